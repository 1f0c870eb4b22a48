"""Injected faults of issue 12 against a served API: the MLflow tracking store unavailable at
start-up."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import psutil
import pytest
from features import store as fs
from features.build import read_summary
from features.online import OnlineFeatures, ts_column
from features.schema import PRODUCTS
from kapok.settings import Paths
from serving.auth import add_key
from tests.cli_processes import kapok_command
from tests.test_cli_ui import answers, free_port, group_alive, stop_everything
from tests.test_service import Api, get_status, start_server, stop_server

pytestmark = pytest.mark.slow

START_TIMEOUT = 240  # s: BentoML and the worker's imports on a busy 2-core machine


@dataclass
class Home:
    paths: Paths
    keys: dict[str, str]
    env: dict[str, str]
    ids: list[str]  # enterprises in the online store, untouched by any test


@pytest.fixture(scope="module")
def home(tmp_path_factory, small_system) -> Home:
    """The small system served: all three products trained, kapok-microloan twice (v1
    @champion, v2 @challenger)."""
    from training.data import product_data
    from training.train import train

    p = Paths(tmp_path_factory.mktemp("faults_home"))
    p.data.mkdir(parents=True)
    (p.data / "raw").symlink_to(small_system.paths.raw)
    (p.data / "features").symlink_to(small_system.paths.features)
    store = fs.feature_store(p)
    fs.apply(store, p)
    start, end = fs.materialize_window(read_summary(p.features), full=False)
    fs.materialize(store, start, end)
    for product in PRODUCTS:
        train(product_data(p, product), p, trials=2, seed=7)
    train(product_data(p, "microloan"), p, trials=2, seed=8)
    keys_file = p.home / "api_keys.toml"
    keys = {role: add_key(keys_file, f"test-{role}", role) for role in ("lender", "reviewer")}
    registered = pl.read_parquet(small_system.paths.raw / "registration" / "*.parquet")
    found = OnlineFeatures(p, cache=False).read(registered["enterprise_id"].to_list()[:200])
    # firms with tax, power, payments and credit history in the store
    known = found.filter(
        pl.all_horizontal(
            pl.col(ts_column(f)).is_not_null()
            for f in ("tax", "power", "payments", "credit_history")
        )
    )["enterprise_id"].to_list()
    assert len(known) >= 40
    env = dict(os.environ, KAPOK_HOME=str(p.home), KAPOK_API_KEYS=str(keys_file),
               KAPOK_WORKERS="1", BENTOML_HOME=str(p.home / "bentoml"),
               KAPOK_DECISION_LOG=f"sqlite:///{p.home / 'decisions.db'}",
               MLFLOW_TRACKING_URI=f"sqlite:///{p.mlruns / 'mlflow.db'}")  # fmt: skip
    for name in ("KAPOK_DEMO", "KAPOK_POLICY", "KAPOK_ONLINE_STORE"):
        env.pop(name, None)
    return Home(p, keys, env, known)


@pytest.fixture(scope="module")
def server(home):
    log = home.paths.home / "server.log"
    process, base = start_server(home.env, log)
    yield Api(base, home.keys), process, log
    stop_server(process, log)


# -- (a) the MLflow tracking store unavailable at start-up ---------------------------------------
def serve_until_it_ends(env: dict[str, str], seconds: float = START_TIMEOUT):
    """`kapok serve` until it exits by itself: its output, exit code, the /readyz answers seen
    while it ran, and the process groups of the server it started."""
    port = free_port()
    kapok = subprocess.Popen([*kapok_command(), "serve", "--port", str(port)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    groups: set[int] = set()
    seen: list[int | None] = []
    try:
        deadline = time.monotonic() + seconds
        while kapok.poll() is None:
            assert time.monotonic() < deadline, "kapok serve did not stop by itself"
            try:
                children = psutil.Process(kapok.pid).children(recursive=True)
                groups |= {os.getpgid(c.pid) for c in children}
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
            seen.append(get_status(f"http://127.0.0.1:{port}/readyz", timeout=1))
            time.sleep(0.3)
        out, err = kapok.communicate(timeout=30)
    finally:
        stop_everything(kapok, groups)
    left = [g for g in groups - {os.getpgrp()} if group_alive(g)]
    return kapok.returncode, out, err, seen, left, port


def registry_without(home: Home, tmp_path: Path, product: str) -> str:
    """A copy of the home's registry in which `product` has no @champion."""
    from mlflow import MlflowClient

    copy = tmp_path / "mlflow.db"
    shutil.copyfile(home.paths.mlruns / "mlflow.db", copy)
    uri = f"sqlite:///{copy}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).delete_registered_model_alias(
        f"kapok-{product}", "champion"
    )
    return uri


@pytest.mark.parametrize("fault", ["postgres_down", "corrupt_store", "no_champion"])
def test_serve_refuses_to_start_without_its_models(home, tmp_path, fault):
    """The tracking store is unreachable (a PostgreSQL port where nothing listens), not a
    database, or has no @champion for one product: `kapok serve` ends by itself with one line
    naming the store and what is missing, exit code 1, no traceback, nothing left running, and
    /readyz never answered 200 meanwhile (never a server with a product missing)."""
    if fault == "postgres_down":
        port = free_port()
        uri = f"postgresql+psycopg2://kapok:secret@127.0.0.1:{port}/test"
        wanted = [f"the MLflow tracking store postgresql+psycopg2://kapok:***@127.0.0.1:{port}/test"
                  " is unavailable", "Connection refused"]  # fmt: skip
    elif fault == "corrupt_store":
        broken = tmp_path / "mlflow.db"
        broken.write_bytes(b"this is not an SQLite database\n" * 200)
        uri = f"sqlite:///{broken}"
        wanted = [f"the MLflow tracking store {uri} is unavailable", "file is not a database"]
    else:
        uri = registry_without(home, tmp_path, "guarantee")
        wanted = [f"no @champion model for kapok-guarantee in the MLflow tracking store {uri}"]
    env = dict(home.env, MLFLOW_TRACKING_URI=uri)
    started = time.monotonic()
    code, out, err, seen, left, port = serve_until_it_ends(env)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, (code, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    assert lines and lines[-1].startswith("error: the API cannot start: "), err[-3000:]
    for text in wanted:
        assert text in lines[-1], lines[-1]
    assert "secret" not in out + err  # a password in the URI is never printed
    assert 200 not in seen, seen
    assert not left, left
    assert not answers(port, "/livez")
    assert time.monotonic() - started < START_TIMEOUT
