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
