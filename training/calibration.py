"""Turning LightGBM margins into PDs a lender can price with: isotonic or Platt, whichever fits
the validation window better (log loss), always monotone in the margin."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

PD_FLOOR, PD_CAP = 1e-4, 1 - 1e-4  # no borrower is certain to repay or to default


@dataclass(frozen=True)
class Calibrator:
    method: str  # "isotonic" | "platt"
    a: float = 0.0  # platt: pd = sigmoid(a * margin + b)
    b: float = 0.0
    x: list[float] = field(default_factory=list)  # isotonic: knots (margin -> pd), increasing
    y: list[float] = field(default_factory=list)

    def __call__(self, margin: np.ndarray) -> np.ndarray:
        m = np.asarray(margin, dtype=float)
        if self.method == "platt":
            p = 1 / (1 + np.exp(-(self.a * m + self.b)))
        else:
            p = np.interp(m, self.x, self.y)
        return np.clip(p, PD_FLOOR, PD_CAP)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibrator:
        return cls(**d)


def fit_platt(margin: np.ndarray, y: np.ndarray) -> Calibrator:
    model = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(margin).reshape(-1, 1), y)
    a = float(model.coef_[0, 0])
    if a <= 0:  # a calibration that reverses the ranking is a broken model, not a calibration
        raise ValueError("Platt scaling found a non-increasing relation between margin and bads")
    return Calibrator("platt", a=a, b=float(model.intercept_[0]))


def fit_isotonic(margin: np.ndarray, y: np.ndarray) -> Calibrator:
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=PD_FLOOR, y_max=PD_CAP)
    iso.fit(margin, y)
    return Calibrator("isotonic", x=iso.X_thresholds_.tolist(), y=iso.y_thresholds_.tolist())


def fit_calibrator(margin: np.ndarray, y: np.ndarray) -> tuple[Calibrator, dict[str, float]]:
    """Both methods on the validation window; the lower log loss wins. Returns the losses too.

    Isotonic is scored by 2-fold cross-fitting so that its flexibility is not rewarded for
    memorising the very labels it is judged on; the winner is then refit on all rows.
    """
    margin, y = np.asarray(margin, dtype=float), np.asarray(y).astype(int)
    losses = {}
    platt = fit_platt(margin, y)
    losses["platt"] = float(log_loss(y, platt(margin), labels=[0, 1]))
    folds = np.arange(len(y)) % 2
    crossed = np.empty(len(y))
    for k in (0, 1):
        iso = fit_isotonic(margin[folds != k], y[folds != k])
        crossed[folds == k] = iso(margin[folds == k])
    losses["isotonic"] = float(log_loss(y, crossed, labels=[0, 1]))
    best = min(losses, key=losses.__getitem__)
    return (platt if best == "platt" else fit_isotonic(margin, y)), losses
