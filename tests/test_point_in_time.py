"""Point-in-time correctness: what Feast returns for (enterprise, time) is exactly what the raw
tables allowed anyone to know at that time — recomputed here independently of the pipelines."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from features import store as fs
from features.schema import FAMILIES, FEATURES
from kapok.bigdata.generate import scan

pytestmark = pytest.mark.slow
START = date(2023, 1, 1)
TTL = timedelta(days=92)
DAY = {f.name: f.publication_day for f in FAMILIES}


def add_months(d: date, months: int) -> date:
    total = d.year * 12 + d.month - 1 + months
    return date(total // 12, total % 12 + 1, d.day)


def month_idx(d: date) -> int:
    return (d.year - START.year) * 12 + d.month - START.month


class Raw:
    """The raw tables in memory and the rules a credit analyst would apply by hand."""

    def __init__(self, raw_dir, months: int):
        self.months = months
        self.t = {
            name: scan(raw_dir, name).collect()
            for name in (
                "registration",
                "tax",
                "tax_credit_rating",
                "electricity",
                "social_insurance",
                "payments",
                "judicial_events",
                "credit_history",
                "receivables_payables",
                "registration_events",
            )
        }
        self.founded = dict(
            self.t["registration"].select("enterprise_id", "founded_on").iter_rows()
        )

    def snapshot(self, eid: str, at: datetime, family: str) -> tuple[int, datetime] | None:
        """The latest snapshot cut at or before `at` that Feast may use (within TTL)."""
        founded_idx = month_idx(self.founded[eid])
        for m in range(self.months - 1, -1, -1):
            cut = datetime.combine(
                add_months(START, m + 1).replace(day=DAY[family]), datetime.min.time(), UTC
            )
            if cut <= at:
                if m < founded_idx or at - cut > TTL:
                    return None
                return m, cut
        return None

    def rows(self, table: str, eid: str, cut: datetime, first: int, last: int) -> pl.DataFrame:
        frame = self.t[table].filter(
            (pl.col("enterprise_id") == eid) & (pl.col("available_at") <= cut)
        )
        k = (pl.col("month").dt.year() - START.year) * 12 + pl.col("month").dt.month() - START.month
        return frame.filter(k.is_between(first, last))

    def expected(self, eid: str, at: datetime, amount: float) -> dict[str, object]:
        out: dict[str, object] = {}
        snap = self.snapshot(eid, at, "tax")
        if snap:
            m, cut = snap
            r3, r12 = self.rows("tax", eid, cut, m - 2, m), self.rows("tax", eid, cut, m - 11, m)
            out["tax_sales_3m"] = r3["declared_sales"].sum() if r3.height else None
            out["tax_sales_12m"] = r12["declared_sales"].sum() if r12.height else None
            out["tax_late_filings_12m"] = int(r12["filed_late"].sum()) if r12.height else None
            rating = self.t["tax_credit_rating"].filter(
                (pl.col("enterprise_id") == eid) & (pl.col("available_at") <= cut)
            )
            ranks = {"A": 1, "B": 2, "M": 3, "C": 4, "D": 5}
            out["tax_credit_rating_rank"] = (
                ranks[rating.sort("available_at")["rating"][-1]] if rating.height else None
            )
            sales = out["tax_sales_12m"]
            out["req_loan_to_sales_12m"] = amount / sales if sales else None
        else:
            for name in ("tax_sales_3m", "tax_sales_12m", "tax_late_filings_12m",
                         "tax_credit_rating_rank", "req_loan_to_sales_12m"):  # fmt: skip
                out[name] = None
        snap = self.snapshot(eid, at, "power")
        r = self.rows("electricity", eid, snap[1], snap[0] - 2, snap[0]) if snap else None
        out["power_kwh_3m"] = r["kwh"].sum() if r is not None and r.height else None
        snap = self.snapshot(eid, at, "social_insurance")
        r = self.rows("social_insurance", eid, snap[1], snap[0] - 2, snap[0]) if snap else None
        out["si_headcount"] = (
            int(r.sort("month")["insured_headcount"][-1]) if r is not None and r.height else None
        )
        snap = self.snapshot(eid, at, "payments")
        r = self.rows("payments", eid, snap[1], snap[0] - 2, snap[0]) if snap else None
        out["pay_inflow_3m"] = r["inflow"].sum() if r is not None and r.height else None
        snap = self.snapshot(eid, at, "judicial")
        if snap:
            m, cut = snap
            published = self.events("judicial_events", eid, cut)  # (type, month) seen by cut
            out["jud_lawsuits_12m"] = sum(t == "lawsuit" and m - 11 <= k <= m for t, k in published)
            # knock-out inputs: enforcement cases of the last 12 months, a dishonest-debtor
            # listing within the last 24
            out["jud_enforcements_12m"] = sum(
                t == "enforcement" and m - 11 <= k <= m for t, k in published
            )
            out["jud_dishonest_debtor_listed"] = int(
                any(t == "dishonest_debtor" and m - 23 <= k <= m for t, k in published)
            )
        else:
            for name in ("jud_lawsuits_12m", "jud_enforcements_12m",
                         "jud_dishonest_debtor_listed"):  # fmt: skip
                out[name] = None
        out.update(self.receivables_payables(eid, at))
        snap = self.snapshot(eid, at, "credit_history")
        r = self.rows("credit_history", eid, snap[1], snap[0] - 11, snap[0]) if snap else None
        out["cred_dpd30_months_12m"] = (
            r.filter(pl.col("dpd30"))["month"].n_unique() if r is not None and r.height else None
        )
        snap = self.snapshot(eid, at, "registration")
        out["reg_firm_age_months"] = snap[0] - month_idx(self.founded[eid]) if snap else None
        out["reg_abnormal_ops_listed"] = None
        if snap:
            # on the abnormal-operations list: the latest listing published by the cut is not
            # followed by a removal in a later month (a removal in the listing's month does not
            # count: conservative)
            seen = self.events("registration_events", eid, snap[1])
            listed = max((k for t, k in seen if t == "abnormal_ops_listed"), default=None)
            removed = max((k for t, k in seen if t == "abnormal_ops_removed"), default=None)
            out["reg_abnormal_ops_listed"] = int(
                listed is not None and (removed is None or listed >= removed)
            )
        return out

    def events(self, table: str, eid: str, cut: datetime) -> list[tuple[str, int]]:
        """(event type, event month index) of the events published by `cut`."""
        ev = self.t[table].filter(
            (pl.col("enterprise_id") == eid) & (pl.col("available_at") <= cut)
        )
        return [(t, month_idx(d)) for t, d in ev.select("event_type", "event_date").iter_rows()]

    def receivables_payables(self, eid: str, at: datetime) -> dict[str, object]:
        """The family from the monthly rows published by the cut: month m is the snapshot's own,
        a value of month m-d is used only if that month's row had been published."""
        names = ("arap_receivables", "arap_overdue_receivables_ratio",
                 "arap_overdue_receivables_ratio_6m", "arap_days_payable",
                 "arap_days_payable_change_6m")  # fmt: skip
        snap = self.snapshot(eid, at, "receivables_payables")
        if not snap:
            return dict.fromkeys(names)
        m, cut = snap
        rows = self.rows("receivables_payables", eid, cut, m - 6, m)
        month = {month_idx(r["month"]): r for r in rows.iter_rows(named=True)}

        def value(col: str, d: int) -> float | None:
            return month[m - d][col] if m - d in month else None

        def latest(col: str) -> float | None:  # the newest known value of the last 3 months
            return next((v for d in range(3) if (v := value(col, d)) is not None), None)

        def total(col: str, n: int) -> float | None:
            known = [v for d in range(n) if (v := value(col, d)) is not None]
            return sum(known) if known else None

        ar, overdue = latest("receivables"), latest("overdue_receivables")
        ar6, overdue6 = total("receivables", 6), total("overdue_receivables", 6)
        now, before = value("days_payable", 0), value("days_payable", 6)
        values = (
            ar,
            overdue / ar if ar is not None and ar > 0 and overdue is not None else None,
            overdue6 / ar6 if ar6 is not None and ar6 > 0 and overdue6 is not None else None,
            latest("days_payable"),
            now - before if now is not None and before is not None else None,
        )
        return dict(zip(names, values, strict=True))


@pytest.fixture(scope="module")
def store(small_system):
    p = small_system.paths
    feature_store = fs.feature_store(p)
    fs.apply(feature_store, p)
    return feature_store


@pytest.fixture(scope="module")
def raw(small_system) -> Raw:
    return Raw(small_system.paths.raw, small_system.config.months)


def feast_rows(store, entities: list[tuple[str, datetime]], amount: float = 250_000.0):
    frame = pl.DataFrame(
        {
            "enterprise_id": [e for e, _ in entities],
            "event_timestamp": [t for _, t in entities],
            "requested_amount": [amount] * len(entities),
            "term_months": [12] * len(entities),
        },
        schema_overrides={"event_timestamp": pl.Datetime("us", "UTC")},
    ).with_row_index("row")
    result = fs.historical_features(store, frame, "microloan").sort("row")
    assert result["row"].to_list() == list(range(len(entities))), result["row"].to_list()
    return result.to_dicts()


def assert_same(got: dict, want: dict, context: str) -> None:
    for name, value in want.items():
        actual = got[name]
        if value is None:
            assert actual is None or (isinstance(actual, float) and math.isnan(actual)), (
                f"{context}: {name} should be null, got {actual}"
            )
        else:
            assert actual == pytest.approx(value, rel=1e-9), f"{context}: {name}"


def test_sampled_pairs_match_recomputation_from_raw(store, raw, small_system):
    rng = np.random.default_rng(0)
    ids = raw.t["registration"]["enterprise_id"].to_list()
    entities = []
    for eid in rng.choice(ids, 40, replace=False):
        seconds = rng.integers(0, int(timedelta(days=1140).total_seconds()))
        entities.append(
            (str(eid), datetime(2023, 1, 1, tzinfo=UTC) + timedelta(seconds=int(seconds)))
        )
    # exactly on a cut-off: the snapshot published at that instant is usable
    entities.append((str(ids[0]), datetime(2024, 6, 15, tzinfo=UTC)))
    got = feast_rows(store, entities)
    checked = 0
    for (eid, at), row in zip(entities, got, strict=True):
        assert row["enterprise_id"] == eid
        want = raw.expected(eid, at, 250_000.0)
        assert_same(row, want, f"{eid} at {at}")
        checked += sum(v is not None for v in want.values())
    assert checked > 200  # most of the sampled values are real numbers, not nulls


def test_knock_out_inputs_match_recomputation_from_raw(store, raw):
    """Dishonest-debtor listings, enforcement cases and abnormal-operations listings (and their
    removal) are rare in a random sample: here each is looked at around its own publication — a
    second before the first cut-off that sees it, on it, a year and two years on."""
    judicial, registration = raw.t["judicial_events"], raw.t["registration_events"]
    picked = [
        *judicial.filter(pl.col("event_type") == "dishonest_debtor").head(4).iter_rows(named=True),
        *judicial.filter(pl.col("event_type") == "enforcement").head(4).iter_rows(named=True),
        *registration.filter(pl.col("event_type").str.starts_with("abnormal_ops"))
        .head(8)
        .iter_rows(named=True),
    ]
    entities = []
    for event in picked:
        family = "judicial" if "amount" in event else "registration"
        day = DAY[family]
        published = event["available_at"]
        first = datetime(published.year, published.month, day, tzinfo=UTC)
        if first < published:  # the next cut-off on the family's publication day
            first = datetime.combine(add_months(first.date(), 1), datetime.min.time(), UTC)
        for at in (first - timedelta(seconds=1), first, first + timedelta(days=366),
                   first + timedelta(days=731)):  # fmt: skip
            entities.append((event["enterprise_id"], at))
    # once each: Feast's retrieval answers only one of two identical (enterprise, time) rows,
    # and historical_features then gives the other null features
    entities = list(dict.fromkeys(entities))
    got = feast_rows(store, entities)
    seen: dict[str, set] = {}
    for (eid, at), row in zip(entities, got, strict=True):
        want = raw.expected(eid, at, 250_000.0)
        assert_same(row, want, f"{eid} at {at}")
        for name in ("jud_dishonest_debtor_listed", "jud_enforcements_12m",
                     "reg_abnormal_ops_listed"):  # fmt: skip
            seen.setdefault(name, set()).add(want[name])
    # both sides of every knock-out were compared, not only the common "nothing on record"
    assert {0, 1} <= seen["jud_dishonest_debtor_listed"]
    assert {0, 1} <= seen["reg_abnormal_ops_listed"]
    assert 0 in seen["jud_enforcements_12m"] and max(v or 0 for v in seen["jud_enforcements_12m"])


def test_before_the_firm_existed_everything_is_null(store, raw):
    reg = raw.t["registration"].filter(pl.col("founded_on") > date(2024, 3, 1))
    eid, founded = reg.row(0)[0], reg["founded_on"][0]
    at = datetime.combine(founded - timedelta(days=10), datetime.min.time(), UTC)
    row = feast_rows(store, [(eid, at)])[0]
    for feature in FEATURES:
        value = row[feature.name]
        assert value is None or (isinstance(value, float) and math.isnan(value)), feature.name


def test_late_tax_filing_is_invisible_until_it_arrives(store, raw):
    """Month k's return filed late: between the normal cut-off and its arrival it must not count.

    A join on the month alone (ignoring available_at) would include it: that is the leak.
    """
    late = raw.t["tax"].filter(
        pl.col("filed_late")
        & (pl.col("month") >= date(2023, 6, 1))
        & (pl.col("month") <= date(2025, 6, 1))
    )
    eid, month, arrived = late.select("enterprise_id", "month", "available_at").row(0)
    normal_cut = datetime.combine(add_months(month, 1).replace(day=15), datetime.min.time(), UTC)
    at = normal_cut + timedelta(days=1)
    assert at < arrived
    row = feast_rows(store, [(eid, at)])[0]
    want = raw.expected(eid, at, 250_000.0)
    assert_same(row, want, "late filing")
    k = month_idx(month)
    leaky = (
        raw.t["tax"]
        .filter(pl.col("enterprise_id") == eid)
        .filter(
            pl.col("month").map_elements(month_idx, return_dtype=pl.Int64).is_between(k - 2, k)
        )["declared_sales"]
        .sum()
    )
    assert row["tax_sales_3m"] != pytest.approx(leaky)
    # once it has arrived, a later snapshot includes it
    after = datetime.combine(arrived.date() + timedelta(days=40), datetime.min.time(), UTC)
    assert_same(feast_rows(store, [(eid, after)])[0], raw.expected(eid, after, 250_000.0), "after")


def test_a_second_before_the_cut_off_uses_the_previous_snapshot(store, raw):
    eid = raw.t["registration"].filter(pl.col("founded_on") < date(2022, 1, 1))["enterprise_id"][3]
    cut = datetime(2024, 9, 15, tzinfo=UTC)  # tax snapshot of 2024-08
    before, on = feast_rows(store, [(eid, cut - timedelta(seconds=1)), (eid, cut)])
    assert_same(before, raw.expected(eid, cut - timedelta(seconds=1), 250_000.0), "before")
    assert_same(on, raw.expected(eid, cut, 250_000.0), "on")
    assert before["tax_sales_3m"] != on["tax_sales_3m"]


def test_court_records_count_only_once_published(store, raw):
    ev = raw.t["judicial_events"].filter(
        (pl.col("event_type") == "lawsuit")
        & (pl.col("available_at").dt.month() != pl.col("event_date").dt.month())
        & (pl.col("event_date") > date(2023, 3, 1))
    )
    eid, event_date, published = ev.select("enterprise_id", "event_date", "available_at").row(0)
    # the first judicial cut-off after the lawsuit's month ends, but before it was published
    cut = datetime.combine(add_months(event_date, 1).replace(day=1), datetime.min.time(), UTC)
    assert cut < published
    row = feast_rows(store, [(eid, cut)])[0]
    want = raw.expected(eid, cut, 250_000.0)
    assert_same(row, want, "unpublished lawsuit")
    later = datetime.combine(
        add_months(published.date(), 1).replace(day=2), datetime.min.time(), UTC
    )
    row_later = feast_rows(store, [(eid, later)])[0]
    assert (
        row_later["jud_lawsuits_12m"] == row["jud_lawsuits_12m"] + 1
        or row_later["jud_lawsuits_12m"] == raw.expected(eid, later, 250_000.0)["jud_lawsuits_12m"]
    )
    assert row_later["jud_lawsuits_12m"] > row["jud_lawsuits_12m"]


def test_money_sums_do_not_depend_on_row_order():
    """Two builds from the same raw tables must give the same features to the last bit (the
    training data's content hash, and so the Optuna study and the model, depend on it): summing
    amounts in float in whatever order a parallel group-by meets them did not."""
    from features.pipelines import Panel, event_counts

    rng = np.random.default_rng(3)
    n = 20_000
    day = datetime(2024, 1, 10, tzinfo=UTC)
    events = pl.DataFrame(
        {
            "enterprise_id": rng.integers(0, 50, n).astype(str),
            "event_type": np.full(n, "lawsuit"),
            "event_date": [
                date(2024, 1, 1) + timedelta(days=int(d)) for d in rng.integers(0, 300, n)
            ],
            "available_at": [day + timedelta(days=int(d)) for d in rng.integers(0, 330, n)],
            "amount": np.round(rng.lognormal(11, 1.5, n), 2),
        }
    )
    registration = pl.DataFrame(
        {"enterprise_id": [str(i) for i in range(50)], "founded_on": [date(2020, 1, 1)] * 50}
    )
    panel = Panel.of(registration, 12, date(2024, 1, 1))
    windows = {"amount_12m": ("lawsuit", 12, "amount")}
    first = event_counts(panel, events, 5, windows)["amount_12m"]
    # the sum is the exact sum of the amounts in cents of the events each snapshot can see
    cents = np.round(events["amount"].to_numpy() * 100).astype(np.int64)
    k = np.array([(d.year - 2024) * 12 + d.month - 1 for d in events["event_date"]])
    e = events["enterprise_id"].cast(pl.Int64).to_numpy()
    at = events["available_at"].to_list()
    e0, t0 = int(e[0]), 11
    cut = datetime(2024 + (t0 + 1) // 12, (t0 + 1) % 12 + 1, 5, tzinfo=UTC)
    index = int(np.flatnonzero(panel.ids.to_numpy() == str(e0))[0])
    want = sum(
        int(c)
        for c, kk, ee, a in zip(cents, k, e, at, strict=True)
        if ee == e0 and a <= cut and t0 - 12 < kk <= t0
    )
    assert round(first[index, t0] * 100) == want
    for seed in range(3):
        shuffled = events.sample(fraction=1.0, shuffle=True, seed=seed)
        again = event_counts(panel, shuffled, 5, windows)["amount_12m"]
        assert again.tobytes() == first.tobytes()
