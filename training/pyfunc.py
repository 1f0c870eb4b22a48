"""The MLflow face of a Kapok model: `models:/kapok-<product>@champion` → calibrated PD.

`predict(frame)` returns calibrated PD; `predict(frame, params={"output": "margin"})` returns the
LightGBM log-odds margin that SHAP explanations add up to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl

from training.scorer import Scorer


class KapokModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.scorer = Scorer.load(Path(context.artifacts["scorer"]))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        frame = (
            pl.from_pandas(model_input) if isinstance(model_input, pd.DataFrame) else model_input
        )
        output = (params or {}).get("output", "pd")
        if output == "margin":
            return self.scorer.margin(frame)
        if output != "pd":
            raise ValueError(f"params.output must be 'pd' or 'margin', got {output!r}")
        return self.scorer.pd(frame)


def model_input(frame: pl.DataFrame, scorer: Scorer) -> pd.DataFrame:
    """The pandas frame the pyfunc signature expects: numeric features as float64 (missing as
    NaN), categorical features as strings, in model order."""
    cat = set(scorer.categories)
    return frame.select(
        [pl.col(f).cast(pl.String if f in cat else pl.Float64) for f in scorer.features]
    ).to_pandas()


def load_scorer(model_uri: str) -> Scorer:
    """The plain Scorer behind a registered model (no pandas round trip)."""
    model = mlflow.pyfunc.load_model(model_uri)
    return model.unwrap_python_model().scorer
