"""Candidates per product and the rule that chooses among them (issue 13, item 1).

Three candidates are fitted on the training window and judged on the validation window: the WOE
scorecard (training.scorecard), the Optuna-tuned LightGBM (training.tune) and their blend,
w x scorecard log-odds + (1 - w) x LightGBM log-odds with w from BLEND_WEIGHTS, the one with the
best validation AUC. The choice: validation AUC minus the complexity premium
(training/promotion.toml) times the candidate's steps of complexity; the highest wins and a tie
goes to the simpler. The blend's weight is itself chosen on the validation window, so its
validation AUC is slightly optimistic: one premium step is the price of that choice too.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from training.metrics import ks

SCORECARD, BLEND, LIGHTGBM = "scorecard", "blend", "lightgbm"
STEPS = {SCORECARD: 0, BLEND: 1, LIGHTGBM: 2}  # steps of complexity: reading, then trusting
BLEND_WEIGHTS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # scorecard's weight 0.05..0.95
PROMOTION_FILE = Path(__file__).with_name("promotion.toml")
TIE = 1e-12  # scores closer than this are equal (floating-point noise, not evidence)


def complexity_premium(path: Path = PROMOTION_FILE) -> float:
    """Validation AUC a candidate must earn per step of complexity (training/promotion.toml)."""
    return float(tomllib.loads(path.read_text())["complexity_premium"])


@dataclass
class Candidate:
    kind: str
    valid_auc: float
    valid_ks: float
    test_auc: float | None = None  # the train-window fit on the test window: for the record only
    test_ks: float | None = None
    weight: float | None = None  # blend: the scorecard's weight
    score: float = float("nan")  # valid AUC - premium x steps
    chosen: bool = False
    note: str = ""  # why it failed, or what it is

    @property
    def steps(self) -> int:
        return STEPS[self.kind]

    def line(self) -> str:
        """One line for `kapok train`."""
        test = "" if self.test_auc is None else f", test AUC {self.test_auc:.4f}"
        note = f" ({self.note})" if self.note else ""
        mark = "  <- chosen" if self.chosen else ""
        return (
            f"{self.kind:<9} validation AUC {self.valid_auc:.4f}, KS {self.valid_ks:.4f}{test};"
            f" {self.steps} steps, score {self.score:.4f}{note}{mark}"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"steps": self.steps}


def judge(kind: str, y_valid: np.ndarray, m_valid: np.ndarray, **extra: object) -> Candidate:
    """A candidate from its validation-window margins."""
    return Candidate(kind, float(roc_auc_score(y_valid, m_valid)), ks(y_valid, m_valid), **extra)


def blend_weight(y_valid: np.ndarray, scorecard: np.ndarray, lightgbm: np.ndarray) -> float:
    """The scorecard's weight in the blend: the best validation AUC over BLEND_WEIGHTS (the
    larger weight, the simpler blend, on a tie)."""
    aucs = [roc_auc_score(y_valid, w * scorecard + (1 - w) * lightgbm) for w in BLEND_WEIGHTS]
    best = max(aucs)
    return max(w for w, a in zip(BLEND_WEIGHTS, aucs, strict=True) if a >= best - TIE)


def choose(candidates: list[Candidate], premium: float) -> Candidate:
    """Marks and returns the winner: the highest valid AUC - premium x steps, a tie to the
    simpler candidate."""
    if not candidates:
        raise ValueError("no candidate to choose from")
    for c in candidates:
        c.score = c.valid_auc - premium * c.steps
        c.chosen = False
    best = max(c.score for c in candidates)
    winner = min((c for c in candidates if c.score >= best - TIE), key=lambda c: c.steps)
    winner.chosen = True
    return winner


def reason(candidates: list[Candidate], premium: float) -> str:
    """Why the winner won, in one line (`kapok train` prints it, MLflow keeps it)."""
    winner = next(c for c in candidates if c.chosen)
    others = [c for c in candidates if not c.chosen]
    parts = []
    for c in sorted(others, key=lambda c: c.steps):
        gap = c.valid_auc - winner.valid_auc
        if c.steps > winner.steps:
            need = premium * (c.steps - winner.steps)
            parts.append(f"{c.kind} {gap:+.4f} AUC, needs > {need:+.4f} to pay its complexity")
        else:
            parts.append(f"{c.kind} {gap:+.4f} AUC")
    against = "; ".join(parts) if parts else "the only candidate"
    return (
        f"chose {winner.kind}: validation AUC {winner.valid_auc:.4f}, score {winner.score:.4f} "
        f"(AUC - {premium:g} x {winner.steps} steps); against it: {against}"
    )
