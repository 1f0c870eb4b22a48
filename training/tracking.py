"""MLflow: where runs and models live (SQLite under KAPOK_HOME/mlruns, or MLFLOW_TRACKING_URI),
and the champion / challenger aliases of the registered models `kapok-<name>`."""

from __future__ import annotations

import os

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kapok.settings import Paths

CHAMPION, CHALLENGER = "champion", "challenger"


# mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI for subprocesses; remember the default
# stores Kapok itself exported, so that a later KAPOK_HOME is not mistaken for a user's server.
_exported_defaults: set[str] = set()


def _default_uri(paths: Paths) -> str:
    paths.mlruns.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{paths.mlruns / 'mlflow.db'}"


def tracking_uri(paths: Paths) -> str:
    """MLFLOW_TRACKING_URI if set (e.g. postgresql://...), else SQLite under KAPOK_HOME/mlruns."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri and uri not in _exported_defaults:
        return uri
    return _default_uri(paths)


def configure(paths: Paths) -> MlflowClient:
    uri = tracking_uri(paths)
    if uri == _default_uri(paths):
        _exported_defaults.add(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def shown_uri(uri: str) -> str:
    """A tracking URI as Kapok shows it in messages: any password replaced by ***."""
    if "://" not in uri or "@" not in uri:
        return uri
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        return uri.split("://", 1)[0] + "://***@" + uri.rsplit("@", 1)[1]


_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def store_problem(uri: str) -> str | None:
    """Why the database behind an MLflow tracking URI cannot be read, in one line, or None.

    One quick connection with a 5 s timeout: MLflow itself retries an unreachable database for
    about 100 s before it gives up. A SQLite file that does not exist yet is no problem (MLflow
    creates it); a URI that is not a database (http://, file:) is not probed."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in _SQL_SCHEMES:
        return None
    if scheme == "sqlite":
        file = uri.split(":///", 1)[-1].split("?", 1)[0]
        if file in ("", ":memory:") or not os.path.exists(file):
            return None
    connect_args = {} if scheme == "sqlite" else {"connect_timeout": 5}
    try:
        engine = sqlalchemy.create_engine(
            uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool
        )
    except (SQLAlchemyError, ImportError, ValueError) as e:
        return _one_line(e)
    try:
        with engine.connect() as connection:
            sqlalchemy.inspect(connection).get_table_names()
    except SQLAlchemyError as e:
        return _one_line(getattr(e, "orig", None) or e)
    finally:
        engine.dispose()
    return None


def _one_line(error: BaseException) -> str:
    first = str(error).strip().splitlines()
    return " ".join(first[0].split()) if first else type(error).__name__


def experiment(client: MlflowClient, name: str, paths: Paths) -> str:
    """Get or create an experiment whose artifacts live under KAPOK_HOME/mlruns/artifacts."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (paths.mlruns / "artifacts" / name).resolve()
    location.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=location.as_uri())


def model_name(name: str) -> str:
    return f"kapok-{name}"


def alias_version(client: MlflowClient, model: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException:
        return None
