"""Request-time features computed from what the applicant asks for and two stored features.

The Feast on-demand view `request_features` (features/feast_defs.py) computes the same values for
training; Feast requires that function to be self-contained, so this is the serving path's copy,
tested against Feast's output.
"""

from __future__ import annotations

import math


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or (isinstance(den, float) and math.isnan(den)) or den <= 0:
        return None
    if isinstance(num, float) and math.isnan(num):
        return None
    return float(num) / float(den)


def request_features(
    requested_amount: float, term_months: int, tax_sales_12m: float | None,
    pay_inflow_3m: float | None,
) -> dict[str, float | int | None]:  # fmt: skip
    monthly_inflow = None if pay_inflow_3m is None else float(pay_inflow_3m) / 3
    return {
        "req_loan_to_sales_12m": _ratio(requested_amount, tax_sales_12m),
        "req_installment_to_inflow": _ratio(_ratio(requested_amount, term_months), monthly_inflow),
        "req_term_months": int(term_months),
    }
