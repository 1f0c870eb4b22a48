"""The columnar decision core: a frame of N requests in, N decisions out.

Every decision path calls `decide`: the API with one row, /screen with up to 1,000, batch jobs
with chunks of up to millions. One LightGBM call gives the margins (or the exact TreeSHAP
contributions, whose sum is the margin) of all N rows; calibration, score, grade, knock-outs,
price, decision and reasons are array operations (serving/columnar_policy.py). The limit search
runs the reference's bisection over the CNY 1,000 grid for every row in lockstep, one model call
per step for all rows and all three PD-dependent constraints.

`serving.policy` and `serving.reasons.reasons_from` stay the per-row reference: a property test
holds this module to them, and `Decisions.decision(r)`, `.limit(r)` etc. return the reference's
own dataclasses so the API and the decision log show exactly what they always did.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl

from features.schema import FEATURES
from serving import columnar_policy as cp
from serving import policy as pol
from serving.model import ProductModel
from serving.reasons import MAX_REASONS, Reason, knockout_reasons, reason

REQUEST_COLUMNS = ("requested_amount", "term_months")
LOAN_TO_SALES = "req_loan_to_sales_12m"
INSTALLMENT_TO_INFLOW = "req_installment_to_inflow"
TERM = "req_term_months"
REQUEST_FEATURES = (LOAN_TO_SALES, INSTALLMENT_TO_INFLOW, TERM)
# The stored features as the core reads them, in schema order and types (request-time ones are
# computed here, from the amount and term)
STORED_SCHEMA: dict[str, type[pl.DataType]] = {
    f.name: {"float": pl.Float64, "int": pl.Int64, "string": pl.String}[f.dtype] for f in FEATURES
}
LIMIT_STEP = 1000.0
SPECULATE_ROWS = 256  # below this many open searches, probe several bisection levels per call
Explain = Literal["all", "adverse", "none"] | bool
_ORDER = pol._BINDING_ORDER
_ZERO_ORDER = pol._ZERO_ORDER


class DecisionInputError(ValueError):
    """A request the core cannot decide (a missing column, a negative amount); names the field."""


# the stored numeric features and the values each can take at all (features/schema.py)
_BOUNDED = [(f.name, *f.bounds) for f in FEATURES if f.dtype != "string"]


def impossible_values(
    columns: dict[str, np.ndarray], n: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per row None, or why its stored features cannot be decided on: the first feature whose
    value no source can report, an infinity or a value outside the feature's bounds (a
    negative amount or count, a share above 1). NaN is missing, which the model handles.
    With the columns, where such values are NaN from here on: the row is an error, and no
    infinity reaches the policy's arithmetic."""
    error = np.full(n, None, dtype=object)
    present = [(name, lo, hi) for name, lo, hi in _BOUNDED if name in columns]
    if not n or not present:
        return error, columns
    x = np.stack([columns[name] for name, _, _ in present])
    lo = np.array([b[1] for b in present])[:, None]
    hi = np.array([b[2] for b in present])[:, None]
    with np.errstate(invalid="ignore"):
        bad = np.isinf(x) | (x < lo) | (x > hi)
    if not bad.any():
        return error, columns
    for r in np.flatnonzero(bad.any(axis=0)).tolist():
        k = int(np.argmax(bad[:, r]))
        name, low, high = present[k]
        error[r] = _fault(name, float(x[k, r]), low, high)
    cleaned = dict(columns)
    for k in np.flatnonzero(bad.any(axis=1)).tolist():
        name = present[k][0]
        cleaned[name] = np.where(bad[k], np.nan, x[k])
    return error, cleaned


def _fault(name: str, value: float, low: float, high: float) -> str:
    if math.isinf(value):
        return f"feature {name} is {'+' if value > 0 else '-'}inf, not a value any source reports"
    if low == 0 and value < 0:
        return f"feature {name} is negative ({value:,.2f})"
    return f"feature {name} is {value:,.2f}, outside the values it can take ({low:g} to {high:g})"


def future_snapshots(
    error: np.ndarray, stamps: pl.DataFrame, families: list[str], now: dt.datetime | None = None
) -> None:
    """Mark in `error` (rows without an error yet) the rows whose feature snapshot is stamped
    after now, with a minute for clock skew: a clock or a load that is wrong, not a risk.
    `stamps`: one column per family (in `families`' order) of snapshot times, null for none."""
    if not stamps.height:
        return
    now = now or dt.datetime.now(dt.UTC)
    limit = now + CLOCK_SKEW
    latest = stamps.select(pl.max_horizontal(pl.all())).to_series()
    if latest.dtype == pl.Datetime and latest.dtype.time_zone is None:  # type: ignore[union-attr]
        latest = latest.dt.replace_time_zone("UTC")
    ahead = (latest > limit).fill_null(False).to_numpy()
    for r in np.flatnonzero(ahead).tolist():
        if error[r] is not None:
            continue
        for family, stamp in zip(families, stamps.row(r), strict=True):
            if stamp is None:
                continue
            stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)
            if stamp > limit:
                error[r] = (
                    f"the {family} snapshot is stamped {stamp:%Y-%m-%dT%H:%M:%SZ}, in the "
                    f"future (now {now:%Y-%m-%dT%H:%M:%SZ})"
                )
                break


CLOCK_SKEW = dt.timedelta(minutes=1)


def request_features(
    amount: np.ndarray, term: np.ndarray, sales: np.ndarray, inflow: np.ndarray
) -> dict[str, np.ndarray]:
    """The request-time features (features/request.py) for every row; NaN where undefined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        to_sales = np.where(sales > 0, amount / sales, np.nan)
        monthly = inflow / 3.0
        to_inflow = np.where(monthly > 0, (amount / term) / monthly, np.nan)
    return {LOAN_TO_SALES: to_sales, INSTALLMENT_TO_INFLOW: to_inflow, TERM: term}


def numeric_columns(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    """Every numeric column as float64 with NaN for missing (Series.to_numpy: no query plan,
    which costs more than the data for the API's one row)."""
    out = {}
    for name, dtype in frame.schema.items():
        if dtype.is_numeric():
            out[name] = frame.get_column(name).to_numpy().astype(np.float64, copy=False)
    return out


def _column(columns: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    found = columns.get(name)
    return np.full(n, np.nan) if found is None else found


def _codes(column: pl.Series, codes: Mapping[str, float]) -> np.ndarray:
    """Category codes as the model learned them; unknown and missing values are NaN."""
    if len(column) <= 64:  # a dictionary lookup beats building a query for the API's few rows
        return np.array([codes.get(str(v), np.nan) if v is not None else np.nan
                         for v in column.to_list()], dtype=np.float64)  # fmt: skip
    return (
        column.cast(pl.String)
        .replace_strict(dict(codes), default=None, return_dtype=pl.Float64)
        .to_numpy()
        .astype(np.float64, copy=False)
    )


class Matrix:
    """The model's input matrix for N requests, and the same rows at other amounts."""

    def __init__(
        self,
        model: ProductModel,
        frame: pl.DataFrame,
        columns: Mapping[str, np.ndarray],
        request: dict[str, np.ndarray],
    ):
        x = np.full((frame.height, len(model.scorer.features)), np.nan)
        for name, i in model.index.items():
            if name in request:
                x[:, i] = request[name]
            elif name in model.codes:
                if name in frame.columns:
                    x[:, i] = _codes(frame.get_column(name), model.codes[name])
            elif name in columns:
                x[:, i] = columns[name]
        self.x = x
        self.model = model
        self.to_sales = model.index.get(LOAN_TO_SALES)
        self.to_inflow = model.index.get(INSTALLMENT_TO_INFLOW)

    def at_amounts(
        self,
        rows: np.ndarray,
        amounts: np.ndarray,
        term: np.ndarray,
        sales: np.ndarray,
        inflow: np.ndarray,
    ) -> np.ndarray:
        """PD of `rows` at `amounts` (only the loan-burden features change with the amount)."""
        x = self.x[rows]
        req = request_features(amounts, term[rows], sales[rows], inflow[rows])
        if self.to_sales is not None:
            x[:, self.to_sales] = req[LOAN_TO_SALES]
        if self.to_inflow is not None:
            x[:, self.to_inflow] = req[INSTALLMENT_TO_INFLOW]
        return self.model.scorer.calibrator(self.model.margin(x))


@dataclass
class Limits:
    """The limit of every row (`policy.limit` in columns); see `Decisions.limit(r)`."""

    limit: np.ndarray  # CNY, 0 when none is offered
    binding: np.ndarray  # object: the binding constraint or knock-out code
    constraints: np.ndarray  # N x 6 in policy._BINDING_ORDER; NaN rows: none computed
    pd_at_limit: np.ndarray  # NaN when the limit is 0
    price: cp.Prices  # at the limit (meaningful where limit > 0)
    severity: np.ndarray  # decide() at the limit
    pd_at_minimum: np.ndarray  # PD at amount_min, for the decision of a zero limit
    within_cap_at_minimum: np.ndarray
    top_of_range: np.ndarray  # pd_cutoff approves up to the product maximum
    reference: dict[int, pol.Limit]  # rows the reference decided (PD not monotone in amount)


@dataclass
class Decisions:
    """N decisions as arrays; the row methods return the reference's dataclasses."""

    model: ProductModel
    policy: pol.Policy
    product: pol.ProductPolicy
    frame: pl.DataFrame  # the requests, stored features as given
    amount: np.ndarray
    term: np.ndarray
    sales: np.ndarray
    inflow: np.ndarray
    request: dict[str, np.ndarray]  # request-time features
    margin: np.ndarray
    pd: np.ndarray
    score: np.ndarray
    grade: np.ndarray  # object
    knockouts: cp.Knockouts
    price: cp.Prices
    severity: np.ndarray  # int8: approve / refer / decline
    contributions: np.ndarray | None  # exact TreeSHAP: one row per explained request
    explained: np.ndarray | None  # per request: its row in `contributions`, -1 if not explained
    reason_features: np.ndarray | None  # N x MAX_REASONS model feature index, -1 for none
    limits: Limits | None
    error: np.ndarray  # object: None, or why the row cannot be decided

    def __len__(self) -> int:
        return len(self.pd)

    @property
    def decision(self) -> np.ndarray:
        return cp.OUTCOMES[self.severity]

    def values(self, r: int) -> dict[str, Any]:
        """Row r's feature values as the decision log keeps them (stored + request-time)."""
        values = self.frame.row(r, named=True)
        for name in REQUEST_COLUMNS:
            values.pop(name, None)
        for name, column in self.request.items():
            v = column[r]
            values[name] = int(v) if name == TERM else (None if math.isnan(v) else float(v))
        return values

    def rows(self) -> list[dict[str, Any]]:
        """Every row's values (one conversion for the whole frame)."""
        out = self.frame.to_dicts()
        for row in out:
            for name in REQUEST_COLUMNS:
                row.pop(name, None)
        for name, column in self.request.items():
            items = column.tolist()
            if name == TERM:
                items = [int(v) for v in items]
            else:
                items = [None if v != v else v for v in items]
            for row, v in zip(out, items, strict=True):
                row[name] = v
        return out

    def features_json(self) -> list[str]:
        """Every row's values (what `rows()` gives) as the decision log stores them: JSON text
        with sorted keys, NaN and infinities as null, encoded by polars in one call (a Python
        encoding of ~60 values costs ~50 µs a record)."""
        columns = {c: self.frame[c] for c in self.frame.columns if c not in REQUEST_COLUMNS}
        for name, column in self.request.items():
            columns[name] = pl.Series(name, column, dtype=pl.Int64 if name == TERM else None)
        frame = pl.DataFrame([columns[c] for c in sorted(columns)])
        return frame.select(pl.struct(pl.all()).struct.json_encode()).to_series().to_list()

    def knockout_list(self, r: int, values: Mapping[str, Any] | None = None) -> list[pol.Knockout]:
        return self.knockouts.rows(r, values if values is not None else self.values(r), self.policy)

    def reasons(self, r: int, values: Mapping[str, Any] | None = None) -> list[Reason]:
        """Knock-outs first, then the features that raised the risk most; at most four."""
        values = values if values is not None else self.values(r)
        out = knockout_reasons(self.knockout_list(r, values))
        row = self.contribution(r)
        if row is not None and self.reason_features is not None:
            names = self.model.scorer.features
            for i in self.reason_features[r]:
                if i < 0 or len(out) >= MAX_REASONS:
                    break
                out.append(reason(names[i], values.get(names[i]), float(row[i])))
        return out[:MAX_REASONS]

    def contribution(self, r: int) -> np.ndarray | None:
        """Row r's exact TreeSHAP (features, then the base value), None if not explained."""
        if self.contributions is None or self.explained is None or self.explained[r] < 0:
            return None
        return self.contributions[self.explained[r]]

    def price_row(self, r: int) -> pol.Price:
        return self.price.row(r)

    def decision_row(self, r: int, values: Mapping[str, Any] | None = None) -> pol.Decision:
        """The decision with its policy path, as `policy.decide` words it."""
        kos = self.knockout_list(r, values)
        made = pol.decide(
            float(self.pd[r]), self.product, kos, price_ok=bool(self.price.within_cap[r])
        )
        if made.decision != cp.OUTCOMES[self.severity[r]]:  # the core and the reference disagree
            raise ArithmeticError(
                f"row {r}: columnar decision {cp.OUTCOMES[self.severity[r]]} != {made.decision}"
            )
        return made

    def limit(self, r: int, values: Mapping[str, Any] | None = None) -> pol.Limit:
        """Row r's limit as `policy.limit` returns it."""
        lim = self.limits
        if lim is None:
            raise ValueError("decide(..., limits=True) computes limits")
        if r in lim.reference:
            return lim.reference[r]
        prod, step = self.product, LIMIT_STEP
        kos = self.knockout_list(r, values)
        term, requested = int(self.term[r]), float(self.amount[r])
        notes: list[str] = []
        binding = str(lim.binding[r])
        known = not np.isnan(lim.constraints[r, 0])
        constraints = (
            {name: float(lim.constraints[r, i]) for i, name in enumerate(_ORDER)} if known else {}
        )
        if known:
            if math.isnan(self.sales[r]):
                notes.append(f"{pol.SALES_FEATURE} missing: revenue_capacity not applied")
            if math.isnan(self.inflow[r]):
                notes.append(f"{pol.INFLOW_FEATURE} missing: debt_service_capacity not applied")
            if lim.top_of_range[r]:
                hi_amount = math.floor(prod.amount_max / step + 1e-9) * step
                notes.append(f"pd_cutoff: approves up to the product maximum {hi_amount:,.0f}")
        amount = float(lim.limit[r])
        if amount <= 0:
            lo_amount = math.ceil(prod.amount_min / step - 1e-9) * step
            if binding in {k.code for k in kos if k.action == "decline"}:
                text = f"knock-out {binding}: no limit is offered"
                steps = pol._knockout_steps(kos)
            else:
                if binding == "TERM_OUT_OF_RANGE":
                    text = (
                        f"term {term} months outside {prod.term_months_min}-{prod.term_months_max}"
                    )
                elif binding == "pd_cutoff":
                    text = f"no amount from {lo_amount:,.0f} passes the cut-offs and the cap"
                else:
                    text = (
                        f"{binding} {constraints[binding]:,.0f} is below the product minimum "
                        f"{lo_amount:,.0f}"
                    )
                at_min = float(lim.pd_at_minimum[r]), bool(lim.within_cap_at_minimum[r])
                steps = pol._steps(at_min[0], prod, kos, at_min[1], term, prod.amount_min)
            if binding not in {s[0] for s in steps}:
                steps.append(("LIMIT_BELOW_MINIMUM", "decline", f"limit 0 ({binding}): {text}"))
            notes.append(text)
            return pol.Limit(0.0, binding, constraints, None, None, {}, None, pol._finish(steps),
                             kos, notes, prod.name, term, requested, step)  # fmt: skip
        q = lim.price.row(r)
        decision = pol.decide(
            q.pd, prod, kos, price_ok=q.within_cap, term_months=term, amount=amount
        )
        refers = [k.code for k in kos if k.action == "refer"]
        if refers:
            notes.append(f"limit applies once a credit officer clears: {', '.join(refers)}")
        return pol.Limit(amount, binding, constraints, q.pd, q.rate, q.parts(), q, decision, kos,
                         notes, prod.name, term, requested, step)  # fmt: skip


def decide(
    model: ProductModel,
    requests: pl.DataFrame,
    policy: pol.Policy,
    *,
    reasons: Explain = "all",
    limits: bool = False,
) -> Decisions:
    """Decide every row of `requests`: stored features (any missing column is unknown) plus
    requested_amount and term_months. `limits` runs the limit search.

    `reasons`: "all" (True) explains every row with exact TreeSHAP, as the API does; "adverse"
    only the rows referred or declined — the decisions a lender must give reasons for — which
    saves most of a batch's time (TreeSHAP costs ~200x a prediction); "none" (False) none.
    PDs are the same either way (the contributions add up to the margin)."""
    explain = {True: "all", False: "none"}.get(reasons, reasons)  # type: ignore[call-overload]
    if explain not in ("all", "adverse", "none"):
        raise DecisionInputError(f"reasons must be all, adverse or none, got {reasons!r}")
    for name in REQUEST_COLUMNS:
        if name not in requests.columns:
            raise DecisionInputError(f"requests lack the column {name}")
    n = requests.height
    product = policy.product(model.product)
    amount = requests.get_column("requested_amount").cast(pl.Float64).to_numpy()
    term = requests.get_column("term_months").cast(pl.Int64).to_numpy()
    if n and (np.isnan(amount).any() or (amount < 0).any() or np.isinf(amount).any()):
        raise DecisionInputError("requested_amount must be a finite number >= 0 on every row")
    if requests.get_column("term_months").null_count() or (n and (term < 1).any()):
        raise DecisionInputError("term_months must be a whole number >= 1 on every row")
    error, columns = impossible_values(numeric_columns(requests), n)
    sales = _column(columns, pol.SALES_FEATURE, n)
    inflow = _column(columns, pol.INFLOW_FEATURE, n)
    request = request_features(amount, term, sales, inflow)
    matrix = Matrix(model, requests, columns, request)

    contrib = explained = reason_idx = None
    if explain == "all":
        contrib = model.contributions(matrix.x)
        margin = contrib.sum(axis=1)
        explained = np.arange(n)
    else:
        margin = model.margin(matrix.x)
    pd_ = model.scorer.calibrator(margin)

    kos = cp.knockouts(columns, n, policy)
    price = cp.prices(pd_, amount, term, product, sales, policy)
    severity = cp.decide(pd_, product, kos.worst, price.within_cap)
    if explain == "adverse":
        rows = np.flatnonzero(severity > cp.APPROVE)
        contrib = model.contributions(matrix.x[rows])
        explained = np.full(n, -1, dtype=np.int64)
        explained[rows] = np.arange(len(rows))
    if contrib is not None and explained is not None:
        reason_idx = np.full((n, MAX_REASONS), -1, dtype=np.int64)
        reason_idx[explained >= 0] = top_reasons(contrib[:, :-1], model.scorer.features)
    d = Decisions(
        model=model, policy=policy, product=product, frame=requests, amount=amount, term=term,
        sales=sales, inflow=inflow, request=request, margin=margin, pd=pd_,
        score=cp.score_points(pd_, policy), grade=cp.grades(pd_, policy), knockouts=kos,
        price=price, severity=severity, contributions=contrib, explained=explained,
        reason_features=reason_idx,
        limits=None, error=error,
    )  # fmt: skip
    if limits:
        d.limits = limit_search(d, matrix)
    return d


def top_reasons(contrib: np.ndarray, names: list[str]) -> np.ndarray:
    """The MAX_REASONS features with the largest positive contribution per row, ties by name
    (model feature indices; -1 where fewer features raised the risk)."""
    by_name = np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)
    c = contrib[:, by_name]
    key = np.where(c > 0, -np.round(c, 12), np.inf)
    k = min(MAX_REASONS, c.shape[1])
    if k == 0:
        return np.full((len(c), MAX_REASONS), -1, dtype=np.int64)
    # the k smallest keys per row, then ordered by (key, name); a full sort costs more
    part = np.argpartition(key, k - 1, axis=1)[:, :k]
    part_key = np.take_along_axis(key, part, 1)
    order = np.take_along_axis(part, np.lexsort((part, part_key), axis=1), 1)
    # a tie at the k-th key may have left a name-earlier feature outside the partition
    kth = part_key.max(axis=1)
    tied = np.isfinite(kth) & (
        (key == kth[:, None]).sum(axis=1) > (part_key == kth[:, None]).sum(axis=1)
    )
    if tied.any():
        order[tied] = np.argsort(key[tied], axis=1, kind="stable")[:, :k]
    positive = np.take_along_axis(c, order, 1) > 0
    out = np.full((len(c), MAX_REASONS), -1, dtype=np.int64)
    out[:, :k] = np.where(positive, by_name[order], -1)
    return out


class _Probe:
    """PD of (row, grid index) pairs, one model call per batch of probes, deduplicated."""

    def __init__(self, d: Decisions, matrix: Matrix, step: float):
        self.d, self.matrix, self.step = d, matrix, step

    def pd(self, rows: np.ndarray, ks: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.empty(0)
        key = rows.astype(np.int64) * (1 << 32) + ks.astype(np.int64)
        unique, inverse = np.unique(key, return_inverse=True)
        urows, uks = unique >> 32, unique & ((1 << 32) - 1)
        d = self.d
        pds = self.matrix.at_amounts(urows, uks * self.step, d.term, d.sales, d.inflow)
        return pds[inverse]


class _Checks:
    """The limit's PD-dependent constraints, each a predicate on (row, amount, PD)."""

    NAMES = ("pd_cutoff", "expected_loss_budget", "debt_service_capacity")

    def __init__(self, d: Decisions):
        self.d = d
        prod = d.product
        self.payment = prod.debt_service_ratio * np.maximum(d.inflow, 0.0) / 3.0

    def quote(self, rows: np.ndarray, amounts: np.ndarray, pds: np.ndarray) -> cp.Prices:
        d = self.d
        return cp.prices(pds, amounts, d.term[rows], d.product, d.sales[rows], d.policy)

    def borrower_rate(self, q: cp.Prices) -> np.ndarray:
        prod = self.d.product
        return q.all_in_rate if prod.assumed_loan_rate is None else prod.assumed_loan_rate + q.rate

    def ok(self, name: str, rows: np.ndarray, amounts: np.ndarray, pds: np.ndarray) -> np.ndarray:
        prod = self.d.product
        if name == "pd_cutoff":
            return cp.approves(pds, prod, self.quote(rows, amounts, pds).within_cap)
        if name == "expected_loss_budget":
            return pds * prod.lgd * amounts <= prod.expected_loss_budget * (1 + pol._EPS)
        rate = self.borrower_rate(self.quote(rows, amounts, pds))
        payment = cp.annuity_payment(amounts, rate, self.d.term[rows])
        return payment <= self.payment[rows] * (1 + pol._EPS)

    def closed(self, name: str, rows: np.ndarray, amounts: np.ndarray, pds: np.ndarray):
        """The constraint's own value where the grid cannot show it (below or above it)."""
        prod = self.d.product
        if name == "expected_loss_budget":
            with np.errstate(divide="ignore"):
                return np.where(pds > 0, prod.expected_loss_budget / (pds * prod.lgd), amounts)
        rate = self.borrower_rate(self.quote(rows, amounts, pds))
        return cp.max_principal(self.payment[rows], rate, self.d.term[rows])


def _largest(
    probe: _Probe,
    checks: _Checks,
    rows: dict[str, np.ndarray],
    segments: list[tuple[int, int]],
) -> dict[str, np.ndarray]:
    """policy._largest for every check and row at once: the largest grid index whose amount
    passes, or -1; bisection within each segment, every check's probes in one model call."""
    result = {name: np.full(len(r), -1, dtype=np.int64) for name, r in rows.items()}
    pending = {name: np.ones(len(r), dtype=bool) for name, r in rows.items()}
    step = probe.step

    def evaluate(asks: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """ok() of each check at (positions into rows[name], grid index)."""
        names = [n for n in asks if len(asks[n][0])]
        if not names:
            return {n: np.empty(0, dtype=bool) for n in asks}
        all_rows = np.concatenate([rows[n][asks[n][0]] for n in names])
        all_ks = np.concatenate([asks[n][1] for n in names])
        pds = probe.pd(all_rows, all_ks)
        out, at = {n: np.empty(0, dtype=bool) for n in asks}, 0
        for n in names:
            m = len(asks[n][0])
            r = rows[n][asks[n][0]]
            out[n] = checks.ok(n, r, asks[n][1] * step, pds[at : at + m])
            at += m
        return out

    for seg_lo, seg_hi in reversed(segments):
        if seg_hi < seg_lo:
            continue
        asks = {}
        for name in rows:
            idx = np.flatnonzero(pending[name])
            ends = np.concatenate([np.full(len(idx), seg_lo), np.full(len(idx), seg_hi)])
            asks[name] = (np.concatenate([idx, idx]), ends)
        oks = evaluate(asks)
        lo: dict[str, np.ndarray] = {}
        hi: dict[str, np.ndarray] = {}
        active: dict[str, np.ndarray] = {}
        for name in rows:
            idx = np.flatnonzero(pending[name])
            ok_lo, ok_hi = oks[name][: len(idx)], oks[name][len(idx) :]
            top = idx[ok_lo & ok_hi]
            result[name][top] = seg_hi
            pending[name][top] = False
            inside = idx[ok_lo & ~ok_hi]  # ok(lo), not ok(hi): bisect here
            pending[name][inside] = False
            active[name] = inside
            lo[name] = np.full(len(inside), seg_lo, dtype=np.int64)
            hi[name] = np.full(len(inside), seg_hi, dtype=np.int64)
        while True:
            going = {name: np.flatnonzero(hi[name] - lo[name] > 1) for name in rows}
            busy = sum(len(g) for g in going.values())
            if not busy:
                break
            # the next `depth` levels of every bisection at once (all 2^depth - 1 midpoints it
            # may visit): the same probes bisection makes, in fewer model calls for a few rows
            depth = int(np.clip(np.log2(max(SPECULATE_ROWS / busy, 1.0)), 1, 5))
            trees = {name: _midpoints(lo[name][g], hi[name][g], depth) for name, g in going.items()}
            asks = {}
            for name, g in going.items():
                points = trees[name]
                probed = points.ravel() >= 0
                who = np.repeat(active[name][g], points.shape[1])
                asks[name] = (who[probed], points.ravel()[probed])
            oks = evaluate(asks)
            for name, g in going.items():
                points = trees[name]
                flat = np.zeros(points.size, dtype=bool)
                flat[points.ravel() >= 0] = oks[name]
                good = flat.reshape(points.shape)
                lo[name][g], hi[name][g] = _walk(lo[name][g], hi[name][g], points, good, depth)
        for name in rows:
            result[name][active[name]] = lo[name]
    return result


def _midpoints(lo: np.ndarray, hi: np.ndarray, depth: int) -> np.ndarray:
    """Every midpoint the next `depth` bisection steps may probe, per row, in heap order
    (node i has children 2i+1 and 2i+2; -1 where the interval is already closed)."""
    if len(lo) == 0:
        return np.empty((0, 2**depth - 1), dtype=np.int64)
    levels = []
    los, his = lo[:, None], hi[:, None]
    for _ in range(depth):
        open_ = his - los > 1
        mid = (los + his) // 2
        levels.append(np.where(open_, mid, -1))
        left_hi, right_lo = np.where(open_, mid, his), np.where(open_, mid, los)
        los = np.stack([los, right_lo], axis=2).reshape(len(lo), -1)
        his = np.stack([left_hi, his], axis=2).reshape(len(lo), -1)
    return np.concatenate(levels, axis=1)


def _walk(
    lo: np.ndarray, hi: np.ndarray, points: np.ndarray, good: np.ndarray, depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bisection's `depth` steps through the probed midpoints: ok(mid) moves lo up, else hi
    down, exactly as one probe at a time would."""
    lo, hi = lo.copy(), hi.copy()
    node = np.zeros(len(lo), dtype=np.int64)
    rows = np.arange(len(lo))
    for _ in range(depth):
        mid = points[rows, node]
        open_ = (mid >= 0) & (hi - lo > 1)
        ok = good[rows, node]
        lo = np.where(open_ & ok, mid, lo)
        hi = np.where(open_ & ~ok, mid, hi)
        node = np.where(ok, 2 * node + 2, 2 * node + 1)
        node = np.minimum(node, points.shape[1] - 1)
    return lo, hi


def limit_search(d: Decisions, matrix: Matrix) -> Limits:
    """policy.limit for every row: the smallest of the policy cap, revenue capacity, debt-service
    capacity, expected-loss budget, PD cut-off and the request, on the CNY 1,000 grid."""
    prod, policy, step, n = d.product, d.policy, LIMIT_STEP, len(d)
    k_lo = math.ceil(prod.amount_min / step - 1e-9)
    k_hi = math.floor(prod.amount_max / step + 1e-9)
    lo_amount, hi_amount = k_lo * step, k_hi * step
    breaks: list[float] = []
    if prod.name == "guarantee" and policy.caps.guarantee_government_backed:
        breaks.append(policy.caps.guarantee_large_amount)

    limit = np.zeros(n)
    binding = np.full(n, None, dtype=object)
    constraints = np.full((n, len(_ORDER)), np.nan)
    top_of_range = np.zeros(n, dtype=bool)
    reference: dict[int, pol.Limit] = {}

    declines = d.knockouts.severity == cp.DECLINE
    first = declines.argmax(axis=1) if declines.shape[1] else np.zeros(n, dtype=np.int64)
    has_decline = declines.any(axis=1)
    rules = policy.knockout_rules
    if rules:  # the first declining rule's code, or its missing_code when it fired on a gap
        declined = np.flatnonzero(has_decline)
        rule_at = first[declined]
        codes = np.array([rule.code for rule in rules], dtype=object)
        missing_codes = np.array([rule.missing_code for rule in rules], dtype=object)
        on_gap = d.knockouts.missing[declined, rule_at]
        binding[declined] = np.where(on_gap, missing_codes[rule_at], codes[rule_at])
    term_ok = (d.term >= prod.term_months_min) & (d.term <= prod.term_months_max)
    binding[~has_decline & ~term_ok] = "TERM_OUT_OF_RANGE"
    search = np.flatnonzero(~has_decline & term_ok)
    probe, checks = _Probe(d, matrix, step), _Checks(d)

    if k_hi < k_lo:  # a policy whose range holds no grid point: the reference words it
        fallback = list(search)
        search = np.empty(0, dtype=np.int64)
    else:
        fallback = []
    if len(search):
        rows = {"pd_cutoff": search, "expected_loss_budget": search,
                "debt_service_capacity": search[~np.isnan(d.inflow[search])]}  # fmt: skip
        found = _largest(probe, checks, rows, pol.grid_segments(k_lo, k_hi, step, breaks))
        col = {name: i for i, name in enumerate(_ORDER)}
        c = constraints[search]
        c[:, col["requested_amount"]] = d.amount[search]
        c[:, col["policy_cap"]] = prod.policy_cap
        s = d.sales[search]
        c[:, col["revenue_capacity"]] = np.where(
            np.isnan(s), math.inf, prod.sales_multiple * np.maximum(s, 0.0)
        )
        c[:, col["debt_service_capacity"]] = math.inf
        k = found["pd_cutoff"]
        c[:, col["pd_cutoff"]] = np.where(k < 0, 0.0, k * step)
        top_of_range[search] = k == k_hi
        for name in ("expected_loss_budget", "debt_service_capacity"):
            r_rows, k = rows[name], found[name]
            edge = np.where(k < 0, k_lo, k_hi)
            at = np.flatnonzero((k < 0) | (k == k_hi))
            value = k * step
            if len(at):
                pds = probe.pd(r_rows[at], edge[at])
                amounts = edge[at] * step
                shut = checks.closed(name, r_rows[at], amounts, pds)
                value = value.astype(np.float64)
                value[at] = np.where(k[at] < 0, shut, np.maximum(shut, hi_amount))
            c[np.searchsorted(search, r_rows), col[name]] = value  # r_rows: sorted, in search
        raw = c.min(axis=1)
        amount = np.floor(raw / step + 1e-9) * step
        zero = amount < lo_amount
        first_zero = np.argmax(c[:, [col[x] for x in _ZERO_ORDER]] < lo_amount, axis=1)
        first_equal = np.argmax(c == raw[:, None], axis=1)
        names = np.array(_ORDER, dtype=object)
        zero_names = np.array(_ZERO_ORDER, dtype=object)
        binding[search] = np.where(zero, zero_names[first_zero], names[first_equal])
        constraints[search] = c
        limit[search] = np.where(zero, 0.0, amount)

        # verify: every PD-dependent check holds at the returned amount; where one does not
        # (PD not monotone in the amount), the reference searches that row again
        positive = search[~zero]
        if len(positive):
            pds = probe.pd(positive, np.round(limit[positive] / step).astype(np.int64))
            good = np.ones(len(positive), dtype=bool)
            for name in _Checks.NAMES:
                applies = (
                    ~np.isnan(d.inflow[positive])
                    if name == "debt_service_capacity"
                    else good | True
                )
                held = checks.ok(name, positive, limit[positive], pds)
                good &= held | ~applies
            fallback.extend(int(r) for r in positive[~good])

    pd_at_limit = np.full(n, np.nan)
    has_limit = limit > 0
    hit = np.flatnonzero(has_limit)
    if len(hit):
        pd_at_limit[hit] = probe.pd(hit, np.round(limit[hit] / step).astype(np.int64))
    at_min = np.flatnonzero(~has_limit & ~has_decline)
    pd_min = np.full(n, np.nan)
    if len(at_min):
        pd_min[at_min] = matrix.at_amounts(at_min, np.full(len(at_min), prod.amount_min),
                                           d.term, d.sales, d.inflow)  # fmt: skip
    safe_pd = np.where(np.isnan(pd_at_limit), 0.0, pd_at_limit)
    price = cp.prices(safe_pd, limit, d.term, prod, d.sales, policy)
    severity = np.where(
        has_limit, cp.decide(safe_pd, prod, d.knockouts.worst, price.within_cap), cp.DECLINE
    ).astype(np.int8)
    q_min = cp.prices(np.where(np.isnan(pd_min), 0.0, pd_min), np.full(n, prod.amount_min),
                      d.term, prod, d.sales, policy)  # fmt: skip

    for r in fallback:
        ref = pol.limit(
            _pd_of_amount(matrix, d, r), float(d.amount[r]), int(d.term[r]), prod,
            _limit_features(d, r), policy, step=step,
        )  # fmt: skip
        reference[r] = ref
        limit[r], binding[r] = ref.limit, ref.binding
        pd_at_limit[r] = np.nan if ref.pd_at_limit is None else ref.pd_at_limit
        severity[r] = cp.ACTION_SEVERITY[ref.decision.decision]
    return Limits(limit, binding, constraints, pd_at_limit, price, severity, pd_min,
                  q_min.within_cap, top_of_range, reference)  # fmt: skip


def _pd_of_amount(matrix: Matrix, d: Decisions, r: int) -> Callable[[float], float]:
    def pd_of(amount: float) -> float:
        rows = np.array([r])
        return float(matrix.at_amounts(rows, np.array([amount]), d.term, d.sales, d.inflow)[0])

    return pd_of


def _limit_features(d: Decisions, r: int) -> dict[str, Any]:
    """What policy.limit reads of a row: the knock-out features and sales and inflow."""
    names = {rule.feature for rule in d.policy.knockout_rules}
    names |= {pol.SALES_FEATURE, pol.INFLOW_FEATURE}
    return {name: d.frame[name][r] for name in names if name in d.frame.columns}
