"""`kapok report`: the model-risk review's arithmetic by hand, and the HTML report end to end on
the small trained models (sections, figures, no external URLs, MLflow artifact, errors, a
dataset-spec model, and a real render in headless Chromium)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from kapok import staging
from review import report as rp
from tests.conftest import Trained, repo_root

runner = CliRunner()
FIGURE = re.compile(r'data-figure="([^"]+)"')


def section(html: str, number: int) -> str:
    """The body of report section `number` (1-7), without the table of contents."""
    start = html.index(f'<section id="s{number}">')
    return html[start : html.index("</section>", start)]


# -- arithmetic by hand --------------------------------------------------------------------------
def test_wilson_interval_by_hand() -> None:
    # 3 bads in 10: p = 0.3, z = 1.96 -> centre (0.3 + 0.19208) / 1.38416 = 0.35551,
    # half-width 1.96 / 1.38416 * sqrt(0.021 + 0.009604) = 0.24772
    lo, hi = rp.wilson_interval(3, 10, z=1.96)
    assert lo == pytest.approx(0.35551 - 0.24772, abs=1e-4)
    assert hi == pytest.approx(0.35551 + 0.24772, abs=1e-4)
    # no bads: the interval starts at 0 but is not degenerate (unlike the normal approximation)
    lo0, hi0 = rp.wilson_interval(0, 20, z=1.96)
    assert lo0 == pytest.approx(0.0, abs=1e-12) and hi0 == pytest.approx(3.8416 / 23.8416, 1e-4)
    assert all(math.isnan(v) for v in rp.wilson_interval(0, 0))


def test_gains_table_by_hand() -> None:
    # 8 applications, 3 bad (overall 3/8), in 4 groups of 2, riskiest first
    p = np.array([0.2, 0.9, 0.5, 0.7, 0.3, 0.8, 0.4, 0.6])
    y = np.array([0, 1, 0, 0, 0, 1, 0, 1])
    g = rp.gains_table(y, p, bins=4)
    assert g["rows"].to_list() == [2, 2, 2, 2]
    assert g["max_pd"].to_list() == [0.9, 0.7, 0.5, 0.3]
    assert g["bads"].to_list() == [2, 1, 0, 0]
    assert g["bad_rate"].to_list() == [1.0, 0.5, 0.0, 0.0]
    assert g["cumulative_capture"].to_list() == pytest.approx([2 / 3, 1.0, 1.0, 1.0])
    assert g["lift"].to_list() == pytest.approx([8 / 3, 4 / 3, 0.0, 0.0])
    assert g["cumulative_lift"].to_list() == pytest.approx([8 / 3, 2.0, 4 / 3, 1.0])

    cal = rp.calibration_table(y, p, bins=4)  # lowest PD first
    assert cal["mean_pd"].to_list() == pytest.approx([0.25, 0.45, 0.65, 0.85])
    assert cal["bad_rate"].to_list() == [0.0, 0.0, 0.5, 1.0]
    lo, hi = rp.wilson_interval(1, 2)
    assert cal["wilson_low"][2] == pytest.approx(lo) and cal["wilson_high"][2] == pytest.approx(hi)
    # 0 of 2 bad: the Wilson interval is [0, 0.658], so a mean PD of 0.25 is within it
    assert cal["within_interval"].to_list() == [True, True, True, True]


def test_adverse_impact_four_fifths_rule() -> None:
    table = pl.DataFrame(
        {
            "segment": ["a", "b", "c", "tiny"],
            "applications": [100, 100, 100, 5],
            "approval_rate": [0.50, 0.41, 0.39, 0.0],
        }
    )
    out = rp.adverse_impact(table)
    # best judged segment a (0.5): b at 0.82 passes, c at 0.78 fails; tiny is too small to judge
    assert out["adverse_impact"].to_list() == [False, False, True, False]
    assert out["impact_ratio"].to_list() == pytest.approx([1.0, 0.82, 0.78, 0.0])


def test_learned_direction() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    assert rp.learned_direction(x, 0.3 * x + rng.normal(0, 0.05, 500))[0] == 1
    assert rp.learned_direction(x, -np.tanh(x))[0] == -1
    assert rp.learned_direction(x, rng.normal(size=500))[0] == 0  # no clear direction
    with_missing = np.where(x > 1, np.nan, x)
    assert rp.learned_direction(with_missing, -x)[0] == -1


def test_report_writes_keep_the_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "r.html"
    target.write_text("old report")

    def broken(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(staging.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        staging.write_text_atomic(target, "new report")
    assert target.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left


# -- the report on the small trained models -----------------------------------------------------
@dataclass(frozen=True)
class Built:
    result: rp.ReportResult
    html: str
    trained: Trained


@pytest.fixture(scope="module")
def challenger_report(trained_home: Trained, tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("report") / "v2.html"
    steps: list[str] = []
    result = rp.build_report(
        trained_home.paths, "microloan", version="2", out=out, on_step=steps.append
    )
    assert steps == list(rp.STEPS)  # the CLI's progress bar advances once per step
    return Built(result, out.read_text(encoding="utf-8"), trained_home)


@pytest.mark.slow
def test_report_has_every_section_and_figure(challenger_report: Built) -> None:
    html = challenger_report.html
    for en, zh in rp.SECTIONS:
        assert en in html and zh in html, en
    figures = set(FIGURE.findall(html))
    for name in (
        "optuna_history",
        "roc",
        "ks",
        "calibration",
        "score_distribution",
        "shap_bar",
        "shap_beeswarm",
        "dependence",
        "cc_roc",
        "cc_calibration",
    ):
        assert name in figures, f"figure {name} missing; has {sorted(figures)}"
    # every image is embedded; nothing is fetched from anywhere
    for needle in ('src="http', "src='http", 'href="http', "url(http", "<script", "<link"):
        assert needle not in html.lower(), needle
    assert all(
        src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]+)"', html)
    )
    # the SHAP sample is documented, the identity is the challenger's
    assert "Exact TreeSHAP" in html
    assert "no sampling needed" in html or f"seed {rp.SHAP_SEED}" in html
    assert "kapok-microloan v2" in html and challenger_report.result.version == "2"
    assert "microloan_v1" in html  # FeatureService
    assert "90+ days past due" in html  # label definition
    # the candidates side by side: every kind with its validation AUC, the chosen one marked
    candidates = html[html.index("<h3>Candidates<") :]
    candidates = candidates[: candidates.index("</table>")]
    for kind in ("scorecard", "blend", "lightgbm"):
        assert f'<td class="text">{kind}</td>' in candidates, kind
    assert "chose " in candidates and "complexity premium" in candidates
    # the sign-off is left to a human: every field blank, no decision ticked
    signoff = html[html.index('<table class="signoff">') :]
    signoff = signoff[: signoff.index("</table>")]
    fields = dict(re.findall(r'<th class="text">([^<]*)</th><td>(.*?)</td>', signoff))
    assert set(fields) == {"Reviewer 审核人", "Role 职务", "Date 日期", "Decision 结论",
                           "Conditions 条件", "Signature 签名"}  # fmt: skip
    assert all(v == "" for k, v in fields.items() if k != "Decision 结论"), fields
    decision = fields["Decision 结论"]
    assert decision.count("☐") == 3 and not set("☑☒✓✔✗") & set(decision), decision
    for choice in ("approve 批准", "approve with conditions", "reject 否决"):
        assert choice in decision


@pytest.mark.slow
def test_report_compares_champion_and_challenger(challenger_report: Built) -> None:
    html = challenger_report.html
    body = section(html, 6)
    assert "champion v1" in body and "challenger v2" in body
    # the gate's verdict recomputed here: both versions on v2's test rows, the challenger's PSI
    # against its training-window reference, the rules of training/promotion.toml
    from review.evidence import PD_COLUMN, load_evidence
    from training.data import LABEL
    from training.metrics import ece, psi
    from training.promote import Gate

    paths = challenger_report.trained.paths
    v1 = load_evidence(paths, "microloan", version="1")
    v2 = load_evidence(paths, "microloan", version="2")
    y = v2.test[LABEL].to_numpy().astype(int)
    p1, p2 = v1.scorer.pd(v2.test), v2.scorer.pd(v2.test)
    auc1, auc2 = roc_auc_score(y, p1), roc_auc_score(y, p2)
    ece2, psi2 = ece(y, np.clip(p2, 1e-6, 1 - 1e-6)), psi(v2.train[PD_COLUMN].to_numpy(), p2)
    gate = Gate.load()
    auc_ok, ece_ok, psi_ok = (
        auc1 - auc2 <= gate.auc_tolerance,
        ece2 <= gate.ece_limit,
        psi2 < gate.psi_limit,
    )
    verdict = "PASS" if auc_ok and ece_ok and psi_ok else "REFUSE"
    assert f"Gate verdict: {verdict} " in body, (auc1, auc2, ece2, psi2)
    for rule, ok, shown in (("auc", auc_ok, f"{auc2:.4f}"), ("ece", ece_ok, f"{ece2:.4f}"),
                            ("psi", psi_ok, f"{psi2:.4f}")):  # fmt: skip
        assert re.search(rf"{'pass' if ok else 'FAIL'} {rule}: [^<]*{shown}", body), rule
    assert f"champion {auc1:.4f}" in body
    assert "No promotion run recorded" in body  # the fixture never ran kapok promote


@pytest.mark.slow
def test_report_is_logged_to_the_version_run(challenger_report: Built) -> None:
    from training.tracking import configure

    client = configure(challenger_report.trained.paths)
    result = challenger_report.result
    assert result.run_id == client.get_model_version("kapok-microloan", "2").run_id
    logged = [a.path for a in client.list_artifacts(result.run_id, "reports")]
    assert f"reports/{result.path.name}" in logged


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--product", "microloan", "--version", "99"], "kapok-microloan has no version 99"),
        (["--product", "nosuch"], "kapok-nosuch has no alias @champion"),
        (["--product", "microloan", "--alias", "champion", "--version", "1"], "not both"),
    ],
)
def test_cli_errors_leave_the_report_untouched(
    trained_home: Trained,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    from kapok.cli import app

    monkeypatch.setenv("KAPOK_HOME", str(trained_home.paths.home))
    existing = tmp_path / "report.html"
    existing.write_text("an earlier report")
    result = runner.invoke(app, ["report", *args, "--out", str(existing)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert message in text  # as a process of its own (one line, no traceback): test_cli.py
    assert existing.read_text() == "an earlier report"


@pytest.mark.slow
def test_cli_writes_the_default_path_and_prints_it(
    trained_home: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default location is KAPOK_HOME/reports; here a copy of the trained home is used so
    the shared fixture's folder stays untouched."""
    from kapok.cli import app

    home = tmp_path / "home"
    shutil.copytree(trained_home.paths.home, home, symlinks=True)
    monkeypatch.setenv("KAPOK_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["report", "--product", "microloan"])
    assert result.exit_code == 0, result.output
    expected = home / "reports" / "kapok-microloan-v1.html"
    assert expected.exists() and str(expected) in result.output
    assert "kapok-microloan v1" in expected.read_text(encoding="utf-8")


@pytest.mark.slow
def test_report_on_a_dataset_spec_model(tmp_path: Path) -> None:
    from features.spec import load_spec
    from kapok.settings import Paths
    from training.data import spec_data
    from training.train import train

    paths = Paths(tmp_path / "home")
    train(spec_data(load_spec(repo_root() / "datasets" / "german_credit.toml")), paths, trials=2)
    out = tmp_path / "german.html"
    result = rp.build_report(paths, "german_credit", out=out)
    html = out.read_text(encoding="utf-8")
    assert result.model_name == "kapok-german_credit" and result.version == "1"
    for en, zh in rp.SECTIONS:
        assert en in html and zh in html, en
    segments = section(html, 5)
    assert "purpose" in segments and "personal_status_and_sex" in segments  # from the spec
    assert "microloan cut-off is used as a stand-in" in segments
    assert "Not applicable" in section(html, 4)
    assert "no @challenger" in html  # only one version exists
    assert "dataset spec german_credit.toml" in html  # data is not called simulated
    assert {"roc", "shap_beeswarm", "dependence"} <= set(FIGURE.findall(html))


@pytest.mark.slow
def test_report_renders_in_headless_chromium(challenger_report: Built, tmp_path: Path) -> None:
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = "chromium is not installed"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: the render test must run)")
        pytest.skip(message)
    shot = tmp_path / "report.png"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1200,3000",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        challenger_report.result.path.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.exists(), done.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (3000, 1200)
    non_white = (image < 245).any(axis=2).mean()
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert non_white > 0.01, f"only {non_white:.2%} of the page is not white"
    assert colours > 50, f"only {colours} distinct colours: the figures did not render"
