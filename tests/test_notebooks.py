"""The notebooks run top to bottom on a fresh KAPOK_HOME and really render their plots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _ensure_python3_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ipykernel ships a `python3` spec in the venv; install one into tmp_path if it is absent."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" in KernelSpecManager().find_kernel_specs():
        return
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter-prefix"
    install(kernel_name="python3", prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bigdata_tour_runs_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    home = tmp_path / "kapok_home"
    # the kernel inherits this process's environment: a fresh, empty KAPOK_HOME makes the
    # notebook simulate and build its own small system; Agg keeps matplotlib headless
    monkeypatch.setenv("KAPOK_HOME", str(home))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    _ensure_python3_kernel(tmp_path, monkeypatch)

    nb = jupytext.read(NOTEBOOKS / "01_bigdata_tour.py")
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError if any cell fails

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    with_images = [
        c for c in code_cells if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))
    ]
    assert len(with_images) >= 3, f"only {len(with_images)} cells rendered a plot"
    assert (home / "data" / "raw" / "_manifest.json").exists()
    assert (home / "data" / "features" / "_manifest.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_model_review_runs_on_the_champion(
    trained_home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    # the kernel reviews the shared trained home's champion; the report goes to tmp_path
    monkeypatch.setenv("KAPOK_HOME", str(trained_home.paths.home))
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; earlier tests may have pointed it
    # at another home, and the kernel would take it for a user's server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    root = str(NOTEBOOKS.parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    _ensure_python3_kernel(tmp_path, monkeypatch)

    nb = jupytext.read(NOTEBOOKS / "02_model_review.py")
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    reports = tmp_path / "reports"
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f"REPORT_DIR = {str(reports)!r}"))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    with_images = [
        c for c in code_cells if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))
    ]
    assert len(with_images) >= 3, f"only {len(with_images)} cells rendered a plot"
    report = reports / "kapok-microloan-v1.html"
    assert report.exists() and 'data-figure="shap_beeswarm"' in report.read_text(encoding="utf-8")
