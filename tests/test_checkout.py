"""The run's guard that no test writes into the checkout (tests/conftest.py): what it sees."""

from __future__ import annotations

import subprocess

from tests.conftest import untracked_paths


def test_the_guard_sees_new_untracked_and_ignored_paths_but_not_caches(tmp_path_factory):
    repo = tmp_path_factory.mktemp("checkout")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/mlruns/*\n!/mlruns/.gitkeep\n__pycache__/\n")
    (repo / "mlruns").mkdir()
    (repo / "mlruns" / ".gitkeep").touch()
    (repo / "serving").mkdir()
    (repo / "serving" / "core.py").touch()
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)  # tracked from here on
    before = untracked_paths(repo)
    # what MLflow left in the checkout (ignored, so `git status` hides it), a stray file, caches
    (repo / "mlruns" / "1" / "models").mkdir(parents=True)
    (repo / "mlruns" / "1" / "models" / "MLmodel").touch()
    (repo / "api_keys.toml").touch()
    (repo / "serving" / "__pycache__").mkdir()
    (repo / "serving" / "__pycache__" / "core.cpython-311.pyc").touch()
    (repo / ".pytest_cache").mkdir()
    assert untracked_paths(repo) - before == {"mlruns/1/", "api_keys.toml"}


def test_outside_a_git_checkout_the_guard_stands_aside(tmp_path_factory):
    assert untracked_paths(tmp_path_factory.mktemp("plain")) is None
