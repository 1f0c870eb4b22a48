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


class TrackingStoreUnavailable(MlflowException):
    """The MLflow tracking store cannot be read (its database down, unreachable or not one): the
    message names the store (any password hidden) and why, in one line."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"the MLflow tracking store {shown_uri(uri)} is unavailable: {reason}")


def configure(paths: Paths) -> MlflowClient:
    """A client of the tracking store (also made MLflow's default). A store whose database
    cannot be read raises TrackingStoreUnavailable here, after one connection (5 s at most),
    not at its first use after MLflow's ~100 s of retries."""
    uri = tracking_uri(paths)
    if uri == _default_uri(paths):
        _exported_defaults.add(uri)
    problem = store_problem(uri)
    if problem is not None:
        raise TrackingStoreUnavailable(uri, problem)
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

    One quick connection (5 s to reach a database server): MLflow itself retries an unreachable
    database for about 100 s before it gives up. A SQLite file that does not exist yet is no
    problem (MLflow creates it); a URI that is not a database (http://, file:) is not probed."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in _SQL_SCHEMES:
        return None
    if scheme == "sqlite":
        file = uri.split(":///", 1)[-1].split("?", 1)[0]
        if file in ("", ":memory:") or not os.path.exists(file):
            return None
    # SQLite: wait for a writer's lock as long as MLflow does (busy_timeout 20 s), so that a
    # store busy with a training run is not taken for a broken one
    connect_args = {"timeout": 20} if scheme == "sqlite" else {"connect_timeout": 5}
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


# what the registry answers for a model, or an alias, that does not exist (SQL and REST stores)
_NOT_THERE = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def alias_version(client: MlflowClient, model: str, alias: str) -> str | None:
    """The version `model@alias` names; None when the model or the alias does not exist.

    A store that cannot be read raises TrackingStoreUnavailable, never taken for "no alias":
    `kapok train` would have made its new model the champion without the promotion gate,
    `kapok promote` and `kapok report` said there was no champion to compare with. A store that
    is unreachable from the start is found by configure()."""
    from sqlalchemy.exc import SQLAlchemyError

    uri = client.tracking_uri  # configure() gives the registry the same URI
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException as e:
        if e.error_code in _NOT_THERE:
            return None
        raise TrackingStoreUnavailable(uri, _reason(e)) from e
    except (SQLAlchemyError, OSError) as e:  # the store could not even be opened
        raise TrackingStoreUnavailable(uri, _reason(e)) from e


def version_exists(client: MlflowClient, model: str, version: str) -> bool:
    """Whether `model` version `version` is in the registry; a store that cannot be read
    raises TrackingStoreUnavailable, never taken for "gone" (as in `alias_version`)."""
    from sqlalchemy.exc import SQLAlchemyError

    uri = client.tracking_uri
    try:
        client.get_model_version(model, version)
    except MlflowException as e:
        if e.error_code in _NOT_THERE:
            return False
        raise TrackingStoreUnavailable(uri, _reason(e)) from e
    except (SQLAlchemyError, OSError) as e:
        raise TrackingStoreUnavailable(uri, _reason(e)) from e
    return True


def _reason(error: BaseException) -> str:
    """The database driver's own words where there are some (MLflow wraps SQLAlchemy's error,
    which wraps the driver's)."""
    if isinstance(error, MlflowException) and error.__cause__ is not None:
        error = error.__cause__
    return _one_line(getattr(error, "orig", None) or error)
