"""The fixed facts of the simulated region: how its industries, districts and size classes behave,
and its products. Their codes and names, and the publication days, are the raw tables' contract
(`features.raw_tables`)."""

from __future__ import annotations

from dataclasses import dataclass

from features import raw_tables


@dataclass(frozen=True)
class Industry:
    code: str  # GB/T 4754-2017 section, a key of raw_tables.INDUSTRY_SECTIONS
    weight: float  # share of enterprises
    base_risk: float  # shift of permanent quality (negative = riskier)
    macro_beta: float  # sensitivity to the city-wide cycle
    meter_share: float  # share of firms with their own electricity meter
    energy_intensity: float  # kWh per CNY of monthly revenue
    dso_days: float  # typical days sales outstanding
    summer_power: float  # extra summer electricity (air conditioning, cold chains)

    @property
    def name(self) -> str:
        return raw_tables.INDUSTRY_SECTIONS[self.code][0]

    @property
    def name_zh(self) -> str:
        return raw_tables.INDUSTRY_SECTIONS[self.code][1]


INDUSTRIES: tuple[Industry, ...] = (
    Industry("A", 0.03, -0.15, 0.5, 0.70, 0.08, 45, 0.10),
    Industry("C", 0.22, 0.00, 0.9, 0.95, 0.12, 75, 0.08),
    Industry("E", 0.08, -0.20, 1.0, 0.60, 0.03, 110, 0.05),
    Industry("F", 0.30, -0.05, 0.7, 0.45, 0.01, 40, 0.15),
    Industry("G", 0.06, -0.05, 0.8, 0.70, 0.03, 60, 0.12),
    Industry("H", 0.08, -0.25, 1.1, 0.80, 0.05, 10, 0.25),
    Industry("I", 0.08, 0.15, 0.4, 0.25, 0.01, 80, 0.10),
    Industry("L", 0.08, -0.05, 0.6, 0.30, 0.01, 60, 0.10),
    Industry("M", 0.04, 0.15, 0.3, 0.35, 0.02, 90, 0.10),
    Industry("O", 0.03, -0.10, 0.6, 0.50, 0.03, 15, 0.15),
)


_DISTRICT_NAMES = {code: (name, zh) for code, name, zh in raw_tables.DISTRICTS}


@dataclass(frozen=True)
class District:
    code: str  # administrative division code, digits 3-8 of the USCC (raw_tables.DISTRICTS)
    weight: float
    base_risk: float

    @property
    def name(self) -> str:  # what the registration table holds
        return _DISTRICT_NAMES[self.code][0]

    @property
    def name_zh(self) -> str:
        return _DISTRICT_NAMES[self.code][1]


DISTRICTS: tuple[District, ...] = (
    District("440103", 0.08, 0.00),
    District("440104", 0.09, 0.05),
    District("440105", 0.10, 0.00),
    District("440106", 0.14, 0.08),
    District("440111", 0.16, -0.08),
    District("440112", 0.09, 0.05),
    District("440113", 0.13, 0.00),
    District("440114", 0.07, -0.05),
    District("440115", 0.05, 0.03),
    District("440117", 0.03, -0.10),
    District("440118", 0.06, -0.05),
)

SIZE_CLASSES = ("micro", "small", "medium")  # of raw_tables.SIZE_CLASSES: no large firms
SIZE_SHARES = (0.70, 0.25, 0.05)
# median annual revenue (CNY) and employees by size class
SIZE_REVENUE = (2.0e6, 1.5e7, 8.0e7)
SIZE_EMPLOYEES = (5.0, 30.0, 150.0)

PRODUCTS = ("microloan", "guarantee", "insurance")
