"""What the codes in the categorical features mean, in English and Chinese: the one home of these
names for everything that shows a feature's value to a person (reasons, `kapok watch`, reports).

A categorical feature's `unit` in `features.schema` says which table its values come from:
`GB/T 4754 section` (industry), `district` (district of Guangzhou) and `class` (enterprise size).
A unit written as a code table, e.g. the tax-credit rating's `1=A 2=B 3=M 4=C 5=D`, is read by
`codes` instead. A value no table knows is shown as it is.
"""

from __future__ import annotations

import re
from functools import cache

Label = tuple[str, str]  # (English, Chinese)

# GB/T 4754-2017 门类 (sections) of the national industry classification.
INDUSTRY_SECTIONS: dict[str, Label] = {
    "A": ("Agriculture, forestry, animal husbandry, fishery", "农、林、牧、渔业"),
    "B": ("Mining", "采矿业"),
    "C": ("Manufacturing", "制造业"),
    "D": ("Electricity, heat, gas and water production and supply",
          "电力、热力、燃气及水生产和供应业"),
    "E": ("Construction", "建筑业"),
    "F": ("Wholesale and retail trade", "批发和零售业"),
    "G": ("Transport, storage and postal services", "交通运输、仓储和邮政业"),
    "H": ("Accommodation and catering", "住宿和餐饮业"),
    "I": ("Information transmission, software and IT services", "信息传输、软件和信息技术服务业"),
    "J": ("Finance", "金融业"),
    "K": ("Real estate", "房地产业"),
    "L": ("Leasing and business services", "租赁和商务服务业"),
    "M": ("Scientific research and technical services", "科学研究和技术服务业"),
    "N": ("Water conservancy, environment and public facilities management",
          "水利、环境和公共设施管理业"),
    "O": ("Resident services, repair and other services", "居民服务、修理和其他服务业"),
    "P": ("Education", "教育"),
    "Q": ("Health and social work", "卫生和社会工作"),
    "R": ("Culture, sports and entertainment", "文化、体育和娱乐业"),
    "S": ("Public administration, social security and social organisations",
          "公共管理、社会保障和社会组织"),
    "T": ("International organisations", "国际组织"),
}  # fmt: skip

# The districts of Guangzhou (广州市), by the name the registration table uses, with their
# administrative division codes (digits 3-8 of a USCC) as aliases.
_DISTRICTS: tuple[tuple[str, str, str], ...] = (
    ("440103", "Liwan", "荔湾区"),
    ("440104", "Yuexiu", "越秀区"),
    ("440105", "Haizhu", "海珠区"),
    ("440106", "Tianhe", "天河区"),
    ("440111", "Baiyun", "白云区"),
    ("440112", "Huangpu", "黄埔区"),
    ("440113", "Panyu", "番禺区"),
    ("440114", "Huadu", "花都区"),
    ("440115", "Nansha", "南沙区"),
    ("440117", "Conghua", "从化区"),
    ("440118", "Zengcheng", "增城区"),
)
DISTRICTS: dict[str, Label] = {
    key: (name, zh) for code, name, zh in _DISTRICTS for key in (name, code, zh)
}

# Enterprise size classes (中小企业划型标准).
SIZE_CLASSES: dict[str, Label] = {
    "micro": ("micro", "微型"),
    "small": ("small", "小型"),
    "medium": ("medium", "中型"),
    "large": ("large", "大型"),
}

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
