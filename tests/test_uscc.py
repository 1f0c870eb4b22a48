"""Enterprise ids: Unified Social Credit Codes with a correct GB 32100 check character."""

import numpy as np
import pytest

from kapok import uscc


def _codes(n: int = 25) -> list[str]:
    return uscc.generate(np.arange(n) * 7919, np.full(n, "440106"), np.full(n, "1"), seed=3)


def test_generated_codes_are_valid_and_unique():
    codes = uscc.generate(np.arange(5000), np.full(5000, "440113"), np.full(5000, "1"), seed=1)
    assert all(uscc.is_valid(c) for c in codes)
    assert len(set(codes)) == 5000
    assert all(len(c) == 18 and c[2:8] == "440113" for c in codes)


@pytest.mark.parametrize("code", ["91350100M000100Y43", "91110000802100433B"])
def test_published_codes_pass(code):
    assert uscc.validate(code) == code
    assert uscc.validate(code.lower() + " ") == code  # normalised: stripped, upper case


def test_every_single_character_corruption_fails():
    checked = 0
    for code in _codes():
        for position in range(18):
            for replacement in uscc.ALPHABET + "IOSVZ":
                if replacement == code[position]:
                    continue
                corrupted = code[:position] + replacement + code[position + 1 :]
                assert not uscc.is_valid(corrupted), (code, position, replacement)
                checked += 1
    assert checked == 25 * 18 * 35


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("9144010632611062", "18 characters"),
        ("91440106326110621I", "not allowed"),
        ("9144A106326110621P", "administrative division"),
        ("91440106326110621Q", "check"),
        (12345, "must be a string"),
    ],
)
def test_errors_say_what_is_wrong(bad, message):
    with pytest.raises(uscc.USCCError, match=message):
        uscc.validate(bad)
