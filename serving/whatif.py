"""What-if: "what would get this approved?" for one enterprise and one product. Read only.

Two answers, both from the decision core (`serving.core.decide`) on copies of the enterprise's
stored feature row, with the current model and policy:

(a) the grid: the decision at other amounts and terms the caller gives (at most MAX_CELLS
    cells), one core call for every cell (only the request-time features change);
(b) the smallest change to the features the enterprise can act on (`Feature.actionable` in
    features/schema.py: paying overdue tax, collecting overdue receivables, paying down debt)
    that moves a decline or refer to approve. Each actionable feature moves in STEPS (25%, 50%,
    75%, 100% of the way to its bound). One core call decides every set of actionable
    features moved all the way (and each feature alone at each step); the fewest features that
    approve win; a second call decides every step combination of those sets, and the smallest
    total move that approves is proposed, each change with the PD it gives alone. A knock-out
    that rests on a feature the enterprise cannot act on (court enforcement, a young firm) means
    no actionable change helps, and the answer says so rather than suggest one.

Nothing is decided and nothing is written to the decision log: the answer is an estimate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from features.schema import ACTIONABLE, Feature
from serving import columnar_policy as cp
from serving import core
from serving import policy as pol
from serving.api_models import MAX_WHATIF_CELLS
from serving.reasons import descriptions, shown

if TYPE_CHECKING:
    from serving.engine import EnterpriseFeatures, LendingEngine

MAX_CELLS = MAX_WHATIF_CELLS  # amounts x terms in one what-if grid
STEPS = (0.25, 0.5, 0.75, 1.0)  # how far along the way to its bound a feature is moved
MAX_REFINE_ROWS = 4096  # step combinations decided in the refining call
NOTE = "an estimate from the current model and policy; not a decision or an offer"
NOTE_ZH = "根据当前模型与政策的估算；不是审批决定，也不是要约"


class WhatIfInputError(ValueError):
    """A what-if request that cannot be answered as asked; `field` names the part at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


# -- (a) the grid ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    amounts: tuple[float, ...]
    terms: tuple[int, ...]

    @property
    def cells(self) -> list[tuple[float, int]]:
        return [(a, t) for a in self.amounts for t in self.terms]


def grid_for(
    product: pol.ProductPolicy,
    amount: float,
    term: int,
    amounts: Sequence[float] | None = None,
    terms: Sequence[int] | None = None,
    *,
    default: bool = False,
) -> Grid:
    """The grid to decide: the caller's amounts and terms (either missing: the requested one),
    or with `default` and neither given, the requested amount, 75% and 50% of it at the requested
    term and 12, 24 and 36 months (within the product's range). WhatIfInputError for a term or
    an amount outside the product's range, an amount that is not a positive number, or more
    than MAX_CELLS cells."""
    check_term(product, term, "term_months")
    check_amount(product, amount, "amount")
    if default and amounts is None and terms is None:
        amounts = [amount] + [round(amount * f / 1000) * 1000.0 for f in (0.75, 0.5)]
        amounts = [a for a in amounts if pol.amount_outside(product, a) is None]
        terms = [term] + [
            t for t in (12, 24, 36) if product.term_months_min <= t <= product.term_months_max
        ]
    amounts = [amount] if amounts is None else list(amounts)
    terms = [term] if terms is None else list(terms)
    if not amounts or not terms:
        which = "grid.amounts" if not amounts else "grid.terms"
        raise WhatIfInputError(f"{which}: give at least one value", which)
    for i, a in enumerate(amounts):
        check_amount(product, a, f"grid.amounts[{i}]")
    for i, t in enumerate(terms):
        check_term(product, t, f"grid.terms[{i}]")
    amounts_ = tuple(sorted(set(map(float, amounts)), reverse=True))
    terms_ = tuple(sorted(set(terms)))
    cells = len(amounts_) * len(terms_)
    if cells > MAX_CELLS:
        raise WhatIfInputError(
            f"grid: at most {MAX_CELLS} cells (amounts x terms), got {len(amounts_)} amounts x "
            f"{len(terms_)} terms = {cells}",
            "grid",
        )
    return Grid(amounts_, terms_)


def check_term(product: pol.ProductPolicy, term: Any, field: str) -> None:
    problem = pol.term_outside(product, term)
    if problem:
        raise WhatIfInputError(f"{field} {problem}", field)


def check_amount(product: pol.ProductPolicy, amount: Any, field: str) -> None:
    ok = isinstance(amount, int | float) and not isinstance(amount, bool)
    if not ok or not math.isfinite(amount) or amount <= 0:
        raise WhatIfInputError(f"{field} must be a positive number of CNY, got {amount!r}", field)
    problem = pol.amount_outside(product, amount)
    if problem:
        raise WhatIfInputError(f"{field} {problem}", field)


@dataclass(frozen=True)
class Cell:
    """One cell of the grid as the core decides it."""

    amount: float
    term_months: int
    decision: str
    pd: float
    score: float
    grade: str
    rate_name: str
    rate: float
    within_cap: bool
    limit: float  # the largest amount the policy approves at this term (at most `amount`)
    binding_constraint: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "amount": self.amount,
            "term_months": self.term_months,
            "decision": self.decision,
            "pd": round(self.pd, 6),
            "score": round(self.score, 1),
            "grade": self.grade,
            "rate_name": self.rate_name,
            "rate": round(self.rate, 6),
            "within_cap": self.within_cap,
            "limit": self.limit,
            "binding_constraint": self.binding_constraint,
        }


def stored_row(d: core.Decisions, r: int = 0) -> pl.DataFrame:
    """Row r's stored features (the request's amount and term left out)."""
    return d.frame.select([c for c in d.frame.columns if c not in core.REQUEST_COLUMNS])[r]


def copies(row: pl.DataFrame, amounts: Sequence[float], terms: Sequence[int]) -> pl.DataFrame:
    """One stored feature row repeated for every (amount, term), as the core reads requests."""
    n = len(amounts)
    return row.select(pl.all().gather([0] * n)).with_columns(
        pl.Series("requested_amount", list(amounts), pl.Float64),
        pl.Series("term_months", list(terms), pl.Int64),
    )


def decide_grid(d: core.Decisions, grid: Grid) -> list[Cell]:
    """Every cell of the grid, from the stored features of row 0 of `d`: one core call."""
    amounts, terms = zip(*grid.cells, strict=True)
    g = core.decide(d.model, copies(stored_row(d), amounts, terms), d.policy, reasons="none",
                    limits=True)  # fmt: skip
    assert g.limits is not None
    rate_name = pol.HEADLINE_RATE[d.product.name]
    return [
        Cell(
            amount=float(amounts[r]),
            term_months=int(terms[r]),
            decision=str(g.decision[r]),
            pd=float(g.pd[r]),
            score=float(g.score[r]),
            grade=str(g.grade[r]),
            rate_name=rate_name,
            rate=float(g.price.rate[r]),
            within_cap=bool(g.price.within_cap[r]),
            limit=float(g.limits.limit[r]),
            binding_constraint=str(g.limits.binding[r]),
        )
        for r in range(len(g))
    ]


# -- (b) the smallest actionable change -----------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """One feature moved: from its stored value to the proposed one."""

    feature: Feature
    current: float
    proposed: float
    share: float  # of the way from the current value to the actionable bound
    pd_alone: float  # the PD with this change only
    decision_alone: str

    def as_dict(self) -> dict[str, Any]:
        move = self.feature.actionable
        assert move is not None
        name = self.feature.name
        (en, zh), (a_en, a_zh) = descriptions(name), shown(name, _plain(self.current))
        b_en, b_zh = shown(name, _plain(self.proposed))
        return {
            "feature": self.feature.name,
            "action": move.action,
            "action_zh": move.action_zh,
            "current_value": _plain(self.current),
            "proposed_value": _plain(self.proposed),
            "share_of_way": round(self.share, 4),
            "text_en": f"{en}: from {a_en} to {b_en}",
            "text_zh": f"{zh}：由{a_zh}调整为{b_zh}",
            "pd_alone": round(self.pd_alone, 6),
            "decision_alone": self.decision_alone,
        }


@dataclass(frozen=True)
class Changes:
    """The search's answer. status: `approved_already` (nothing to change), `found` (the
    changes approve), `out_of_reach` (no actionable change approves; best_pd is the lowest PD
    reached), `blocked` (a knock-out on a feature the enterprise cannot act on)."""

    status: str
    message: str
    pd_before: float
    decision_before: str
    changes: tuple[Change, ...] = ()
    final_pd: float | None = None
    final_decision: str | None = None
    best_pd: float | None = None
    blocked_by: tuple[str, ...] = ()
    candidates: int = 0  # rows the search decided

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "pd_before": round(self.pd_before, 6),
            "decision_before": self.decision_before,
            "changes": [c.as_dict() for c in self.changes],
            "final_pd": None if self.final_pd is None else round(self.final_pd, 6),
            "final_decision": self.final_decision,
            "best_pd": None if self.best_pd is None else round(self.best_pd, 6),
            "blocked_by": list(self.blocked_by),
            "candidates_decided": self.candidates,
        }


@dataclass(frozen=True)
class _Moves:
    feature: Feature
    current: float
    values: tuple[float, ...]  # the stepped values, the last the bound; increasing moves

    def share(self, value: float) -> float:
        bound = self.values[-1]
        return abs(value - self.current) / abs(bound - self.current)


def moves_of(row: dict[str, Any], features: Sequence[Feature], steps: Sequence[float]) -> list:
    """Each actionable feature with room to move (known, not yet at its bound), and the values
    STEPS of the way to the bound reach (whole numbers for a count or flag, rounded towards the
    current value, so that no step moves further than it says)."""
    out: list[_Moves] = []
    for f in features:
        move, value = f.actionable, row.get(f.name)
        if move is None or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        current = float(value)
        if (move.bound - current) * move.direction <= 0:
            continue  # at or past its bound already
        values: list[float] = []
        for s in steps:
            v = current + s * (move.bound - current)
            if f.dtype == "int":
                v = float(math.ceil(v) if move.direction < 0 else math.floor(v))
            if v != current and v not in values:
                values.append(v)
        if values:
            out.append(_Moves(f, current, tuple(values)))
    return out


def _with(row: pl.DataFrame, settings: list[dict[str, float]], amount: float, term: int):
    """Copies of the stored row, each with its features set to the given values."""
    frame = copies(row, [amount] * len(settings), [term] * len(settings))
    names = sorted({name for s in settings for name in s})
    columns = []
    for name in names:
        old = frame.get_column(name).cast(pl.Float64).to_numpy().copy()
        for i, s in enumerate(settings):
            if name in s:
                old[i] = s[name]
        columns.append(pl.Series(name, old).cast(frame.schema[name]))
    return frame.with_columns(columns) if columns else frame


def _plain(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def blocking_knockouts(d: core.Decisions, r: int = 0) -> list[tuple[pol.KnockoutRule, bool]]:
    """The knock-outs on row r that no actionable change clears: a rule that fired on a
    feature the enterprise cannot act on, or on a missing value (which no action fills in);
    with each, whether it fired because the value is missing."""
    actionable = {f.name for f in ACTIONABLE}
    out = []
    for i, rule in enumerate(d.policy.knockout_rules):
        if d.knockouts.fired[r, i] and (
            d.knockouts.missing[r, i] or rule.feature not in actionable
        ):
            out.append((rule, bool(d.knockouts.missing[r, i])))
    return out


def smallest_changes(d: core.Decisions, r: int = 0, steps: Sequence[float] = STEPS) -> Changes:
    """The fewest actionable features, moved the least, that turn row r's decline or refer into
    approve (no knock-out, PD at or below the approve cut-off, price within the cap)."""
    prod = d.product
    pd0, decision0 = float(d.pd[r]), str(d.decision[r])
    if d.severity[r] == cp.APPROVE:
        return Changes("approved_already", "approved as it stands: nothing to change", pd0,
                       decision0, final_pd=pd0, final_decision=decision0)  # fmt: skip
    blockers = blocking_knockouts(d, r)
    if blockers:
        said = "; ".join(
            f"{rule.missing_code if missing else rule.code} "
            f"({rule.missing_text_en if missing else rule.text_en}) rests on {rule.feature}"
            + (" being unknown" if missing else ", which the enterprise cannot change soon")
            for rule, missing in blockers
        )
        codes = tuple(rule.missing_code if m else rule.code for rule, m in blockers)
        return Changes("blocked", f"no actionable change helps: knock-out {said}", pd0, decision0,
                       blocked_by=codes)  # fmt: skip
    row = stored_row(d, r)
    used = set(d.model.index) | {rule.feature for rule in d.policy.knockout_rules}
    moves = moves_of(row.row(0, named=True), [f for f in ACTIONABLE if f.name in used], steps)
    if not moves:
        return Changes("out_of_reach", "no actionable change is within reach: none of the "
                       "features the enterprise can act on has room to move", pd0, decision0,
                       best_pd=pd0)  # fmt: skip
    amount, term = float(d.amount[r]), int(d.term[r])

    # call 1: every set of features moved all the way, and each feature alone at each step
    subsets = [c for k in range(1, len(moves) + 1) for c in itertools.combinations(moves, k)]
    singles = [(m, v) for m in moves for v in m.values]
    settings = [{m.feature.name: m.values[-1] for m in s} for s in subsets]
    settings += [{m.feature.name: v} for m, v in singles]
    first = core.decide(d.model, _with(row, settings, amount, term), d.policy, reasons="none")
    ok = (first.severity == cp.APPROVE) & np.array([e is None for e in first.error])
    alone = {(m.feature.name, v): (float(first.pd[len(subsets) + i]),
                                   str(first.decision[len(subsets) + i]))
             for i, (m, v) in enumerate(singles)}  # fmt: skip
    decided = len(settings)
    sizes = [len(s) for s in subsets]
    fits = [i for i in range(len(subsets)) if ok[i]]
    if not fits:
        best = int(np.argmin(first.pd))
        short = []
        if first.pd[best] > prod.approve_max_pd:
            short.append(f"above the approve cut-off {prod.approve_max_pd:.4f}")
        if not first.price.within_cap[best]:
            short.append("priced above the cap")
        if first.knockouts.worst[best] > cp.APPROVE:
            short.append("a knock-out still applies")
        return Changes(
            "out_of_reach",
            f"no actionable change within reach approves: the lowest PD reached is "
            f"{first.pd[best]:.4f} ({first.decision[best]}), " + " and ".join(short),
            pd0, decision0, best_pd=float(first.pd[best]), candidates=decided,
        )  # fmt: skip
    fewest = min(sizes[i] for i in fits)
    sets = sorted((i for i in fits if sizes[i] == fewest), key=lambda i: first.pd[i])

    # call 2: every step combination of the smallest sets that approve, the least moved wins
    chosen: list[tuple[tuple[_Moves, ...], tuple[float, ...]]] = []
    for i in sets:
        options = list(itertools.product(*(m.values for m in subsets[i])))
        if chosen and len(chosen) + len(options) > MAX_REFINE_ROWS:
            break
        chosen += [(subsets[i], values) for values in options]
    combos = [{m.feature.name: v for m, v in zip(ms, vs, strict=True)} for ms, vs in chosen]
    second = core.decide(d.model, _with(row, combos, amount, term), d.policy, reasons="none")
    decided += len(combos)
    good = np.flatnonzero(
        (second.severity == cp.APPROVE) & np.array([e is None for e in second.error])
    )
    total = [sum(m.share(v) for m, v in zip(ms, vs, strict=True)) for ms, vs in chosen]
    pick = min(good.tolist(), key=lambda j: (round(total[j], 9), float(second.pd[j])))
    ms, vs = chosen[pick]
    changes = tuple(
        Change(m.feature, m.current, v, m.share(v), *alone[(m.feature.name, v)])
        for m, v in zip(ms, vs, strict=True)
    )
    final = float(second.pd[pick])
    actions = "; ".join(f"{c.feature.actionable.action.lower()} ({c.as_dict()['text_en']})"  # type: ignore[union-attr]
                        for c in changes)  # fmt: skip
    return Changes(
        "found",
        f"estimated to approve if the enterprise were to {actions}; PD {pd0:.4f} -> {final:.4f} "
        f"(approve cut-off {prod.approve_max_pd:.4f})",
        pd0, decision0, changes, final, str(second.decision[pick]), final, candidates=decided,
    )  # fmt: skip


# -- one enterprise, from the online store ---------------------------------------------------------
@dataclass(frozen=True)
class WhatIf:
    enterprise_id: str
    product: str
    amount: float
    term_months: int
    current: dict[str, Any]  # engine.outcome of the requested amount and term
    grid: list[Cell]
    changes: Changes

    def as_dict(self) -> dict[str, Any]:
        """The answer of POST /whatif."""
        from serving.reasons import reasons_json

        a = self.current
        feats: EnterpriseFeatures = a["features"]
        price: pol.Price = a["price"]
        return {
            "estimate": True,
            "note": NOTE,
            "note_zh": NOTE_ZH,
            "enterprise_id": self.enterprise_id,
            "product": self.product,
            "model_name": a["model"].name,
            "model_version": a["model"].version,
            "features_as_of": feats.as_of,
            "amount": self.amount,
            "term_months": self.term_months,
            "current": {
                "decision": a["decision"].decision,
                "pd": round(a["pd"], 6),
                "score": round(a["score"], 1),
                "grade": a["grade"],
                "rate_name": price.rate_name,
                "rate": round(price.rate, 6),
                "within_cap": price.within_cap,
                "policy_path": a["decision"].path,
                "reasons": reasons_json(a["reasons"]),
            },
            "grid": [c.as_dict() for c in self.grid],
            "changes": self.changes.as_dict(),
        }


def what_if(
    engine: LendingEngine,
    enterprise_id: str,
    product: str,
    amount: float,
    term: int,
    amounts: Sequence[float] | None = None,
    terms: Sequence[int] | None = None,
) -> WhatIf:
    """The what-if of one enterprise from the online store, as the API would decide it: the
    current decision (the same core call as /score), the grid (the default grid when neither
    amounts nor terms are given) and the smallest actionable change. Reads only: nothing is
    logged. EnterpriseNotFound, core.DecisionInputError (stored values no policy can use),
    WhatIfInputError (a bad grid or term)."""
    from serving.engine import EnterpriseNotFound, outcome

    engine.model(product)  # ValueError naming the products
    grid = grid_for(engine.policy.product(product), amount, term, amounts, terms, default=True)
    decided = engine._decide_online(product, [(enterprise_id, amount, term)])
    if decided is None:
        raise EnterpriseNotFound(enterprise_id)
    d, [(_, feats)] = decided
    current = outcome(d, 0, feats)  # DecisionInputError when the stored values cannot be used
    return WhatIf(enterprise_id, product, amount, term, current, decide_grid(d, grid),
                  smallest_changes(d))  # fmt: skip
