"""`kapok explain REQUEST_ID`: one logged decision, taken apart for a reviewer.

The decision is rebuilt from what the log holds — the model version and the feature values the
engine saw — never from today's features: exact TreeSHAP (LightGBM's pred_contrib) from the base
value to the margin, the additivity and PD checks, the reasons the applicant was given, and the
policy path (knock-outs, cut-offs, price cap and, for /limit, the binding limit constraint).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from features.schema import BY_NAME
from kapok.settings import Paths
from review.html import Document
from serving import policy as pol
from serving.decision_log import DecisionLog, DecisionRecord
from serving.engine import ProductModel
from serving.reasons import shown, shown_in

ADDITIVITY_TOLERANCE = 1e-6  # log-odds; the engine's own check uses the same
PD_TOLERANCE = 1e-9
WATERFALL_ROWS = 12  # features drawn one by one; the rest are summed in one bar
NO_CAP = "no legal cap applies"


@dataclass
class Explanation:
    record: DecisionRecord
    features: list[str]  # model order
    values: dict[str, Any]  # logged feature values
    shap: np.ndarray  # per feature, log-odds
    base: float
    margin: float  # the booster's raw score
    pd: float  # calibrated from the margin
    knockouts: list[pol.Knockout]
    decision: pol.Decision  # the policy re-applied to the replayed PD
    price: pol.Price | None
    product_policy: pol.ProductPolicy

    @property
    def additivity_error(self) -> float:
        return abs(self.base + float(self.shap.sum()) - self.margin)

    @property
    def additive(self) -> bool:
        return self.additivity_error <= ADDITIVITY_TOLERANCE

    @property
    def pd_error(self) -> float:
        return abs(self.pd - float(self.record.pd))

    @property
    def pd_matches(self) -> bool:
        return self.pd_error <= PD_TOLERANCE

    @property
    def same_decision(self) -> bool:
        return self.decision.decision == self.record.decision

    def ranked(self) -> list[tuple[str, Any, float]]:
        """(feature, value, shap) by |shap|, largest first; ties by name."""
        rows = [
            (n, self.values.get(n), float(s)) for n, s in zip(self.features, self.shap, strict=True)
        ]
        return sorted(rows, key=lambda r: (-abs(r[2]), r[0]))

    @property
    def limit(self) -> dict[str, Any] | None:
        """What a /limit (or /screen) response logged about the limit, if anything."""
        response = self.record.response or {}
        if "binding_constraint" not in response and self.record.limit_amount is None:
            return None
        keys = ("limit", "binding_constraint", "constraints", "pd_at_limit", "annual_rate",
                "rate_parts")  # fmt: skip
        return {k: response.get(k) for k in keys}


def explain(
    request_id: str,
    paths: Paths,
    *,
    log: DecisionLog | None = None,
    policy: pol.Policy | None = None,
) -> Explanation:
    """Load a logged decision and its model version; replay it with exact TreeSHAP."""
    from training.pyfunc import load_scorer
    from training.tracking import configure

    log = log or DecisionLog()
    record = log.get(request_id)
    if record is None:
        raise ValueError(f"no decision {request_id!r} in the decision log {log.url}")
    configure(paths)
    scorer = load_scorer(f"models:/{record.model_name}/{record.model_version}")
    model = ProductModel(record.product, record.model_name, record.model_version, scorer)
    values = dict(record.features)
    x = model.row(values)
    contrib = model.contributions(x)[0]
    margin = float(model.margin(x)[0])
    pd_ = float(scorer.calibrator(np.array([margin]))[0])
    policy = policy or pol.load_policy()
    product_policy = policy.product(record.product)
    kos = pol.knockouts(values, policy)
    request = record.request or {}
    price = None
    amount, term = request.get("requested_amount"), request.get("term_months")
    if amount is not None and term is not None:
        price = pol.price(pd_, float(amount), int(term), product_policy,
                          values.get("tax_sales_12m"), policy)  # fmt: skip
    decision = pol.decide(pd_, product_policy, kos, price_ok=price is None or price.within_cap)
    return Explanation(
        record=record,
        features=list(scorer.features),
        values=values,
        shap=np.asarray(contrib[:-1], dtype=float),
        base=float(contrib[-1]),
        margin=margin,
        pd=pd_,
        knockouts=kos,
        decision=decision,
        price=price,
        product_policy=product_policy,
    )


# -- presentation --------------------------------------------------------------------------------
def _shown(value: Any, name: str = "") -> str:
    """A feature's value as the reasons word it (from the schema's unit), in English."""
    return shown(name, value)[0]


def waterfall_figure(e: Explanation, rows: int = WATERFALL_ROWS):
    """Horizontal waterfall in log-odds: from the base value (bottom) to the margin (top)."""
    import matplotlib.pyplot as plt

    ranked = e.ranked()
    top, rest = ranked[:rows], ranked[rows:]
    steps = [(f"{len(rest)} other features", float(sum(r[2] for r in rest)))] if rest else []
    steps += [(f"{n} = {_shown(v, n)}", s) for n, v, s in reversed(top)]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(steps) + 1.8))
    start = e.base
    for y, (_, value) in enumerate(steps):
        color = "#c0392b" if value > 0 else "#2e6da4"
        ax.barh(y, value, left=start, color=color, height=0.6)
        ax.text(start + value, y, f" {value:+.3f}" if value >= 0 else f"{value:+.3f} ",
                va="center", ha="left" if value >= 0 else "right", fontsize=8)  # fmt: skip
        start += value
    ax.set_yticks(range(len(steps)), [s[0] for s in steps], fontsize=8)
    ax.axvline(e.base, color="#777", linestyle=":", linewidth=1)
    ax.axvline(e.margin, color="#222", linestyle="--", linewidth=1)
    ax.set_xlabel(
        f"log-odds of default: base E[f(x)] = {e.base:.3f} -> f(x) = {e.margin:.3f}, "
        f"PD = {e.pd:.3%}"
    )
    ax.set_title("SHAP waterfall (red raises the risk, blue lowers it)", fontsize=10)
    ax.margins(x=0.3)
    fig.tight_layout()
    return fig


def _summary_pairs(e: Explanation) -> list[tuple[str, Any]]:
    r = e.record
    req = r.request or {}
    pairs: list[tuple[str, Any]] = [
        ("request id", r.request_id),
        ("decided at", r.decided_at.isoformat()),
        ("caller / endpoint", f"{r.caller} / {r.endpoint}"),
        ("enterprise", r.enterprise_id),
        ("product", r.product),
        ("requested amount (CNY)", req.get("requested_amount")),
        ("term (months)", req.get("term_months")),
        ("model", f"{r.model_name} v{r.model_version}"),
        ("PD (logged)", f"{r.pd:.6%}"),
        ("score", f"{float(r.score):.1f}"),
        ("grade", r.grade),
        ("decision", r.decision),
    ]
    if r.price:
        name = r.price.get("rate_name", "rate")
        if r.price.get("rate") is not None:
            pairs.append((f"price: {name}", f"{float(r.price['rate']):.4%}"))
        if r.price.get("cap") is not None:
            pairs.append(("price cap (all-in)", f"{float(r.price['cap']):.4%}"))
        elif "cap" in r.price:
            pairs.append(("price cap", NO_CAP))
    if r.limit_amount is not None:
        pairs.append(("limit (CNY)", float(r.limit_amount)))
    return pairs


def _check_lines(e: Explanation) -> tuple[list[str], list[str]]:
    ok, bad = [], []
    total = e.base + float(e.shap.sum())
    line = (f"additivity: base {e.base:.6f} + contributions {float(e.shap.sum()):+.6f} = "
            f"{total:.6f}; margin {e.margin:.6f} (error {e.additivity_error:.2e})")  # fmt: skip
    (ok if e.additive else bad).append(line)
    line = (f"PD: replayed {e.pd:.10f}, logged {float(e.record.pd):.10f} "
            f"(difference {e.pd_error:.2e}, tolerance {PD_TOLERANCE:g})")  # fmt: skip
    (ok if e.pd_matches else bad).append(line)
    line = (f"decision: the current policy gives {e.decision.decision}, the log says "
            f"{e.record.decision}")  # fmt: skip
    (ok if e.same_decision else bad).append(line)
    return ok, bad


def summary_lines(e: Explanation) -> list[str]:
    r = e.record
    req = r.request or {}
    lines = [
        f"{r.request_id}: {r.endpoint} {r.product} {r.enterprise_id}, "
        f"{r.model_name} v{r.model_version}, decided {r.decided_at:%Y-%m-%d %H:%M} UTC",
        f"request {float(req.get('requested_amount') or 0):,.0f} CNY / "
        f"{req.get('term_months')} months: "
        f"PD {r.pd:.3%}, score {float(r.score):.1f}, grade {r.grade}, decision {r.decision}",
    ]
    ok, bad = _check_lines(e)
    lines += [f"ok   {x}" for x in ok] + [f"FAIL {x}" for x in bad]
    for name, value, s in e.ranked()[:5]:
        lines.append(f"  {s:+.4f}  {name} = {_shown(value, name)}")
    if e.knockouts:
        lines.append("knock-outs: " + ", ".join(f"{k.code} ({k.action})" for k in e.knockouts))
    lim = e.limit
    if lim and lim.get("binding_constraint"):
        lines.append(
            f"limit {shown_in('CNY', lim.get('limit'))[0]}, bound by {lim['binding_constraint']}"
        )
    return lines


def render(e: Explanation) -> str:
    r = e.record
    doc = Document(
        f"Decision {r.request_id}",
        subtitle=f"{r.product} · {r.enterprise_id} · {r.model_name} v{r.model_version} · "
        f"{r.decision}",
    )
    with doc.section("Request and decision", "申请与决策"):
        doc.key_values(_summary_pairs(e))
    with doc.section("Checks", "核验"):
        ok, bad = _check_lines(e)
        for line in bad:
            doc.flag(line)
        doc.bullets(ok, "ok")
        doc.note(
            "The row is rebuilt from the feature values in the decision log and scored by the "
            "logged model version; SHAP values are LightGBM's exact TreeSHAP in log-odds, and "
            "base value + contributions must equal the model's margin."
        )
    with doc.section("SHAP waterfall", "SHAP 瀑布图"):
        doc.figure(waterfall_figure(e), f"From the base value to this applicant's margin "
                   f"(PD {e.pd:.3%}); log-odds, exact TreeSHAP.", name="waterfall")  # fmt: skip
        rows = []
        for name, value, s in e.ranked():
            f = BY_NAME.get(name)
            en, zh = shown(name, value)
            rows.append({"feature": name, "description": f.description if f else "",
                         "说明": f.description_zh if f else "", "value": en, "取值": zh,
                         "shap (log-odds)": s})  # fmt: skip
        doc.heading("Every feature", "全部特征")
        doc.table(rows, digits=4)
    with doc.section("Reasons given", "给出的理由"):
        reasons = r.reasons or []
        if not reasons:
            doc.paragraph("The decision logged no reasons.")
        else:
            doc.table(
                [
                    {
                        "code": x.get("code"),
                        "reason": x.get("text_en"),
                        "理由": x.get("text_zh"),
                        "impact (log-odds)": x.get("impact"),
                        "knock-out": bool(x.get("knockout")),
                    }
                    for x in reasons
                ]
            )
    with doc.section("Policy path", "政策路径"):
        doc.heading("Knock-outs", "否决规则")
        if e.knockouts:
            doc.table([{"code": k.code, "feature": k.feature, "value": _shown(k.value, k.feature),
                        "action": k.action, "rule": k.text_en, "规则": k.text_zh}
                       for k in e.knockouts])  # fmt: skip
        else:
            doc.paragraph("No knock-out rule fires on the logged features.")
        doc.heading("Cut-offs", "决策阈值")
        p = e.product_policy
        doc.key_values(
            [
                ("approve if PD <=", f"{p.approve_max_pd:.2%}"),
                ("refer if PD <=", f"{p.refer_max_pd:.2%}"),
                ("decline above", f"{p.refer_max_pd:.2%}"),
            ]
        )
        doc.heading("Path (the policy re-applied now)", "决策路径（按现行政策）")
        doc.bullets(e.decision.path)
        logged_path = (r.response or {}).get("policy_path")
        if logged_path and list(logged_path) != list(e.decision.path):
            doc.flag("The path logged with the decision differs from the policy applied now:")
            doc.bullets([str(x) for x in logged_path])
        if e.price is not None:
            doc.heading("Price", "定价")
            doc.key_values(
                [(k, f"{v:.4%}") for k, v in e.price.parts().items()]
                + [
                    (e.price.rate_name, f"{e.price.rate:.4%}"),
                    ("all-in rate", f"{e.price.all_in_rate:.4%}"),
                ]
                + (
                    [("cap", NO_CAP)]
                    if e.price.cap is None
                    else [("cap", f"{e.price.cap:.4%}"), ("within the cap", e.price.within_cap)]
                )
            )
        lim = e.limit
        if lim is not None:
            doc.heading("Limit", "额度")
            doc.key_values([("limit (CNY)", lim.get("limit") or r.limit_amount),
                            ("binding constraint", lim.get("binding_constraint") or "–"),
                            ("PD at the limit", lim.get("pd_at_limit"))])  # fmt: skip
            constraints = lim.get("constraints") or {}
            if constraints:
                binding = lim.get("binding_constraint")
                doc.table(
                    [{"constraint": k, "amount (CNY)": v if v is not None else "no bound",
                      "binds": k == binding} for k, v in constraints.items()],
                    highlight="binds",
                )  # fmt: skip
    return doc.render()


def default_out(paths: Paths, request_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", request_id)
    return paths.home / "reports" / f"explain-{safe}.html"
