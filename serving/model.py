"""A registered champion as the decision core uses it: the scorer, its feature order and codes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from training.scorer import Scorer

if TYPE_CHECKING:
    from kapok.settings import Paths


class ModelUnavailable(ValueError):
    """A product has no @champion in the registry; the message says how to train one."""


@dataclass
class ProductModel:
    product: str
    name: str
    version: str
    scorer: Scorer
    index: dict[str, int] = field(default_factory=dict)
    codes: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {f: i for i, f in enumerate(self.scorer.features)}
        self.codes = {
            f: {v: float(i) for i, v in enumerate(values)}
            for f, values in self.scorer.categories.items()
        }

    def row(self, values: Mapping[str, Any]) -> np.ndarray:
        """One model-ordered float row; categoricals as codes; missing and unknown as NaN."""
        x = np.full((1, len(self.index)), np.nan)
        for name, i in self.index.items():
            value = values.get(name)
            if value is None:
                continue
            if name in self.codes:
                x[0, i] = self.codes[name].get(str(value), np.nan)
            else:
                x[0, i] = float(value)
        return x

    def margin(self, x: np.ndarray) -> np.ndarray:
        return self.scorer.booster.predict(x, raw_score=True, num_threads=threads(len(x)))

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Exact TreeSHAP in log-odds: one column per feature, then the base value."""
        return self.scorer.booster.predict(x, pred_contrib=True, num_threads=threads(len(x)))


def threads(rows: int) -> int:
    """One thread for small batches (OpenMP start-up costs more than it saves), all cores above."""
    return 1 if rows < 256 else 0


def load_champion(paths: Paths, product: str) -> ProductModel:
    """The registered @champion of a product, pinned to the version the alias names now: a
    later move of the alias changes nothing here (a new champion needs a new load: a restart of
    `kapok serve`). ModelUnavailable, naming the tracking store and what is missing, when the
    store cannot be read, has no @champion for the product or cannot load its model."""
    from training.pyfunc import load_scorer
    from training.tracking import (
        CHAMPION,
        alias_version,
        configure,
        model_name,
        shown_uri,
        store_problem,
        tracking_uri,
    )

    uri = tracking_uri(paths)
    where = f"the MLflow tracking store {shown_uri(uri)}"
    problem = store_problem(uri)
    if problem is not None:
        raise ModelUnavailable(f"{where} is unavailable: {problem}")
    client = configure(paths)
    name = model_name(product)
    version = alias_version(client, name, CHAMPION)
    if version is None:
        raise ModelUnavailable(
            f"no @{CHAMPION} model for {name} in {where}: train one with "
            f"`kapok train --product {product}` (or set MLFLOW_TRACKING_URI to the store that "
            "has it)"
        )
    try:
        scorer = load_scorer(f"models:/{name}/{version}")
    except Exception as e:  # missing or unreadable artifacts: MlflowException, OSError, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelUnavailable(
            f"cannot load {name} version {version} (@{CHAMPION}) from {where}: {reason}"
        ) from e
    return ProductModel(product, name, version, scorer)
