"""The `kapok` command: the main job end to end, helpful help, clear errors without tracebacks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kapok.cli import app
from kapok.settings import paths
from tests.cli_processes import Ran, run_forked, run_kapok

runner = CliRunner()


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for word in ("run", "data", "features", "KAPOK_HOME"):
        assert word in result.output
    assert "train" in result.output and "promote" in result.output
    for stage in ("prospect", "whatif", "simulate-policy", "queue", "actions", "watch"):
        assert stage in result.output, stage
    groups = {
        "data": ("generate", "check-spec"),
        "features": ("build", "apply", "materialize", "online"),
        "audit": ("verify", "anchor"),
        "queue": ("list", "decide"),
        "actions": ("list", "record"),
    }
    for group, commands in groups.items():
        out = runner.invoke(app, [group, "--help"]).output
        assert all(c in out for c in commands), group


@pytest.mark.slow
def test_main_job_runs_end_to_end_in_kapok_home():
    result = runner.invoke(app, ["run", "--enterprises", "2500", "--months", "36", "--trials", "2"])
    assert result.exit_code == 0, result.output
    p = paths()
    assert (p.raw / "_manifest.json").exists()
    assert (p.features / "_manifest.json").exists()
    assert (p.feast_data / "registry.db").exists()
    assert (p.feast_data / "online_store.db").exists()
    assert (p.feature_repo / "feature_store.yaml").read_text().count(str(p.home)) >= 2
    output = " ".join(result.output.split())
    for product in ("microloan", "guarantee", "insurance"):
        assert f"kapok-{product} v1 -> @champion" in output
    assert f"KAPOK_HOME={p.home}" in output and "kapok ui" in output  # a command that runs
    import polars as pl

    eid = pl.read_parquet(p.raw / "registration" / "*.parquet")["enterprise_id"][0]
    shown = runner.invoke(app, ["features", "online", eid, "--product", "insurance"])
    assert shown.exit_code == 0, shown.output
    assert "tax_sales_12m" in shown.output


# -- known failures: exit 2, one line on stderr, no traceback, as a user sees them -------------
LONG_MISSING = "no/such/folder/with/a/rather/long/name/to/wrap/at/eighty/columns/spec.toml"


def assert_one_line_error(ran: Ran, message: str) -> None:
    assert ran.returncode == 2, (ran.args, ran.stderr)
    assert "Traceback" not in ran.stderr + ran.stdout, ran.stderr
    assert len(ran.stderr_lines) == 1, (ran.args, ran.stderr)
    assert ran.stderr_lines[0].startswith("error: "), ran.stderr
    assert message in ran.stderr_lines[0], (message, ran.stderr)
    assert ran.stdout == "", ran.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "generate", "--enterprises", "0"], "--enterprises must be at least 1"),
        (["data", "check-spec", LONG_MISSING], LONG_MISSING),  # longer than 80 columns
        (["data", "check-spec", "no/such/[/]spec.toml"], "no/such/[/]spec.toml"),  # not markup
        (["features", "build"], "kapok data generate"),
        (["keys", "add", "acme", "--role", "boss"], "unknown role 'boss'"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(args, message, tmp_path):
    """Commands that fail before importing any framework: the installed `kapok` script."""
    ran = run_kapok(args, env={"KAPOK_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert_one_line_error(ran, message)


@dataclass(frozen=True)
class Failure:
    args: tuple[str, ...]
    message: str
    home: str = "fresh"  # "fresh": an empty KAPOK_HOME of its own; "trained": trained_home
    env: tuple[tuple[str, str], ...] = ()


MYSQL = (("KAPOK_DECISION_LOG", "mysql://root@localhost/x"),)
EARLIER = "an earlier report"
FAILURES = {
    "data generate start": Failure(("data", "generate", "--start", "2023-13"), "--start must be"),
    "run enterprises": Failure(("run", "--enterprises", "0"), "--enterprises must be at least 1"),
    "features apply": Failure(("features", "apply"), "kapok features build"),
    "features materialize": Failure(("features", "materialize"), "kapok features build"),
    "features online bad code": Failure(
        ("features", "online", "91440106326110621Q"), "GB 32100 check"
    ),
    "features online markup": Failure(("features", "online", "9144[/]0106326110"), "[/]"),
    "features online product": Failure(
        ("features", "online", "91440106326110621P", "--product", "car"), "--product"
    ),
    "train no source": Failure(("train",), "exactly one of --product or --dataset"),
    "train product": Failure(("train", "--product", "mortgage"), "unknown product 'mortgage'"),
    "train spec": Failure(("train", "--dataset", "no/such/spec.toml"), "no/such/spec.toml"),
    "promote force": Failure(
        ("promote", "--product", "microloan", "--force"), "--force needs --reason"
    ),
    "promote no data": Failure(("promote", "--product", "microloan"), "kapok data generate"),
    "replay mysql": Failure(("replay", "req_x"), "unsupported backend 'mysql'", env=MYSQL),
    "replay unknown": Failure(("replay", "req_x"), "no decision 'req_x' in the decision log"),
    "explain unknown": Failure(
        ("explain", "req_does_not_exist"), "no decision 'req_does_not_exist' in the decision log"
    ),
    "explain mysql": Failure(("explain", "req_x"), "unsupported backend 'mysql'", env=MYSQL),
    # the report's failures leave an earlier report in place (--out)
    "report version": Failure(
        ("report", "--product", "microloan", "--version", "99"),
        "kapok-microloan has no version 99",
        "trained",
    ),
    "report model": Failure(
        ("report", "--product", "nosuch"), "kapok-nosuch has no alias @champion", "trained"
    ),
    "report alias and version": Failure(
        ("report", "--product", "microloan", "--alias", "champion", "--version", "1"),
        "not both",
        "trained",
    ),
    "monitor date": Failure(
        ("monitor", "--product", "microloan", "--since", "yesterday"), "YYYY-MM-DD"
    ),
    "monitor no decisions": Failure(
        ("monitor", "--product", "microloan"), "no microloan decisions", "trained"
    ),
    "backfill product": Failure(("backfill", "--product", "car"), "--product"),
    "decide reasons": Failure(("decide", "apps.csv", "--reasons", "some"), "--reasons"),
    "decide missing file": Failure(("decide", "nosuch.csv"), "nosuch.csv"),
    "audit verify no log": Failure(("audit", "verify"), "no such file"),
    "audit verify anchor": Failure(("audit", "verify", "--anchor", "12"), "--anchor must be"),
    "audit anchor mysql": Failure(("audit", "anchor"), "unsupported backend 'mysql'", env=MYSQL),
    "watch product": Failure(("watch", "--product", "car", "--as-of", "2025-06-15"), "--product"),
    "watch portfolio": Failure(
        ("watch", "--product", "microloan", "--as-of", "2025-06-15", "--portfolio", "no_id.csv"),
        "no enterprise_id column",
        "trained",
    ),
}
# what these commands import before they can fail: imported once, then one child per command
FRAMEWORKS = ["features.store", "training.train", "training.promote", "serving.replay",
              "review.explain", "review.report", "review.monitor", "review.backfill",
              "serving.batch", "review.watch", "serving.audit"]  # fmt: skip


@pytest.fixture(scope="module")
def failures(trained_home, tmp_path_factory) -> dict[str, tuple[Ran, Path]]:
    work = tmp_path_factory.mktemp("cli_failures")
    (work / "no_id.csv").write_text("uscc\n91440106326110621P\n")
    (work / "apps.csv").write_text("enterprise_id,product,requested_amount,term_months\n")
    cases, outs = [], []
    for i, f in enumerate(FAILURES.values()):
        home = trained_home.paths.home if f.home == "trained" else work / f"home{i}"
        env = {"KAPOK_HOME": str(home), "KAPOK_DECISION_LOG": f"sqlite:///{work}/log{i}.db"}
        env |= dict(f.env)
        args = list(f.args)
        out = work / f"out{i}"
        if args[0] in ("report", "watch"):  # never into the shared trained home
            if args[0] == "report":
                out.write_text(EARLIER)
            else:
                out.mkdir()
            args += ["--out", str(out)]
        cases.append((args, env))
        outs.append(out)
    runs, imports = run_forked(cases, FRAMEWORKS, cwd=work)
    assert imports == "", imports  # importing the frameworks printed nothing (no warnings)
    return {name: (ran, out) for name, ran, out in zip(FAILURES, runs, outs, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAILURES))
def test_every_command_fails_in_one_line_with_exit_2(failures, name):
    """Every command's known failures, each in a process of its own: exit status 2, exactly
    one line on stderr (not wrapped, no warnings, no progress bar), no traceback."""
    ran, out = failures[name]
    assert_one_line_error(ran, FAILURES[name].message)
    if ran.args[0] == "report":
        assert out.read_text() == EARLIER  # a failed report leaves the earlier one in place
    if ran.args[0] == "watch":
        assert list(out.iterdir()) == []


def test_check_spec_summarises_a_real_dataset():
    from tests.conftest import repo_root

    result = runner.invoke(
        app, ["data", "check-spec", str(repo_root() / "datasets" / "german_credit.toml")]
    )
    assert result.exit_code == 0, result.output
    assert "1,000 rows, 300 bad (30.0%)" in result.output
