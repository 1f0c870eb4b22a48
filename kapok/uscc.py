"""Unified Social Credit Codes (统一社会信用代码, GB 32100-2015): the one validator and generator.

An USCC has 18 characters: registration authority (1), entity type (1), administrative division
(6 digits), organisation code (9, itself ending in a GB 11714 check character) and a final check
character computed over the first 17 with weights 3^i mod 31.
"""

from __future__ import annotations

import numpy as np

ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"  # 31 characters: no I, O, S, V, Z
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
_WEIGHTS = tuple(pow(3, i, 31) for i in range(17))
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)


class USCCError(ValueError):
    """An enterprise id that is not a valid Unified Social Credit Code."""


def check_character(first17: str) -> str:
    """The GB 32100 check character for the first 17 characters of a code."""
    total = sum(_VALUE[c] * w for c, w in zip(first17, _WEIGHTS, strict=True))
    return ALPHABET[(31 - total % 31) % 31]


def validate(code: object) -> str:
    """Return the normalised code (stripped, upper case) or raise USCCError saying what is wrong."""
    if not isinstance(code, str):
        raise USCCError(f"enterprise_id must be a string, got {type(code).__name__}")
    text = code.strip().upper()
    if len(text) != 18:
        raise USCCError(f"enterprise_id must have 18 characters, got {len(text)}: {code!r}")
    bad = sorted({c for c in text if c not in _VALUE})
    if bad:
        raise USCCError(
            f"enterprise_id {code!r} contains characters not allowed in a USCC: "
            + ", ".join(c if c.isprintable() and not c.isspace() else repr(c) for c in bad)
        )
    if not text[2:8].isdigit():
        raise USCCError(
            f"enterprise_id {code!r}: characters 3-8 must be the 6-digit administrative division"
        )
    expected = check_character(text[:17])
    if text[17] != expected:
        raise USCCError(
            f"enterprise_id {code!r} fails the GB 32100 check: last character should be "
            f"{expected!r}, got {text[17]!r}"
        )
    return text


def is_valid(code: object) -> bool:
    try:
        validate(code)
    except USCCError:
        return False
    return True


def _org_check(base8: str) -> str:
    total = sum(int(c) * w for c, w in zip(base8, _ORG_WEIGHTS, strict=True))
    value = 11 - total % 11
    return "X" if value == 10 else "0" if value == 11 else str(value)


def generate(
    index: np.ndarray, division_codes: np.ndarray, entity_types: np.ndarray, seed: int
) -> list[str]:
    """Deterministic, unique codes for enterprise numbers `index` (< 10**8).

    The 8-digit organisation number is an affine bijection of the index modulo 10**8, so codes are
    unique for distinct indices and do not reveal the generation order.
    """
    multiplier = 48_271 * 2 + 1  # odd and not divisible by 5: invertible modulo 10**8
    offset = (seed * 7_919_311) % 10**8
    numbers = (index.astype(np.int64) * multiplier + offset) % 10**8
    codes = []
    for number, division, kind in zip(
        numbers.tolist(), division_codes.tolist(), entity_types.tolist(), strict=True
    ):
        base8 = f"{number:08d}"
        first17 = f"9{kind}{division}{base8}{_org_check(base8)}"
        codes.append(first17 + check_character(first17))
    return codes
