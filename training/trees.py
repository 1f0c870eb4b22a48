"""LightGBM model text built by hand: a binned step function per feature as one tree each, and
the weighted sum of two models as one Booster.

Why: serving, `kapok explain`, replay, watch and TreeSHAP reasons all read a LightGBM Booster.
A scorecard compiled into one (one tree per characteristic, raw score = intercept + sum of the
characteristics' log-odds) and a blend written as one (each model's leaves scaled by its weight)
go through every one of them unchanged.

A step function here is optbinning's: bin i is [splits[i-1], splits[i]) (numpy.digitize with
right=False: a value exactly on a split belongs to the bin above it; -inf to the first bin, +inf
to the last), NaN to its own missing leaf. LightGBM sends `x <= threshold` left, so each split
becomes the threshold just below it (numpy.nextafter towards -inf): the same partition of the
doubles, exactly.

TreeSHAP's reference for a tree is the count-weighted mean of its leaves (leaf_count /
internal_count). A step tree puts REFERENCE_COUNT on the leaf named as its reference and 1 on
every other leaf (0 would make TreeSHAP divide 0 by 0 at nodes without the reference), so a
feature's SHAP value is its leaf minus the reference leaf, to within about
(leaves x largest leaf gap) / REFERENCE_COUNT, around 1e-8 log-odds.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

REFERENCE_COUNT = 1_000_000_000  # leaf_count is an int32 in LightGBM: the total must fit
# the threshold that isolates NaN: only -inf and -DBL_MAX are <= it, and both belong to the
# first bin of any step function whose splits are finite
LOWEST = float(np.finfo(np.float64).min)
ZERO = 1e-35  # LightGBM's kZeroThreshold: inputs this close to 0 are 0 when it predicts
# decision_type bits (LightGBM tree.h): 2 = missing values go left; 8 = missing type NaN
NAN_LEFT, NAN_RIGHT = 8 | 2, 8


@dataclass(frozen=True)
class Step:
    """One feature's step function: a value per bin and one for missing (NaN)."""

    feature: int  # column index in the model's feature order
    splits: Sequence[float]  # increasing, finite; bin i = [splits[i-1], splits[i])
    values: Sequence[float]  # len(splits) + 1
    missing: float
    reference: int  # the bin (0..len(splits)) TreeSHAP measures against; -1: the missing leaf

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The step function evaluated in numpy (the reference the compiled tree must match).
        LightGBM reads any |x| <= ZERO as 0 (kZeroThreshold, c_api.cpp), so this does too."""
        x = np.asarray(x, dtype=float)
        x = np.where(np.abs(x) <= ZERO, 0.0, x)
        out = np.asarray(self.values, dtype=float)[
            np.searchsorted(np.asarray(self.splits, dtype=float), x, side="right")
        ]
        return np.where(np.isnan(x), self.missing, out)


class _Tree:
    """Nodes and leaves of one tree as LightGBM's text format lists them."""

    def __init__(self) -> None:
        self.feature: list[int] = []
        self.threshold: list[float] = []
        self.decision: list[int] = []
        self.left: list[int] = []
        self.right: list[int] = []
        self.leaf_value: list[float] = []
        self.leaf_count: list[int] = []

    def leaf(self, value: float, count: int) -> int:
        self.leaf_value.append(float(value))
        self.leaf_count.append(int(count))
        return ~(len(self.leaf_value) - 1)  # children < 0 are leaves: ~leaf_index

    def node(self, feature: int, threshold: float, decision: int) -> int:
        self.feature.append(feature)
        self.threshold.append(threshold)
        self.decision.append(decision)
        self.left.append(0)
        self.right.append(0)
        return len(self.feature) - 1

    def _totals(self, child: int) -> tuple[int, float]:
        """(count, count-weighted sum of leaf values) under a child."""
        if child < 0:
            leaf = ~child
            return self.leaf_count[leaf], self.leaf_count[leaf] * self.leaf_value[leaf]
        a, b = self._totals(self.left[child]), self._totals(self.right[child])
        return a[0] + b[0], a[1] + b[1]

    def text(self) -> str:
        totals = [self._totals(i) for i in range(len(self.feature))]
        lines = {
            "num_leaves": str(len(self.leaf_value)),
            "num_cat": "0",
            "split_feature": _ints(self.feature),
            "split_gain": " ".join("0" for _ in self.feature),
            "threshold": _floats(self.threshold),
            "decision_type": _ints(self.decision),
            "left_child": _ints(self.left),
            "right_child": _ints(self.right),
            "leaf_value": _floats(self.leaf_value),
            "leaf_weight": _floats([float(c) for c in self.leaf_count]),
            "leaf_count": _ints(self.leaf_count),
            "internal_value": _floats([s / c for c, s in totals]),
            "internal_weight": _floats([float(c) for c, _ in totals]),
            "internal_count": _ints([c for c, _ in totals]),
            "is_linear": "0",
            "shrinkage": "1",
        }
        return "\n".join(f"{k}={v}" for k, v in lines.items())


def _ints(values: Sequence[int]) -> str:
    return " ".join(str(int(v)) for v in values)


def _floats(values: Sequence[float]) -> str:
    return " ".join(repr(float(v)) for v in values)  # repr: the shortest exact round trip


def step_tree(step: Step, offset: float = 0.0) -> str:
    """One step function as the body of a LightGBM tree (without its "Tree=" line); `offset` is
    added to every leaf (the intercept rides on the first tree)."""
    if len(step.values) != len(step.splits) + 1:
        raise ValueError(f"{len(step.splits)} splits need {len(step.splits) + 1} bin values")
    splits = [float(s) for s in step.splits]
    increasing = all(a < b for a, b in itertools.pairwise(splits))
    if not increasing or not all(np.isfinite(s) for s in splits):
        raise ValueError("splits must be finite and increasing")
    tree = _Tree()

    def count(bin_: int) -> int:
        return REFERENCE_COUNT if bin_ == step.reference else 1

    def bins(lo: int, hi: int) -> int:
        """The subtree for bins lo..hi (inclusive), split in the middle: depth ~log2(bins)."""
        if lo == hi:
            return tree.leaf(step.values[lo] + offset, count(lo))
        mid = (lo + hi + 1) // 2  # bins lo..mid-1 go left: x < splits[mid-1]
        at = tree.node(step.feature, float(np.nextafter(splits[mid - 1], -np.inf)), NAN_LEFT)
        tree.left[at] = bins(lo, mid - 1)
        tree.right[at] = bins(mid, hi)
        return at

    # root: NaN, -inf and -DBL_MAX left, to a node that sends NaN alone to the missing leaf
    root = tree.node(step.feature, LOWEST, NAN_LEFT)
    nan = tree.node(step.feature, LOWEST, NAN_RIGHT)
    tree.left[root] = nan
    tree.left[nan] = tree.leaf(step.values[0] + offset, 1)  # -inf only: never the reference
    tree.right[nan] = tree.leaf(step.missing + offset, count(-1))
    tree.right[root] = bins(0, len(splits))
    return tree.text()


def header(features: Sequence[str], feature_infos: Sequence[str] | None = None) -> str:
    """The model header of a binary-objective LightGBM model over `features`."""
    infos = list(feature_infos) if feature_infos is not None else ["none"] * len(features)
    return "\n".join(
        [
            "tree",
            "version=v4",
            "num_class=1",
            "num_tree_per_iteration=1",
            "label_index=0",
            f"max_feature_idx={len(features) - 1}",
            "objective=binary sigmoid:1",
            "feature_names=" + " ".join(features),
            "feature_infos=" + " ".join(infos),
        ]
    )


def assemble(head: str, trees: Sequence[str]) -> lgb.Booster:
    """A Booster from a header and tree bodies (no tree_sizes: LightGBM then reads the trees
    one after the other)."""
    body = "".join(f"Tree={i}\n{t}\n\n" for i, t in enumerate(trees))
    return lgb.Booster(model_str=f"{head}\n\n{body}end of trees\n\npandas_categorical:null\n")


def compile_steps(
    steps: Sequence[Step], features: Sequence[str], intercept: float, scale: float = 1.0
) -> lgb.Booster:
    """raw score = scale x (intercept + sum of the steps): one tree per step."""
    if not steps:
        raise ValueError("a model needs at least one step function")
    return assemble(header(features), scaled_steps(steps, intercept, scale))


def scaled_steps(steps: Sequence[Step], intercept: float, scale: float) -> list[str]:
    """Tree bodies of scale x (intercept + sum of the steps)."""
    out = []
    for i, s in enumerate(steps):
        scaled = Step(
            s.feature,
            s.splits,
            [scale * v for v in s.values],
            scale * s.missing,
            s.reference,
        )
        out.append(step_tree(scaled, scale * intercept if i == 0 else 0.0))
    return out


_TREE = re.compile(r"^Tree=\d+\n", re.MULTILINE)


def split_model(booster: lgb.Booster) -> tuple[str, list[str]]:
    """(header without tree_sizes, tree bodies) of a trained Booster's text."""
    text = booster.model_to_string()
    body = text.split("\nend of trees", 1)[0]
    parts = _TREE.split(body)
    head = "\n".join(
        line
        for line in parts[0].strip("\n").split("\n")
        if line and not line.startswith("tree_sizes=")
    )
    return head, [p.strip("\n") for p in parts[1:]]


def scale_tree(tree: str, factor: float) -> str:
    """A tree body with every leaf (and internal) value multiplied by `factor`."""
    lines = []
    for line in tree.split("\n"):
        key, _, value = line.partition("=")
        if key in ("leaf_value", "internal_value"):
            line = f"{key}=" + _floats([factor * float(v) for v in value.split()])
        lines.append(line)
    return "\n".join(lines)


def blend(
    booster: lgb.Booster, steps: Sequence[Step], intercept: float, weight: float
) -> lgb.Booster:
    """One Booster whose raw score is weight x (intercept + sum of steps) + (1 - weight) x
    booster's raw score: the trained trees scaled first, the step trees after them."""
    if not 0 < weight < 1:
        raise ValueError(f"a blend weight must be in (0, 1), got {weight}")
    head, trees = split_model(booster)
    scaled = [scale_tree(t, 1 - weight) for t in trees]
    return assemble(head, [*scaled, *scaled_steps(steps, intercept, weight)])
