"""Early-warning actions (处置): the policy's action table, the append-only actions store that
`kapok watch` fills, `kapok actions list` / `record`, and the watch HTML's action counts."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import tomllib
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from features.schema import FAMILIES
from kapok.cli import app
from review import actions as act
from review import portfolio as pf
from review import watch
from serving import policy as P
from tests.test_watch import AS_OF, PREVIOUS, _edit, _ids, _snapshot, turn_bad

SHIPPED = P.DEFAULT_PATH.read_text(encoding="utf-8")


# -- the policy's action table -------------------------------------------------------------------
def test_shipped_table_maps_every_watch_flag_to_an_action() -> None:
    policy = P.load_policy()
    assert tuple(watch.FLAGS) == P.EARLY_WARNING_TRIGGERS  # the same names as the watch's flags
    by_trigger = {a.trigger: a for a in policy.early_warning_actions}
    assert set(by_trigger) == set(watch.FLAGS)
    review = by_trigger["grade_drop"]
    assert (review.action, review.due_days, review.at_least) == ("review", 30, 2)
    assert by_trigger["new_enforcement"].action == "freeze_undrawn_limit"
    assert by_trigger["tax_collapse"].action == "request_documents"
    assert by_trigger["pd_doubled"].action == "call_borrower"


def _first_entry(text: str) -> str:
    start = text.index("[[early_warning.actions]]")
    return text[start : text.index("\n\n", start)]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('trigger = "grade_drop"', 'trigger = "grade_fall"',
         "early_warning.actions[0].trigger must be one of grade_drop, pd_doubled, "
         "new_enforcement, dishonest_debtor, tax_collapse, power_collapse, got 'grade_fall'"),
        ('action = "review"', 'action = "sue"',
         "early_warning.actions[0].action must be one of review, call_borrower, "
         "request_documents, site_visit, freeze_undrawn_limit, reduce_limit, demand_repayment, "
         "got 'sue'"),
        ("due_days = 30", "due_days = 0", "early_warning.actions[0].due_days must be > 0, got 0"),
        ("due_days = 30", "due_days = -5",
         "early_warning.actions[0].due_days must be > 0, got -5"),
        ("due_days = 30", "due_days = 1.5",
         "early_warning.actions[0].due_days must be a whole number, got 1.5"),
        ("at_least = 2", "at_least = 0",
         "early_warning.actions[0].at_least must be a whole number of grades >= 1, got 0"),
        ('trigger = "grade_drop"', 'trigger = "tax_collapse"',
         "early_warning.actions[0].at_least is only for grade_drop and pd_doubled, not for "
         "trigger 'tax_collapse'"),
        ("due_days = 30", "due_days = 30\nwhen = \"grade_drop >= 2\"",
         "early_warning.actions[0].when: unknown key (allowed in early_warning.actions[0]: "
         "action, at_least, description, description_zh, due_days, trigger)"),
    ],
)  # fmt: skip
def test_a_wrong_action_entry_stops_the_policy_naming_it(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    entry = _first_entry(SHIPPED)
    assert entry.count(old) == 1, old
    path = tmp_path / "policy.toml"
    path.write_text(SHIPPED.replace(entry, entry.replace(old, new)), encoding="utf-8")
    with pytest.raises(P.PolicyError) as e:
        P.load_policy(path)
    assert str(e.value) == f"{path}: {message}"


def test_one_action_per_trigger_and_an_optional_table(tmp_path: Path) -> None:
    entry = _first_entry(SHIPPED)
    path = tmp_path / "policy.toml"
    path.write_text(SHIPPED + "\n" + entry.replace("due_days = 30", "due_days = 10") + "\n")
    with pytest.raises(P.PolicyError, match=r"early_warning.actions\[6\].action 'review' for "
                       r"trigger 'grade_drop' is already early_warning.actions\[0\]"):  # fmt: skip
        P.load_policy(path)
    data = tomllib.loads(SHIPPED)
    del data["early_warning"]  # an older policy file: loads, opens no action
    assert P.policy_from_dict(data).early_warning_actions == ()


# -- the store -----------------------------------------------------------------------------------
def _flagged(**flags: list[bool]) -> pl.DataFrame:
    """A watchlist of two borrowers as review/watch.py writes it (the columns actions read)."""
    n = 2
    return pl.DataFrame(
        {
            "enterprise_id": ["91440100000000001A", "91440100000000002B"],
            "grades_down": [3, 0],
            "pd_ratio": [2.5, 1.2],
            "reasons": [["grade fell from A2 to B2", "risk raised most by: overdue tax"],
                        ["Court enforcement cases: rose from 0 to 1"]],
            "reasons_zh": [["评级由A2降至B2", "风险上升的主要因素：欠税"], ["被执行：由0升至1"]],
            "reason_flags": [["grade_drop", "risk_drivers"], ["new_enforcement"]],
            **{f"flag_{f}": flags.get(f, [False] * n) for f in watch.FLAGS},
        }
    )  # fmt: skip


def _store_checks(url: str) -> None:
    policy = P.load_policy()
    flagged = _flagged(grade_drop=[True, False], new_enforcement=[False, True])
    plan = act.planned(flagged, policy.early_warning_actions, AS_OF)
    assert sorted(zip(plan["enterprise_id"], plan["action"], plan["due_date"], strict=True)) == [
        ("91440100000000001A", "review", AS_OF + dt.timedelta(days=30)),
        ("91440100000000002B", "freeze_undrawn_limit", AS_OF + dt.timedelta(days=1)),
    ]
    review = plan.filter(pl.col("action") == "review").row(0, named=True)
    assert review["details"] == "grade fell from A2 to B2 | risk raised most by: overdue tax"
    with act.ActionStore(url) as store:
        assert store.open(plan, "microloan", AS_OF) == 2
        assert store.open(plan, "microloan", AS_OF) == 0  # the same watch again: nothing new
        before = store.rows()
        assert before.height == 2
        listed = store.frame("microloan", AS_OF + dt.timedelta(days=2))
        assert listed["action"].to_list() == ["freeze_undrawn_limit", "review"]  # overdue first
        assert listed["overdue"].to_list() == [True, False]
        review_id = listed["action_id"][1]
        store.record(review_id, "called, documents requested", "li.wei")  # a note: still open
        assert store.frame("microloan", AS_OF)["action_id"].to_list().count(review_id) == 1
        store.record(review_id, "reviewed; limit cut to 200k", "wang.fang", close=True)
        assert review_id not in store.frame("microloan", AS_OF)["action_id"].to_list()
        closed = store.frame(include_closed=True).filter(pl.col("action_id") == review_id)
        assert closed["status"].item() == "closed"
        assert closed["last_outcome"].item() == "reviewed; limit cut to 200k"
        with pytest.raises(act.ActionsError, match=r"already closed by wang\.fang"):
            store.record(review_id, "again", "li.wei", close=True)
        with pytest.raises(act.ActionsError, match="no action 'act_000000000000'"):
            store.record("act_000000000000", "x", "li.wei")
        after = store.rows()
        # outcomes are new rows; the actions' own rows are exactly as written
        assert after.head(2).equals(before)
        assert after["event"].to_list() == ["action", "action", "outcome", "outcome"]
    engine = sa.create_engine(url)
    try:
        for statement in ("UPDATE actions SET status = 'closed'", "DELETE FROM actions"):
            refused = pytest.raises(sa.exc.DatabaseError, match="actions store is append-only")
            with refused, engine.begin() as conn:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()
    with act.ActionStore(url) as store:
        assert store.rows().equals(after)


def test_store_opens_once_records_outcomes_as_new_rows_and_refuses_edits(tmp_path: Path) -> None:
    _store_checks(f"sqlite:///{tmp_path / 'decisions' / 'decisions.db'}")


@pytest.mark.postgres
def test_store_on_postgres(pg_url: str) -> None:
    _store_checks(pg_url)
    engine = sa.create_engine(pg_url)
    try:
        refused = pytest.raises(sa.exc.DatabaseError, match="TRUNCATE on actions is not allowed")
        with refused, engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE actions")
    finally:
        engine.dispose()


def test_cli_record_rejects_an_unknown_id_in_one_line(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "decisions" / "decisions.db"
    monkeypatch.setenv("KAPOK_DECISION_LOG", f"sqlite:///{db}")
    runner = CliRunner()
    record = ["actions", "record", "act_nope", "--outcome", "x", "--officer", "y"]
    empty = runner.invoke(app, ["actions", "list"])  # a home where nothing was logged yet
    assert empty.exit_code == 0, empty.output
    assert "0 actions listed" in empty.output
    out = runner.invoke(app, record)
    assert out.exit_code == 2
    assert out.output.startswith("error: no action 'act_nope': the actions store")
    assert not db.exists()  # reading and refusing created nothing
    with act.ActionStore(f"sqlite:///{db}") as store:
        store.open(pl.DataFrame(schema=act.PLANNED_SCHEMA), "microloan", AS_OF)  # the table
    out = runner.invoke(app, record)
    assert out.exit_code == 2
    assert out.output.startswith("error: no action 'act_nope' in the actions store")
    assert len(out.output.strip().splitlines()) == 1
    bad = runner.invoke(app, ["actions", "list", "--product", "leasing"])
    assert bad.exit_code == 2 and "--product must be one of" in bad.output


# -- kapok watch -> kapok actions ----------------------------------------------------------------
def _home_with_a_grade_drop(trained_home, tmp_path: Path) -> tuple[Path, str, str]:
    """A KAPOK_HOME with trained_home's models and a copy of its features in which one borrower's
    credit history, receivables and payments turn bad at AS_OF and another's stay as they were;
    (home, the deteriorating borrower, the stable one)."""
    from training.pyfunc import load_scorer
    from training.tracking import configure

    home = tmp_path / "home"
    features = home / "data" / "features"
    shutil.copytree(trained_home.paths.features, features)
    (home / "mlruns").symlink_to(trained_home.paths.mlruns)
    configure(trained_home.paths)
    scorer = load_scorer("models:/kapok-microloan@champion")
    ids = _ids(trained_home, 40, seed=5)
    base = watch.watch(features, scorer, pl.DataFrame({"enterprise_id": ids}), AS_OF, PREVIOUS,
                       product="microloan")  # fmt: skip
    calm = base.scores.filter(pl.col("grades_down") <= 0).sort("pd_now")
    bad, stable = calm["enterprise_id"][0], calm["enterprise_id"][calm.height // 2]
    now_at, prev_at = pf.end_of_day(AS_OF), pf.end_of_day(PREVIOUS)
    for eid in (bad, stable):
        for fam in FAMILIES:
            _edit(features, fam.name, eid, now_at, _snapshot(features, fam.name, eid, prev_at))
    turn_bad(features, bad, now_at)
    return home, bad, stable


def _review_row(html: str) -> list[str]:
    """The cells of the review row of the watch HTML's Actions table."""
    section = html[html.index("处置措施") :]
    row = re.search(r"<tr><td class=\"text\">review</td>(.*?)</tr>", section)
    assert row, "no review row in the Actions table"
    return re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))


@pytest.mark.slow
def test_watch_opens_a_review_once_and_an_outcome_closes_it(trained_home, tmp_path, monkeypatch):
    home, bad, stable = _home_with_a_grade_drop(trained_home, tmp_path)
    url = f"sqlite:///{tmp_path / 'log' / 'decisions.db'}"
    monkeypatch.setenv("KAPOK_HOME", str(home))
    monkeypatch.setenv("KAPOK_DECISION_LOG", url)
    book = tmp_path / "book.csv"
    pl.DataFrame({"enterprise_id": [bad, stable], "requested_amount": 300_000.0}).write_csv(book)
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["watch", "--product", "microloan", "--as-of", str(AS_OF), "--portfolio", str(book),
            "--out", str(out)]  # fmt: skip
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    flagged = pl.read_parquet(out / f"watch-microloan-{AS_OF}.parquet")
    row = flagged.filter(pl.col("enterprise_id") == bad).row(0, named=True)
    assert row["grades_down"] >= 2, row  # the set-up: a grade drop of two or more
    assert stable not in flagged["enterprise_id"].to_list()

    with act.ActionStore(url) as store:
        opened = store.frame("microloan", AS_OF)
    reviews = opened.filter(pl.col("action") == "review")
    assert reviews["enterprise_id"].to_list() == [bad]
    review = reviews.row(0, named=True)
    assert review["due_date"] == AS_OF + dt.timedelta(days=30)
    assert (review["trigger"], review["status"], review["overdue"]) == ("grade_drop", "open", False)
    assert f"grade fell from {row['grade_previous']} to {row['grade_now']}" in review["details"]
    assert stable not in opened["enterprise_id"].to_list()
    html = (out / f"watch-microloan-{AS_OF}.html").read_text(encoding="utf-8")
    # action, description, this watch, open, overdue, closed
    assert _review_row(html) == ["Credit review within 30 days", "1", "1", "0", "0"]

    again = runner.invoke(app, args)  # the same date again: nothing opened twice
    assert again.exit_code == 0, again.output
    with act.ActionStore(url) as store:
        assert store.frame("microloan", AS_OF).equals(opened)
    html = (out / f"watch-microloan-{AS_OF}.html").read_text(encoding="utf-8")
    assert _review_row(html) == ["Credit review within 30 days", "1", "1", "0", "0"]

    on = str(AS_OF + dt.timedelta(days=31))  # a day after the review was due
    listed = runner.invoke(app, ["actions", "list", "--product", "microloan", "--on", on])
    assert listed.exit_code == 0, listed.output
    line = next(x for x in listed.output.splitlines() if review["action_id"] in x)
    assert bad in line and "OVERDUE 1 d" in line and str(review["due_date"]) in line
    overdue = runner.invoke(app, ["actions", "list", "--overdue", "--on", str(AS_OF)])
    assert review["action_id"] not in overdue.output  # not yet due on the as-of date

    with act.ActionStore(url) as store:
        written = store.rows().filter(pl.col("action_id") == review["action_id"])
    close = ["actions", "record", review["action_id"], "--outcome", "reviewed: limit cut",
             "--officer", "wang.fang", "--close"]  # fmt: skip
    recorded = runner.invoke(app, close)
    assert recorded.exit_code == 0, recorded.output
    assert "closed" in recorded.output
    listed = runner.invoke(app, ["actions", "list", "--on", on])
    assert review["action_id"] not in listed.output
    every = runner.invoke(app, ["actions", "list", "--all", "--on", on])
    assert review["action_id"] in every.output and "reviewed: limit cut" in every.output
    twice = runner.invoke(app, ["actions", "record", review["action_id"], "--outcome", "x",
                                "--officer", "li", "--close"])  # fmt: skip
    assert twice.exit_code == 2 and "already closed" in twice.output
    with act.ActionStore(url) as store:
        rows = store.rows().filter(pl.col("action_id") == review["action_id"])
    assert rows.head(1).equals(written)  # the action's own row is unchanged
    assert rows["event"].to_list() == ["action", "outcome"]

    third = runner.invoke(app, args)  # a closed action is not reopened by the same date's watch
    assert third.exit_code == 0, third.output
    html = (out / f"watch-microloan-{AS_OF}.html").read_text(encoding="utf-8")
    assert _review_row(html) == ["Credit review within 30 days", "1", "0", "0", "1"]

    monkeypatch.setenv("KAPOK_POLICY", str(tmp_path / "bad_policy.toml"))
    (tmp_path / "bad_policy.toml").write_text(SHIPPED.replace("due_days = 30", "due_days = 0"))
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert "early_warning.actions[0].due_days must be > 0, got 0" in refused.output


def test_actions_group_is_in_the_help() -> None:
    out = CliRunner().invoke(app, ["actions", "--help"])
    assert out.exit_code == 0
    assert "list" in out.output and "record" in out.output
    assert "actions" in CliRunner().invoke(app, ["--help"]).output
