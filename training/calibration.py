"""Turning LightGBM margins into PDs a lender can price with: isotonic or Platt, whichever fits
the validation window better (log loss), always monotone in the margin.

Shape and level are separate questions. The shape (how PD rises with the margin) comes from the
most recent held-out months. The level can come from elsewhere: out of time, training anchors it
to the long-run default rate of every matured month it learnt from (the central tendency, as
IRB practice calibrates PDs through the cycle), because a single recent window caught in a
downturn or a boom is a poor forecast of the next one. The level moves every PD by the same
log-odds shift, so the ranking, and monotonicity, are untouched."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

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
    shift: float = 0.0  # log-odds added to every PD: the level (central tendency) adjustment
    # margin -> margin_offset + margin_scale * margin before the shape: maps the shipped model's
    # margins onto the scale of the held-out model the shape was fitted on (see `aligned`)
    margin_offset: float = 0.0
    margin_scale: float = 1.0

    def __call__(self, margin: np.ndarray) -> np.ndarray:
        m = self.margin_offset + self.margin_scale * np.asarray(margin, dtype=float)
        if self.method == "platt":
            p = 1 / (1 + np.exp(-(self.a * m + self.b)))
        else:
            p = np.interp(m, self.x, self.y)
        if self.shift:
            p = np.clip(p, PD_FLOOR, PD_CAP)
            p = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + self.shift)))
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


def with_level(calibrator: Calibrator, margin: np.ndarray, target: float) -> Calibrator:
    """The calibrator shifted (in log-odds) so that its mean PD over `margin` equals `target`."""
    if not 0 < target < 1:
        raise ValueError(f"a calibration level must be a rate in (0, 1), got {target}")
    base = replace(calibrator, shift=0.0)
    lo, hi = -10.0, 10.0
    for _ in range(100):  # mean PD is increasing in the shift: bisection
        mid = (lo + hi) / 2
        if float(np.mean(replace(base, shift=mid)(margin))) < target:
            lo = mid
        else:
            hi = mid
    return replace(base, shift=(lo + hi) / 2)


def aligned(calibrator: Calibrator, shipped: np.ndarray, held_out: np.ndarray) -> Calibrator:
    """The calibrator for a model refit on more rows than the one its shape was fitted on.

    `shipped` and `held_out` are the two models' margins on the same rows. The refit model's
    margins are mapped (increasing, affine) to the held-out model's mean and spread on those rows,
    so that the calibration fitted on the held-out model's validation margins applies unchanged:
    no label is used, and the ranking is the refit model's own.
    """
    shipped, held_out = np.asarray(shipped, dtype=float), np.asarray(held_out, dtype=float)
    spread = float(np.std(shipped))
    if spread <= 0:
        raise ValueError("the refit model gives every row the same margin: nothing to calibrate")
    scale = float(np.std(held_out)) / spread
    offset = float(np.mean(held_out)) - scale * float(np.mean(shipped))
    return replace(calibrator, margin_offset=offset, margin_scale=scale)


def fit_calibrator(
    margin: np.ndarray, y: np.ndarray, level: float | None = None
) -> tuple[Calibrator, dict[str, float]]:
    """Both methods on the validation window; the lower log loss wins. Returns the losses too.

    Isotonic is scored by 2-fold cross-fitting so that its flexibility is not rewarded for
    memorising the very labels it is judged on; the winner is then refit on all rows. With
    `level`, the winner is shifted so that its mean PD on these rows is that rate (see above).
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
    chosen = platt if best == "platt" else fit_isotonic(margin, y)
    if level is not None:
        chosen = with_level(chosen, margin, level)
    return chosen, losses
