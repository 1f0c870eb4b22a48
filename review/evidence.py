"""Everything a review needs about one registered model version, read back from MLflow:
identity and lineage, the training run's metrics and study, the scorer, and the evaluation rows
(`evaluation/test.parquet`, `evaluation/train.parquet`) that training logged."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import mlflow
import polars as pl
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kapok.settings import Paths
from review.lookback import history_start
from training.data import LABEL, TIME
from training.pyfunc import load_scorer
from training.scorer import Scorer
from training.tracking import CHAMPION, configure
from training.tracking import model_name as registered_name
from training.train import MARGIN_COLUMN, PD_COLUMN

__all__ = [
    "LABEL",
    "MARGIN_COLUMN",
    "PD_COLUMN",
    "TIME",
    "EvidenceError",
    "ModelEvidence",
    "load_evidence",
    "resolve_version",
]


class EvidenceError(ValueError):
    """The model, version or alias does not exist, or its run lacks what a review needs."""


@dataclass
class ModelEvidence:
    name: str  # registered model, e.g. kapok-microloan
    data_name: str  # product or dataset name (the suffix of `name`)
    version: str
    aliases: list[str]
    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]  # the training run's metrics (test_auc, best_valid_auc, ...)
    tags: dict[str, str]
    version_tags: dict[str, str]
    windows: dict[str, Any]
    model_spec: dict[str, Any]  # features, categorical, monotone_constraints, segments, label
    study: dict[str, Any]  # optuna/study.json
    trials: pl.DataFrame  # optuna/trials.csv
    segments_metrics: dict[str, Any]  # segments.json as logged at training
    scorer: Scorer
    test: pl.DataFrame  # evaluation rows with PD_COLUMN and MARGIN_COLUMN
    train: pl.DataFrame  # training-window reference rows with PD_COLUMN and MARGIN_COLUMN
    extras: dict[str, Any] = field(default_factory=dict)
    # the first month of the data the model was trained on (review.lookback.history_start):
    # look-back features hold their whole window only from history_start + lookback
    history_start: date | None = None
    history_source: str = "unknown"  # where history_start was read
    # candidates.json and scorecard/points.csv (training.train); None for models trained before
    # Kapok fitted candidates, or (points) when no scorecard was fitted
    candidates: dict[str, Any] | None = None
    points: pl.DataFrame | None = None

    @property
    def model_kind(self) -> str:
        """scorecard, blend or lightgbm (models from before the candidates: lightgbm)."""
        return self.tags.get("kapok.model_kind", "lightgbm")

    @property
    def features(self) -> list[str]:
        return list(self.scorer.features)

    @property
    def categorical(self) -> list[str]:
        return list(self.model_spec.get("categorical", []))

    @property
    def segments(self) -> list[str]:
        return list(self.model_spec.get("segments", []))

    @property
    def has_time(self) -> bool:
        return TIME in self.test.columns

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _name(product_or_name: str) -> str:
    return (
        product_or_name
        if product_or_name.startswith("kapok-")
        else registered_name(product_or_name)
    )


def resolve_version(
    client: MlflowClient, name: str, alias: str | None = None, version: str | None = None
) -> str:
    """The version number behind an alias (default champion) or an explicit version."""
    if alias and version:
        raise EvidenceError("give --alias or --version, not both")
    try:
        if version:
            return str(client.get_model_version(name, str(version)).version)
        return str(client.get_model_version_by_alias(name, alias or CHAMPION).version)
    except MlflowException as e:
        what = f"version {version}" if version else f"alias @{alias or CHAMPION}"
        known = ", ".join(
            sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))
        )
        raise EvidenceError(
            f"{name} has no {what}"
            + (f" (versions: {known})" if known else ": train it first with `kapok train`")
        ) from e


def _artifact(run_id: str, path: str, target: Path) -> Path:
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(target)
            )
        )
    except (MlflowException, OSError) as e:
        raise EvidenceError(
            f"run {run_id} has no artifact {path!r}: it was trained by an older Kapok; "
            "retrain it with `kapok train`"
        ) from e


def load_evidence(
    paths: Paths,
    product_or_name: str,
    *,
    alias: str | None = None,
    version: str | None = None,
    workdir: Path | None = None,
) -> ModelEvidence:
    """Read one model version and its training run back from MLflow."""
    import tempfile

    client = configure(paths)
    name = _name(product_or_name)
    v = resolve_version(client, name, alias, version)
    mv = client.get_model_version(name, v)
    run = client.get_run(mv.run_id)
    registered = client.get_registered_model(name)
    aliases = sorted(a for a, ver in (registered.aliases or {}).items() if str(ver) == v)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)

        def read_json(path: str) -> Any:
            return json.loads(_artifact(mv.run_id, path, folder).read_text())

        windows = read_json("windows.json")
        spec = read_json("model_spec.json")
        study = read_json("optuna/study.json")
        segments = read_json("segments.json")
        trials = pl.read_csv(_artifact(mv.run_id, "optuna/trials.csv", folder))
        test = pl.read_parquet(_artifact(mv.run_id, "evaluation/test.parquet", folder))
        train = pl.read_parquet(_artifact(mv.run_id, "evaluation/train.parquet", folder))
        candidates = _optional(lambda: read_json("candidates.json"))
        points = _optional(
            lambda: pl.read_csv(_artifact(mv.run_id, "scorecard/points.csv", folder))
        )
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    start, start_source = history_start(tags, paths.raw)
    return ModelEvidence(
        name=name,
        data_name=name.removeprefix("kapok-"),
        version=v,
        aliases=aliases,
        run_id=mv.run_id,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=tags,
        version_tags=dict(mv.tags or {}),
        windows=windows,
        model_spec=spec,
        study=study,
        trials=trials,
        segments_metrics=segments,
        scorer=load_scorer(f"models:/{name}/{v}"),
        test=test,
        train=train,
        history_start=start,
        history_source=start_source,
        candidates=candidates,
        points=points,
    )


def _optional(read: Callable[[], Any]) -> Any:
    """An artifact older runs lack: None instead of an error."""
    try:
        return read()
    except EvidenceError:
        return None
