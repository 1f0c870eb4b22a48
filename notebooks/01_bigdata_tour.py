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
# # A tour of the simulated regional big-data system
#
# Kapok scores small enterprises from the data a city's **regional big-data platform**
# (区域大数据平台) collects about them: business registration, tax filings, electricity use,
# social insurance, payment flows, receivables and payables, court records and credit reports.
# We cannot ship the real thing, so `kapok.bigdata` simulates it: every enterprise has a hidden,
# month-by-month *health*; every table is a noisy, **late** consequence of that health; and the
# outcome of each loan, guarantee or insurance application is drawn from a true probability of
# default (the *oracle*) that no feature sees directly. One city-wide **downturn** hits the
# middle of the simulated period.
#
# This notebook is for a new engineer or a credit analyst. It shows
#
# 1. what each raw table holds, how big it is, and **how late** it is published;
# 2. bad rates over time and by industry;
# 3. how features relate to outcomes once joined **point in time**, and why that matters;
# 4. where features are missing, and why.
#
# It reads the data under `KAPOK_HOME` (see `kapok.settings`). If nothing has been generated
# there yet, it simulates a small system (3,000 enterprises x 36 months) and builds its
# features first, which takes a few seconds.

# %%
# %matplotlib inline
from datetime import date

import matplotlib.pyplot as plt
import numpy as np
import polars as pl

import kapok  # noqa: F401  (switches telemetry off)
from features.build import build
from features.schema import BY_NAME, FAMILIES, features_of
from kapok.bigdata.generate import MONTHLY_TABLES, TABLES, generate, read_manifest, scan
from kapok.bigdata.simulate import SimulationConfig
from kapok.bigdata.world import INDUSTRIES
from kapok.settings import paths

P = paths()
if not (P.raw / "_manifest.json").exists():
    print(f"no simulated data under {P.home}: generating 3,000 enterprises x 36 months")
    generate(SimulationConfig(enterprises=3_000, months=36, seed=7), P.raw)
if not (P.features / "_manifest.json").exists():
    print(f"building the feature tables under {P.features}")
    build(P.raw, P.features)

pl.Config.set_fmt_str_lengths(90)
pl.Config.set_tbl_rows(30)
manifest = read_manifest(P.raw)
START = date.fromisoformat(manifest["start"] + "-01")
_t = START.year * 12 + START.month - 1 + manifest["downturn_month"]
DOWNTURN = date(_t // 12, _t % 12 + 1, 1)
print(
    f"{manifest['enterprises']:,} enterprises, {manifest['months']} months from {START:%Y-%m}, "
    f"seed {manifest['seed']}; the downturn starts in {DOWNTURN:%Y-%m}"
)

# %% [markdown]
# ## 1. The raw tables
#
# Every row the platform exports carries `available_at`: the moment it became visible to a
# lender. A monthly table describes a month but is published on a fixed day of the *next*
# month (payments on the 3rd, electricity the 5th, social insurance and credit reports the
# 10th, tax the 15th, receivables and payables the 20th); some tax returns are filed one or two
# months late. Court records appear weeks after the event; the yearly tax-credit rating is
# published on 30 April of the following year. The lag below is measured from the end of the
# period a row describes (month end, event date, founding date, year end) to `available_at`.
#
# `applications` are the lenders' own records: `outcome` (1 = default for a microloan,
# compensation paid for a guarantee, claim paid for an insurance policy) stays empty until the
# outcome window has passed (`matured`). `oracle` holds the true probability of default and
# exists only in the simulator, to check models against the truth; it is never a feature.

# %%
NOTES = {
    "registration": "business registration (工商): industry, district, founding date, capital",
    "registration_events": "legal-representative changes, abnormal-operations listings",
    "tax": "monthly tax filings (税务): declared sales, tax paid, overdue tax, late filing",
    "tax_credit_rating": "yearly tax-credit rating A / B / M / C / D",
    "electricity": "monthly kWh, only firms with their own meter (企业用电)",
    "social_insurance": "monthly insured headcount (社保)",
    "payments": "monthly payment inflow / outflow and counterparties (交易支付)",
    "receivables_payables": "monthly receivables, overdue receivables, payables (应收应付)",
    "judicial_events": "lawsuits, enforcement, dishonest-debtor listing, penalties (司法)",
    "credit_history": "monthly reports of banks, microloan and guarantee firms (征信)",
    "applications": "microloan / guarantee / insurance applications and their outcomes",
    "oracle": "the true probability of default of each application (simulator only)",
    "credit_aggregates": "monthly 30+ / 90+ dpd rates by city, district, industry (征信统计)",
}
PERIOD_END = {  # the end of the period a row describes; available_at minus this is the lag
    **{t: pl.col("month").dt.offset_by("1mo") for t in MONTHLY_TABLES},
    "registration": pl.col("founded_on"),
    "registration_events": pl.col("event_date"),
    "judicial_events": pl.col("event_date"),
    "tax_credit_rating": pl.date(pl.col("rating_year").cast(pl.Int32) + 1, 1, 1),
}


def lag_days(table: str) -> tuple[float | None, float | None]:
    if table not in PERIOD_END:
        return None, None
    lag = (pl.col("available_at").dt.date() - PERIOD_END[table]).dt.total_days()
    row = scan(P.raw, table).select(lag.median().alias("a"), lag.max().alias("b")).collect()
    return row["a"][0], row["b"][0]


lags = {t: lag_days(t) for t in TABLES}
pl.DataFrame(
    [
        {
            "table": t,
            "rows": manifest["rows"][t],
            "columns": len(scan(P.raw, t).collect_schema()),
            "lag_median_days": lags[t][0],
            "lag_max_days": lags[t][1],
            "what": NOTES[t],
        }
        for t in TABLES
    ]
)

# %% [markdown]
# ## 2. Bad rates over time
#
# Matured applications only, by the month they were made. Each point looks **forward**: a
# microloan made in month *m* defaults if the firm fails in months *m+1 .. m+12*. So the
# downturn (dashed line) raises the bad rate of applications made up to a year *before* it,
# whose outcome windows run into it, not only of those made after it. The curves stop where
# outcomes are not known yet (a microloan made in the last 12 months has not matured); the
# late guarantee points are the 6-month guarantees only, the only ones matured by then. Months
# with fewer than `MIN_N` matured applications are left out; with a few thousand enterprises
# each point still rests on a few dozen applications, so expect noise.

# %%
apps = scan(P.raw, "applications").collect()
matured = apps.filter(pl.col("matured"))
MIN_N = 10
by_month = (
    matured.group_by("product", month=pl.col("applied_at").dt.truncate("1mo").dt.date())
    .agg(rate=pl.col("outcome").mean(), n=pl.len())
    .filter(pl.col("n") >= MIN_N)
    .sort("product", "month")
)
LABEL = {"microloan": "default", "guarantee": "compensation", "insurance": "claim"}
fig, ax = plt.subplots(figsize=(10, 4.5))
for product, label in LABEL.items():
    d = by_month.filter(pl.col("product") == product)
    ax.plot(
        d["month"].to_numpy(), d["rate"].to_numpy(), marker="o", ms=3, label=f"{product}: {label}"
    )
ax.axvline(np.datetime64(DOWNTURN), color="black", ls="--", lw=1)
ax.annotate(
    "downturn starts", (np.datetime64(DOWNTURN), ax.get_ylim()[1] * 0.95), ha="right", fontsize=9
)
ax.set(title="Bad rate of matured applications by application month", ylabel="bad rate")
ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
ax.legend()
fig.tight_layout()

# %%
matured.group_by("product").agg(
    applications=pl.len(), bad_rate=pl.col("outcome").mean().round(4)
).sort("product")

# %% [markdown]
# ## 3. Bad rate by industry (microloans)
#
# Industries differ in their permanent risk and in how hard the downturn hits them
# (construction and catering are the most cyclical). Error bars are 95% binomial intervals:
# on a small system most of the differences are within noise.

# %%
names = pl.DataFrame(
    {"industry": [i.code for i in INDUSTRIES], "name": [i.name.split(",")[0] for i in INDUSTRIES]}
)
registration = scan(P.raw, "registration").select("enterprise_id", "industry").collect()
microloans = matured.filter(pl.col("product") == "microloan")
by_industry = (
    microloans.join(registration, on="enterprise_id")
    .group_by("industry")
    .agg(rate=pl.col("outcome").mean(), n=pl.len())
    .join(names, on="industry")
    .with_columns(se=(pl.col("rate") * (1 - pl.col("rate")) / pl.col("n")).sqrt())
    .sort("rate")
)
fig, ax = plt.subplots(figsize=(10, 4.5))
ypos = np.arange(by_industry.height)
ax.barh(ypos, by_industry["rate"].to_numpy(), xerr=1.96 * by_industry["se"].to_numpy(), capsize=3)
labels = [
    f"{c} {nm} (n={n})" for c, nm, n in by_industry.select("industry", "name", "n").iter_rows()
]
ax.set_yticks(ypos, labels, fontsize=8)
ax.axvline(microloans["outcome"].mean(), color="black", ls="--", lw=1, label="all industries")
ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
ax.set(title="Microloan default rate by industry (GB/T 4754 section)", xlabel="default rate")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## 4. Features against outcomes, joined point in time
#
# `kapok features build` turns the raw tables into one feature table per source family. Each
# row is a monthly **snapshot** cut on the family's publication day, using only raw rows whose
# `available_at` is at or before that moment; `event_timestamp` is the cut-off.
#
# To train on an application we must use the features **as the lender could have seen them on
# the day it decided**: the latest snapshot at or before `applied_at`, and no later. That is an
# as-of join (`join_asof`, backward, by enterprise), with a tolerance of the family's TTL (92
# days) so a source that stopped reporting reads as missing rather than as stale. Joining on
# the calendar month instead, or on the latest snapshot in the table, leaks the future: the
# model learns from overdue payments that happen *after* the decision, looks excellent in
# back-testing and disappoints in production. The table after the plots shows how large that
# illusion is here.
#
# Expect overlapping distributions: by design no single feature separates good from bad firms
# well (AUCs of roughly 0.55 to 0.70 on a large system), so a model has to combine many of
# them. Year-on-year sales growth is among the weakest, and is missing for almost half of the
# matured microloans (see section 5).

# %%
SHOWN = [
    "tax_sales_growth_yoy",
    "cred_dpd30_months_12m",
    "arap_overdue_receivables_ratio_6m",
    "tax_overdue_months_12m",
]
BY_FAMILY = {fam.name: fam for fam in FAMILIES}


def feature_table(fam: str, ids: pl.DataFrame) -> pl.DataFrame:
    """One family's snapshots for the given enterprises, sorted for the as-of join."""
    return (
        pl.scan_parquet(P.features / fam / "*.parquet")
        .join(ids.lazy(), on="enterprise_id", how="semi")
        .sort("event_timestamp")
        .collect()
    )


def point_in_time(left: pl.DataFrame, on: str, families: list[str]) -> pl.DataFrame:
    """Features of each row as they were visible at its timestamp column `on`."""
    out = left.sort(on)
    ids = left.select("enterprise_id").unique()
    for fam in families:
        out = out.join_asof(
            feature_table(fam, ids),
            left_on=on,
            right_on="event_timestamp",
            by="enterprise_id",
            strategy="backward",
            tolerance=BY_FAMILY[fam].ttl,
            check_sortedness=False,  # both sides sorted by time; polars cannot check with `by`
        ).drop("event_timestamp")
    return out


def auc(frame: pl.DataFrame, feature: str) -> float:
    """AUC of a feature used as a risk score in its schema direction (nulls left out)."""
    d = frame.select(x=pl.col(feature) * (BY_NAME[feature].direction or 1), y="outcome")
    d = d.drop_nulls().with_columns(r=pl.col("x").rank("average"))
    n1 = d["y"].sum()
    n0 = d.height - n1
    return (d.filter(pl.col("y") == 1)["r"].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


shown_families = sorted({BY_NAME[f].family for f in SHOWN})
pit = point_in_time(microloans, "applied_at", shown_families)

fig, axes = plt.subplots(2, 2, figsize=(11, 7))
for ax, feature in zip(axes.flat, SHOWN, strict=True):
    values = pit.select(feature, "outcome").drop_nulls()
    x = values[feature].to_numpy().astype(float)
    y = values["outcome"].to_numpy()
    if BY_NAME[feature].dtype == "int":
        bins = np.arange(-0.5, max(x.max(), 1) + 1.5)
    else:
        lo, hi = np.quantile(x, [0.01, 0.99])
        bins = np.linspace(lo, hi, 21)
        x = np.clip(x, lo, hi)
    for outcome, colour, label in ((0, "tab:blue", "repaid"), (1, "tab:red", "defaulted")):
        ax.hist(x[y == outcome], bins=bins, density=True, alpha=0.5, color=colour, label=label)
    missing = pit[feature].null_count() / pit.height
    ax.set_title(f"{feature}\nAUC {auc(pit, feature):.2f}, missing {missing:.0%}", fontsize=9)
    ax.set_xlabel(BY_NAME[feature].unit, fontsize=8)
axes.flat[0].legend()
fig.suptitle("Matured microloans: feature at application time, by outcome (density)")
fig.tight_layout()

# %% [markdown]
# The same features joined on the snapshot visible when the **outcome** became known (what a
# careless join on "the latest data we have" does): the AUCs jump, because the features now
# describe the firm's trouble rather than predict it.

# %%
leaked = point_in_time(microloans, "outcome_known_at", shown_families)
pl.DataFrame(
    {
        "feature": SHOWN,
        "auc_point_in_time": [round(auc(pit, f), 3) for f in SHOWN],
        "auc_leaked": [round(auc(leaked, f), 3) for f in SHOWN],
    }
)

# %% [markdown]
# ## 5. What is missing, and why
#
# Missing values are **information, not errors**, and must not be filled with zeros: a firm
# without its own electricity meter (shared premises: shops, offices, software firms) has no
# power data, not zero consumption. The main reasons in the system:
#
# * **coverage** - only firms with their own meter appear in `electricity`; about 12% of firms
#   are not on the payment network, 25% do not report receivables, 10% have no social
#   insurance records, and firms with no bank, microloan or guarantee relationship have **no
#   credit history** at all (a thin file, itself a risk signal);
# * **youth** - a firm founded 8 months ago has no year-on-year growth, no 12-month-old
#   headcount to compare with and no tax-credit rating until the first April after a full year;
# * **the start of the export** - the platform's data begin in the first simulated month, so
#   for applications in roughly the first 15 months year-on-year features are empty even for
#   old firms (this is why a quarter of the oldest firms below have no `tax_sales_growth_yoy`);
# * **never happened** - `jud_months_since_lawsuit` and `cred_months_since_dpd30` are empty
#   for firms never sued or never late.
#
# LightGBM routes missing values on its own; the scorecard gives them their own bin. Below:
# the share of null features per family over all applications at application time, the share
# of applications for which a whole source is absent, and missingness by firm age.

# %%
all_families = [fam.name for fam in FAMILIES]
at_application = point_in_time(apps, "applied_at", all_families)
n_apps = at_application.height
family_nulls = pl.DataFrame(
    [
        {
            "family": fam,
            "null_share": at_application.select(
                pl.mean_horizontal([pl.col(f.name).is_null() for f in features_of(fam)]).mean()
            ).item(),
            "source_absent": at_application.select(
                pl.all_horizontal([pl.col(f.name).is_null() for f in features_of(fam)]).mean()
            ).item(),
        }
        for fam in all_families
    ]
)
AGE_BANDS = ["< 12 months", "12-23 months", "24-59 months", "60+ months"]
age_band = (
    pl.when(pl.col("reg_firm_age_months") < 12)
    .then(pl.lit(AGE_BANDS[0]))
    .when(pl.col("reg_firm_age_months") < 24)
    .then(pl.lit(AGE_BANDS[1]))
    .when(pl.col("reg_firm_age_months") < 60)
    .then(pl.lit(AGE_BANDS[2]))
    .otherwise(pl.lit(AGE_BANDS[3]))
)
BY_AGE = [
    "tax_sales_growth_yoy",
    "tax_credit_rating_rank",
    "si_headcount_growth_12m",
    "power_kwh_3m",
]
by_age = (
    at_application.group_by(band=age_band)
    .agg([pl.col(f).is_null().mean() for f in BY_AGE] + [pl.len().alias("n")])
    .join(pl.DataFrame({"band": AGE_BANDS, "order": range(4)}), on="band")
    .sort("order")
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
ypos = np.arange(family_nulls.height)
ax1.barh(ypos + 0.2, family_nulls["null_share"].to_numpy(), 0.4, label="features null (mean)")
ax1.barh(ypos - 0.2, family_nulls["source_absent"].to_numpy(), 0.4, label="whole source absent")
ax1.set_yticks(ypos, family_nulls["family"].to_list(), fontsize=8)
ax1.invert_yaxis()
ax1.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
ax1.set_title(f"Missing at application time, by family ({n_apps:,} applications)", fontsize=10)
ax1.legend(fontsize=8)
xpos = np.arange(len(BY_AGE))
for i, row in enumerate(by_age.iter_rows(named=True)):
    shares = [row[f] for f in BY_AGE]
    ax2.bar(xpos + (i - 1.5) * 0.2, shares, 0.2, label=f"{row['band']} (n={row['n']})")
ax2.set_xticks(xpos, BY_AGE, fontsize=8, rotation=10)
ax2.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
ax2.set_title("Share missing by firm age at application", fontsize=10)
ax2.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# Electricity coverage follows the industry: manufacturers almost all have their own meter,
# software and business-services firms mostly share one. The simulator's meter share per
# industry against the share of applications with power data:

# %%
meters = pl.DataFrame(
    {
        "reg_industry": [i.code for i in INDUSTRIES],
        "name": [i.name[:40] for i in INDUSTRIES],
        "meter_share_simulated": [i.meter_share for i in INDUSTRIES],
    }
)
(
    at_application.group_by("reg_industry")
    .agg(power_data_share=pl.col("power_kwh_3m").is_not_null().mean().round(3), n=pl.len())
    .join(meters, on="reg_industry")
    .sort("meter_share_simulated")
)
