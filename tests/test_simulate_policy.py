"""`kapok simulate-policy`: the backfilled history of the trained small system re-decided under
the current policy and a candidate — the current policy as its own candidate changes nothing, a
stricter approve cut-off only takes approvals away, a looser one adds them, and a broken
candidate writes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from kapok.cli import app
from kapok.settings import Paths
from serving import policy as pol
from tests.test_monitor import linked

runner = CliRunner()
pytestmark = pytest.mark.slow

# models trained in seconds on 3,000 firms give few PDs under the shipped 6% microloan cut-off:
# the "current" policy here approves up to 10% (as tests/test_service.py's server does)
CURRENT_APPROVE, STRICT_APPROVE, LOOSE_APPROVE = 0.10, 0.06, 0.14


def with_cutoff(text: str, approve: float, refer: float = 0.16) -> str:
    """policy.toml's text with the microloan approve (and refer) cut-offs replaced."""
    section = re.compile(r"(\[products\.microloan\][^\[]*?approve_max_pd\s*=\s*)[0-9._]+")
    text, n = section.subn(rf"\g<1>{approve}", text, count=1)
    refer_at = re.compile(r"(\[products\.microloan\][^\[]*?refer_max_pd\s*=\s*)[0-9._]+")
    text, m = refer_at.subn(rf"\g<1>{refer}", text, count=1)
    assert n == m == 1
    return text


@pytest.fixture(scope="module")
def history(trained_home, tmp_path_factory) -> tuple[Paths, Path]:
    """trained_home's microloan applications backfilled into a log of this module's own home,
    and the current policy file (KAPOK_POLICY)."""
    from review.backfill import backfill

    tmp = tmp_path_factory.mktemp("simulate")
    home = linked(trained_home, tmp)
    current = tmp / "current.toml"
    current.write_text(with_cutoff(pol.DEFAULT_PATH.read_text(), CURRENT_APPROVE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAPOK_HOME", str(home.home))
        mp.setenv("KAPOK_POLICY", str(current))
        done = backfill(home, "microloan")
    assert done.written > 500 and done.outcomes > 100
    return home, current


@pytest.fixture
def env(history, monkeypatch) -> tuple[Paths, Path]:
    home, current = history
    monkeypatch.setenv("KAPOK_HOME", str(home.home))
    monkeypatch.setenv("KAPOK_POLICY", str(current))
    monkeypatch.delenv("KAPOK_DECISION_LOG", raising=False)
    return home, current


def candidate(tmp_path: Path, current: Path, approve: float) -> Path:
    path = tmp_path / f"candidate-{approve}.toml"
    path.write_text(with_cutoff(current.read_text(), approve))
    assert pol.load_policy(path).product("microloan").approve_max_pd == approve
    return path


def summary(result) -> dict[str, tuple[str, str]]:
    return {r["metric"]: (r["current"], r["candidate"]) for r in result.summary()}


def test_the_current_policy_as_its_own_candidate_changes_nothing(env, tmp_path):
    home, current = env
    out = tmp_path / "reports"
    args = ["simulate-policy", "--product", "microloan", "--policy", str(current)]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "swap-in 0 " in text and "swap-out 0 " in text
    from review.simulate_policy import simulate

    s = simulate(home, "microloan", current)
    figures = summary(s)
    assert all(a == b for a, b in figures.values()), figures
    assert int(figures["approved"][0].replace(",", "")) > 0
    assert s.swaps.height == 0
    # and the re-decision under the current policy is what the backfill logged
    assert (s.rows["decision_current"] == s.rows["logged_decision"]).all()
    # the bad rate: the backfill's matured outcomes of the approvals, joined by hand
    outcomes = pl.read_parquet(home.data / "outcomes" / "microloan.parquet")
    approved = s.rows.filter(pl.col("decision_current") == "approve").select("request_id")
    matured = approved.join(outcomes, on="request_id")["outcome"]
    assert matured.len() > 0
    assert figures["approvals with a matured outcome"][0] == f"{matured.len():,}"
    assert figures["observed bad rate among matured approvals"][0] == f"{matured.mean():.2%}"
    swaps = list(out.glob("simulate-policy-microloan-*-swaps.parquet"))
    assert len(swaps) == 1 and pl.read_parquet(swaps[0]).height == 0


def test_a_stricter_cutoff_approves_no_one_the_current_policy_declines(env, tmp_path):
    from review.simulate_policy import simulate

    home, current = env
    strict = candidate(tmp_path, current, STRICT_APPROVE)
    s = simulate(home, "microloan", strict)
    rows = s.rows
    assert s.swap_count("in") == 0
    assert rows.filter(
        (pl.col("decision_current") != "approve") & (pl.col("decision_candidate") == "approve")
    ).is_empty()
    approved = {side: int((rows[f"decision_{side}"] == "approve").sum()) for side in
                ("current", "candidate")}  # fmt: skip
    assert 0 < approved["candidate"] < approved["current"]
    out = s.swaps
    assert out.height == s.swap_count("out") == approved["current"] - approved["candidate"]
    # every swap-out is an approval whose PD the new cut-off refers, and says so
    assert ((out["pd"] > STRICT_APPROVE) & (out["pd"] <= CURRENT_APPROVE)).all()
    assert (out["rule"] == "PD_ABOVE_APPROVE_CUTOFF").all()
    assert out["detail"].str.contains(f"approve cut-off {STRICT_APPROVE:.2%}").all()
    # fewer approvals lend less and expect to lose less
    assert rows["exposure_candidate"].sum() < rows["exposure_current"].sum()
    assert rows["el_candidate"].sum() < rows["el_current"].sum()


def test_a_looser_cutoff_swaps_in_and_the_report_names_both_policies(env, tmp_path):
    home, current = env
    loose = candidate(tmp_path, current, LOOSE_APPROVE)
    args = ["simulate-policy", "--product", "microloan", "--policy", str(loose)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    reports = home.home / "reports"
    [html] = reports.glob("simulate-policy-microloan-*.html")
    [csv] = reports.glob("simulate-policy-microloan-*-swaps.csv")
    swaps = pl.read_csv(csv)
    assert swaps.height > 0 and set(swaps["swap"]) == {"in"}
    assert ((swaps["pd"] > CURRENT_APPROVE) & (swaps["pd"] <= LOOSE_APPROVE)).all()
    assert (swaps["rule"] == "PD_ABOVE_APPROVE_CUTOFF").all()
    assert (swaps["decision_current"] == "refer").all()
    text = " ".join(result.output.split())
    assert f"swap-in {swaps.height:,} " in text and "swap-out 0 " in text
    page = html.read_text()
    assert str(current) in page and str(loose) in page
    # the header says which model re-decided the records
    assert "re-decided under both policies by kapok-microloan v1, as logged" in page
    # the changed cut-off is listed, and the segments are named, not coded
    assert "products.microloan.approve_max_pd" in page
    assert "By district" in page and "区" in page and "observed bad rate" in page


def test_a_broken_candidate_ends_with_one_line_and_writes_nothing(env, tmp_path):
    home, current = env
    broken = tmp_path / "broken.toml"
    broken.write_text("[scale\n")
    invalid = tmp_path / "invalid.toml"
    invalid.write_text(with_cutoff(current.read_text(), 1.5))
    reports = home.home / "reports"
    before = sorted(reports.iterdir()) if reports.exists() else []
    field = "products.microloan.approve_max_pd must be in (0, 1)"
    for path, says in ((broken, "not valid TOML"), (invalid, field)):
        out = tmp_path / "out"
        args = ["simulate-policy", "--product", "microloan", "--policy", str(path)]
        result = runner.invoke(app, [*args, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert result.output.strip().count("\n") == 0, result.output  # one line
        assert result.output.startswith("error: ") and says in result.output
        assert not out.exists()
        # nor into the default folder
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert (sorted(reports.iterdir()) if reports.exists() else []) == before


def test_an_empty_window_says_what_the_log_holds(env):
    _, current = env
    args = ["simulate-policy", "--product", "microloan", "--policy", str(current)]
    result = runner.invoke(app, [*args, "--since", "2031-01-01"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "no microloan application decisions in the window 2031-01-01" in text
    assert re.search(r"holds [\d,]+, decided \d{4}-\d{2}-\d{2} \.\. \d{4}-\d{2}-\d{2}", text)


def test_each_record_is_decided_by_its_logged_model_or_else_the_champion(env, tmp_path):
    """Records of a version still in the registry are re-decided by it; of one that is gone,
    by the current champion, and the report says which. Without outcomes: "not matured"."""
    import dataclasses

    from review.simulate_policy import simulate
    from serving.decision_log import DecisionLog

    home, current = env
    logged = DecisionLog().between()[:60]
    copies = [
        dataclasses.replace(r, request_id=f"live_{i}", caller="test",
                            model_version="2" if i % 2 else "99")
        for i, r in enumerate(logged)
    ]  # fmt: skip
    log = DecisionLog(f"sqlite:///{tmp_path / 'live.db'}")
    log.write_many(copies)
    s = simulate(home, "microloan", current, log=log)
    assert s.rows.height == 60
    assert any("kapok-microloan v2, as logged (30 records)" in m for m in s.models), s.models
    gone = "kapok-microloan v99 is no longer in the registry: the current champion v1"
    assert any(gone in m and "(30 records)" in m for m in s.models), s.models
    by_id = {r.request_id: r for r in copies}
    pds = dict(zip(s.rows["request_id"], s.rows["pd"], strict=True))
    # the champion (v1) decided the backfill: its re-decisions give the logged PDs back
    assert all(abs(pds[i] - by_id[i].pd) < 1e-9 for i in pds if by_id[i].model_version == "99")
    # v2 is another model: its PDs are its own
    assert any(abs(pds[i] - by_id[i].pd) > 1e-6 for i in pds if by_id[i].model_version == "2")
    figures = summary(s)
    assert int(figures["approved"][0]) > 0
    assert figures["observed bad rate among matured approvals"][0] == "not matured"


def test_a_window_across_months_simulates_exactly_its_decisions(env):
    """The log is read a month at a time: a window that starts and ends inside months holds
    every decision of the window once, and none outside it."""
    from review.backfill import window_bounds
    from review.simulate_policy import simulate
    from serving.decision_log import DecisionLog

    home, current = env
    since, until = window_bounds("2024-03-15", "2024-09-10")
    expected = DecisionLog().frame(since, until, "microloan", columns=["request_id"])
    assert expected.height > 50
    s = simulate(home, "microloan", current, since, until)
    assert sorted(s.rows["request_id"]) == sorted(expected["request_id"])
    assert s.rows["decided_at"].min() >= since and s.rows["decided_at"].max() < until
