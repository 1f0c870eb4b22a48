"""`kapok prospect`: pre-approved offers (精准营销) on the small trained system.

What a lender would notice: a current borrower or an enterprise the policy knocks out, refers or
declines is never offered anything; every offer has a limit, a PD under the approve cut-off, a
price and the reasons it qualifies; each offer is a logged decision in a chain that verifies;
the district filter keeps that district only; bad input is one line, exit 2, nothing written.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from features.raw_tables import DISTRICTS, INDUSTRY_SECTIONS
from features.request import request_features
from features.schema import FEATURES
from kapok.cli import app
from review import portfolio as pf
from review import prospect as pr
from serving import core
from serving import policy as pol
from serving.reasons import favourable_from, reason

AS_OF = date(2025, 6, 15)  # inside the small system's 2023-01 .. 2025-12 window
POLICY = pol.load_policy()
MICROLOAN = POLICY.product("microloan")


# -- the favourable reasons ----------------------------------------------------------------------
def test_favourable_reasons_are_the_features_that_lowered_the_risk_most():
    model = SimpleNamespace(index={"tax_sales_12m": 0, "reg_firm_age_months": 1,
                                   "jud_enforcements_12m": 2, "si_headcount": 3,
                                   "cred_dpd30_months_12m": 4})  # fmt: skip
    contrib = np.array([-0.30, -0.10, 0.50, -0.10, 0.0, 0.2])  # last: the base value
    values = {"tax_sales_12m": 130_300.0, "reg_firm_age_months": 18, "si_headcount": 12,
              "jud_enforcements_12m": 3}  # fmt: skip
    got = favourable_from(contrib, model, values)
    # most negative first, a tie by name; a feature that raised the risk (or did nothing) never
    assert [r.feature for r in got] == ["tax_sales_12m", "reg_firm_age_months", "si_headcount"]
    assert [r.code for r in got] == ["F_TAX_SALES_12M", "F_REG_FIRM_AGE_MONTHS", "F_SI_HEADCOUNT"]
    assert [r.impact for r in got] == [-0.30, -0.10, -0.10]
    # worded as an adverse reason is worded
    assert got[0].text_en == "Declared sales, last 12 months: CNY 130,300"
    assert (
        got[0].text_zh
        == reason("tax_sales_12m", 130_300.0, 0.3).text_zh
        == ("近12个月申报销售额：13.03万元")
    )
    assert favourable_from(np.array([0.1, 0.2, 0.0, 0.3, 0.4, 0.0]), model, values) == []


# -- helpers -------------------------------------------------------------------------------------
def _run(trained_home, tmp: Path, log: str, **options) -> pr.Offers:
    req = pr.parse_request(trained_home.paths, "microloan", AS_OF, **options)
    return pr.run(trained_home.paths, req, out=tmp / "out", log_url=log)


def _loan(eid: str, at: datetime, decision: str = "approve", term: int = 12):
    """A logged application decision of CNY 200,000 for `term` months (a loan if approved)."""
    from serving.decision_log import DecisionRecord, new_request_id

    return DecisionRecord(
        request_id=new_request_id(), decided_at=at, caller="test", endpoint="score",
        enterprise_id=eid, product="microloan",
        request={"requested_amount": 200_000.0, "term_months": term},
        model_name="kapok-microloan", model_version="1", features={}, feature_timestamps={},
        pd=0.02, score=650.0, grade="B2", decision=decision, limit_amount=None, price=None,
        reasons=[], response={},
    )  # fmt: skip


def _region_features(trained_home) -> pl.DataFrame:
    """Every enterprise's point-in-time features at the as-of date (Feast's join)."""
    from serving.batch import point_in_time

    req = pr.parse_request(trained_home.paths, "microloan", AS_OF)
    ids = pr.region(trained_home.paths.features, req)["enterprise_id"]
    apps = pl.DataFrame({"enterprise_id": ids}).with_row_index("row")
    apps = apps.with_columns(pl.lit(req.at).cast(pl.Datetime("us", "UTC")).alias("event_timestamp"))
    return point_in_time(trained_home.paths.features, apps)


def _reference_pd(model, values: dict, amount: float, term: int) -> float:
    v = dict(values)
    v.update(request_features(amount, term, values["tax_sales_12m"], values["pay_inflow_3m"]))
    return float(model.scorer.calibrator(model.margin(model.row(v)))[0])


@pytest.fixture(scope="module")
def plain(trained_home, tmp_path_factory) -> tuple[Path, str, pr.Offers]:
    """One run with an empty book: every offer the region has."""
    tmp = tmp_path_factory.mktemp("prospect")
    log = f"sqlite:///{tmp / 'decisions.db'}"
    return tmp, log, _run(trained_home, tmp, log)


# -- who is offered ------------------------------------------------------------------------------
@pytest.mark.slow
def test_no_borrower_and_no_knocked_out_or_unapproved_enterprise_is_offered(
    trained_home, plain, tmp_path
):
    from serving.decision_log import DecisionLog
    from serving.model import load_champion

    _, _, first = plain
    offered = first.frame["enterprise_id"].to_list()
    assert len(offered) > 50
    # every enterprise of the region is an offer or counted with why it is not
    assert first.decided == first.region == len(offered) + sum(first.not_offered.values())
    assert first.not_offered["knocked_out"] > 0 and first.not_offered["not_approved"] > 0

    # the book: five of those enterprises borrow now (approved, still running); one applied and
    # was declined, one borrowed and repaid: those two are not borrowers and stay on the list
    day = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
    borrowers, declined, repaid = offered[:5], offered[5], offered[6]
    log = f"sqlite:///{tmp_path / 'decisions.db'}"
    with DecisionLog(log) as writer:
        loans = [_loan(e, day - timedelta(days=30 * i)) for i, e in enumerate(borrowers)]
        others = [_loan(declined, day, "decline"), _loan(repaid, day - timedelta(days=400), term=6)]
        writer.write_many(loans + others)
    second = _run(trained_home, tmp_path, log)
    again = set(second.frame["enterprise_id"].to_list())
    assert not again & set(borrowers)
    assert {declined, repaid} <= again
    assert again == set(offered) - set(borrowers)
    assert second.borrowers == 5 and second.region == first.region

    # a book kept elsewhere: the same
    book = tmp_path / "book.csv"
    pl.DataFrame({"enterprise_id": offered[10:13]}).write_csv(book)
    req = pr.parse_request(trained_home.paths, "microloan", AS_OF)
    third = pr.run(trained_home.paths, req, portfolio=book, out=tmp_path / "o3", log_url=log)
    assert not set(third.frame["enterprise_id"].to_list()) & set(offered[10:13])
    assert third.frame.height == first.frame.height - 3

    # the policy's own per-row rules on the region's point-in-time features: an enterprise a
    # knock-out fires on (decline or refer) is never offered, nor one no amount would approve
    feats = _region_features(trained_home)
    rows = {r["enterprise_id"]: r for r in feats.to_dicts()}
    knocked = {e for e, r in rows.items() if pol.knockouts(r, POLICY)}
    assert len(knocked) > 100  # the region has many: the check checks something
    assert not knocked & set(offered)
    model = load_champion(trained_home.paths, "microloan")
    rest = sorted(set(rows) - knocked - set(offered))
    assert len(rest) > 50
    for eid in rest[:40]:  # the reference limit search (slow per row): none is approved
        values = {f.name: rows[eid][f.name] for f in FEATURES}
        lim = pol.limit(lambda a, v=values: _reference_pd(model, v, a, 12), 1_000_000.0, 12,
                        MICROLOAN, values, POLICY)  # fmt: skip
        assert lim.limit == 0 or lim.decision.decision != "approve", eid

    # every offer: a limit, a PD under the approve cut-off, approved by the per-row reference
    # at that limit on the features it was logged with
    frame = first.frame
    assert (frame["limit"] > 0).all()
    assert (frame["pd"] <= MICROLOAN.approve_max_pd).all()
    assert (frame["limit"] <= MICROLOAN.policy_cap).all()
    assert frame["pd"].is_sorted() and frame["rank"].to_list() == list(range(1, frame.height + 1))
    assert frame["grade"].to_list() == [pol.grade(p, POLICY) for p in frame["pd"]]
    assert np.allclose(frame["expected_loss"], frame["pd"] * MICROLOAN.lgd * frame["limit"])
    assert np.allclose(frame["expected_revenue"], frame["annual_rate"] * frame["limit"])
    with DecisionLog(plain[1]) as reader:
        for row in frame.head(30).iter_rows(named=True):
            record = reader.get(row["request_id"])
            values = dict(record.features)
            pd_ = float(model.scorer.calibrator(model.margin(model.row(values)))[0])
            assert math.isclose(pd_, row["pd"], rel_tol=1e-9)
            assert pol.knockouts(values, POLICY) == []
            price = pol.price(pd_, row["limit"], 12, MICROLOAN, values["tax_sales_12m"], POLICY)
            assert price.rate == pytest.approx(row["annual_rate"], rel=1e-12)
            made = pol.decide(pd_, MICROLOAN, [], price_ok=price.within_cap)
            assert made.decision == "approve"
            # the reasons it qualifies lowered its risk
            assert len(row["reasons"]) == 3 and all(c.startswith("F_") for c in row["reason_codes"])
            assert all(r["impact"] < 0 and not r["knockout"] for r in record.reasons)


@pytest.mark.slow
def test_reasons_in_columns_are_the_per_row_favourable_reasons(trained_home, plain):
    from serving.model import load_champion

    model = load_champion(trained_home.paths, "microloan")
    feats = _region_features(trained_home).head(300)
    requests = feats.select(*core.STORED_SCHEMA).with_columns(
        pl.lit(200_000.0).alias("requested_amount"), pl.lit(12).alias("term_months")
    )
    d = core.decide(model, requests, POLICY, reasons="all")
    values = d.rows()
    columns = pr.favourable_reasons(d, values)
    for r in range(len(values)):
        assert columns[r] == favourable_from(d.contributions[r], model, values[r]), r


# -- the log -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_offers_are_logged_decisions_in_a_chain_that_verifies(trained_home, plain, tmp_path):
    from serving.audit import verify
    from serving.decision_log import DecisionLog

    _, log, first = plain
    with DecisionLog(log) as reader:
        logged = reader.frame(endpoints=["prospect"])
        assert reader.frame().height == 0  # applications only, by default: offers are not loans
    assert logged.height == first.logged == first.frame.height
    assert set(logged["request_id"]) == set(first.frame["request_id"])
    assert set(logged["caller"]) == {"prospect"} and set(logged["decision"]) == {"approve"}
    request = logged["request"].str.json_decode().struct.unnest()
    assert set(request["as_of"]) == {str(AS_OF)}
    assert (request["requested_amount"] == logged["limit_amount"]).all()
    assert set(request["term_months"]) == {12}
    decided = logged["decided_at"].max()
    assert datetime.now(UTC) - decided < timedelta(hours=2)  # the wall clock, not the as-of date
    verdict = verify(log)
    assert verdict.intact and verdict.records == first.logged
    # a book read from a log full of offers is still empty: offers are not loans
    assert pf.from_decision_log(log, "microloan", pf.end_of_day(AS_OF)).height == 0

    # twice: a second set of offers, fresh request ids, the chain still intact
    copy = tmp_path / "decisions.db"
    copy.write_bytes(Path(log.removeprefix("sqlite:///")).read_bytes())
    second = _run(trained_home, tmp_path, f"sqlite:///{copy}", top=10)
    assert second.run_id != first.run_id
    assert not set(second.frame["request_id"]) & set(first.frame["request_id"])
    verdict = verify(f"sqlite:///{copy}")
    assert verdict.intact and verdict.records == first.logged + 10


# -- the command ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_district_filter_top_and_files(trained_home, plain, tmp_path, monkeypatch):
    monkeypatch.setenv("KAPOK_HOME", str(trained_home.paths.home))
    monkeypatch.setenv("KAPOK_DECISION_LOG", f"sqlite:///{tmp_path / 'decisions.db'}")
    _, _, first = plain
    runner = CliRunner()
    out = tmp_path / "out"
    base = ["prospect", "--product", "microloan", "--as-of", str(AS_OF), "--out", str(out)]
    ran = runner.invoke(app, [*base, "--district", "440113", "--district", "荔湾区"])
    assert ran.exit_code == 0, ran.output
    offers = pl.read_parquet(out / f"prospect-microloan-{AS_OF}.parquet")
    assert offers.height > 0
    assert set(offers["district"]) == {"Panyu", "Liwan"}
    expected = first.frame.filter(pl.col("district").is_in(["Panyu", "Liwan"]))
    assert offers["enterprise_id"].to_list() == expected["enterprise_id"].to_list()
    csv = pl.read_csv(out / f"prospect-microloan-{AS_OF}.csv")
    assert csv["enterprise_id"].to_list() == offers["enterprise_id"].to_list()
    for column in ("district", "industry", "size_class", "pd", "score", "grade", "limit",
                   "annual_rate", "expected_loss", "expected_revenue", "reasons"):  # fmt: skip
        assert column in csv.columns, column
    html = (out / f"prospect-microloan-{AS_OF}.html").read_text(encoding="utf-8")
    for heading in ("By grade", "By district", "By industry", "Top offers", "番禺区"):
        assert heading in html
    assert offers["enterprise_id"][0] in html and "http://" not in html

    ran = runner.invoke(app, [*base, "--top", "7", "--industry", "f"])
    assert ran.exit_code == 0, ran.output
    top = pl.read_parquet(out / f"prospect-microloan-{AS_OF}.parquet")
    best = first.frame.filter(pl.col("industry") == "F").head(7)
    assert top["enterprise_id"].to_list() == best["enterprise_id"].to_list()
    assert "7 offers" in " ".join(ran.output.split())

    # a district and an industry with no offer at all: an empty list, with its columns
    taken = set(first.frame.select("district", "industry").iter_rows())
    district, industry = next(
        (d, i) for _, d, _ in DISTRICTS for i in INDUSTRY_SECTIONS if (d, i) not in taken
    )
    ran = runner.invoke(app, [*base, "--district", district, "--industry", industry])
    assert ran.exit_code == 0, ran.output
    empty = pl.read_csv(out / f"prospect-microloan-{AS_OF}.csv")
    assert empty.height == 0 and "enterprise_id" in empty.columns


@pytest.mark.slow
def test_cli_bad_input_is_one_line_and_writes_nothing(trained_home, tmp_path, monkeypatch):
    monkeypatch.setenv("KAPOK_HOME", str(trained_home.paths.home))
    database = tmp_path / "decisions.db"
    monkeypatch.setenv("KAPOK_DECISION_LOG", f"sqlite:///{database}")
    out = tmp_path / "out"
    runner = CliRunner()
    cases = {
        ("--product", "mortgage", "--as-of", str(AS_OF)): "--product must be one of",
        ("--product", "microloan", "--as-of", "2025-02-30"): "--as-of must be a date",
        ("--product", "microloan", "--as-of", "2031-01-31"): "after the data",
        ("--product", "microloan", "--as-of", "2019-01-31"): "before the data",
        ("--product", "microloan", "--as-of", str(AS_OF), "--district", "Atlantis"):
            "unknown --district 'Atlantis': use one of 440103 Liwan 荔湾区",
        ("--product", "microloan", "--as-of", str(AS_OF), "--industry", "ZZ"):
            "unknown --industry 'ZZ'",
        ("--product", "microloan", "--as-of", str(AS_OF), "--term", "48"):
            "--term must be 1 to 36 months",
        ("--product", "guarantee", "--as-of", str(AS_OF)): "no @champion model for kapok-guarantee",
    }  # fmt: skip
    for args, message in cases.items():
        ran = runner.invoke(app, ["prospect", *args, "--out", str(out)])
        assert ran.exit_code == 2, (args, ran.output)
        lines = ran.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), ran.output
        assert message in lines[0], ran.output
        assert "Traceback" not in ran.output
    assert not out.exists() and not database.exists()


@pytest.mark.slow
def test_failures_as_a_process_are_one_line_on_stderr(trained_home, tmp_path):
    """As a user runs it: exit 2, one line on stderr, nothing on stdout (no library warning, no
    progress bar), nothing written."""
    from tests.cli_processes import run_forked
    from tests.test_cli import assert_one_line_error

    env = {"KAPOK_HOME": str(trained_home.paths.home),
           "KAPOK_DECISION_LOG": f"sqlite:///{tmp_path / 'decisions.db'}"}  # fmt: skip
    base = ["prospect", "--as-of", str(AS_OF), "--out", str(tmp_path / "out")]
    cases = {
        "unknown --district 'Atlantis'": [
            *base,
            "--product",
            "microloan",
            "--district",
            "Atlantis",
        ],
        "no @champion model for kapok-guarantee": [*base, "--product", "guarantee"],
        "--product must be one of": [*base, "--product", "car"],
    }
    preload = ["review.prospect", "serving.model", "training.pyfunc"]
    runs, imports = run_forked([(args, env) for args in cases.values()], preload, tmp_path)
    assert imports == ""
    for message, ran in zip(cases, runs, strict=True):
        assert_one_line_error(ran, message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "decisions.db").exists()
