"""Shared fixtures: a small simulated region with features, built once per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kapok  # noqa: F401  (telemetry off)
from features.build import build
from kapok.bigdata.generate import generate
from kapok.bigdata.simulate import SimulationConfig
from kapok.settings import Paths

SMALL = SimulationConfig(enterprises=3_000, months=36, seed=11)


@dataclass(frozen=True)
class System:
    config: SimulationConfig
    paths: Paths


# What running Python and its tools leave in a checkout; anything else new is a test's doing.
CHECKOUT_CACHES = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache", ".venv"})
_UNTRACKED_BEFORE = pytest.StashKey[set[str] | None]()
_HYPOTHESIS_HOME = pytest.StashKey[Path]()


def untracked_paths(root: Path) -> set[str] | None:
    """The untracked and the ignored paths of the git checkout at `root`, as `git status` names
    them (a folder that is new as a whole is one entry, e.g. `mlruns/1/`), caches aside; None
    when `root` is not a git checkout or git is missing."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--ignored", "-z"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {
        entry[3:]
        for entry in out.split("\0")
        if entry[:3] in ("?? ", "!! ") and not CHECKOUT_CACHES & set(Path(entry[3:]).parts)
    }


def pytest_sessionstart(session: pytest.Session) -> None:
    """Before collection: note what the checkout holds, and give Hypothesis a home of its own
    (it writes .hypothesis/ into the current folder while collecting, even with no database)."""
    from hypothesis.configuration import set_hypothesis_home_dir

    session.config.stash[_UNTRACKED_BEFORE] = untracked_paths(repo_root())
    home = Path(tempfile.mkdtemp(prefix="kapok-hypothesis-"))
    session.config.stash[_HYPOTHESIS_HOME] = home
    set_hypothesis_home_dir(home)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """No test writes into the checkout: the run fails, naming them, when new untracked or
    ignored paths (gitignored ones too, which `git status` hides) appeared in it since the
    session started. Limits: a file new inside a folder that was already untracked is not seen,
    and a file you create in the checkout during the run is taken for a test's."""
    if (home := session.config.stash.get(_HYPOTHESIS_HOME, None)) is not None:
        shutil.rmtree(home, ignore_errors=True)
    before = session.config.stash.get(_UNTRACKED_BEFORE, None)
    after = untracked_paths(repo_root())
    if before is None or after is None or not (new := sorted(after - before)):
        return
    message = (
        f"tests wrote into the checkout {repo_root()}: {', '.join(new)} "
        "(write under tmp_path or the test's KAPOK_HOME instead)"
    )
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(f"FAILED {message}", red=True, bold=True)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test writes into the checkout: KAPOK_HOME is a fresh temporary folder by default."""
    monkeypatch.setenv("KAPOK_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("KAPOK_ONLINE_STORE", raising=False)
    monkeypatch.delenv("KAPOK_FEAST_PROJECT", raising=False)


@pytest.fixture(scope="session")
def small_system(tmp_path_factory: pytest.TempPathFactory) -> System:
    """3,000 enterprises x 36 months, raw tables and feature tables (read-only for tests)."""
    p = Paths(tmp_path_factory.mktemp("small_system"))
    generate(SMALL, p.raw)
    build(p.raw, p.features)
    return System(SMALL, p)


def linked_home(tmp_path: Path, small_system: System) -> Paths:
    """A KAPOK_HOME of its own whose raw and feature tables are the shared small system's."""
    from features import store as fs

    p = Paths(tmp_path)
    p.data.mkdir(parents=True)
    (p.data / "raw").symlink_to(small_system.paths.raw)
    (p.data / "features").symlink_to(small_system.paths.features)
    fs.apply(fs.feature_store(p), p)
    return p


@dataclass(frozen=True)
class Trained:
    paths: Paths
    champion: object  # training.train.TrainResult of kapok-microloan v1
    challenger: object  # kapok-microloan v2 (different seed)


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory: pytest.TempPathFactory, small_system: System) -> Trained:
    """The small system with kapok-microloan trained twice (v1 @champion, v2 @challenger), few
    trials. Shared by the review tests: treat it as read-only (write logs and reports elsewhere)."""
    from training.data import product_data
    from training.train import train

    p = linked_home(tmp_path_factory.mktemp("trained_home"), small_system)
    data = product_data(p, "microloan")
    first = train(data, p, trials=3, seed=7)
    second = train(data, p, trials=3, seed=8)
    return Trained(p, first, second)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A database of its own on the local PostgreSQL server (127.0.0.1:5432), dropped
    afterwards; skipped locally when the server is absent, a failure under CI=true."""
    require_service("127.0.0.1", 5432, "PostgreSQL")
    import psycopg2

    name = f"kapok_test_{uuid.uuid4().hex}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def require_service(host: str, port: int, what: str) -> None:
    """Skip locally when a server is absent; under CI=true a missing server fails the run."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as e:
        message = f"{what} at {host}:{port} is not reachable: {e}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: service-backed tests must run)")
        pytest.skip(message)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
