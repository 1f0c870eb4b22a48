"""Figures logged with every training run: ROC, calibration, importance, Optuna history."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve


def log(fig: Figure, artifact_file: str) -> None:
    """Log a figure to the active MLflow run and free it: pyplot keeps every open figure alive,
    and a process that trains many models (benchmarks, tests) would otherwise pile them up."""
    import mlflow

    try:
        mlflow.log_figure(fig, artifact_file)
    finally:
        plt.close(fig)


def roc(y: np.ndarray, p: np.ndarray, title: str) -> Figure:
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label="model")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="random")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    return fig


def calibration(y: np.ndarray, p: np.ndarray, title: str, bins: int = 10) -> Figure:
    order = np.argsort(p, kind="stable")
    groups = np.array_split(order, bins)
    mean_p = [p[g].mean() for g in groups if len(g)]
    mean_y = [y[g].mean() for g in groups if len(g)]
    fig, ax = plt.subplots(figsize=(5, 5))
    top = max(max(mean_p), max(mean_y)) * 1.1
    ax.plot([0, top], [0, top], "--", color="grey", label="perfect")
    ax.plot(mean_p, mean_y, "o-", label="deciles of predicted PD")
    ax.set(xlabel="predicted PD", ylabel="observed bad rate", title=title)
    ax.legend(loc="upper left")
    return fig


def importance(names: list[str], values: np.ndarray, title: str, top: int = 20) -> Figure:
    """Mean |SHAP| per feature (log-odds): the one importance every candidate has (a compiled
    scorecard's hand-built trees have no gain)."""
    order = np.argsort(values)[::-1][:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(order) + 1))
    ax.barh([names[i] for i in order], values[order])
    ax.set(xlabel="mean |SHAP| (log-odds)", title=title)
    fig.tight_layout()
    return fig


def history(values: list[float], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(values)), values, "o", alpha=0.6, label="trial")
    ax.plot(range(len(values)), np.maximum.accumulate(values), "-", label="best so far")
    ax.set(xlabel="trial", ylabel="validation AUC", title=title)
    ax.legend(loc="lower right")
    return fig
