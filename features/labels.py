"""What the codes in the categorical features mean, in English and Chinese, for everything that
shows a feature's value to a person (reasons, `kapok watch`, reports). The names themselves are
defined with the raw tables' coded columns, in `features.raw_tables`.

A categorical feature's `unit` in `features.schema` says which table its values come from:
`GB/T 4754 section` (industry), `district` (district of Guangzhou) and `class` (enterprise size).
A unit written as a code table, e.g. the tax-credit rating's `1=A 2=B 3=M 4=C 5=D`, is read by
`codes` instead. A value no table knows is shown as it is.
"""

from __future__ import annotations

import re
from functools import cache

from features import raw_tables

Label = raw_tables.Names  # (English, Chinese)

INDUSTRY_SECTIONS: dict[str, Label] = raw_tables.INDUSTRY_SECTIONS
# A district by the name the registration table uses, its division code or its Chinese name.
DISTRICTS: dict[str, Label] = {
    key: (name, zh) for code, name, zh in raw_tables.DISTRICTS for key in (name, code, zh)
}
SIZE_CLASSES: dict[str, Label] = raw_tables.SIZE_CLASSES

BY_UNIT: dict[str, dict[str, Label]] = {
    "GB/T 4754 section": INDUSTRY_SECTIONS,
    "district": DISTRICTS,
    "class": SIZE_CLASSES,
}

_CODE = re.compile(r"(-?\d+)=(\S+)")


@cache
def codes(unit: str) -> dict[int, str]:
    """A code-table unit ("1=A 2=B 3=M 4=C 5=D") as {1: "A", ...}; {} for any other unit."""
    pairs = _CODE.findall(unit)
    if not pairs or " ".join(f"{k}={v}" for k, v in pairs) != unit.strip():
        return {}
    return {int(k): v for k, v in pairs}


def label(unit: str, value: object) -> Label | None:
    """(English, Chinese) name of a categorical value, or None when no table knows it."""
    table = BY_UNIT.get(unit)
    if table is None or not isinstance(value, str):
        return None
    return table.get(value.strip())
