"""The lending API's typed requests, answers and error: one pydantic model each.

They validate every request (serving/service.py) and they are the schemas of Kapok's OpenAPI
document and docs page (serving/api_docs.py), so what the page promises is what the server
checks. Answers are built as plain dicts on the hot path; tests validate real answers against
these models, so the documented shape is the served one.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
)
from pydantic_core import PydanticKnownError

from features.schema import PRODUCTS
from kapok import uscc

Product = Literal[PRODUCTS]  # type: ignore[valid-type]  # microloan, guarantee, insurance

EXAMPLE_ID = "91440112554351777N"
MAX_SCREEN = 1000
MAX_QUEUE = 1000


def _uscc(value: str) -> str:
    try:
        return uscc.validate(value)
    except uscc.USCCError as e:
        raise ValueError(str(e)) from None


ProductName = Annotated[Product, Field(description="The lending product.", examples=["microloan"])]
EnterpriseId = Annotated[
    str,
    AfterValidator(_uscc),
    Field(
        description="The enterprise's unified social credit code (统一社会信用代码, "
        "GB 32100-2015): "
        "18 characters, the last a check character.",
        examples=[EXAMPLE_ID],
    ),
]
Amount = Annotated[
    float,
    Field(
        gt=0,
        allow_inf_nan=False,
        strict=True,
        description="Loan, guarantee or insured amount in CNY.",
        examples=[300_000],
    ),
]
Term = Annotated[
    int,
    Field(
        ge=1,
        strict=True,
        description="Term in whole months, within the product's range in the lending policy "
        "(an out-of-range term is a 400 that names the range).",
        examples=[12],
    ),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoanRequest(_Request):
    """One application: which enterprise, which product, how much, how long."""

    enterprise_id: EnterpriseId
    product: ProductName
    requested_amount: Amount
    term_months: Term


class PriceRequest(_Request):
    """The exposure to price."""

    enterprise_id: EnterpriseId
    product: ProductName
    amount: Amount
    term_months: Term


class ExplainRequest(_Request):
    """The decision to explain (amount and term only matter for the request-level features)."""

    enterprise_id: EnterpriseId
    product: ProductName
    requested_amount: Amount = 100_000.0
    term_months: Term = 12


class Applicant(_Request):
    """One applicant of a screened list (its product is the list's)."""

    enterprise_id: EnterpriseId
    requested_amount: Amount
    term_months: Term


def _object_row(row: Any) -> dict[str, Any]:
    """An applicant row must be a JSON object (checked as an Applicant on its own later)."""
    if not isinstance(row, dict):
        raise PydanticKnownError("dict_type")  # "applicants[i]: should be an object, got …"
    return row


# A row of /screen: any JSON object (the document: an Applicant, or any object, since an object
# that is not a valid Applicant is answered in `errors`); anything else fails the whole request.
ApplicantRow = Annotated[
    dict[str, Any], PlainValidator(_object_row, json_schema_input_type=Applicant | dict[str, Any])
]


class ScreenRequest(_Request):
    """A list of applicants for one product. Each applicant is checked on its own: an object
    that is not a valid applicant is reported in `errors` (its field named as
    applicants[i].field) and the others are decided; a row that is not an object at all makes
    the whole request a 400 naming it (applicants[i])."""

    product: ProductName
    applicants: Annotated[
        list[ApplicantRow],
        Field(
            max_length=MAX_SCREEN,
            description=f"Up to {MAX_SCREEN:,} applicants, each a JSON object; one that is not a "
            "valid Applicant is answered in `errors`, the others are decided.",
            examples=[
                [{"enterprise_id": EXAMPLE_ID, "requested_amount": 300_000, "term_months": 12}]
            ],
        ),
    ]


class DecisionRequest(_Request):
    """A logged decision to read back."""

    request_id: Annotated[
        str,
        Field(
            min_length=1,
            max_length=100,
            description="The request_id of an answered /score, /limit, /price or /screen.",
            examples=["req_d905f440373c45eaba39caa7b2ddb28a"],
        ),
    ]


RequestId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=100,
        pattern=r"^[^/.][^/]*$",  # one path segment (req_…, bf_…, <batch id>_<row>)
        description="The request_id of a referred /score, /limit, /price or /screen decision.",
        examples=["req_d905f440373c45eaba39caa7b2ddb28a"],
    ),
]


def _iso_time(value: Any) -> Any:
    """A query parameter's time must be ISO 8601 text (pydantic alone also takes a number of
    seconds since 1970, which no one means by `until=0.5`)."""
    if not isinstance(value, str) or not _ISO_DATE.match(value):
        raise ValueError("should be an ISO 8601 time with an offset, e.g. 2026-12-01T00:00:00Z")
    return value


def _whole_number(value: Any) -> Any:
    """A query parameter's count must be written as a whole number ('1.0' is not one)."""
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError(f"should be a whole number, got {value!r}")
    return value


_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
QueryTime = Annotated[AwareDatetime, BeforeValidator(_iso_time)]


class QueueQuery(_Request):
    """GET /queue's query parameters (all optional)."""

    product: ProductName | None = None
    since: Annotated[
        QueryTime | None,
        Field(
            description="Only referrals decided at or after this time (ISO 8601 with offset).",
            examples=["2026-12-01T00:00:00Z"],
        ),
    ] = None
    until: Annotated[
        QueryTime | None,
        Field(description="Only referrals decided before this time (ISO 8601 with offset)."),
    ] = None
    limit: Annotated[
        int,
        Field(ge=1, le=MAX_QUEUE),
        BeforeValidator(_whole_number),
        Field(
            description=f"At most this many items (1-{MAX_QUEUE:,}); `count` says how many "
            "are open in all.",
            examples=[100],
        ),
    ] = 100


class QueuePath(_Request):
    """POST /queue/{request_id}'s path parameter."""

    request_id: RequestId


class OverrideRequest(_Request):
    """A credit officer's decision on a referred application."""

    decision: Annotated[
        Literal["approve", "decline"],
        Field(description="The officer's decision.", examples=["approve"]),
    ]
    reason: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2000,
            pattern=r"\S",
            description="Why (required, not blank): kept in the decision log with the override.",
            examples=["site visit 2026-12-03: orders from two state-owned buyers confirmed"],
        ),
    ]
    limit: Annotated[
        float | None,
        Field(
            gt=0,
            allow_inf_nan=False,
            description="Approve only: the limit in CNY (default: the original decision's). "
            "At most the product's maximum, its house limit and the amount asked for (422).",
            examples=[200_000],
        ),
    ] = None
    price: Annotated[
        float | None,
        Field(
            gt=0,
            lt=1,
            allow_inf_nan=False,
            description="The headline annual rate / fee / premium as a fraction (default: the "
            "original's); above a legal cap is refused (422).",
            examples=[0.18],
        ),
    ] = None


# -- answers ------------------------------------------------------------------------------------
class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reason(_Answer):
    """A reason code: a feature that raised the risk most, or a knock-out rule that fired."""

    code: str = Field(description="Stable reason code, e.g. R_TAX_PAID_TO_SALES_12M, KO_*.")
    feature: str | None = Field(description="The feature (None for a rule without one).")
    value: Any = Field(description="The feature's value for this enterprise.")
    impact: float | None = Field(description="Its SHAP contribution to the risk, in log-odds.")
    knockout: bool
    text_en: str = Field(description="The reason as a lender reads it, in English.")
    text_zh: str = Field(description="The reason in Chinese.")


class Decision(_Answer):
    """What every decision answers."""

    request_id: str = Field(description="The decision's id in the decision log.")
    product: Product
    model_name: str
    model_version: str = Field(description="The registered model version that decided.")
    features_as_of: str | None = Field(description="Time of the newest feature value used.")
    decided_at: str = Field(description="ISO 8601, UTC.")
    pd: float = Field(ge=0, le=1, description="Calibrated probability of default, 12 months.")
    score: float = Field(description="Points on the score scale (higher is safer).")
    grade: str = Field(description="Master-scale grade.")
    decision: Literal["approve", "refer", "decline"]
    policy_path: list[str] = Field(description="Each policy step taken, in words.")
    reasons: list[Reason] = Field(description="Up to four reasons, knock-outs first.")


class Price(_Answer):
    """A risk-based price, part by part (rates are annual fractions unless named otherwise)."""

    product: Product
    pd: float
    amount: float
    term_months: int
    lgd: float
    expected_loss: float
    expected_loss_lifetime: float
    expected_loss_rate: float
    expected_loss_loading: float
    cost_of_funds: float
    operating_cost: float
    capital_k: float
    capital_charge: float
    margin: float
    rate_name: Literal["annual_rate", "fee_rate", "premium_rate"]
    rate: float
    annual_rate: float | None
    fee_rate: float | None
    premium_rate: float | None
    extra_annual_cost: float
    all_in_rate: float
    cap: float | None = Field(description="The legal cap that applies, or None.")
    within_cap: bool


class ScoreAnswer(Decision):
    """/score."""


class LimitAnswer(Decision):
    """/limit: the largest approvable amount and what binds it."""

    limit: float = Field(ge=0, description="CNY; 0 when nothing can be approved.")
    binding_constraint: str = Field(description="The constraint (or knock-out) that binds.")
    constraints: dict[str, float | None] = Field(description="Every constraint's amount, CNY.")
    pd_at_limit: float | None
    annual_rate: float | None
    rate_parts: dict[str, float]


class PriceAnswer(Decision):
    """/price."""

    price: Price


class Contribution(_Answer):
    feature: str
    value: Any
    missing: bool
    shap_log_odds: float


class ExplainAnswer(_Answer):
    """/explain: base value + contributions = the model's margin (log-odds)."""

    request_id: str
    product: Product
    model_name: str
    model_version: str
    features_as_of: str | None
    decided_at: str
    base_value: float
    margin: float
    pd: float = Field(ge=0, le=1)
    additivity_error: float = Field(ge=0)
    contributions: list[Contribution]


class ScreenRow(Decision):
    enterprise_id: str
    requested_amount: float
    limit: float = Field(ge=0)
    binding_constraint: str
    price: Price


class ErrorDetail(_Answer):
    """What went wrong."""

    code: str = Field(description="Stable machine-readable code, e.g. invalid_request.")
    message: str = Field(description="One line that says what was wrong.")
    field: str | None = Field(
        description="The request field at fault, e.g. applicants[3].term_months; null when no "
        "one field is (always sent)."
    )


class ScreenError(_Answer):
    index: int = Field(description="The applicant's position in the request.")
    enterprise_id: Any
    error: ErrorDetail


class ScreenAnswer(_Answer):
    """/screen: decided applicants ranked riskiest first, and the rows that could not be."""

    product: Product
    ranked: list[ScreenRow]
    errors: list[ScreenError]
    count: int


class DecisionLogEntry(_Answer):
    """/decision: a decision as the log keeps it."""

    request_id: str
    decided_at: str
    caller: str
    endpoint: Literal["score", "limit", "price", "screen", "prospect", "override"]
    enterprise_id: str
    product: Product
    request: dict[str, Any]
    model_name: str
    model_version: str
    features: dict[str, Any]
    feature_timestamps: dict[str, Any]
    pd: float
    score: float
    grade: str
    decision: str
    limit_amount: float | None
    price: dict[str, Any] | None
    reasons: list[Any]
    response: dict[str, Any]


class QueueItem(_Answer):
    """One referred application waiting for an officer."""

    request_id: str = Field(description="The referred decision's id (POST /queue/{request_id}).")
    decided_at: str = Field(description="When the model referred it, ISO 8601 UTC.")
    endpoint: Literal["score", "limit", "price", "screen"]
    caller: str = Field(description="Who asked for the decision (the key's name).")
    product: Product
    enterprise_id: str
    amount: float | None = Field(description="The amount asked for, CNY.")
    term_months: int | None
    limit: float | None = Field(description="The limit the model set (/limit, /screen).")
    pd: float
    score: float
    grade: str
    decision: Literal["refer"]
    knockouts: list[str] = Field(description="The knock-out rules that fired (KO_*).")
    referred_because: list[str] = Field(description="The policy path: each step, in words.")
    reasons: list[Any] = Field(description="The original decision's reasons.")


class QueueAnswer(_Answer):
    """GET /queue: the open referrals, the longest waiting first."""

    order: Literal["oldest first"]
    count: int = Field(ge=0, description="How many referrals are open (matching the filters).")
    items: list[QueueItem]


class OverrideAnswer(_Answer):
    """POST /queue/{request_id}: the override record written to the decision log."""

    request_id: str = Field(description="The override record's own id in the decision log.")
    overrides: str = Field(description="The referred decision it decides.")
    decided_at: str
    officer: str
    enterprise_id: str
    product: Product
    model_decision: Literal["refer"]
    decision: Literal["approve", "decline"]
    reason: str
    limit: float | None = Field(description="The approved limit, CNY (null: none set).")
    price: dict[str, Any] | None
    grade: str
    pd: float


class ErrorBody(_Answer):
    """Every error answers this shape, whatever its status."""

    error: ErrorDetail


# -- what-if (POST /whatif): read only, nothing decided or logged --------------------------------
MAX_WHATIF_CELLS = 20  # amounts x terms in one what-if grid


class WhatIfGrid(_Request):
    """Other amounts and terms to decide (a missing list: the requested amount or term)."""

    amounts: Annotated[
        list[Amount] | None,
        Field(
            min_length=1,
            max_length=MAX_WHATIF_CELLS,
            description="Amounts in CNY.",
            examples=[[100_000, 200_000, 300_000]],
        ),
    ] = None
    terms: Annotated[
        list[Term] | None,
        Field(
            min_length=1,
            max_length=MAX_WHATIF_CELLS,
            description="Terms in whole months, each within the product's range.",
            examples=[[6, 12, 24]],
        ),
    ] = None


class WhatIfRequest(_Request):
    """One enterprise, product, amount and term, and optionally a grid of other amounts and
    terms (at most 20 cells, amounts x terms; without a grid: the requested amount, 75% and 50%
    of it, at the requested term and 12, 24 and 36 months)."""

    enterprise_id: EnterpriseId
    product: ProductName
    amount: Amount
    term_months: Term
    grid: WhatIfGrid | None = None


class WhatIfCurrent(_Answer):
    """The decision at the requested amount and term, as /score would give it (not logged)."""

    decision: Literal["approve", "refer", "decline"]
    pd: float = Field(ge=0, le=1)
    score: float
    grade: str
    rate_name: Literal["annual_rate", "fee_rate", "premium_rate"]
    rate: float
    within_cap: bool
    policy_path: list[str]
    reasons: list[Reason]


class WhatIfCell(_Answer):
    """One amount and term of the grid."""

    amount: float
    term_months: int
    decision: Literal["approve", "refer", "decline"]
    pd: float = Field(ge=0, le=1)
    score: float
    grade: str
    rate_name: Literal["annual_rate", "fee_rate", "premium_rate"]
    rate: float
    within_cap: bool
    limit: float = Field(ge=0, description="The largest amount approved at this term (≤ amount).")
    binding_constraint: str


class WhatIfChange(_Answer):
    """One change the enterprise can make, and the PD it gives on its own."""

    feature: str
    action: str = Field(description="What the enterprise would do, in English.")
    action_zh: str
    current_value: float
    proposed_value: float
    share_of_way: float = Field(gt=0, le=1, description="Of the way to the feature's bound.")
    text_en: str
    text_zh: str
    pd_alone: float = Field(ge=0, le=1, description="The PD with this change only.")
    decision_alone: Literal["approve", "refer", "decline"]


class WhatIfChanges(_Answer):
    """The smallest change to the features the enterprise can act on that would approve."""

    status: Literal["approved_already", "found", "out_of_reach", "blocked"] = Field(
        description="found: the changes approve; out_of_reach: none within reach does (best_pd: "
        "the lowest PD reached); blocked: a knock-out on a feature the enterprise cannot act "
        "on (blocked_by)."
    )
    message: str
    pd_before: float = Field(ge=0, le=1)
    decision_before: Literal["approve", "refer", "decline"]
    changes: list[WhatIfChange]
    final_pd: float | None = Field(ge=0, le=1)
    final_decision: Literal["approve", "refer", "decline"] | None
    best_pd: float | None = Field(ge=0, le=1)
    blocked_by: list[str]
    candidates_decided: int = Field(ge=0)


class WhatIfAnswer(_Answer):
    """/whatif: an estimate from the current model and policy; nothing decided or logged."""

    estimate: Literal[True]
    note: str
    note_zh: str
    enterprise_id: str
    product: Product
    model_name: str
    model_version: str
    features_as_of: str | None
    amount: float
    term_months: int
    current: WhatIfCurrent
    grid: list[WhatIfCell]
    changes: WhatIfChanges
