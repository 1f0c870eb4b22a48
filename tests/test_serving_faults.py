"""Injected faults of issue 12 against a served API: the MLflow tracking store unavailable at
start-up, impossible feature values in the online store, and the champion alias moving while
the server answers."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest

from features import store as fs
from features.build import read_summary
from features.online import OnlineFeatures, ts_column
from features.schema import FEATURES, PRODUCTS, features_of
from kapok.settings import Paths
from serving.api_models import (
    ErrorBody,
    ExplainAnswer,
    LimitAnswer,
    PriceAnswer,
    ScoreAnswer,
    ScreenAnswer,
)
from serving.auth import add_key
from tests.cli_processes import kapok_command
from tests.test_cli_ui import answers, free_port, group_alive, stop_everything
from tests.test_service import Api, get_status, request, start_server, stop_server

pytestmark = pytest.mark.slow

START_TIMEOUT = 240  # s: BentoML and the worker's imports on a busy 2-core machine


@dataclass
class Home:
    paths: Paths
    keys: dict[str, str]
    env: dict[str, str]
    ids: list[str]  # enterprises in the online store, untouched by any test
    bad: dict[str, str]  # case -> enterprise whose online features the fixture spoiled


# -- the online store's impossible values --------------------------------------------------------
FUTURE = datetime.now(UTC) + timedelta(days=40)
# case: (family, {feature: value}, snapshot stamped in the future)
SPOILED: dict[str, tuple[str, dict[str, float], bool]] = {
    "nan": ("tax", {"tax_sales_growth_yoy": math.nan, "tax_paid_to_sales_12m": math.nan}, False),
    "plus_inf": ("power", {"power_kwh_3m": math.inf}, False),
    "minus_inf": ("payments", {"pay_inflow_3m": -math.inf}, False),
    "negative_sales": ("tax", {"tax_sales_12m": -250_000.0}, False),
    "share_above_one": ("credit_history", {"cred_nonbank_share": 1.7}, False),
    "future_snapshot": ("tax", {}, True),
}
# the feature each fault names in its error (None: a valid decision is expected)
NAMED = {
    "nan": None,
    "plus_inf": "feature power_kwh_3m is +inf",
    "minus_inf": "feature pay_inflow_3m is -inf",
    "negative_sales": "feature tax_sales_12m is negative (-250,000.00)",
    "share_above_one": "feature cred_nonbank_share is 1.70, outside the values it can take",
    "future_snapshot": "the tax snapshot is stamped " + FUTURE.strftime("%Y-%m-%dT%H"),
}


def spoil(p: Paths, store, eid: str, family: str, values: dict[str, float], future: bool) -> None:
    """Write one enterprise's snapshot of one family into the online store through Feast, with
    `values` in place of the real ones (and stamped 40 days from now when `future`)."""
    row = OnlineFeatures(p, cache=False).read([eid])
    names = [f.name for f in features_of(family)]
    stamp = row[ts_column(family)][0]
    frame = row.select(
        pl.col("enterprise_id"),
        *names,
        pl.lit(FUTURE if future else stamp + timedelta(seconds=1))
        .cast(pl.Datetime("us", "UTC"))
        .alias("event_timestamp"),
    ).with_columns(pl.lit(v, dtype=pl.Float64).alias(k) for k, v in values.items())
    store.write_to_online_store(family, frame.to_pandas(use_pyarrow_extension_array=True))
    got = OnlineFeatures(p, cache=False).read([eid]).row(0, named=True)
    for name, value in values.items():  # the store now holds the spoiled values
        if math.isnan(value):  # Feast writes a NaN as a missing value
            assert got[name] is None or math.isnan(got[name]), name
        else:
            assert got[name] == value, name
    if future:
        assert got[ts_column(family)] > datetime.now(UTC), got[ts_column(family)]


@pytest.fixture(scope="module")
def home(tmp_path_factory, small_system) -> Home:
    """The small system served: all three products trained, kapok-microloan twice (v1
    @champion, v2 @challenger), and six enterprises whose online features are impossible."""
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
    # firms with tax, power, payments and credit history in the store: each fault lands
    known = found.filter(
        pl.all_horizontal(
            pl.col(ts_column(f)).is_not_null()
            for f in ("tax", "power", "payments", "credit_history")
        )
    )["enterprise_id"].to_list()
    assert len(known) >= 40
    bad = dict(zip(SPOILED, known[: len(SPOILED)], strict=True))
    for case, (family, values, future) in SPOILED.items():
        spoil(p, store, bad[case], family, values, future)
    env = dict(os.environ, KAPOK_HOME=str(p.home), KAPOK_API_KEYS=str(keys_file),
               KAPOK_WORKERS="1", BENTOML_HOME=str(p.home / "bentoml"),
               KAPOK_DECISION_LOG=f"sqlite:///{p.home / 'decisions.db'}",
               MLFLOW_TRACKING_URI=f"sqlite:///{p.mlruns / 'mlflow.db'}")  # fmt: skip
    for name in ("KAPOK_DEMO", "KAPOK_POLICY", "KAPOK_ONLINE_STORE"):
        env.pop(name, None)
    return Home(p, keys, env, known[len(SPOILED) :], bad)


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
    held = contextlib.ExitStack()
    if fault == "postgres_down":
        # bound but not listening for the whole test: a connection to it is refused, and the
        # server the test starts (on a free port of its own) can never be given this one
        closed = held.enter_context(socket.socket())
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
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
    with held:
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


# -- (b) impossible feature values in the online store -------------------------------------------
ANSWERS = {"/score": ScoreAnswer, "/limit": LimitAnswer, "/price": PriceAnswer,
           "/explain": ExplainAnswer}  # fmt: skip


def body_for(path: str, eid: str) -> tuple[dict, str]:
    if path == "/price":
        return {"enterprise_id": eid, "product": "guarantee", "amount": 500_000,
                "term_months": 12}, "lender"  # fmt: skip
    if path == "/explain":
        return {"enterprise_id": eid, "product": "microloan"}, "reviewer"
    return request(eid, "insurance" if path == "/limit" else "microloan"), "lender"


def test_impossible_feature_values_are_a_422_naming_the_feature_and_the_enterprise(home, server):
    """NaN in the online store is a missing value (LightGBM's own): a valid decision. +inf,
    -inf, negative sales, a share above 1 and a snapshot stamped in the future are faults of the
    data: every endpoint answers 422 cannot_decide naming the enterprise and the feature (or the
    snapshot), logs nothing, and /screen decides the other applicants; never a 500."""
    from serving.decision_log import DecisionLog

    api, _, log_file = server
    log = DecisionLog(home.env["KAPOK_DECISION_LOG"])
    before = log.count()
    decided = 0
    for case, eid in home.bad.items():
        for path, model in ANSWERS.items():
            body, role = body_for(path, eid)
            status, answer = api.call(path, body, role=role)
            if NAMED[case] is None:
                assert status == 200, (case, path, answer)
                model.model_validate(answer)
                decided += path != "/explain"
                continue
            assert status == 422, (case, path, answer)
            ErrorBody.model_validate(answer)
            error = answer["error"]
            assert error["code"] == "cannot_decide", (case, path, error)
            assert eid in error["message"] and NAMED[case] in error["message"], (case, error)
    assert log.count() == before + decided  # the NaN firm's three decisions, nothing else

    good = home.ids[:3]
    applicants = [{"enterprise_id": e, "requested_amount": 300_000, "term_months": 12}
                  for e in [*home.bad.values(), *good]]  # fmt: skip
    status, answer = api.call("/screen", {"product": "guarantee", "applicants": applicants},
                              role="lender")  # fmt: skip
    assert status == 200, answer
    ScreenAnswer.model_validate(answer)
    ranked = {r["enterprise_id"] for r in answer["ranked"]}
    assert ranked == {home.bad["nan"], *good}, answer
    errors = {e["enterprise_id"]: e["error"] for e in answer["errors"]}
    for case, eid in home.bad.items():
        if NAMED[case] is not None:
            assert errors[eid]["code"] == "cannot_decide", errors[eid]
            assert NAMED[case] in errors[eid]["message"] and eid in errors[eid]["message"]
    assert "Traceback" not in log_file.read_text()


def test_the_simulated_data_has_no_impossible_values(small_system):
    """The bounds that refuse a value (features/schema.py) never refuse a real one: every
    snapshot the simulator's region produces lies inside them, so normal decisions are the
    same as before."""
    for fam in {f.family for f in FEATURES}:
        table = pl.read_parquet(small_system.paths.features / fam / "*.parquet")
        for f in features_of(fam):
            if f.dtype == "string":
                continue
            low, high = f.bounds
            column = table[f.name].cast(pl.Float64).drop_nulls().drop_nans()
            assert column.is_infinite().sum() == 0, f.name
            assert column.min() >= low and column.max() <= high, (f.name, column.min(), low)


# -- (c) the champion alias moves while the server answers ---------------------------------------
def pd_under(home: Home, version: str, features: dict) -> float:
    from serving.model import ProductModel
    from training.pyfunc import load_scorer
    from training.tracking import configure

    configure(home.paths)
    scorer = load_scorer(f"models:/kapok-microloan/{version}")
    model = ProductModel("microloan", "kapok-microloan", version, scorer)
    margin = model.margin(model.row(features))
    return float(scorer.calibrator(np.asarray(margin))[0])


def test_moving_the_champion_alias_while_serving(home, server):
    """While requests keep coming, @champion moves from v1 to v2 and back: no request fails,
    and every logged decision names the version whose PD it carries (the server pins the
    champion it loaded at start-up: v1). A restarted server decides with the new champion."""
    from mlflow import MlflowClient

    from serving.decision_log import DecisionLog

    api, _, _ = server
    uri = home.env["MLFLOW_TRACKING_URI"]
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(registry.get_model_version_by_alias("kapok-microloan", "champion").version) == "1"
    firms = home.ids[:8]
    answered: list[tuple[int, dict]] = []
    stop = threading.Event()

    def keep_asking() -> None:
        i = 0
        while not stop.is_set():
            answered.append(api.call("/score", request(firms[i % len(firms)]), role="lender"))
            i += 1

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        time.sleep(2)
        registry.set_registered_model_alias("kapok-microloan", "champion", "2")
        time.sleep(4)
        registry.set_registered_model_alias("kapok-microloan", "champion", "1")
        time.sleep(2)
        registry.set_registered_model_alias("kapok-microloan", "champion", "2")
        time.sleep(2)
    finally:
        stop.set()
        asker.join(timeout=120)
    assert len(answered) >= 20, len(answered)
    assert [s for s, _ in answered] == [200] * len(answered), [b for s, b in answered if s != 200]

    log = DecisionLog(home.env["KAPOK_DECISION_LOG"])
    versions = {b["model_version"] for _, b in answered}
    assert versions == {"1"}, versions  # pinned at start-up
    differs = 0
    for _, body in answered[:: max(1, len(answered) // 12)]:
        record = log.get(body["request_id"])
        assert record is not None and record.model_version == body["model_version"]
        decided_by = pd_under(home, record.model_version, record.features)
        other = pd_under(home, "2" if record.model_version == "1" else "1", record.features)
        assert record.pd == pytest.approx(decided_by, rel=1e-9, abs=1e-12)
        differs += abs(other - record.pd) > 1e-6
    assert differs >= 1  # the two versions really decide differently

    # a restart takes the champion the alias names now: v2
    log_file = home.paths.home / "restarted.log"
    process, base = start_server(home.env, log_file)
    try:
        status, body = Api(base, home.keys).call("/score", request(firms[0]), role="lender")
        assert status == 200, body
        assert body["model_version"] == "2"
        record = log.get(body["request_id"])
        assert record is not None and record.model_version == "2"
        assert record.pd == pytest.approx(pd_under(home, "2", record.features), rel=1e-9)
    finally:
        stop_server(process, log_file)
        registry.set_registered_model_alias("kapok-microloan", "champion", "1")
