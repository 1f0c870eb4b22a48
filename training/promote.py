"""`kapok promote`: champion vs challenger on the same most-recent test window, a recorded verdict,
and the `champion` alias moved only when the gate (training/promotion.toml) passes or a human
overrides it with a reason."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow

from kapok.settings import Paths
from training.data import LABEL, TrainingData
from training.metrics import binary_metrics, psi
from training.pyfunc import load_scorer
from training.scorer import Scorer
from training.tracking import CHALLENGER, CHAMPION, alias_version, configure, experiment
from training.tracking import model_name as registered_name

GATE_FILE = Path(__file__).with_name("promotion.toml")


class PromotionError(ValueError):
    pass


@dataclass(frozen=True)
class Gate:
    auc_tolerance: float
    ece_limit: float
    psi_limit: float

    @classmethod
    def load(cls, path: Path = GATE_FILE) -> Gate:
        values = tomllib.loads(path.read_text())
        return cls(**{k: float(values[k]) for k in ("auc_tolerance", "ece_limit", "psi_limit")})


@dataclass(frozen=True)
class Comparison:
    window: str
    rows: int
    champion: dict[str, float]
    challenger: dict[str, float]
    psi_challenger: float  # the challenger's PDs: oldest (training) months vs the recent window
    psi_challenger_vs_champion: float  # how far the PD distribution moves on switching (info)


def compare(champion: Scorer, challenger: Scorer, data: TrainingData) -> Comparison:
    """Both models on the most recent test window of the data as it is now."""
    if not data.has_time:
        raise PromotionError(
            f"{data.name} has no timestamp: promotion compares models on the most recent "
            "window, which needs application dates"
        )
    split = data.split()
    window = data.frame[split.test]
    y = window[LABEL].to_numpy().astype(int)
    p_champion, p_challenger = champion.pd(window), challenger.pd(window)
    return Comparison(
        window=split.windows["test"],
        rows=len(y),
        champion=binary_metrics(y, p_champion),
        challenger=binary_metrics(y, p_challenger),
        psi_challenger=psi(challenger.pd(data.frame[split.train]), p_challenger),
        psi_challenger_vs_champion=psi(p_champion, p_challenger),
    )


def verdict(c: Comparison, gate: Gate) -> tuple[bool, list[str]]:
    """Whether the challenger may replace the champion, and why (every rule, pass or fail)."""
    reasons, ok = [], True
    auc_gap = c.champion["auc"] - c.challenger["auc"]
    if auc_gap > gate.auc_tolerance:
        ok = False
        reasons.append(
            f"FAIL auc: challenger {c.challenger['auc']:.4f} is {auc_gap:.4f} below champion "
            f"{c.champion['auc']:.4f} (tolerance {gate.auc_tolerance})"
        )
    else:
        reasons.append(
            f"pass auc: challenger {c.challenger['auc']:.4f} vs champion {c.champion['auc']:.4f}"
        )
    if c.challenger["ece"] > gate.ece_limit:
        ok = False
        reasons.append(f"FAIL ece: {c.challenger['ece']:.4f} above limit {gate.ece_limit}")
    else:
        reasons.append(f"pass ece: {c.challenger['ece']:.4f} within {gate.ece_limit}")
    psi_text = f"challenger score PSI (training months vs window) {c.psi_challenger:.4f}"
    if c.psi_challenger >= gate.psi_limit:
        ok = False
        reasons.append(f"FAIL psi: {psi_text} at or above {gate.psi_limit}")
    else:
        reasons.append(f"pass psi: {psi_text} below {gate.psi_limit}")
    reasons.append(f"info: PSI of challenger vs champion PDs {c.psi_challenger_vs_champion:.4f}")
    return ok, reasons


@dataclass(frozen=True)
class PromotionResult:
    model_name: str
    champion_version: str
    challenger_version: str
    promoted: bool
    forced: bool
    reasons: list[str]
    comparison: Comparison


def promote(
    data: TrainingData,
    paths: Paths,
    *,
    force: bool = False,
    reason: str | None = None,
    gate: Gate | None = None,
) -> PromotionResult:
    if force and not (reason and reason.strip()):
        raise PromotionError("--force needs --reason: a human override must say why")
    gate = gate or Gate.load()
    client = configure(paths)
    name = registered_name(data.name)
    champion_v = alias_version(client, name, CHAMPION)
    challenger_v = alias_version(client, name, CHALLENGER)
    if champion_v is None or challenger_v is None:
        raise PromotionError(
            f"{name} needs both a champion and a challenger (has champion={champion_v}, "
            f"challenger={challenger_v}): train again to create a challenger"
        )
    champion = load_scorer(f"models:/{name}@{CHAMPION}")
    challenger = load_scorer(f"models:/{name}@{CHALLENGER}")
    comparison = compare(champion, challenger, data)
    passed, reasons = verdict(comparison, gate)
    promoted = passed or force
    if force and not passed:
        reasons.append(f"OVERRIDE by a human: {reason}")

    with mlflow.start_run(
        experiment_id=experiment(client, "kapok-promotions", paths),
        run_name=f"promote {name} v{challenger_v} over v{champion_v}",
    ):
        mlflow.set_tags(
            {
                "model": name,
                "champion_version": champion_v,
                "challenger_version": challenger_v,
                "verdict": "promoted" if promoted else "refused",
                "forced": str(force and not passed).lower(),
                "override_reason": reason or "",
                "window": comparison.window,
            }
        )
        mlflow.log_metrics({f"champion_{k}": v for k, v in comparison.champion.items()})
        mlflow.log_metrics({f"challenger_{k}": v for k, v in comparison.challenger.items()})
        mlflow.log_metric("psi_challenger", comparison.psi_challenger)
        mlflow.log_metric("psi_challenger_vs_champion", comparison.psi_challenger_vs_champion)
        mlflow.log_dict(
            {"gate": asdict(gate), "reasons": reasons, "comparison": asdict(comparison)},
            "verdict.json",
        )
    client.set_model_version_tag(
        name, challenger_v, "promotion_verdict", "promoted" if promoted else "refused"
    )
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, challenger_v)
        client.set_registered_model_alias(name, "previous-champion", champion_v)
        client.delete_registered_model_alias(name, CHALLENGER)
    return PromotionResult(
        name, champion_v, challenger_v, promoted, force and not passed, reasons, comparison
    )
