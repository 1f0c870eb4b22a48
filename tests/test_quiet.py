"""Quiet output: a user sees Kapok's own messages, not the libraries' deprecation warnings nor
raw colour codes in a log; `kapok --verbose` (KAPOK_VERBOSE=1) shows the libraries' warnings.

The commands run as processes of their own with stdout and stderr going to pipes (a log, not a
terminal), as `make run > run.log` runs them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kapok
from tests.cli_processes import Ran, run_kapok
from tests.conftest import System, repo_root

ESC = "\x1b["


def assert_quiet(ran: Ran) -> None:
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, (ran.args, output)
    assert "Warning" not in output, (ran.args, output)  # DeprecationWarning, UserWarning, ...
    assert "warnings.warn" not in output, (ran.args, output)
    assert ESC not in output, (ran.args, output)


@pytest.mark.slow
def test_features_apply_and_materialize_print_no_library_warning_and_no_colour_codes(
    small_system: System, tmp_path: Path
):
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "raw").symlink_to(small_system.paths.raw)
    (home / "data" / "features").symlink_to(small_system.paths.features)
    env = {"KAPOK_HOME": str(home)}

    applied = run_kapok(["features", "apply"], env=env)
    assert_quiet(applied)  # Feast warns on apply that on-demand views are "experimental"
    materialized = run_kapok(["features", "materialize"], env=env)
    assert_quiet(materialized)  # Feast colours its materialize messages with ANSI codes
    assert "Materializing 8 feature views from " in materialized.stdout, materialized.stdout
    assert "credit_history:" in materialized.stdout  # each view named, in plain text

    verbose = run_kapok(["--verbose", "features", "apply"], env=env)
    assert verbose.returncode == 0, verbose.stderr
    assert "On demand feature view is an experimental feature" in verbose.stderr


# What the API's workers do at start-up: Kapok first (every module of Kapok imports it), then
# Feast (which puts simplefilter("once", DeprecationWarning) in front of every filter), then
# MLflow's SQLAlchemy tracking store (SQLAlchemy: "The noload loader strategy is deprecated").
WORKER_START = textwrap.dedent(
    """
    import sys, warnings
    import kapok
    import feast
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{sys.argv[1]}").search_registered_models()
    warnings.warn_explicit("Kapok's own warning", UserWarning, kapok.__file__, 1)
    """
)


@pytest.mark.slow
def test_a_process_that_imports_kapok_shows_no_library_deprecation_but_kapoks_own(tmp_path):
    base = {k: v for k, v in os.environ.items() if k != "KAPOK_VERBOSE"}

    def start(name: str, env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER_START, str(tmp_path / f"{name}.db")],
            env={**base, **env},
            cwd=repo_root(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    quiet, verbose = start("quiet", {}), start("verbose", {"KAPOK_VERBOSE": "1"})
    quiet_err = quiet.communicate(timeout=300)[1]
    verbose_err = verbose.communicate(timeout=300)[1]
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet_err + verbose_err

    assert "SADeprecationWarning" in verbose_err, verbose_err  # the warning is real...
    assert "DeprecationWarning" not in quiet_err, quiet_err  # ...and hidden by default
    assert "UserWarning: Kapok's own warning" in quiet_err, quiet_err  # Kapok's own still show


def test_library_warnings_are_told_from_kapoks_own_by_the_file_they_come_from():
    def origin(module: str) -> str:  # a library's file, without importing it
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None
        return spec.origin

    library, feast = origin("sqlalchemy"), origin("feast")
    assert kapok.library_warning(DeprecationWarning, "noload is deprecated", library)
    assert kapok.library_warning(FutureWarning, "will change", library)
    assert kapok.library_warning(UserWarning, "field shadows", library)
    assert kapok.library_warning(
        RuntimeWarning,
        "On demand feature view is an experimental feature. This API",
        feast,
    )
    # not a library's notice: any other runtime warning (e.g. numpy's divide by zero)
    assert not kapok.library_warning(RuntimeWarning, "divide by zero", library)
    # Kapok's own code, a notebook, a script: always shown
    for own in (origin("features.store"), kapok.__file__, __file__, "/tmp/analysis.py"):
        assert not kapok.library_warning(DeprecationWarning, "deprecated", own), own
