"""The MLflow tracking store failing under `kapok train`, `promote` and `report`: a store that is
down is one clear error naming it, never read as "this model has no @champion" (train would have
made its new model the champion past the promotion gate; promote and report said there was none
to compare with). The serving side of the same faults: tests/test_serving_faults.py."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_processes import run_kapok


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port held bound but not listening: a connection to it is refused, and nothing
    else can be given it meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def test_a_store_unreachable_from_the_start_is_one_line_at_once(tmp_path: Path, monkeypatch):
    """MLFLOW_TRACKING_URI at a PostgreSQL where nothing listens: configure() raises at once
    (one refused connection, not MLflow's ~100 s of retries), and `kapok report` exits 2 with
    one line naming the store (password hidden) and the refused connection, no traceback."""
    from kapok.settings import Paths
    from training.tracking import TrackingStoreUnavailable, configure

    with closed_port() as port:
        uri = f"postgresql+psycopg2://kapok:secret@127.0.0.1:{port}/test"
        said = (
            f"the MLflow tracking store postgresql+psycopg2://kapok:***@127.0.0.1:{port}/test is "
            f'unavailable: connection to server at "127.0.0.1", port {port} failed: Connection '
            "refused"
        )
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        with pytest.raises(TrackingStoreUnavailable) as e:
            configure(Paths(tmp_path))
        assert time.monotonic() - started < 10
        assert str(e.value) == said
        env = {"KAPOK_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": uri}
        ran = run_kapok(["report", "--product", "microloan"], env=env)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert ran.stderr_lines == [f"error: {said}"], ran.stderr
    assert "secret" not in ran.stdout + ran.stderr


def test_a_store_that_goes_down_is_an_error_not_no_alias(tmp_path: Path):
    """A registry on a PostgreSQL of the test's own: the champion's version while it is up, None
    for an alias or a model that does not exist; once the database has stopped, the same lookup
    raises TrackingStoreUnavailable naming the store (password hidden), where it answered None
    ("no champion") before."""
    from mlflow import MlflowClient

    from tests.private_stores import PrivatePostgres
    from training.tracking import CHALLENGER, CHAMPION, TrackingStoreUnavailable, alias_version

    pg = PrivatePostgres()
    try:
        pg.create()
        client = MlflowClient(tracking_uri=pg.url, registry_uri=pg.url)
        client.create_registered_model("kapok-microloan")
        version = client.create_model_version("kapok-microloan", source=tmp_path.as_uri()).version
        client.set_registered_model_alias("kapok-microloan", CHAMPION, version)
        assert alias_version(client, "kapok-microloan", CHAMPION) == str(version)
        assert alias_version(client, "kapok-microloan", CHALLENGER) is None
        assert alias_version(client, "kapok-guarantee", CHAMPION) is None
        pg.stop()
        started = time.monotonic()
        with pytest.raises(TrackingStoreUnavailable) as e:
            alias_version(client, "kapok-microloan", CHAMPION)
        assert time.monotonic() - started < 30
        message = str(e.value)
        shown = f"postgresql+psycopg2://postgres:***@127.0.0.1:{pg.port}/kapok"
        assert message.startswith(f"the MLflow tracking store {shown} is unavailable: "), message
        assert "\n" not in message and pg.PASSWORD not in message
    finally:
        pg.remove()
