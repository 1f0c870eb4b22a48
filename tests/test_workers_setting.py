"""KAPOK_WORKERS: how many API worker processes `kapok serve` starts."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("value", "want"), [(None, "cpu_count"), ("", "cpu_count"), (" 3 ", 3)])
def test_unset_or_empty_means_one_per_core(monkeypatch, value, want):
    from serving.service import _workers

    if value is None:
        monkeypatch.delenv("KAPOK_WORKERS", raising=False)
    else:
        monkeypatch.setenv("KAPOK_WORKERS", value)
    assert _workers() == want


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_a_bad_value_stops_with_a_message_naming_the_setting(monkeypatch, value):
    from serving.service import _workers

    monkeypatch.setenv("KAPOK_WORKERS", value)
    with pytest.raises(SystemExit, match="KAPOK_WORKERS must be a whole number"):
        _workers()
