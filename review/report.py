"""`kapok report`: the model-risk review of one registered model version as one self-contained
HTML file, built from what training logged to MLflow (no retraining, no Feast).

Sections: identity and lineage; performance on the out-of-time test window; global SHAP;
stability; segments; champion vs challenger; limitations and sign-off. The file is written
atomically (an earlier report survives a failed run) and logged to the version's MLflow run as
`reports/<file>.html`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from features import labels
from features.schema import BY_NAME
from kapok.settings import Paths
from kapok.staging import write_text_atomic
from review import figures
from review.evidence import (
    LABEL,
    PD_COLUMN,
    TIME,
    EvidenceError,
    ModelEvidence,
    load_evidence,
)
from review.html import Document
from review.lookback import MIN_ROWS, NA, Sample, feature_stability, lookback_note
from review.stability import ACT, STABLE, WATCH, psi, verdict

SHAP_ROWS = 2_000  # the most test-window rows explained by TreeSHAP
SHAP_SEED = 7  # the seed of that sample (polars DataFrame.sample)
DEPENDENCE_FEATURES = 6
DIRECTION_MIN_RHO = 0.1  # |Spearman rho| below this: no clear learned direction
MIN_SEGMENT_AUC_ROWS = 50
MIN_SEGMENT_JUDGED = 20  # segments smaller than this are shown but not judged for adverse impact
FOUR_FIFTHS = 0.8
PROMOTIONS_EXPERIMENT = "kapok-promotions"

SECTIONS = (
    ("1. Identity and lineage", "模型身份与数据沿袭"),
    ("2. Performance on the out-of-time test window", "样本外表现"),
    ("3. SHAP, global", "SHAP 全局解释"),
    ("4. Stability", "稳定性"),
    ("5. Segments", "分群表现"),
    ("6. Champion vs challenger", "冠军/挑战者"),
    ("7. Limitations and assumptions", "局限与假设"),
)
STEPS = ("load", *(en for en, _ in SECTIONS), "write")


# -- arithmetic the report rests on (pure, tested by hand) --------------------------------------
def wilson_interval(bads: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); NaNs when n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = bads / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _decile_groups(p: np.ndarray, bins: int, riskiest_first: bool) -> list[np.ndarray]:
    order = np.argsort(-p if riskiest_first else p, kind="stable")
    return [g for g in np.array_split(order, bins) if len(g)]


def gains_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pl.DataFrame:
    """Gains and lift by PD decile, riskiest decile first: rows, bads, bad rate, cumulative
    capture of all bads, lift (decile bad rate / overall bad rate) and cumulative lift."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    total_bads, overall = int(y.sum()), float(y.mean()) if len(y) else math.nan
    rows, cum_rows, cum_bads = [], 0, 0
    for i, g in enumerate(_decile_groups(p, bins, riskiest_first=True), start=1):
        bads = int(y[g].sum())
        cum_rows += len(g)
        cum_bads += bads
        rate = bads / len(g)
        rows.append(
            {
                "decile": i,
                "rows": len(g),
                "min_pd": float(p[g].min()),
                "max_pd": float(p[g].max()),
                "mean_pd": float(p[g].mean()),
                "bads": bads,
                "bad_rate": rate,
                "cumulative_rows_share": cum_rows / len(y),
                "cumulative_capture": cum_bads / total_bads if total_bads else math.nan,
                "lift": rate / overall if overall else math.nan,
                "cumulative_lift": (cum_bads / cum_rows) / overall if overall else math.nan,
            }
        )
    return pl.DataFrame(rows)


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pl.DataFrame:
    """Predicted vs observed by PD decile (lowest PD first) with the Wilson 95% interval of the
    observed bad rate, and whether the mean PD lies inside it."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    rows = []
    for i, g in enumerate(_decile_groups(p, bins, riskiest_first=False), start=1):
        bads, n = int(y[g].sum()), len(g)
        lo, hi = wilson_interval(bads, n)
        mean_pd = float(p[g].mean())
        rows.append(
            {
                "decile": i,
                "rows": n,
                "mean_pd": mean_pd,
                "bads": bads,
                "bad_rate": bads / n,
                "wilson_low": lo,
                "wilson_high": hi,
                "within_interval": lo <= mean_pd <= hi,
            }
        )
    return pl.DataFrame(rows)


def learned_direction(x: np.ndarray, shap_values: np.ndarray) -> tuple[int, float]:
    """The sign of the Spearman correlation between a feature's value and its SHAP value
    (missing values left out); 0 when |rho| < DIRECTION_MIN_RHO or too few distinct values."""
    x = np.asarray(x, dtype=float)
    present = ~np.isnan(x)
    if present.sum() < 10 or len(np.unique(x[present])) < 2:
        return 0, math.nan
    s = shap_values[present]
    if np.ptp(s) == 0:
        return 0, 0.0
    rho = float(spearmanr(x[present], s).statistic)
    if math.isnan(rho) or abs(rho) < DIRECTION_MIN_RHO:
        return 0, rho
    return (1 if rho > 0 else -1), rho


def adverse_impact(table: pl.DataFrame) -> pl.DataFrame:
    """Flag segments (with at least MIN_SEGMENT_JUDGED applications) whose approval rate is below
    four-fifths of the best such segment's; adds impact_ratio and adverse_impact columns."""
    judged = table.filter(pl.col("applications") >= MIN_SEGMENT_JUDGED)
    best = judged["approval_rate"].max() if judged.height else None
    if not best:
        return table.with_columns(
            impact_ratio=pl.lit(None, pl.Float64), adverse_impact=pl.lit(False)
        )
    ratio = pl.col("approval_rate") / best
    return table.with_columns(impact_ratio=ratio).with_columns(
        adverse_impact=(pl.col("applications") >= MIN_SEGMENT_JUDGED) & (ratio < FOUR_FIFTHS)
    )


def segment_table(
    frame: pl.DataFrame, column: str, p: np.ndarray, approve_max_pd: float
) -> pl.DataFrame:
    """Per value of one segment column: applications, observed bad rate, mean PD, AUC (both
    classes and at least MIN_SEGMENT_AUC_ROWS rows) and approval rate at the cut-off."""
    values = frame[column].cast(pl.String).fill_null("(missing)").to_numpy()
    y = frame[LABEL].to_numpy().astype(int)
    rows = []
    for value in sorted(set(values)):
        mask = values == value
        yy, pp = y[mask], p[mask]
        auc = (
            float(roc_auc_score(yy, pp))
            if mask.sum() >= MIN_SEGMENT_AUC_ROWS and 0 < yy.sum() < len(yy)
            else None
        )
        rows.append(
            {
                "segment": str(value),
                "applications": int(mask.sum()),
                "bad_rate": float(yy.mean()),
                "mean_pd": float(pp.mean()),
                "auc": auc,
                "approval_rate": float((pp <= approve_max_pd).mean()),
            }
        )
    schema = {
        "segment": pl.String,
        "applications": pl.Int64,
        "bad_rate": pl.Float64,
        "mean_pd": pl.Float64,
        "auc": pl.Float64,
        "approval_rate": pl.Float64,
    }
    return adverse_impact(pl.DataFrame(rows, schema=schema))


def segment_names(table: pl.DataFrame, column: str) -> pl.DataFrame:
    """The segment table with each code's name in English and Chinese beside it, when the column
    is a schema feature whose values have names (industry, district, size class)."""
    feature = BY_NAME.get(column)
    if feature is None or feature.unit not in labels.BY_UNIT:
        return table
    known = {"(missing)": ("(missing)", "缺失")}
    names = [
        known.get(v) or labels.label(feature.unit, v) or (v, v) for v in table["segment"].to_list()
    ]
    return table.insert_column(1, pl.Series("name", [n[0] for n in names])).insert_column(
        2, pl.Series("名称", [n[1] for n in names])
    )


# -- what the report needs besides the evidence -------------------------------------------------
@dataclass
class Counterpart:
    """The other version of the champion / challenger pair, and the recorded promotion."""

    evidence: ModelEvidence | None
    role_this: str  # champion or challenger: the reported version's role
    note: str = ""
    promotion: dict[str, Any] | None = None


@dataclass
class ReportResult:
    path: Path
    model_name: str
    version: str
    run_id: str
    artifact: str
    flags: list[str] = field(default_factory=list)


class _Report:
    """Builds the Document section by section, collecting flags for the summary."""

    def __init__(self, ev: ModelEvidence, counterpart: Counterpart | None) -> None:
        from serving.policy import PRODUCTS, load_policy

        self.ev, self.counterpart = ev, counterpart
        self.policy = load_policy()
        self.policy_product = ev.data_name if ev.data_name in PRODUCTS else "microloan"
        self.cutoffs = self.policy.product(self.policy_product)
        self.flags: list[str] = []
        self.y = ev.test[LABEL].to_numpy().astype(int)
        self.p = ev.test[PD_COLUMN].to_numpy().astype(float)
        window = ev.windows.get("test", {}).get("window", "no timestamp")
        self.window = window if ev.has_time else "out-of-fold predictions (no timestamp)"
        self.doc = Document(
            f"Model-risk review: {ev.name} v{ev.version}",
            subtitle=(
                f"aliases: {', '.join('@' + a for a in ev.aliases) or 'none'}; "
                f"test window: {self.window}; {ev.test.height:,} applications; "
                f"data: {ev.tags.get('kapok.data', 'unknown')}"
            ),
        )

    def flag(self, text: str) -> None:
        self.flags.append(text)
        self.doc.flag(text)

    # 1 -------------------------------------------------------------------------------------------
    def identity(self) -> None:
        ev, doc = self.ev, self.doc
        with doc.section(*SECTIONS[0]):
            spec_source = ev.tags.get("kapok.dataset")
            doc.key_values(
                [
                    ("registered model", ev.name),
                    ("version", ev.version),
                    ("aliases", ", ".join("@" + a for a in ev.aliases) or "none"),
                    ("model URI", ev.model_uri),
                    ("MLflow run id", ev.run_id),
                    ("data", ev.tags.get("kapok.data", "unknown")),
                    (
                        "FeatureService",
                        ev.tags.get("kapok.feature_service")
                        or (f"none: dataset spec {spec_source}" if spec_source else "unknown"),
                    ),
                    (
                        "feature schema version",
                        ev.tags.get("kapok.feature_schema_version")
                        or ("the dataset spec's [features]" if spec_source else "unknown"),
                    ),
                    ("label (1 = bad)", ev.model_spec.get("label") or ev.tags.get("kapok.label")),
                    ("validation", ev.tags.get("kapok.validation", "unknown")),
                    ("features", f"{len(ev.features)} ({len(ev.categorical)} categorical)"),
                    ("code version (git)", ev.tags.get("kapok.code_version", "unknown")),
                    ("Kapok version", ev.tags.get("kapok.version", "unknown")),
                    ("model", ev.model_kind),
                    ("calibration", ev.params.get("calibration", ev.scorer.calibrator.method)),
                    (
                        "boosting rounds",
                        "none: a scorecard"
                        if ev.model_kind == "scorecard"
                        else ev.params.get("rounds", "unknown"),
                    ),
                ]
            )
            self._candidates()
            doc.heading("Training data fingerprint", "训练数据指纹")
            doc.key_values(
                [
                    (k.removeprefix("data."), v)
                    for k, v in sorted(ev.params.items())
                    if k.startswith("data.")
                ]
            )
            doc.heading("Windows", "时间窗口")
            doc.table(
                [
                    {
                        "part": part,
                        "window": str(w.get("window")),
                        "rows": int(w.get("rows", 0)),
                        "bad_rate": float(w.get("bad_rate", math.nan)),
                    }
                    for part, w in ev.windows.items()
                ]
            )
            self._study()
            doc.heading("LightGBM parameters (the tuned candidate)", "LightGBM 参数")
            doc.key_values(
                [
                    (k.removeprefix("lgb."), v)
                    for k, v in sorted(ev.params.items())
                    if k.startswith("lgb.")
                ]
            )

    def _candidates(self) -> None:
        """The candidates side by side and, when the model holds a scorecard, its points."""
        ev, doc, record = self.ev, self.doc, self.ev.candidates
        if not record:
            doc.note("This model was trained before Kapok fitted candidates: LightGBM only.")
            return
        doc.heading("Candidates", "候选模型")
        doc.paragraph(
            f"{record.get('choice', '')}. Each candidate is fitted on the training window and "
            "judged on the validation window by AUC minus the complexity premium "
            f"({record.get('complexity_premium')} per step, training/promotion.toml) times its "
            "steps; the test figures are the same train-window fits on the test window, for the "
            "record only (the chosen model's test metrics in section 2 are those of its refit)."
        )
        doc.table(
            [
                {
                    "candidate": c["kind"],
                    "valid AUC": c["valid_auc"],
                    "valid KS": c["valid_ks"],
                    "test AUC": c.get("test_auc"),
                    "test KS": c.get("test_ks"),
                    "complexity (steps)": c["steps"],
                    "score": c.get("score"),
                    "chosen": bool(c.get("chosen")),
                    "note": c.get("note", ""),
                }
                for c in record.get("candidates", [])
            ]
        )
        points = record.get("points")
        if ev.points is None or not points or ev.model_kind == "lightgbm":
            return
        weight = float(points.get("weight", 1.0))
        doc.heading("Scorecard points", "评分卡分值")
        share = "" if weight == 1 else f" (its weight in the blend, {weight:g}, included)"
        scale = points.get("score_scale", {})
        doc.paragraph(
            f"The scorecard in this model{share}, on the policy's score scale (score = "
            f"{scale.get('offset', float('nan')):.2f} + {scale.get('factor', float('nan')):.2f}"
            " x ln(good:bad odds)): an applicant's points are the base points plus one bin's "
            "points per characteristic. points_lost is what a bin costs against the "
            "characteristic's best bin, the size of the reason it gives. The served score comes "
            "from the calibrated PD (section 2), so it differs from this raw sum by the "
            "calibration."
        )
        doc.table(ev.points)
        dropped = points.get("dropped", {})
        if dropped:
            doc.table([{"left out": f, "why": why} for f, why in sorted(dropped.items())])

    def _study(self) -> None:
        from training.plots import history

        ev, doc, s = self.ev, self.doc, self.ev.study
        doc.heading("Optuna study", "Optuna 调参")
        doc.key_values(
            [
                ("study", s.get("study_name", ev.tags.get("kapok.optuna_study", "unknown"))),
                ("trials", s.get("trials")),
                ("complete", s.get("complete")),
                ("pruned", s.get("pruned")),
                ("best value (validation AUC)", s.get("best_value_valid_auc")),
                ("best trial", s.get("best_trial")),
            ]
        )
        doc.table(
            [
                {"parameter": k, "best value": str(v)}
                for k, v in sorted(s.get("best_params", {}).items())
            ]
        )
        done = ev.trials.filter(pl.col("state") == "COMPLETE").sort("number")
        values = [float(v) for v in done["value"].to_list() if v is not None]
        if values:
            doc.figure(
                history(values, "Optuna: validation AUC by trial"),
                f"Optimisation history: {len(values)} complete trials of "
                f"{ev.trials.height} (optuna/trials.csv)",
                name="optuna_history",
            )
        else:
            self.flag("the Optuna study has no complete trial")

    # 2 -------------------------------------------------------------------------------------------
    def performance(self) -> None:
        from serving.policy import score_points
        from training.metrics import binary_metrics
        from training.plots import roc

        ev, doc, y, p = self.ev, self.doc, self.y, self.p
        with doc.section(*SECTIONS[1]):
            if not ev.has_time:
                doc.note(
                    "This model's data has no timestamp: there is no out-of-time window. The "
                    "figures below are on out-of-fold predictions of repeated stratified "
                    "K-fold over every row, an optimistic stand-in for performance on a later "
                    "population."
                )
            else:
                doc.paragraph(
                    f"Test window {self.window}: {len(y):,} applications, "
                    f"{int(y.sum()):,} bad, never used for tuning, early stopping or "
                    "calibration."
                )
            if len(y) == 0 or not 0 < y.sum() < len(y):
                self.flag("the test window lacks goods or bads: no discrimination metric")
                doc.table([{"metric": k, "value": v} for k, v in binary_metrics(y, p).items()])
                return
            metrics = binary_metrics(y, p)
            for key in ("oracle_auc", "gini_share_of_oracle"):
                if f"test_{key}" in ev.metrics:
                    metrics[key] = ev.metrics[f"test_{key}"]
            doc.heading("Metrics", "指标")
            doc.table([{"metric": k, "value": v} for k, v in metrics.items()])
            score = np.array([score_points(float(v), self.policy) for v in p])
            doc.figure(
                roc(y, p, f"ROC, AUC {metrics['auc']:.3f}"),
                f"ROC on the test window ({self.window})",
                name="roc",
            )
            doc.figure(
                figures.ks_curve(y, score, f"KS {metrics['ks']:.3f}"),
                "KS: cumulative share of bads and goods by score",
                name="ks",
            )
            doc.heading("Gains and lift by PD decile", "增益与提升")
            doc.paragraph(
                "Decile 1 holds the tenth of applications with the highest PD. Capture: "
                "share of all bads in this and riskier deciles; lift: decile bad rate "
                "over the overall bad rate."
            )
            doc.table(gains_table(y, p))
            doc.heading("Calibration", "校准")
            cal = calibration_table(y, p)
            doc.figure(
                figures.calibration_bars(cal, "Calibration by PD decile"),
                "Observed bad rate against mean predicted PD by decile, with binomial "
                "(Wilson) 95% intervals",
                name="calibration",
            )
            doc.table(cal, highlight=None)
            outside = cal.filter(~pl.col("within_interval"))
            if outside.height > 2:
                self.flag(
                    f"calibration: the mean PD of {outside.height} of {cal.height} deciles "
                    "lies outside the 95% interval of the observed bad rate"
                )
            cuts = {
                f"approve PD <= {self.cutoffs.approve_max_pd:g}": score_points(
                    self.cutoffs.approve_max_pd, self.policy
                ),
                f"refer PD <= {self.cutoffs.refer_max_pd:g}": score_points(
                    self.cutoffs.refer_max_pd, self.policy
                ),
            }
            doc.figure(
                figures.score_distribution(y, score, "Score by outcome", cuts),
                f"Score (policy scale, serving.policy.score_points) of goods and bads; "
                f"cut-offs of the {self.policy_product} policy",
                name="score_distribution",
            )

    # 3 -------------------------------------------------------------------------------------------
    def shap_global(self) -> None:
        ev, doc = self.ev, self.doc
        with doc.section(*SECTIONS[2]):
            sample = ev.test
            if sample.height > SHAP_ROWS:
                sample = sample.sample(n=SHAP_ROWS, seed=SHAP_SEED)
                how = (
                    f"a random sample of {SHAP_ROWS:,} of the {ev.test.height:,} test-window "
                    f"rows (polars DataFrame.sample, seed {SHAP_SEED})"
                )
            else:
                how = f"all {sample.height:,} test-window rows (no sampling needed)"
            x = ev.scorer.matrix(sample)
            contrib = ev.scorer.booster.predict(x, pred_contrib=True)
            values, base = contrib[:, :-1], contrib[:, -1]
            doc.paragraph(
                f"Exact TreeSHAP from LightGBM (Booster.predict(pred_contrib=True)) on {how}. "
                "Values are in log-odds of the raw model, before calibration; per row they sum "
                "with the base value to the model's margin. Categorical features are shown grey "
                "in the beeswarm (their codes have no order)."
            )
            if ev.model_kind in ("scorecard", "blend"):
                doc.paragraph(
                    f"This model is a {ev.model_kind}: the scorecard's trees are built by hand "
                    "(training/trees.py), so their gain is zero and importance here is mean "
                    "|SHAP|. A scorecard tree's reference is its characteristic's best bin: its "
                    "SHAP value is the log-odds the characteristic loses against that bin, never "
                    "negative (in a blend, times the scorecard's weight, plus the trained trees' "
                    "share)."
                )
            names = list(ev.features)
            colour_data = x.copy()
            for i, name in enumerate(names):
                if name in ev.categorical:
                    colour_data[:, i] = np.nan
            doc.figure(
                figures.shap_bar(values, base, colour_data, names),
                "Global importance: mean |SHAP| per feature",
                name="shap_bar",
            )
            doc.figure(
                figures.shap_beeswarm(values, base, colour_data, names),
                "Beeswarm: each dot one application; colour = feature value",
                name="shap_beeswarm",
            )
            importance = np.abs(values).mean(axis=0)
            order = [i for i in np.argsort(-importance) if names[i] not in ev.categorical]
            constraints = ev.model_spec.get("monotone_constraints", {})
            items = []
            for i in order[:DEPENDENCE_FEATURES]:
                expected = int(constraints.get(names[i], 0))
                learned, rho = learned_direction(x[:, i], values[:, i])
                items.append(
                    figures.Dependence(
                        names[i],
                        x[:, i],
                        values[:, i],
                        expected,
                        learned,
                        0.0 if math.isnan(rho) else rho,
                        disagrees=expected != 0 and learned != 0 and learned != expected,
                    )
                )
            doc.heading("Dependence: expected vs learned risk direction", "依赖图：预期与学习方向")
            doc.paragraph(
                f"The {len(items)} most important numeric features. Expected direction: the "
                "schema's (model_spec.json monotone_constraints; + means a higher value is "
                "riskier). Learned: the sign of the Spearman correlation between value and SHAP "
                f"(none when |rho| < {DIRECTION_MIN_RHO})."
            )
            if items:
                doc.figure(
                    figures.dependence_grid(items),
                    "SHAP dependence of the top numeric features; red title = the learned "
                    "direction contradicts the expected one",
                    name="dependence",
                )
            table = pl.DataFrame(
                [
                    {
                        "feature": it.feature,
                        "mean_abs_shap": float(importance[names.index(it.feature)]),
                        "expected": it.expected,
                        "learned": it.learned,
                        "spearman_rho": it.rho,
                        "disagrees": it.disagrees,
                    }
                    for it in items
                ],
                schema={
                    "feature": pl.String,
                    "mean_abs_shap": pl.Float64,
                    "expected": pl.Int64,
                    "learned": pl.Int64,
                    "spearman_rho": pl.Float64,
                    "disagrees": pl.Boolean,
                },
            )
            doc.table(table, highlight="disagrees")
            for it in items:
                if it.disagrees:
                    self.flag(
                        f"{it.feature}: the model learned the opposite of the expected risk "
                        f"direction (expected {it.expected:+d}, rho {it.rho:+.2f})"
                    )

    # 4 -------------------------------------------------------------------------------------------
    def stability(self) -> None:
        ev, doc = self.ev, self.doc
        with doc.section(*SECTIONS[3]):
            if not ev.has_time:
                doc.note(
                    "Not applicable: this model was validated by K-fold on data without a "
                    "timestamp, so there is no training window and no later window to "
                    "compare. Monitor the score once it is used (`kapok monitor`)."
                )
                return
            ref = ev.train[PD_COLUMN].to_numpy().astype(float)
            score_psi = psi(ref, self.p)
            v = verdict(score_psi)
            doc.paragraph(
                f"Reference: {ev.train.height:,} training-window rows "
                f"({ev.windows.get('train', {}).get('window', '?')}, at most 50,000 sampled); "
                f"current: the test window ({self.window}). PSI over deciles of the reference "
                "plus a missing bin; verdicts: < 0.1 stable, 0.1-0.25 watch, >= 0.25 act."
            )
            doc.key_values([("score (PD) PSI", score_psi), ("verdict", v)])
            if v != STABLE:
                self.flag(f"score PSI {score_psi:.3f}: {v}")
            doc.figure(
                figures.overlaid_distributions(
                    {"training window": ref, "test window": self.p},
                    "PD",
                    "PD distribution: training vs test window",
                ),
                "PD in the training-window reference and in the test window",
                name="score_stability",
            )
            doc.heading("Feature stability (CSI)", "特征稳定性")
            csi = feature_stability(
                Sample(ev.train, ev.train[TIME]),
                Sample(ev.test, ev.test[TIME]),
                ev.features,
                ev.categorical,
                start=ev.history_start,
            )
            doc.paragraph(lookback_note(ev.history_start, ev.history_source))
            csi = csi.with_columns(flag=pl.col("verdict").is_in([WATCH, ACT]))
            doc.table(csi, highlight="flag")
            for row in csi.filter(pl.col("verdict") == ACT).iter_rows(named=True):
                self.flag(f"{row['feature']}: CSI {row['csi']:.3f} (act)")
            watch = csi.filter(pl.col("verdict") == WATCH).height
            if watch:
                doc.paragraph(f"{watch} feature(s) on watch (0.1 <= CSI < 0.25).", "watch")
            na = csi.filter(pl.col("verdict") == NA)["feature"].to_list()
            if na:
                doc.paragraph(
                    f"n/a: {', '.join(na)} — too few rows with the whole look-back window on one "
                    f"side (fewer than {MIN_ROWS}) to judge.",
                    "watch",
                )

    # 5 -------------------------------------------------------------------------------------------
    def segments(self) -> None:
        ev, doc = self.ev, self.doc
        with doc.section(*SECTIONS[4]):
            cut = self.cutoffs.approve_max_pd
            note = (
                f"Approval rate: share of applications with PD <= {cut:g}, the "
                f"{self.policy_product} policy's automatic-approval cut-off"
            )
            if self.policy_product != ev.data_name:
                note += (
                    f" (this model, {ev.data_name}, has no lending policy of its own: the "
                    "microloan cut-off is used as a stand-in)"
                )
            doc.paragraph(
                note + f". A segment of at least {MIN_SEGMENT_JUDGED} applications is flagged "
                "when its approval rate is below four-fifths of the best such segment's "
                f"(adverse-impact rule). AUC needs both outcomes and {MIN_SEGMENT_AUC_ROWS}+ rows."
            )
            columns = [c for c in ev.segments if c in ev.test.columns]
            if not columns:
                doc.paragraph("This model declares no segment columns.")
            for column in columns:
                feature = BY_NAME.get(column)
                if feature is None:
                    doc.heading(column)
                else:
                    doc.heading(f"{column}: {feature.description}", feature.description_zh)
                table = segment_table(ev.test, column, self.p, cut)
                doc.table(segment_names(table, column), highlight="adverse_impact")
                for row in table.filter(pl.col("adverse_impact")).iter_rows(named=True):
                    self.flag(
                        f"{column} = {row['segment']}: approval rate "
                        f"{row['approval_rate']:.1%} is {row['impact_ratio']:.2f} of the "
                        "best segment's (below four-fifths)"
                    )

    # 6 -------------------------------------------------------------------------------------------
    def champion_challenger(self) -> None:
        doc, c = self.doc, self.counterpart
        with doc.section(*SECTIONS[5]):
            if c is None or c.evidence is None:
                doc.paragraph(c.note if c else "No champion / challenger pair to compare.")
                return
            if c.note:
                doc.note(c.note)
            compare_pair(doc, self.ev, c, self.flag)

    # 7 -------------------------------------------------------------------------------------------
    def limitations(self) -> None:
        ev, doc = self.ev, self.doc
        data = ev.tags.get("kapok.data", "unknown")
        simulated = "simulated" in data
        with doc.section(*SECTIONS[6]):
            doc.bullets(
                [
                    (
                        "Data: simulated by Kapok's regional big-data simulator, not observed "
                        "lending. The model's figures describe the simulator, not a real "
                        "population; retrain and review again on real data before any use."
                        if simulated
                        else f"Data: {data} (from its dataset spec), as supplied; "
                        "its provenance and representativeness are the data owner's to confirm."
                    ),
                    f"Label (1 = bad): {ev.model_spec.get('label') or ev.tags.get('kapok.label')}.",
                    f"Evaluation: {self.window}"
                    + (
                        "; an out-of-time window, never used for tuning or calibration."
                        if ev.has_time
                        else "; no out-of-time evidence exists."
                    ),
                    f"Validation: {ev.tags.get('kapok.validation', 'unknown')}.",
                    "SHAP values explain the raw LightGBM margin (log-odds), not the calibrated "
                    "PD; they describe the model, not causes in the world.",
                    "Missing values are kept missing; the model learned what a missing source "
                    "means in the training period, which may change when a feed changes.",
                ]
            )
            doc.heading("The model must not be used", "禁止用途")
            doc.bullets(
                [
                    (
                        "for individuals' consumer credit: it scores small and micro enterprises;"
                        if simulated
                        else "for any population or purpose other than the dataset's own "
                        f"({ev.data_name});"
                    ),
                    "outside the training population or period (other regions, products, "
                    "enterprise types or economic conditions) without a new review;",
                    "as the sole basis of a decline: a decline needs human review and the "
                    "reasons given to the applicant;",
                    "with features computed differently from the training pipeline (point in "
                    "time, same sources and definitions).",
                ]
            )
            doc.heading("Officers' overrides of the model", "信贷员对模型决策的改判")
            counts = override_counts(ev.name, ev.version)
            if isinstance(counts, str):
                doc.paragraph(counts)
            else:
                doc.paragraph(
                    "Referred decisions of this model version in the decision log, and what "
                    "credit officers decided on them (an override is its own record in the log)."
                )
                doc.table(counts)
            doc.bullets(self.flags or ["none"], css="flag" if self.flags else "ok")
            doc.heading("Sign-off", "审批签字")
            doc.raw(SIGN_OFF)


SIGN_OFF = (
    '<table class="signoff">'
    '<tr><th class="text">Reviewer 审核人</th><td></td></tr>'
    '<tr><th class="text">Role 职务</th><td></td></tr>'
    '<tr><th class="text">Date 日期</th><td></td></tr>'
    '<tr><th class="text">Decision 结论</th><td>☐ approve 批准 &nbsp; ☐ approve with conditions '
    "有条件批准 &nbsp; ☐ reject 否决</td></tr>"
    '<tr><th class="text">Conditions 条件</th><td></td></tr>'
    '<tr><th class="text">Signature 签名</th><td></td></tr>'
    "</table>"
)


def override_counts(model_name: str, version: str, url: str | None = None) -> pl.DataFrame | str:
    """What officers decided on the model version's referred decisions: model decision, officer
    decision (approve, decline, or still open) and how many. A text instead when there is no
    decision log to read ("no decision log"): the report is built from MLflow alone."""
    import sqlalchemy as sa

    from serving.decision_log import DecisionLog, DecisionLogError, default_url

    parsed = sa.make_url(url or default_url())
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and database and not Path(database).exists():
        return f"no decision log (none at {database}): no overrides to count"
    try:
        with DecisionLog(url) as log:
            referred = log.tally(["decision"], model_name=model_name, model_version=version)
            overrides = log.tally(["decision"], endpoints=["override"], model_name=model_name,
                                  model_version=version)  # fmt: skip
    except DecisionLogError as e:
        return f"no decision log ({e})"
    n_referred = dict(referred).get("refer", 0)
    done = dict(overrides)
    rows = [
        {"model decision": "refer", "officer decision": d, "decisions": done.get(d, 0)}
        for d in ("approve", "decline")
    ]
    rows.append({"model decision": "refer", "officer decision": "still open",
                 "decisions": max(n_referred - sum(done.values()), 0)})  # fmt: skip
    return pl.DataFrame(rows)


def compare_pair(
    doc: Document, ev: ModelEvidence, c: Counterpart, flag: Callable[[str], None]
) -> None:
    """Both versions scored on the more recent version's test rows, side by side, and the gate
    verdict of training.promote for that comparison."""
    from training.metrics import binary_metrics
    from training.metrics import psi as gate_psi
    from training.promote import Comparison, Gate, verdict

    other = c.evidence
    assert other is not None
    champion, challenger = (ev, other) if c.role_this == "champion" else (other, ev)
    recent = max((ev, other), key=lambda e: int(e.version))
    window = recent.test
    y = window[LABEL].to_numpy().astype(int)
    label = (
        recent.windows.get("test", {}).get("window", "?")
        if recent.has_time
        else "every row (no timestamp: in-sample for the final models)"
    )
    doc.paragraph(
        f"Champion v{champion.version} and challenger v{challenger.version}, both scored on the "
        f"test rows of v{recent.version} ({label}; {window.height:,} applications)."
    )
    try:
        p_champion = champion.scorer.pd(window)
        p_challenger = challenger.scorer.pd(window)
    except ValueError as e:
        doc.flag(f"the versions cannot be scored on the same rows: {e}")
        return
    if not 0 < y.sum() < len(y):
        doc.flag("the comparison window lacks goods or bads: no comparison")
        return
    comparison = Comparison(
        window=label,
        rows=len(y),
        champion=binary_metrics(y, p_champion),
        challenger=binary_metrics(y, p_challenger),
        psi_challenger=gate_psi(challenger.train[PD_COLUMN].to_numpy(), p_challenger),
        psi_challenger_vs_champion=gate_psi(p_champion, p_challenger),
    )
    keys = [k for k in comparison.champion if k != "n"]
    doc.table(
        [
            {
                "metric": k,
                f"champion v{champion.version}": comparison.champion[k],
                f"challenger v{challenger.version}": comparison.challenger[k],
                "difference": comparison.challenger[k] - comparison.champion[k],
            }
            for k in keys
        ]
    )
    tag_c, tag_h = f"champion v{champion.version}", f"challenger v{challenger.version}"
    doc.figure(
        figures.roc_curves(y, {tag_c: p_champion, tag_h: p_challenger}, "ROC on the same window"),
        "ROC of both versions on the same rows",
        name="cc_roc",
    )
    doc.figure(
        figures.calibration_curves(
            {tag_c: calibration_table(y, p_champion), tag_h: calibration_table(y, p_challenger)},
            "Calibration on the same window",
        ),
        "Calibration by PD decile of both versions on the same rows",
        name="cc_calibration",
    )
    gate = Gate.load()
    passed, reasons = verdict(comparison, gate)
    doc.heading(
        f"Gate verdict: {'PASS' if passed else 'REFUSE'} "
        f"(auc tolerance {gate.auc_tolerance}, ECE limit {gate.ece_limit}, "
        f"PSI limit {gate.psi_limit})",
        "晋升门槛结论",
    )
    doc.bullets(reasons)
    doc.paragraph(
        "The challenger's PSI compares its PDs on its own training-window reference with the "
        "window above (training.promote uses the same rules on the data as it is now)."
    )
    if c.promotion:
        pr = c.promotion
        doc.heading("Recorded promotion", "晋升记录")
        doc.key_values([(k, v) for k, v in pr.items()])
    else:
        doc.paragraph(
            f"No promotion run recorded for v{challenger.version} over "
            f"v{champion.version} (experiment {PROMOTIONS_EXPERIMENT}); "
            "run `kapok promote` to record one."
        )


# -- assembling ----------------------------------------------------------------------------------
def find_counterpart(paths: Paths, ev: ModelEvidence) -> Counterpart:
    from training.tracking import CHALLENGER, CHAMPION, alias_version, configure

    client = configure(paths)
    champion_v = alias_version(client, ev.name, CHAMPION)
    challenger_v = alias_version(client, ev.name, CHALLENGER)
    if ev.version == champion_v:
        role, other_v = CHAMPION, challenger_v
    elif ev.version == challenger_v:
        role, other_v = CHALLENGER, champion_v
    else:
        return Counterpart(
            None,
            "",
            note=(
                f"v{ev.version} is neither champion nor challenger "
                f"(champion: {champion_v or 'none'}, challenger: {challenger_v or 'none'}): "
                "no comparison."
            ),
        )
    if other_v is None or other_v == ev.version:
        missing = CHALLENGER if role == CHAMPION else CHAMPION
        return Counterpart(
            None,
            role,
            note=(
                f"Only one of the pair exists: v{ev.version} is @{role} and {ev.name} has no "
                f"@{missing}. Train again to create a challenger."
            ),
        )
    other = load_evidence(paths, ev.name, version=other_v)
    pair = (ev.version, other_v) if role == CHAMPION else (other_v, ev.version)
    return Counterpart(other, role, promotion=_promotion(client, ev.name, *pair))


def _promotion(client: Any, name: str, champion_v: str, challenger_v: str) -> dict | None:
    experiment = client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.model = '{name}' and tags.champion_version = '{champion_v}' "
            f"and tags.challenger_version = '{challenger_v}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run, tags = runs[0], runs[0].data.tags
    when = datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return {
        "verdict": tags.get("verdict", "?"),
        "forced": tags.get("forced", "false"),
        "override reason": tags.get("override_reason", ""),
        "window": tags.get("window", ""),
        "recorded": when,
        "run id": run.info.run_id,
    }


def render(
    ev: ModelEvidence,
    counterpart: Counterpart | None = None,
    on_step: Callable[[str], None] | None = None,
) -> tuple[str, list[str]]:
    """The report's HTML and the flags it raised."""
    step = on_step or (lambda _name: None)
    report = _Report(ev, counterpart)
    for (name, _zh), build in zip(
        SECTIONS,
        (
            report.identity,
            report.performance,
            report.shap_global,
            report.stability,
            report.segments,
            report.champion_challenger,
            report.limitations,
        ),
        strict=True,
    ):
        build()
        step(name)
    flags = report.flags
    report.doc.subtitle += (
        f"; {len(flags)} flag(s) for the reviewer, listed in section 7" if flags else "; no flags"
    )
    return report.doc.render(), flags


def default_path(paths: Paths, ev: ModelEvidence) -> Path:
    return paths.home / "reports" / f"{ev.name}-v{ev.version}.html"


def build_report(
    paths: Paths,
    product_or_name: str,
    *,
    alias: str | None = None,
    version: str | None = None,
    out: Path | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ReportResult:
    """Build the report of one model version, write it and log it to the version's run."""
    from training.tracking import configure

    step = on_step or (lambda _name: None)
    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out must be a file, not the folder {out}")
    if not product_or_name.strip():
        raise EvidenceError("--product must name a product or a dataset-spec model")
    ev = load_evidence(paths, product_or_name.strip(), alias=alias, version=version)
    counterpart = find_counterpart(paths, ev)
    step("load")
    html, flags = render(ev, counterpart, step)
    target = Path(out) if out is not None else default_path(paths, ev)
    write_text_atomic(target, html)
    configure(paths).log_artifact(ev.run_id, str(target), "reports")
    step("write")
    return ReportResult(target, ev.name, ev.version, ev.run_id, f"reports/{target.name}", flags)


__all__ = [
    "SECTIONS",
    "SHAP_ROWS",
    "SHAP_SEED",
    "STEPS",
    "Counterpart",
    "ReportResult",
    "adverse_impact",
    "build_report",
    "calibration_table",
    "find_counterpart",
    "gains_table",
    "learned_direction",
    "override_counts",
    "render",
    "segment_table",
    "wilson_interval",
]
