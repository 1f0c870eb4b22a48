"""The fixed facts of the simulated region: industries, districts, products, publication lags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Industry:
    code: str  # GB/T 4754-2017 section
    name: str
    name_zh: str
    weight: float  # share of enterprises
    base_risk: float  # shift of permanent quality (negative = riskier)
    macro_beta: float  # sensitivity to the city-wide cycle
    meter_share: float  # share of firms with their own electricity meter
    energy_intensity: float  # kWh per CNY of monthly revenue
    dso_days: float  # typical days sales outstanding
    summer_power: float  # extra summer electricity (air conditioning, cold chains)


INDUSTRIES: tuple[Industry, ...] = (
    Industry("A", "Agriculture, forestry, animal husbandry, fishery", "农、林、牧、渔业",
             0.03, -0.15, 0.5, 0.70, 0.08, 45, 0.10),
    Industry("C", "Manufacturing", "制造业", 0.22, 0.00, 0.9, 0.95, 0.12, 75, 0.08),
    Industry("E", "Construction", "建筑业", 0.08, -0.20, 1.0, 0.60, 0.03, 110, 0.05),
    Industry("F", "Wholesale and retail trade", "批发和零售业",
             0.30, -0.05, 0.7, 0.45, 0.01, 40, 0.15),
    Industry("G", "Transport, storage and postal services", "交通运输、仓储和邮政业",
             0.06, -0.05, 0.8, 0.70, 0.03, 60, 0.12),
    Industry("H", "Accommodation and catering", "住宿和餐饮业",
             0.08, -0.25, 1.1, 0.80, 0.05, 10, 0.25),
    Industry("I", "Information transmission, software and IT services", "信息传输、软件和信息技术服务业",
             0.08, 0.15, 0.4, 0.25, 0.01, 80, 0.10),
    Industry("L", "Leasing and business services", "租赁和商务服务业",
             0.08, -0.05, 0.6, 0.30, 0.01, 60, 0.10),
    Industry("M", "Scientific research and technical services", "科学研究和技术服务业",
             0.04, 0.15, 0.3, 0.35, 0.02, 90, 0.10),
    Industry("O", "Resident services, repair and other services", "居民服务、修理和其他服务业",
             0.03, -0.10, 0.6, 0.50, 0.03, 15, 0.15),
)  # fmt: skip


@dataclass(frozen=True)
class District:
    code: str  # administrative division code, digits 3-8 of the USCC
    name: str
    name_zh: str
    weight: float
    base_risk: float


DISTRICTS: tuple[District, ...] = (
    District("440103", "Liwan", "荔湾区", 0.08, 0.00),
    District("440104", "Yuexiu", "越秀区", 0.09, 0.05),
    District("440105", "Haizhu", "海珠区", 0.10, 0.00),
    District("440106", "Tianhe", "天河区", 0.14, 0.08),
    District("440111", "Baiyun", "白云区", 0.16, -0.08),
    District("440112", "Huangpu", "黄埔区", 0.09, 0.05),
    District("440113", "Panyu", "番禺区", 0.13, 0.00),
    District("440114", "Huadu", "花都区", 0.07, -0.05),
    District("440115", "Nansha", "南沙区", 0.05, 0.03),
    District("440117", "Conghua", "从化区", 0.03, -0.10),
    District("440118", "Zengcheng", "增城区", 0.06, -0.05),
)

SIZE_CLASSES = ("micro", "small", "medium")
SIZE_SHARES = (0.70, 0.25, 0.05)
# median annual revenue (CNY) and employees by size class
SIZE_REVENUE = (2.0e6, 1.5e7, 8.0e7)
SIZE_EMPLOYEES = (5.0, 30.0, 150.0)

PRODUCTS = ("microloan", "guarantee", "insurance")

# Tax-credit ratings published each April for the previous year; M is for newly established firms.
TAX_RATINGS = ("A", "B", "M", "C", "D")

# Day of the following month on which each monthly source publishes month m.
PUBLICATION_DAY = {
    "payments": 3,
    "electricity": 5,
    "social_insurance": 10,
    "credit_history": 10,
    "tax": 15,
    "receivables_payables": 20,
}
