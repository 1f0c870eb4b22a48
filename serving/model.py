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
    """The registered @champion of a product, pinned to the version the alias names now."""
    from training.pyfunc import load_scorer
    from training.tracking import CHAMPION, alias_version, configure, model_name

    client = configure(paths)
    name = model_name(product)
    version = alias_version(client, name, CHAMPION)
    if version is None:
        raise ModelUnavailable(
            f"no @{CHAMPION} model for {name}: train one with `kapok train --product {product}`"
        )
    return ProductModel(product, name, version, load_scorer(f"models:/{name}/{version}"))
