"""A trained Kapok model as one object: features → LightGBM margin → calibrated PD.

Plain Python (LightGBM and numpy only): MLflow wraps it, serving and batch jobs call it directly.
Saved as a folder: model.txt (LightGBM), scorer.json (features, categories, calibrator).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl

from training.calibration import Calibrator


@dataclass
class Scorer:
    booster: lgb.Booster
    features: list[str]
    categories: dict[str, list[str]]  # categorical feature -> known values; code = position
    calibrator: Calibrator

    def matrix(self, frame: pl.DataFrame) -> np.ndarray:
        """Float matrix in model column order; categoricals as codes, unknown values missing."""
        missing = [f for f in self.features if f not in frame.columns]
        if missing:
            raise ValueError(f"input lacks model features: {', '.join(missing)}")
        return encode(frame, self.features, self.categories)

    def margin(self, frame: pl.DataFrame) -> np.ndarray:
        return self.booster.predict(self.matrix(frame), raw_score=True)

    def pd(self, frame: pl.DataFrame) -> np.ndarray:
        return self.calibrator(self.margin(frame))

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(folder / "model.txt"))
        meta = {
            "features": self.features,
            "categories": self.categories,
            "calibrator": self.calibrator.to_dict(),
        }
        (folder / "scorer.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        return folder

    @classmethod
    def load(cls, folder: Path) -> Scorer:
        meta = json.loads((Path(folder) / "scorer.json").read_text())
        booster = lgb.Booster(model_file=str(Path(folder) / "model.txt"))
        return cls(
            booster, meta["features"], meta["categories"], Calibrator.from_dict(meta["calibrator"])
        )


def category_levels(frame: pl.DataFrame, categorical: list[str]) -> dict[str, list[str]]:
    """Sorted distinct values of each categorical column (the training data's dictionary)."""
    return {
        c: sorted(v for v in frame[c].cast(pl.String).unique().to_list() if v is not None)
        for c in categorical
    }


def encode(
    frame: pl.DataFrame, features: list[str], categories: dict[str, list[str]]
) -> np.ndarray:
    columns = []
    for name in features:
        col = frame[name]
        if name in categories:
            mapping = {v: float(i) for i, v in enumerate(categories[name])}
            col = col.cast(pl.String).replace_strict(mapping, default=None, return_dtype=pl.Float64)
        columns.append(col.cast(pl.Float64).fill_nan(None).to_numpy())
    return np.column_stack(columns).astype(np.float64) if columns else np.empty((frame.height, 0))
