"""Fit the toad and optbinning scorecard baselines on the two real data sets; print test AUC.

    .venv/bin/python bench/try_scorecards.py

Stratified 70/30 split (seed 0); each scorecard is fitted on the 70% and scored on the 30%.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scorecards import fit_optbinning, fit_toad  # bench/ is on sys.path when run as a script
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from features.spec import LABEL, load_dataset, load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = ("datasets/german_credit.toml", "datasets/credit_scoring_belanche.toml")


def main() -> None:
    for rel in SPECS:
        spec = load_spec(ROOT / rel)
        frame = load_dataset(spec)
        features = [f.name for f in spec.features]
        categorical = [f.name for f in spec.features if f.categorical]
        idx = np.arange(frame.height)
        train_idx, test_idx = train_test_split(
            idx, test_size=0.3, stratify=frame[LABEL].to_numpy(), random_state=0
        )
        train, test = frame[train_idx], frame[test_idx]
        print(
            f"\n{spec.name}: {frame.height} rows, {len(features)} features "
            f"({len(categorical)} categorical), bad rate {frame[LABEL].to_numpy().mean():.3f}; "
            f"train {train.height} / test {test.height}"
        )
        print(f"  {'model':<22} {'test AUC':>8} {'fit s':>7} {'kept':>5}  features")
        for fit in (fit_toad, fit_optbinning):
            model = fit(train, LABEL, features, categorical, seed=0)
            pd_ = model.predict(test)
            auc = roc_auc_score(test[LABEL].to_numpy(), pd_)
            print(
                f"  {model.name:<22} {auc:8.4f} {model.fit_seconds:7.2f} "
                f"{len(model.selected):5d}  {', '.join(model.selected)}"
            )


if __name__ == "__main__":
    main()
