# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Reviewing the champion model interactively
#
# A model-risk reviewer (模型风险审查) signs a model off only after checking what it is, how well
# it ranks and how well its probabilities match outcomes on data it never saw, what drives it,
# and whether it behaves as credit experts expect. `kapok report` does all of that in one HTML
# file; this notebook walks through the same review by hand on the **champion microloan model**,
# so each step can be questioned and extended:
#
# 1. load the champion and the evidence its training run logged to MLflow;
# 2. metrics and calibration on the out-of-time test window;
# 3. global TreeSHAP importance and one dependence plot against the expected risk direction;
# 4. one application of the test window explained feature by feature, with the reasons the
#    lending API would give;
# 5. the full HTML report, built from here.
#
# It reads whatever `KAPOK_HOME` points at. There must be a trained champion: if there is none,
# run `make run` (or `.venv/bin/kapok run`) first.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import shap

import kapok  # noqa: F401  (switches telemetry off)
import review.figures
import training.plots  # noqa: F401  (it selects Agg on import: import it before going inline)
from features.schema import BY_NAME
from kapok.settings import paths
from review.evidence import LABEL, PD_COLUMN, EvidenceError, load_evidence
from review.report import build_report, calibration_table, gains_table, learned_direction
from serving.engine import ProductModel, reasons_from
from training.metrics import binary_metrics
from training.pyfunc import load_scorer

# Kapok's plotting modules select the Agg backend when imported: switch to inline plots after
# importing them all.
# %matplotlib inline

P = paths()
PRODUCT = "microloan"
try:
    ev = load_evidence(P, PRODUCT, alias="champion")
except EvidenceError as e:
    raise SystemExit(
        f"{e}\nThere is no champion under {P.home}: run `make run` (or `.venv/bin/kapok run`) "
        "first, or point KAPOK_HOME at a home with a trained model."
    ) from None
pl.Config.set_tbl_rows(25)
print(f"{ev.name} v{ev.version} (aliases: {', '.join(ev.aliases)}), run {ev.run_id}")

# %% tags=["parameters"]
# Where the HTML report goes (None: KAPOK_HOME/reports, like `kapok report`).
REPORT_DIR = None

# %% [markdown]
# ## 1. What the model is
#
# The training run recorded its lineage as tags and parameters: the data's fingerprint, the
# Feast FeatureService and schema version, the label, the code version, the calibration
# method, and the three time windows. Training used the oldest months; tuning, early stopping
# and calibration the next; the **test** window, the most recent, was touched only to report.
#
# The same model is also a registered MLflow pyfunc, as serving loads it. Both routes must give
# the same PD on the same rows.

# %%
lineage = {
    "data": ev.tags.get("kapok.data"),
    "label": ev.model_spec.get("label"),
    "FeatureService": ev.tags.get("kapok.feature_service"),
    "schema version": ev.tags.get("kapok.feature_schema_version"),
    "code version": ev.tags.get("kapok.code_version"),
    "calibration": ev.params.get("calibration"),
    "content hash": ev.params.get("data.content_hash"),
}
for key, value in lineage.items():
    print(f"{key:>15}: {value}")
pl.DataFrame([{"part": k, **v} for k, v in ev.windows.items()])

# %%
served = load_scorer(f"models:/{ev.name}@champion")
gap = np.abs(served.pd(ev.test) - ev.test[PD_COLUMN].to_numpy()).max()
print(f"largest PD difference, registered model vs logged test PDs: {gap:.2e}")

# %% [markdown]
# ## 2. Discrimination and calibration on the test window
#
# AUC and KS say how well the model **ranks** applications; Brier score, log loss, ECE and the
# calibration slope and intercept say whether its PDs are **right on average** (slope 1 and
# intercept 0 are perfect). Pricing and expected-loss budgets use the PD itself, so both
# matter. On a small simulated system the test window holds only a few hundred applications:
# expect wide intervals.

# %%
y = ev.test[LABEL].to_numpy().astype(int)
p = ev.test[PD_COLUMN].to_numpy()
metrics = binary_metrics(y, p)
pl.DataFrame({"metric": list(metrics), "value": list(metrics.values())})

# %% [markdown]
# Gains by PD decile (decile 1 = highest PD): how many of all bads the riskiest tenth, fifth,
# ... of applications capture.

# %%
gains_table(y, p).select(
    "decile", "rows", "mean_pd", "bads", "bad_rate", "cumulative_capture", "lift"
)

# %% [markdown]
# The calibration plot compares, decile by decile, the mean predicted PD with the observed bad
# rate and its binomial (Wilson) 95% interval. Points near the diagonal, with the diagonal
# inside most intervals, mean the PDs can be taken at face value.

# %%
calibration = calibration_table(y, p)
fig = review.figures.calibration_bars(calibration, f"{ev.name} v{ev.version}: calibration")
plt.show()
calibration.select("decile", "rows", "mean_pd", "bad_rate", "wilson_low", "wilson_high")

# %% [markdown]
# ## 3. What drives the model: TreeSHAP
#
# LightGBM computes exact SHAP values for its own trees (`pred_contrib=True`): for each
# application, one number per feature, in log-odds, that add up with a base value to the
# model's raw score. The mean absolute SHAP value ranks the features by how much they move
# predictions overall.

# %%
x = ev.scorer.matrix(ev.test)
contrib = ev.scorer.booster.predict(x, pred_contrib=True)
values, base = contrib[:, :-1], contrib[:, -1]
names = ev.features
assert np.allclose(contrib.sum(axis=1), ev.scorer.margin(ev.test))  # SHAP adds up to the margin
data = x.copy()
data[:, [names.index(c) for c in ev.categorical]] = np.nan  # category codes have no order
explanation = shap.Explanation(values=values, base_values=base, data=data, feature_names=names)
shap.plots.bar(explanation, max_display=15, show=False)
plt.title("Mean |SHAP| on the test window")
plt.show()

# %% [markdown]
# Each feature has an **expected risk direction** in the schema (`features/schema.py`): +1 when
# a higher value should mean more risk, -1 when less. Training turned these into LightGBM
# monotone constraints, so the model cannot contradict them outright; a dependence plot shows
# what it actually learned. Here the most important numeric feature.

# %%
constraints = ev.model_spec["monotone_constraints"]
importance = np.abs(values).mean(axis=0)
top = next(names[i] for i in np.argsort(-importance) if names[i] not in ev.categorical)
j = names.index(top)
learned, rho = learned_direction(x[:, j], values[:, j])
item = review.figures.Dependence(
    top,
    x[:, j],
    values[:, j],
    int(constraints[top]),
    learned,
    rho,
    disagrees=constraints[top] != 0 and learned != 0 and learned != constraints[top],
)
review.figures.dependence_grid([item], columns=1)
plt.show()
print(f"{top}: {BY_NAME[top].description if top in BY_NAME else ''}")
print(f"expected direction {constraints[top]:+d}, learned {learned:+d} (Spearman rho {rho:+.2f})")

# %% [markdown]
# ## 4. One application, explained
#
# Take the test-window application with the highest PD. Its SHAP values show which features
# pushed its risk up (red) or down (blue) from the base value, in log-odds. The lending API
# turns the largest upward pushes into the reasons it gives the applicant (`serving.engine`).

# %%
i = int(np.argmax(p))
row = ev.test.row(i, named=True)
print(
    f"application {row.get('application_id')} of {row.get('enterprise_id')}, "
    f"applied {row.get('applied_at')}: PD {p[i]:.3f}, outcome {'bad' if y[i] else 'good'}"
)
shap.plots.waterfall(explanation[i], max_display=12, show=False)
plt.show()

# %%
model = ProductModel(PRODUCT, ev.name, ev.version, ev.scorer)
reasons = reasons_from(model.contributions(model.row(row))[0], model, row)
pl.DataFrame(
    [
        {
            "code": r.code,
            "impact (log-odds)": round(r.impact, 4),
            "reason": r.text_en,
            "理由": r.text_zh,
        }
        for r in reasons
    ]
)

# %% [markdown]
# ## 5. The full report
#
# `build_report` is what `kapok report` runs: the sections above plus stability (PSI and CSI
# between the training and test windows), segments with the four-fifths rule, champion vs
# challenger with the promotion gate, limitations and a sign-off block. The file is
# self-contained (open it offline, archive it, e-mail it) and is also logged to the model
# version's MLflow run under `reports/`.

# %%
out = None if REPORT_DIR is None else Path(REPORT_DIR) / f"{ev.name}-v{ev.version}.html"
result = build_report(P, PRODUCT, alias="champion", out=out)
size = result.path.stat().st_size / 1e6
print(f"report: {result.path} ({size:.1f} MB), logged as {result.artifact} on run {result.run_id}")
print(f"{len(result.flags)} flag(s) for the reviewer:")
for text in result.flags:
    print(" -", text)
