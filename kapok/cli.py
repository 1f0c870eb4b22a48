"""`kapok`: one command, one subcommand group per stage of the lending pipeline."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import kapok  # telemetry off and libraries' warnings hidden, before any framework import
from kapok.settings import kapok_home, online_store_url, paths

console = Console(stderr=True)
app = typer.Typer(
    help=(
        "Kapok turns the regional big-data system's enterprise data into lending decisions.\n\n"
        "Start with `kapok run` (simulate a region, build features, load Feast, train), or step "
        "by step: `kapok data generate`, `kapok features build`, `kapok features apply`, "
        "`kapok features materialize`, `kapok train`, `kapok promote`. "
        f"Everything is written under KAPOK_HOME (now: {kapok_home()})."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="The regional big-data system: simulate it, check your own data.")
features_app = typer.Typer(help="Feature tables and the Feast feature store.")
app.add_typer(data_app, name="data", no_args_is_help=True)
app.add_typer(features_app, name="features", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of the lending API (stored hashed).")
app.add_typer(keys_app, name="keys", no_args_is_help=True)
queue_app = typer.Typer(
    help="The referral queue: referred applications waiting for a credit officer's decision."
)
app.add_typer(queue_app, name="queue", no_args_is_help=True)
audit_app = typer.Typer(
    help="Tamper evidence of the decision log: verify its hash chain, print its head to anchor."
)
app.add_typer(audit_app, name="audit", no_args_is_help=True)
actions_app = typer.Typer(
    help="Early-warning actions (处置) that `kapok watch` opens: list them, record outcomes."
)
app.add_typer(actions_app, name="actions", no_args_is_help=True)


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Also show the libraries' warnings and logs (MLflow, Feast, SQLAlchemy, "
            "pydantic, BentoML); by default only Kapok's own messages.",
        ),
    ] = False,
) -> None:
    if verbose:
        import logging
        import os

        os.environ["KAPOK_VERBOSE"] = "1"  # kapok.verbose(); inherited by serve's workers
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Known failures end with a one-line message and exit code 2, never a traceback.

    The known error types are matched by name so that `kapok --help` imports no framework:
    importing mlflow or feast to name their exceptions costs seconds.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (FileNotFoundError, ValueError) as e:  # SpecError, USCCError, ... are ValueErrors
            _error_line(e)
            raise typer.Exit(2) from None
        except Exception as e:
            if not _known_error(e):
                raise
            _error_line(e)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _error_line(error: BaseException | str) -> None:
    """The error as one line on stderr: never wrapped at the console's width (80 columns when
    stderr is not a terminal), line breaks in the message joined, and brackets in it printed
    as they are, not read as rich markup."""
    from rich.markup import escape

    text = " ".join(str(error).split()) or type(error).__name__
    console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True, highlight=False)


_KNOWN_ERRORS = {
    ("mlflow.exceptions", "MlflowException"),
    ("serving.decision_log", "DecisionLogError"),
    ("features.spec", "SpecError"),
    ("features.store", "OnlineStoreConfigError"),
    ("features.build_ray", "ShardBuildError"),
    ("kapok.engine", "EngineConfigError"),
    ("kapok.uscc", "USCCError"),
    ("serving.queue", "QueueError"),
    ("review.actions", "ActionsError"),
}


def _known_error(error: BaseException) -> bool:
    return any((c.__module__, c.__name__) in _KNOWN_ERRORS for c in type(error).__mro__)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal; in a log file (not a terminal), plain lines instead: one
    every 10% of `total` or every 30 seconds, whichever comes first."""
    if not console.is_terminal:
        state = {"done": 0, "shown": 0.0, "at": time.monotonic()}
        start = state["at"]

        def line(n: int = 1) -> None:
            state["done"] += n
            share = state["done"] / total if total else 0.0
            now = time.monotonic()
            if share - state["shown"] >= 0.1 or now - state["at"] >= 30 or share >= 1:
                state["shown"], state["at"] = share, now
                of = f" of {total:,} ({share:.0%})" if total else ""
                console.print(f"{description}: {state['done']:,}{of}, {now - start:.0f} s")

        yield line
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


# the out-of-time windows: options of check-spec, train and promote
ValidMonths = Annotated[
    int | None,
    typer.Option(
        help="Months in the validation window (default: the months before the test window "
        "holding ~20% of the rows)."
    ),
]
TestMonths = Annotated[
    int | None,
    typer.Option(help="Months in the test window (default: the latest months, ~20% of the rows)."),
]


# -- data ----------------------------------------------------------------------------------------
@data_app.command("generate")
@friendly_errors
def data_generate(
    enterprises: Annotated[int, typer.Option(help="Number of enterprises to simulate.")] = 100_000,
    months: Annotated[int, typer.Option(help="Months of history (12-120).")] = 36,
    seed: Annotated[
        int, typer.Option(help="Random seed; same arguments give identical files.")
    ] = 7,
    start: Annotated[str, typer.Option(help="First month, YYYY-MM.")] = "2023-01",
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: KAPOK_HOME/data/raw).")
    ] = None,
) -> None:
    """Simulate the regional big-data system and write its raw tables (parquet).

    Registration, tax, electricity, social insurance, payments, receivables/payables, court
    records, credit history, and applications for microloans, guarantees and insurance with
    their outcomes, and the monthly credit aggregates the system publishes (30+/90+ days past
    due rates by city, district and industry). The true default probabilities go to a separate
    `oracle/` table.
    """
    from kapok.bigdata.generate import generate
    from kapok.bigdata.simulate import SimulationConfig

    _check_month(start)
    target = out or paths().raw
    config = SimulationConfig(enterprises, months, seed, start)
    t0 = time.perf_counter()
    with progress_bar("simulating enterprises", enterprises) as advance:
        manifest = generate(config, target, progress=advance)
    table = Table("table", "rows", title=f"raw tables in {target}")
    for name, rows in manifest["rows"].items():
        table.add_row(name, f"{rows:,}")
    console.print(table)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


def _check_month(text: str) -> None:
    import datetime as dt

    try:
        dt.date.fromisoformat(text + "-01")
    except ValueError:
        raise ValueError(f"--start must be a month as YYYY-MM, got {text!r}") from None


@data_app.command("check-spec")
@friendly_errors
def data_check_spec(
    spec: Annotated[
        Path, typer.Argument(help="A dataset spec (TOML), e.g. datasets/german_credit.toml")
    ],
    valid_months: ValidMonths = None,
    test_months: TestMonths = None,
) -> None:
    """Validate a bring-your-own-data spec and load its data; print what Kapok will train on.

    Warns about feature columns that are nearly all missing or constant, id-like (unique per
    row, or named like an id), dates read as text, and single columns that give the label away
    (a leak); prints the out-of-time windows training will use. Warnings leave the exit status
    0; a spec that cannot be loaded, or a history that cannot be split, exits 2.
    """

    from features.spec import load_spec
    from features.spec_check import column_warnings
    from training.data import LABEL, TIME, month_table, spec_data

    s = load_spec(spec)
    data = spec_data(s).with_windows(valid_months, test_months)
    frame = data.frame
    table = Table("feature", "direction", "categorical", "nulls", title=f"{s.name}: {s.path.name}")
    for f in s.features:
        table.add_row(
            f.name,
            f"{f.direction:+d}",
            "yes" if f.categorical else "",
            str(frame[f.name].null_count()),
        )
    console.print(table)
    bad = int(frame[LABEL].sum())
    chosen = f"every column but {len(s.excluded)} excluded" if s.every_column else "listed"
    console.print(
        f"{frame.height:,} rows, {bad:,} bad ({bad / frame.height:.1%}); "
        f"{len(s.features)} features ({chosen}, {len(s.categorical_features)} categorical, "
        f"{sum(f.direction != 0 for f in s.features)} with a risk direction); "
        f"timestamp: {s.timestamp_column or 'none (K-fold validation)'}; "
        f"segments: {', '.join(s.segments) or 'none'}"
    )
    if not _print_column_warnings(column_warnings(s, frame)):
        console.print("no warnings: no nearly empty, constant, id-like or leaking feature")
    if not data.has_time:
        console.print("validation: repeated stratified K-fold (no timestamp)")
        return
    undated = frame[TIME].null_count()
    if undated:
        console.print(f"{undated:,} rows have no timestamp: they fall in no window")
    months = month_table(frame[TIME], frame[LABEL])
    span = f"{months['month'][0]}..{months['month'][-1]}" if months.height else "none"
    console.print(f"{months.height} months with dated rows ({span})")
    split = data.split()  # an unsplittable history: the error line, exit 2
    y = frame[LABEL].to_numpy()
    console.print("out-of-time split training will use (whole months):")
    for part in ("train", "valid", "test"):
        idx = getattr(split, part)
        n_bad = int(y[idx].sum())
        console.print(
            f"  {part:<5}  {split.windows[part]:<16}  {len(idx):>9,} rows  {n_bad:>7,} bad  "
            f"bad rate {n_bad / len(idx):.3f}",
            highlight=False,
        )


# -- features ------------------------------------------------------------------------------------
@features_app.command("build")
@friendly_errors
def features_build() -> None:
    """Turn the raw tables into point-in-time feature tables, one per source family."""
    from features.build import build
    from features.raw_tables import read_manifest
    from features.schema import FAMILIES

    p = paths()
    chunks = read_manifest(p.raw)["chunks"]
    t0 = time.perf_counter()
    with progress_bar("building feature tables", chunks * len(FAMILIES)) as advance:
        summary = build(p.raw, p.features, progress=lambda _family: advance(1))
    table = Table("family", "snapshot rows", title=f"feature tables in {p.features}")
    for name, rows in summary["rows"].items():
        table.add_row(name, f"{rows:,}")
    console.print(table)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


@features_app.command("apply")
@friendly_errors
def features_apply() -> None:
    """Register the entity, feature views and feature services with Feast (feast apply)."""
    from features import store as fs

    p = paths()
    from features.build import read_summary

    read_summary(p.features)  # the views point at these tables: fail early if they are missing
    yaml_path = fs.write_feature_store_yaml(p)
    names = fs.apply(fs.feature_store(p), p)
    console.print(
        f"applied {len(names)} objects to project {fs.project_name()!r}: {', '.join(names)}"
    )
    console.print(f"online store: {online_store_url()}; config written to {yaml_path}")


@features_app.command("materialize")
@friendly_errors
def features_materialize(
    full: Annotated[
        bool, typer.Option(help="Replay every snapshot, not only the latest ones.")
    ] = False,
) -> None:
    """Load the latest snapshot of every enterprise into the online store.

    Simulated data lives in its own time range, so the window is taken from the data, not from
    today's date.
    """
    from features import store as fs
    from features.build import read_summary

    p = paths()
    start, end = fs.materialize_window(read_summary(p.features), full)
    t0 = time.perf_counter()
    console.print(f"materializing {start:%Y-%m-%d} .. {end:%Y-%m-%d} into {online_store_url()}")
    fs.materialize(fs.feature_store(p), start, end)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


@features_app.command("online")
@friendly_errors
def features_online(
    enterprise_id: Annotated[str, typer.Argument(help="Unified Social Credit Code (18 chars).")],
    product: Annotated[str, typer.Option(help="microloan, guarantee or insurance.")] = "microloan",
    amount: Annotated[float, typer.Option(help="Requested amount, CNY.")] = 100_000.0,
    term: Annotated[int, typer.Option(help="Requested term, months.")] = 12,
) -> None:
    """Show the online features of one enterprise, as the scoring API will see them."""
    from features import store as fs
    from features.schema import PRODUCTS
    from kapok import uscc

    if product not in PRODUCTS:
        raise ValueError(f"--product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    code = uscc.validate(enterprise_id)
    row = {"enterprise_id": code, "requested_amount": amount, "term_months": term}
    frame = fs.online_features(fs.feature_store(), [row], product)
    table = Table("feature", "value", title=f"{code} ({fs.project_name()}, {product})")
    for name, value in frame.row(0, named=True).items():
        table.add_row(name, "" if value is None else str(value))
    console.print(table)


REPORTED_METRICS = (
    "auc", "gini", "ks", "brier", "log_loss", "ece", "calibration_slope",
    "calibration_intercept", "psi_train_test", "oracle_auc", "gini_share_of_oracle",
)  # fmt: skip


# -- training ------------------------------------------------------------------------------------
def _quiet_mlflow() -> None:
    import logging
    import warnings

    if kapok.verbose():  # `kapok --verbose`: the user asked for the libraries' messages
        return
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # e.g. SQLAlchemy's deprecation of a loader MLflow's tracking store uses: not the user's
    # concern, and two lines on stderr before any message of ours
    warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")


def _print_column_warnings(warnings: list, after: str = "") -> bool:
    """check-spec's column warnings, one per line, yellow; False when there are none."""
    from rich.markup import escape

    if not warnings:
        return False
    console.print(f"[bold yellow]{len(warnings)} warning(s){after}:[/]")
    for w in warnings:
        console.print(f"  {escape(str(w))}", soft_wrap=True, highlight=False)
    return True


def _training_data(
    product: str | None,
    dataset: Path | None,
    valid_months: int | None = None,
    test_months: int | None = None,
):
    from features.spec import load_spec
    from training.data import product_data, spec_data

    if (product is None) == (dataset is None):
        raise ValueError("give exactly one of --product or --dataset")
    _quiet_mlflow()
    if dataset is not None:
        from features.spec_check import column_warnings

        spec = load_spec(dataset)
        data = spec_data(spec)
        # what `kapok data check-spec` would warn about, before any tuning: a leak or an id-like
        # column trains a model that looks excellent and is worthless
        _print_column_warnings(
            column_warnings(spec, data.frame), " about the data (kapok data check-spec)"
        )
    else:
        with console.status(f"building the {product} training set through Feast (point in time)"):
            data = product_data(paths(), product)  # type: ignore[arg-type]
    data = data.with_windows(valid_months, test_months)
    if data.has_time:
        data.split()  # a history that cannot be split fails here, before any tuning
    return data


@app.command("train")
@friendly_errors
def train_command(
    product: Annotated[
        str | None, typer.Option(help="microloan, guarantee or insurance (simulated data).")
    ] = None,
    dataset: Annotated[
        Path | None, typer.Option(help="Or a dataset spec (TOML) for your own data.")
    ] = None,
    trials: Annotated[int, typer.Option(help="Optuna trials (the study resumes).")] = 30,
    timeout: Annotated[
        float | None, typer.Option(help="Stop tuning after this many seconds.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed: same data, seed, trials = same model.")] = 7,
    valid_months: ValidMonths = None,
    test_months: TestMonths = None,
) -> None:
    """Tune (Optuna), fit (LightGBM), calibrate and validate a model; register it in MLflow.

    The new version becomes `champion` if the model has none, else `challenger`
    (see `kapok promote`). Simulated products and dataset specs with a timestamp validate out
    of time (whole months: train, validation, test; three months or more split); a dataset spec
    without timestamps uses repeated stratified K-fold.
    """
    from training.tracking import tracking_uri
    from training.train import train

    data = _training_data(product, dataset, valid_months, test_months)
    with progress_bar(f"tuning {data.name}", trials) as advance:
        result = train(data, paths(), trials=trials, timeout=timeout, seed=seed,
                       on_trial=lambda study, trial: advance(1))  # fmt: skip
    table = Table(
        "metric", "value", title=f"{result.model_name} v{result.version} -> @{result.alias}"
    )
    for key in REPORTED_METRICS:
        if key in result.metrics:
            table.add_row(key, f"{result.metrics[key]:.4f}")
    console.print(table)
    for part, w in result.windows.items():
        console.print(
            f"{part:6s} {w['window']}: {int(w['rows']):,} rows, bad rate {w['bad_rate']:.3f}"
        )
    console.print(f"validation: {result.validation}")
    console.print(f"tuning: {result.tuning.line()}", highlight=False, soft_wrap=True)
    for candidate in result.candidates:
        console.print(f"candidate {candidate.line()}", highlight=False, soft_wrap=True)
    console.print(f"model: {result.choice}", highlight=False, soft_wrap=True)
    console.print(f"MLflow run {result.run_id} in {tracking_uri(paths())}", soft_wrap=True)
    console.print("to look at it in the MLflow UI (http://127.0.0.1:5000, Ctrl-C stops it):")
    console.print(f"  {_kapok_again()} ui", soft_wrap=True, highlight=False)


@app.command("promote")
@friendly_errors
def promote_command(
    product: Annotated[str | None, typer.Option(help="microloan, guarantee or insurance.")] = None,
    dataset: Annotated[
        Path | None, typer.Option(help="Or the dataset spec it was trained on.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Promote even if the gate refuses.")] = False,
    reason: Annotated[str | None, typer.Option(help="Why a human overrides the gate.")] = None,
    valid_months: ValidMonths = None,
    test_months: TestMonths = None,
) -> None:
    """Compare challenger and champion on the most recent window; move `champion` if it passes.

    The gate (training/promotion.toml): AUC not worse than the champion's by more than the
    tolerance, ECE within the limit, PSI of the challenger's PDs against the champion's below
    0.25. The comparison and verdict are logged to MLflow (experiment kapok-promotions).
    """
    from training.promote import promote

    if force and not reason:
        raise ValueError("--force needs --reason: a human override must say why")
    data = _training_data(product, dataset, valid_months, test_months)
    result = promote(data, paths(), force=force, reason=reason)
    c = result.comparison
    table = Table("metric", f"champion v{result.champion_version}", f"challenger v{result.challenger_version}",  # noqa: E501
                  title=f"{result.model_name} on {c.window} ({c.rows:,} applications)")  # fmt: skip
    for key in ("auc", "ks", "brier", "ece"):
        table.add_row(key, f"{c.champion[key]:.4f}", f"{c.challenger[key]:.4f}")
    console.print(table)
    for line in result.reasons:
        console.print(line)
    verdict = "PROMOTED" if result.promoted else "REFUSED"
    console.print(f"[bold]{verdict}[/]{' (forced)' if result.forced else ''}")


# -- serving -------------------------------------------------------------------------------------
CURL_EXAMPLE = (
    "curl -s -X POST http://{host}:{port}/score -H 'Content-Type: application/json' "
    '{auth}-d \'{{"enterprise_id": "{eid}", "product": "microloan", '
    '"requested_amount": 300000, "term_months": 12}}\''
)


def _example_enterprise() -> str:
    import polars as pl

    from features.raw_tables import scan

    try:
        return scan(paths().raw, "registration").select("enterprise_id").head(1).collect().item()
    except (FileNotFoundError, ValueError, pl.exceptions.ComputeError):
        return "91440106326110621P"


@app.command("serve")
@friendly_errors
def serve_command(
    port: Annotated[int, typer.Option(help="Port.")] = 3000,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface; keys required).")
    ] = "127.0.0.1",
    demo: Annotated[
        bool,
        typer.Option(help="No API keys (local demo only: loopback hosts only; says so loudly)."),
    ] = False,
) -> None:
    """Serve the lending API (BentoML) with the champion model of each product.

    Endpoints: POST /score /limit /price /explain /screen /decision; the API's docs page at /
    and its OpenAPI document at /openapi.json; /livez, /readyz (200 once every worker has
    loaded), /metrics. API keys: `kapok keys add`. Ctrl-C or SIGTERM stops the server and its
    workers. --demo serves loopback only (127.0.0.1, ::1, localhost).
    """
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from kapok.settings import max_body_bytes, rate_limit
    from serving.access import DEMO_LOOPBACK_ONLY, is_loopback
    from serving.auth import demo_mode

    if (demo or demo_mode()) and not is_loopback(host):
        raise ValueError(
            f"{DEMO_LOOPBACK_ONLY}: --host {host} is not a loopback address "
            "(use 127.0.0.1, ::1 or localhost, or serve with API keys)"
        )
    max_body_bytes(), rate_limit()  # a malformed setting is one line now, not a worker's crash
    env = dict(os.environ)
    env.setdefault("BENTOML_HOME", str(paths().home / "bentoml"))
    if demo:
        env["KAPOK_DEMO"] = "1"
        console.print("[bold red]DEMO MODE: no API keys are checked. Do not expose this server.[/]")
    auth = "" if demo else "-H 'Authorization: Bearer YOUR_KEY' "
    shown = _reachable(host)
    example = CURL_EXAMPLE.format(host=shown, port=port, auth=auth, eid=_example_enterprise())
    console.print("try:\n  " + example, soft_wrap=True, highlight=False)  # one pasteable line
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:Kapok",
               "--host", host, "--port", str(port)]  # fmt: skip
    # a worker that cannot load its models or stores (the MLflow store down, a product without
    # a champion) writes why into this file (serving.service.cannot_start) and ends; BentoML
    # would start it again and again: `kapok serve` stops the server with that one line instead
    workdir = Path(tempfile.mkdtemp(prefix="kapok-serve-"))
    failure = workdir / "cannot-start"
    env["KAPOK_START_FAILURE"] = str(failure)

    def is_ready() -> bool:
        if failure.exists():
            raise ServeRefused(failure.read_text().strip())
        return _answers_http(port, "/readyz", _probe_host(host))

    def ready() -> None:
        console.print(
            f"Kapok API ready: http://{shown}:{port}/ (its docs page; Ctrl-C stops it)",
            soft_wrap=True,
        )

    try:
        # in a process group of its own, stopped whole (server and workers) by Ctrl-C or by a
        # SIGTERM sent to this process (a service manager stopping `kapok serve` by its pid)
        server = subprocess.Popen(command, env=env, start_new_session=True)
        code = _run_process_group(server, is_ready=is_ready, on_ready=ready)
    except ServeRefused as e:
        _error_line(f"the API cannot start: {e}")
        raise typer.Exit(1) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if code is not None:
        raise typer.Exit(code)
    console.print("Kapok API stopped")


class ServeRefused(RuntimeError):
    """The API's workers cannot load (why: the message); the server has been stopped."""


def _kapok_again() -> str:
    """How to run `kapok` again from the user's shell: `kapok` when that is this script, else
    its path (`.venv/bin/kapok` from the checkout); with KAPOK_HOME in front when it is set."""
    import os
    import shlex
    import shutil
    import sys

    script = Path(sys.executable).with_name("kapok")
    found = shutil.which("kapok")
    if not script.exists() or (found and Path(found).resolve() == script.resolve()):
        command = "kapok"
    else:
        relative = os.path.relpath(script)
        command = str(script) if relative.startswith("..") else relative
    home = os.environ.get("KAPOK_HOME")
    return f"KAPOK_HOME={shlex.quote(home)} {command}" if home else command


def _ui_tracking_uri() -> str:
    """training.tracking.tracking_uri's rule without importing MLflow (10 s on this machine):
    MLFLOW_TRACKING_URI when set, else the SQLite store under KAPOK_HOME/mlruns."""
    import os

    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{paths().mlruns / 'mlflow.db'}"


@app.command("ui")
@friendly_errors
def ui_command(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """The MLflow UI on KAPOK_HOME's tracking store; Ctrl-C stops all of it.

    Runs, metrics, plots, registered models and their champion / challenger aliases on
    http://127.0.0.1:PORT. The UI runs in a process group of its own: Ctrl-C or SIGTERM stops
    the server and its workers, nothing is left running. Its log goes to
    KAPOK_HOME/mlruns/ui.log (with --verbose, to this terminal).
    """
    import os
    import socket
    import subprocess
    import sys

    p = paths()
    uri = _ui_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise FileNotFoundError(f"no MLflow store at {uri}: train a model first (kapok run)")
    with socket.socket() as probe:  # a port in use is one line, not the server's traceback
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            raise ValueError(f"port {port} on 127.0.0.1 is not free: {e.strerror}") from None
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--artifacts-destination", (p.mlruns / "artifacts").resolve().as_uri(),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    # no MLflow job runners (a huey_consumer process per job type, which outlived the UI after
    # Ctrl-C): Kapok submits no MLflow jobs
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = None if kapok.verbose() else p.mlruns / "ui.log"
    console.print(f"MLflow UI for {uri}: starting on http://127.0.0.1:{port}", soft_wrap=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log or os.devnull, "wb") as out:
        ui = subprocess.Popen(command, env=env, start_new_session=True,
                              stdout=out if log else None,
                              stderr=subprocess.STDOUT if log else None)  # fmt: skip

    def ready() -> None:
        console.print(f"MLflow UI ready: http://127.0.0.1:{port} (Ctrl-C stops it)")

    code = _run_process_group(ui, is_ready=lambda: _answers_http(port), on_ready=ready)
    if code is not None:
        where = f"; its log: {log}" if log else ""
        raise ValueError(f"the MLflow UI stopped by itself (exit code {code}){where}")
    console.print("MLflow UI stopped")


def _probe_host(host: str) -> str:
    """Where this machine reaches a server bound to `host` (every interface: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _reachable(host: str) -> str:
    """`host` as it goes in a URL (an IPv6 address in brackets)."""
    shown = _probe_host(host)
    return f"[{shown}]" if ":" in shown else shown


def _answers_http(port: int, path: str = "/health", host: str = "127.0.0.1") -> bool:
    import http.client

    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _run_process_group(
    leader: Any, is_ready: Callable[[], bool], on_ready: Callable[[], None]
) -> int | None:
    """Wait for `leader`, a subprocess.Popen started with start_new_session=True (the first
    process of a process group of its own), calling `on_ready` once `is_ready()` holds. On
    Ctrl-C or SIGTERM, or when the leader exits by itself, stop every process left in the group.
    Returns the leader's exit code if it exited by itself, None if it was stopped."""
    import signal
    import subprocess

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, interrupt)
    code: int | None = None
    try:
        announced = False
        while code is None:
            try:
                code = leader.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if not announced and is_ready():
                    on_ready()
                    announced = True
    except KeyboardInterrupt:
        code = None
    finally:
        for s in handlers:  # a second Ctrl-C must not cut the stop short
            signal.signal(s, signal.SIG_IGN)
        try:
            _stop_process_group(leader)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    return code


def _stop_process_group(leader: Any, grace: float = 10.0) -> None:
    """SIGTERM to every process of the leader's group, SIGKILL to any left after `grace` s."""
    import os
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(leader.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            leader.poll()  # reap the leader: a zombie still counts as a member of its group
            try:
                os.killpg(leader.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    leader.poll()


@app.command("replay")
@friendly_errors
def replay_command(
    request_id: Annotated[str, typer.Argument(help="The request_id of a logged decision.")],
) -> None:
    """Re-score a logged decision from its model version and logged features; confirm it."""
    from serving.replay import replay

    result = replay(request_id, paths())
    for line in result.lines:
        console.print(line)
    if not result.same:
        console.print("[bold red]MISMATCH[/]: the replay does not reproduce the logged decision")
        raise typer.Exit(1)
    console.print("[bold green]confirmed[/]: same PD, score, grade and decision")


# -- model-risk review: kapok report ------------------------------------------------------------
@app.command("report")
@friendly_errors
def report_command(
    product: Annotated[
        str,
        typer.Option(
            help="microloan, guarantee, insurance, or a dataset-spec model name (german_credit)."
        ),
    ],
    alias: Annotated[
        str | None, typer.Option(help="Model alias to report on (default: champion).")
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Or an explicit model version number.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="HTML file to write (default: KAPOK_HOME/reports/<model>-v<N>.html)."),
    ] = None,
) -> None:
    """Write the model-risk review of one model version as one self-contained HTML file.

    Identity and lineage, out-of-time performance (ROC, KS, gains, calibration), global SHAP
    with expected vs learned risk directions, stability (PSI/CSI), segments with the
    four-fifths rule, champion vs challenger with the promotion gate, limitations and a
    sign-off block. Built from what training logged to MLflow (no retraining); also logged to
    the version's MLflow run as reports/<file>.html.
    """
    from review.report import STEPS, build_report

    _quiet_mlflow()
    with progress_bar(f"reviewing {product}", len(STEPS)) as advance:
        result = build_report(
            paths(), product, alias=alias, version=version, out=out,
            on_step=lambda _step: advance(1),
        )  # fmt: skip
    console.print(
        f"{result.model_name} v{result.version}: {len(result.flags)} flag(s); logged to MLflow "
        f"run {result.run_id} as {result.artifact}"
    )
    print(result.path)


# -- single decisions: kapok explain -------------------------------------------------------------
@app.command("explain")
@friendly_errors
def explain_command(
    request_id: Annotated[str, typer.Argument(help="The request_id of a logged decision.")],
    out: Annotated[
        Path | None,
        typer.Option(help="HTML file to write (default: KAPOK_HOME/reports/explain-ID.html)."),
    ] = None,
) -> None:
    """Explain one logged decision: SHAP waterfall, reasons given and policy path, as HTML.

    The row is rebuilt from the logged feature values and scored by the logged model version
    (exact TreeSHAP, log-odds); the page checks that base + contributions = margin and that the
    replayed PD equals the logged one, and shows the knock-outs, cut-offs, price and, for /limit
    decisions, the binding limit constraint.
    """
    from kapok.staging import write_text_atomic
    from review.explain import default_out, explain, render, summary_lines

    _quiet_mlflow()
    p = paths()
    with console.status(f"replaying {request_id}"):
        e = explain(request_id, p)
        target = write_text_atomic(out or default_out(p, request_id), render(e))
    for line in summary_lines(e):
        console.print(line, highlight=False)
    console.print(f"report: {target}")


# -- what-if: kapok whatif ------------------------------------------------------------------------
def _numbers(text: str | None, option: str, kind: type) -> list[Any] | None:
    """A comma-separated list of numbers (None when the option is not given)."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        try:
            out.append(kind(part.strip()))
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{option}: {part.strip()!r} is not {what}") from None
    return out


_WHATIF_OPTIONS = {
    "grid.amounts": "--amounts",
    "grid.terms": "--terms",
    "grid": "--amounts x --terms",
    "term_months": "--term",
    "amount": "--amount",
}


@app.command("whatif")
@friendly_errors
def whatif_command(
    enterprise_id: Annotated[str, typer.Argument(help="Unified Social Credit Code (18 chars).")],
    product: Annotated[str, typer.Option(help="microloan, guarantee or insurance.")] = "microloan",
    amount: Annotated[float, typer.Option(help="Requested amount, CNY.")] = 100_000.0,
    term: Annotated[int, typer.Option(help="Requested term, months.")] = 12,
    amounts: Annotated[
        str | None, typer.Option(help="Amounts to decide, CNY, comma-separated: 100000,200000.")
    ] = None,
    terms: Annotated[
        str | None, typer.Option(help="Terms to decide, months, comma-separated: 6,12,24.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the answer of POST /whatif as JSON.")
    ] = False,
) -> None:
    """What would get this approved: the decision at other amounts and terms (at most 20
    cells), and the smallest change to what the enterprise can act on (overdue tax, overdue
    receivables, debt) that would approve, from the online features, the champion and the
    policy the API uses. An estimate: nothing is decided and nothing is logged."""
    import json

    from features.schema import PRODUCTS
    from kapok import uscc
    from serving.engine import EnterpriseNotFound, LendingEngine
    from serving.whatif import WhatIfInputError, what_if

    if product not in PRODUCTS:
        raise ValueError(f"--product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    code = uscc.validate(enterprise_id)
    grid_amounts = _numbers(amounts, "--amounts", float)
    grid_terms = _numbers(terms, "--terms", int)
    _quiet_mlflow()
    with console.status("loading the champion and the online features"):
        engine = LendingEngine(paths(), products=(product,))
    try:
        w = what_if(engine, code, product, amount, term, grid_amounts, grid_terms)
    except EnterpriseNotFound as e:
        raise ValueError(f"the online feature store has no data for {code}") from e
    except WhatIfInputError as e:
        option = _WHATIF_OPTIONS.get(e.field.split("[")[0], e.field)
        raise ValueError(f"{option}{str(e)[len(e.field.split('[')[0]) :]}") from None
    answer = w.as_dict()
    if json_out:
        print(json.dumps(answer, ensure_ascii=False, indent=2))
        return
    now = answer["current"]
    console.print(
        f"[bold]what-if[/] {code} {product}: CNY {amount:,.0f} over {term} months, "
        f"model {answer['model_name']} v{answer['model_version']}, features as of "
        f"{answer['features_as_of']}",
        highlight=False,
    )
    console.print(f"[bold yellow]estimate:[/] {answer['note']}", highlight=False, soft_wrap=True)
    console.print(
        f"now: {now['decision']}, PD {now['pd']:.4f}, grade {now['grade']}, score "
        f"{now['score']:.0f}, {now['rate_name']} {now['rate']:.2%}"
        + ("" if now["within_cap"] else " (above the cap)"),
        highlight=False,
    )
    grid = Table("amount", "term", "decision", "PD", "grade", "rate", "limit", "binding",
                 title="other amounts and terms")  # fmt: skip
    for c in answer["grid"]:
        grid.add_row(
            f"{c['amount']:,.0f}", str(c["term_months"]), c["decision"], f"{c['pd']:.4f}",
            c["grade"], f"{c['rate']:.2%}" + ("" if c["within_cap"] else " > cap"),
            f"{c['limit']:,.0f}", c["binding_constraint"],
        )  # fmt: skip
    console.print(grid)
    changes = answer["changes"]
    console.print(
        f"[bold]what the enterprise can change:[/] {changes['message']}",
        highlight=False,
        soft_wrap=True,
    )
    if changes["changes"]:
        table = Table("action", "change", "of the way", "PD alone", title="smallest change")
        for c in changes["changes"]:
            table.add_row(c["action"], c["text_en"], f"{c['share_of_way']:.0%}",
                          f"{c['pd_alone']:.4f} ({c['decision_alone']})")  # fmt: skip
        console.print(table)
        console.print(
            f"PD with every change: {changes['final_pd']:.4f} ({changes['final_decision']})"
        )


# -- monitoring and back-testing: kapok monitor --------------------------------------------------
@app.command("monitor")
@friendly_errors
def monitor_command(
    product: Annotated[str, typer.Option(help="microloan, guarantee or insurance.")],
    since: Annotated[
        str | None, typer.Option(help="First decision day, YYYY-MM-DD (default: all).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Last decision day, YYYY-MM-DD, inclusive.")
    ] = None,
    outcomes: Annotated[
        Path | None,
        typer.Option(
            help="Matured outcomes (parquet or CSV: request_id, outcome 0/1); default "
            "KAPOK_HOME/data/outcomes/PRODUCT.parquet when it exists."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="HTML report (default: KAPOK_HOME/reports/monitor-PRODUCT-DATE.html)."),
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            help="all, live or backfill: which decisions to monitor. live: the API's and "
            "`kapok decide`'s, dated when they were made; backfill: `kapok backfill`'s, dated by "
            "their application. all (default) pools them for PSI, CSI and the back-test; volume "
            "and approval rate are per source whatever this says."
        ),
    ] = "all",
) -> None:
    """Drift and back-test of logged decisions against the champion's training reference.

    Score PSI, feature CSI (look-back features on whole windows only), missing-rate drift,
    approval-rate drift and volume by month for each source (live, backfill); where outcomes
    have matured, predicted PD vs observed default rate per grade (exact binomial test) and AUC
    over time, leaving out the model's own training and validation months. Writes an HTML
    report. Exit status: 0 when nothing reaches "act", 1 when anything does (for a scheduler to
    alert on), 2 on bad input.
    """
    from kapok.staging import write_text_atomic
    from review.backfill import window_bounds
    from review.monitor import default_out, monitor, render

    _quiet_mlflow()
    start, end = window_bounds(since, until)
    p = paths()
    with console.status(f"monitoring {product}"):
        result = monitor(p, product, start, end, source=source, outcomes=outcomes)
        target = write_text_atomic(out or default_out(p, result), render(result))
    colour = {"stable": "green", "watch": "yellow", "act": "bold red", "info": "dim", "n/a": "dim"}
    window = f"{result.first_decision:%Y-%m-%d} .. {result.last_decision:%Y-%m-%d}"
    title = f"{product}: {result.decisions:,} decisions, {window}"
    table = Table("check", "value", "verdict", "detail", title=title)
    for c in result.checks:
        table.add_row(c.name, c.value, f"[{colour.get(c.verdict, '')}]{c.verdict}[/]", c.detail)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"report: {target}")
    if result.alert:
        console.print("[bold red]ACT[/]: at least one check reached act")
        raise typer.Exit(1)


@app.command("backfill")
@friendly_errors
def backfill_command(
    product: Annotated[str, typer.Option(help="microloan, guarantee or insurance.")],
    since: Annotated[
        str | None, typer.Option(help="First application day, YYYY-MM-DD (default: all).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Last application day, YYYY-MM-DD, inclusive.")
    ] = None,
) -> None:
    """Replay the simulator's applications through the champion into the decision log.

    Simulated data has no lending history: each application in the window is decided as the
    engine would have on its date (point-in-time features from Feast's offline store, the
    policy's knock-outs, cut-offs and price) and logged with caller "backfill"; a re-run skips
    what is already logged. Matured outcomes go to KAPOK_HOME/data/outcomes/PRODUCT.parquet
    for `kapok monitor`'s back-test.
    """
    from features.schema import PRODUCTS
    from review.backfill import backfill, window_bounds

    if product not in PRODUCTS:
        raise ValueError(f"--product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    _quiet_mlflow()
    start, end = window_bounds(since, until)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console,
                  transient=not console.is_terminal) as bar:  # fmt: skip
        task = bar.add_task(f"backfilling {product}", total=None)
        result = backfill(
            paths(), product, start, end,
            on_total=lambda n: bar.update(task, total=n),
            progress=lambda n: bar.advance(task, n),
        )  # fmt: skip
    console.print(
        f"{result.model_name} v{result.model_version}: {result.applications:,} applications, "
        f"{result.written:,} decisions logged, {result.skipped:,} already logged; "
        f"{result.seconds:.1f} s in all ({result.rows_per_second:,.0f} rows/s, start-up included)"
    )
    console.print(f"{result.outcomes:,} matured outcomes -> {result.outcomes_path}")


@app.command("simulate-policy")
@friendly_errors
def simulate_policy_command(
    product: Annotated[str, typer.Option(help="microloan, guarantee or insurance.")],
    policy: Annotated[Path, typer.Option(help="The candidate policy file (policy.toml's format).")],
    since: Annotated[
        str | None, typer.Option(help="First decision day, YYYY-MM-DD (default: all).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Last decision day, YYYY-MM-DD, inclusive.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: KAPOK_HOME/reports).")
    ] = None,
) -> None:
    """Re-decide the logged applications under the current and a candidate policy.

    Every application decision of the product in the window (the API's, `kapok decide`'s and
    `kapok backfill`'s) is decided again from its logged features, amount and term with the
    same model, under the current policy (KAPOK_POLICY or serving/policy.toml) and the
    candidate. Side by side: approval rate, volume, expected loss, expected income and, where
    outcomes have matured, the observed bad rate among approvals; by grade, district, industry
    and size class; and the applications whose decision changes (swap-in, swap-out). Writes
    simulate-policy-PRODUCT-DATE.html and the swap lists (-swaps.parquet, -swaps.csv).
    """
    from review.backfill import window_bounds
    from review.simulate_policy import simulate, window_text, write_outputs

    t0 = time.perf_counter()
    start, end = window_bounds(since, until)
    _quiet_mlflow()
    p = paths()
    with progress_bar(f"simulating {product}", None) as advance:
        result = simulate(p, product, policy, start, end, progress=advance)
    files = write_outputs(result, out or p.home / "reports")
    title = (
        f"{product}: {result.rows.height:,} applications {window_text(result)}; "
        f"current {result.current.source} vs candidate {result.candidate.source}"
    )
    table = Table("metric", "current", "candidate", "change", title=title)
    for row in result.summary():
        table.add_row(row["metric"], row["current"], row["candidate"], row["change"])
    console.print(table)
    console.print(
        f"swap-in {result.swap_count('in'):,} (approved only under the candidate), "
        f"swap-out {result.swap_count('out'):,} (approved only under the current policy)"
    )
    for line in result.models:
        console.print(f"model: {line}")
    for note in result.notes:
        console.print(f"note: {note}")
    for path in files.values():
        console.print(f"wrote {path}")
    console.print(
        f"done in {time.perf_counter() - t0:.1f} s ({result.seconds:.1f} s reading the log and "
        "deciding)"
    )


# -- batch decisions: kapok decide ---------------------------------------------------------------
@app.command("decide")
@friendly_errors
def decide_command(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV or parquet: enterprise_id, product, requested_amount (or amount), "
            "term_months, optional application_date (YYYY-MM-DD)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the decisions, .parquet or .csv (default: next to "
            "FILE, FILE-decisions.parquet)."
        ),
    ] = None,
    batch_id: Annotated[
        str | None,
        typer.Option(help="Batch id for the decision log; reuse it to resume (default: new)."),
    ] = None,
    reasons: Annotated[
        str,
        typer.Option(
            help="adverse (refers and declines: the decisions that need reasons), all, or none."
        ),
    ] = "adverse",
    limits: Annotated[
        bool, typer.Option("--limits", help="Also search each row's limit (slower).")
    ] = False,
) -> None:
    """Decide a whole file of applications with the same decision core as the API.

    With an application_date, each row gets the features it would have had on that day
    (point in time, from the offline store); without one, the latest online features. Every
    decision is logged under the batch id; the output has PD, score, grade, decision, reason
    codes, the headline rate and, with --limits, the limit and the constraint that binds it.
    """
    from serving.batch import decide_file

    if reasons not in ("adverse", "all", "none"):
        raise ValueError(f"--reasons must be adverse, all or none, got {reasons!r}")
    target = out or file.with_name(file.stem + "-decisions.parquet")
    _quiet_mlflow()
    with progress_bar(f"deciding {file.name}", _rows(file)) as advance:
        result = decide_file(
            paths(), file, target, batch_id=batch_id, reasons=reasons,  # type: ignore[arg-type]
            limits=limits, progress=advance,
        )  # fmt: skip
    counts = ", ".join(f"{v:,} {k}" for k, v in sorted(result.counts.items(), key=str))
    console.print(
        f"{result.batch_id}: {result.decided:,} rows decided ({counts}); {result.logged:,} logged; "
        f"{result.seconds:.1f} s ({result.feature_seconds:.1f} s reading features)"
    )
    console.print(f"decisions -> {result.out}")


def _rows(file: Path) -> int | None:
    """Rows of a CSV or parquet file, for the progress bar (None when it cannot be read: the job
    itself then says what is wrong)."""
    import polars as pl

    try:
        scan = pl.scan_parquet(file) if file.suffix == ".parquet" else pl.scan_csv(file)
        return int(scan.select(pl.len()).collect().item())
    except Exception:
        return None


# -- portfolio early warning: kapok watch --------------------------------------------------------
@app.command("watch")
@friendly_errors
def watch_command(
    product: Annotated[str, typer.Option(help="microloan, guarantee or insurance.")],
    as_of: Annotated[
        str, typer.Option("--as-of", help="Score the book at the close of this date, YYYY-MM-DD.")
    ],
    previous: Annotated[
        str | None,
        typer.Option(help="Compare with this date, YYYY-MM-DD (default: one month earlier)."),
    ] = None,
    portfolio: Annotated[
        Path | None,
        typer.Option(
            help="A book kept elsewhere: parquet or CSV with enterprise_id [, requested_amount, "
            "term_months, start_date]. Default: running approved loans in the decision log."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: KAPOK_HOME/reports).")
    ] = None,
) -> None:
    """Portfolio early warning: list current borrowers that deteriorated since the previous date.

    Scores every current borrower with the product's champion at --as-of and at --previous,
    from the Feast offline store read point in time, and flags: a drop of 2+ grades, PD at least
    doubled, a new court enforcement or dishonest-debtor listing, a collapse (50%+) in declared
    sales or electricity use. Each flag comes with its reasons; model-driven flags name the
    features that moved the risk (TreeSHAP). Opens the policy's early-warning actions for the
    flagged borrowers, with their due dates, in the actions store (`kapok actions list`; a re-run
    for the same date opens nothing twice). Writes watch-<product>-<DATE>.parquet, .csv and
    .html (action counts, grade migration matrix, top deteriorations, PD-ratio histogram).
    """
    from review.watch import run

    _quiet_mlflow()
    steps = ("champion", "portfolio", "features", "scoring", "flags", "explain", "actions", "write")
    t0 = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,  # not the bar's last state in a log, before an error
    ) as bar:
        task = bar.add_task("watch", total=len(steps))
        started = [False]

        def step(description: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=description)

        result = run(paths(), product, as_of, previous, portfolio, out, step=step)
        bar.update(task, completed=len(steps), description="done")
    counts = result.flag_counts()
    table = Table("flag", "borrowers", title=f"{result.product} watchlist {result.as_of} vs "
                  f"{result.previous}: {result.flagged.height:,} of {result.scores.height:,} "
                  "scored borrowers flagged")  # fmt: skip
    for name, n in counts.items():
        table.add_row(name, f"{n:,}")
    console.print(table)
    console.print(f"model: {result.model}; portfolio: {result.source}")
    if result.no_data:
        console.print(f"{result.no_data:,} borrowers have no feature snapshot at either date")
    if result.actions is not None and result.action_summary is not None:
        summary = result.action_summary
        console.print(
            f"actions: {result.actions.height:,} for the flagged borrowers, "
            f"{result.new_actions:,} new in the actions store; {int(summary['open'].sum()):,} "
            f"{result.product} actions open, {int(summary['overdue'].sum()):,} overdue on "
            f"{result.as_of} (kapok actions list)",
            soft_wrap=True,
            highlight=False,
        )
    for path in result.files.values():
        console.print(f"wrote {path}")
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


# -- prospecting: kapok prospect -----------------------------------------------------------------
@app.command("prospect")
@friendly_errors
def prospect_command(
    product: Annotated[str, typer.Option(help="microloan, guarantee or insurance.")],
    as_of: Annotated[
        str,
        typer.Option(
            "--as-of", help="Decide on the features known at the close of this date, YYYY-MM-DD."
        ),
    ],
    top: Annotated[
        int | None, typer.Option(help="Keep only the N offers with the lowest PD (default: all).")
    ] = None,
    district: Annotated[
        list[str] | None,
        typer.Option(
            "--district",
            help="Only this district: division code, English or Chinese name (440113, Panyu, "
            "番禺区). Repeat for several.",
        ),
    ] = None,
    industry: Annotated[
        list[str] | None,
        typer.Option(
            "--industry",
            help="Only this GB/T 4754 industry section letter (C: manufacturing, F: wholesale "
            "and retail, ...). Repeat for several.",
        ),
    ] = None,
    term: Annotated[
        int, typer.Option(help="Term of the offered loan, guarantee or cover, in months.")
    ] = 12,
    portfolio: Annotated[
        Path | None,
        typer.Option(
            help="The current borrowers, kept elsewhere: parquet or CSV with enterprise_id [, "
            "requested_amount, term_months, start_date]. Default: running approved loans in the "
            "decision log."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: KAPOK_HOME/reports).")
    ] = None,
) -> None:
    """Pre-approved offers (精准营销): the enterprises of the region that qualify and are not yet
    borrowers, with a limit, a price and the reasons they qualify.

    Every enterprise with features at --as-of, minus the product's current borrowers, is decided
    by the same decision core as the API, at a request of the product's house limit (policy_cap
    in serving/policy.toml) for --term months, with the limit search. Only approvals with a
    positive limit are offers: knock-outs, referrals and declines are never listed. Offers are
    sorted by PD, lowest first. Each offer has its district, industry, size class, PD, score,
    grade, pre-approved limit, price (rate, fee or premium), expected loss (PD x LGD x limit) and
    revenue for one year, and the three features that lowered its risk the most.

    Writes prospect-PRODUCT-DATE.parquet, .csv and .html (counts, limits, expected loss and
    revenue by grade, district and industry; the top offers) to --out.

    Offers are decisions: each is logged to the decision log (endpoint "prospect", new request
    ids every run), so running it twice logs two sets of offers. They are never taken for loans:
    `kapok watch` and `kapok monitor` read applications only.

    Example: kapok prospect --product microloan --as-of 2025-06-30 --top 500 --district Panyu
    """
    from review import prospect as pr

    _quiet_mlflow()
    t0 = time.perf_counter()
    home = paths()
    req = pr.parse_request(home, product, as_of, term=term, top=top,
                           districts=district or (), industries=industry or ())  # fmt: skip
    result = pr.run(home, req, portfolio=portfolio, out=out, bar=progress_bar)
    offers = result.frame
    console.print(
        f"{result.model}: {result.region:,} enterprises in the region, {result.borrowers:,} "
        f"current borrowers left out, {result.decided:,} decided"
    )
    for key, n in result.not_offered.items():
        console.print(f"  not offered, {pr.NOT_OFFERED[key]}: {n:,}")
    console.print(
        f"{offers.height:,} offers, total limit CNY {offers['limit'].sum():,.0f}, expected loss "
        f"CNY {offers['expected_loss'].sum():,.0f} and revenue CNY "
        f"{offers['expected_revenue'].sum():,.0f} a year; {result.logged:,} logged as run "
        f"{result.run_id}"
    )
    for path in result.files.values():
        console.print(f"wrote {path}")
    spent = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items() if k != "total")
    console.print(f"done in {time.perf_counter() - t0:.1f} s ({spent})")


@keys_app.command("add")
@friendly_errors
def keys_add(
    name: Annotated[str, typer.Argument(help="Who the key is for, e.g. acme-microloans.")],
    role: Annotated[str, typer.Option(help="lender, reviewer, officer or admin.")] = "lender",
) -> None:
    """Create an API key; only its hash is stored. The key is printed once."""
    from serving.auth import add_key, keys_path

    key = add_key(keys_path(), name, role)
    console.print(f"key for {name} ({role}), shown once:")
    print(key)


def _utc_text(value: Any) -> str:
    """A UTC timestamp to the second, e.g. 2025-01-31T09:30:00Z."""
    import datetime as dt

    return value.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@keys_app.command("list")
@friendly_errors
def keys_list() -> None:
    """The API keys: name, role, when created and the caller's last logged decision (never a
    key or its hash). Reading explanations or decisions is not logged, so it does not count."""
    from rich.markup import escape
    from rich.table import Column

    from serving.auth import KeyStore, keys_path
    from serving.decision_log import DecisionLog

    path = keys_path()
    if not path.exists():
        console.print(f"no API keys in {escape(str(path))}: kapok keys add NAME --role ROLE")
        return
    store = KeyStore.load(path)
    with DecisionLog() as log:  # a log that does not exist yet is not created
        last = log.last_decision_by_caller()
    table = Table(
        Column("name", overflow="fold"),
        Column("role", no_wrap=True),
        Column("created", no_wrap=True),
        Column("last decision", no_wrap=True),
        title=escape(f"API keys in {path}"),
    )
    for entry in store.entries:
        created = _utc_text(entry.created) if entry.created is not None else "unknown"
        used = _utc_text(last[entry.name]) if entry.name in last else "never"
        table.add_row(entry.name, entry.role, created, used)
    console.print(table)
    if not len(store):
        console.print("no keys: kapok keys add NAME --role ROLE creates one")


@keys_app.command("revoke")
@friendly_errors
def keys_revoke(
    name: Annotated[str, typer.Argument(help="The name the key was added under.")],
) -> None:
    """Delete an API key from the key file; requests with it then get 401 "unknown API key".
    A running `kapok serve` keeps the keys it loaded at start until it is restarted."""
    from rich.markup import escape

    from serving.auth import KeyStore, keys_path, remove_key

    path = keys_path()
    removed = remove_key(path, name)
    console.print(f"revoked {removed.name} ({removed.role}) in {escape(str(path))}")
    if removed.role == "admin" and not any(e.role == "admin" for e in KeyStore.load(path).entries):
        console.print(
            "[bold yellow]warning:[/] that was the last admin key: no key can now read "
            "every endpoint (kapok keys add NAME --role admin creates one)",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        "a running kapok serve loaded its keys at start and still accepts this one "
        "until it is restarted",
        soft_wrap=True,
    )


# -- actions: what the lender does about a flagged borrower ------------------------------------
@actions_app.command("list")
@friendly_errors
def actions_list(
    product: Annotated[
        str | None, typer.Option(help="Only this product's actions (default: every product).")
    ] = None,
    overdue: Annotated[
        bool, typer.Option("--overdue", help="Only the open actions past their due date.")
    ] = False,
    every: Annotated[
        bool,
        typer.Option("--all", help="Closed actions too, with the outcome that closed them."),
    ] = False,
    on: Annotated[
        str | None,
        typer.Option(help="Judge overdue on this date, YYYY-MM-DD (default: today, UTC)."),
    ] = None,
) -> None:
    """The open early-warning actions, most overdue first: id, borrower, action, why, due date;
    an overdue one is marked OVERDUE with its days late. Record what came of one with
    `kapok actions record ACTION_ID --outcome TEXT --officer NAME [--close]`."""
    import datetime as dt

    import polars as pl
    from rich.markup import escape
    from rich.table import Column

    from review.actions import ActionStore
    from review.portfolio import parse_date

    if product is not None:
        _check_product(product)
    day = parse_date(on, "--on") if on else dt.datetime.now(dt.UTC).date()
    with ActionStore() as store:
        frame = store.frame(product, day, include_closed=every)
        where = store.url
    if overdue:
        frame = frame.filter(pl.col("overdue"))
    fixed = {"no_wrap": True, "min_width": 10}
    table = Table(
        Column("action id", **fixed), Column("enterprise", **fixed), Column("product"),
        Column("action", overflow="fold"), Column("trigger", overflow="fold"),
        Column("as of", **fixed), Column("due", **fixed), Column("status", no_wrap=True),
        Column("why / outcome", overflow="fold", ratio=1),
        title=escape(f"{'actions' if every else 'open actions'} in {where} on {day}"),
    )  # fmt: skip
    for r in frame.iter_rows(named=True):
        if r["status"] == "closed":
            status = "closed"
            why = f"{r['last_outcome']} ({r['officer']}, {r['outcome_at'][:10]})"
        elif r["overdue"]:
            status = f"[bold red]OVERDUE {r['days_overdue']} d[/]"
            why = r["details"] or r["description"]
        else:
            status = "open"
            why = r["details"] or r["description"]
        if r["status"] == "open" and r["outcomes"]:
            why += f"; last note: {r['last_outcome']} ({r['officer']})"
        table.add_row(
            r["action_id"], r["enterprise_id"], r["product"], r["action"], r["trigger"],
            str(r["as_of"]), str(r["due_date"]), status, escape(why),
        )  # fmt: skip
    # a terminal wraps the reasons; a file or a pipe gets whole lines
    out = console if console.is_terminal else Console(stderr=True, width=240)
    out.print(table)
    n_overdue = int(frame["overdue"].sum())
    console.print(
        f"{frame.height:,} actions listed, {n_overdue:,} overdue"
        + ("" if frame.height else " (kapok watch opens actions for flagged borrowers)"),
        highlight=False,
    )


def _check_product(product: str) -> None:
    from features.schema import PRODUCTS

    if product not in PRODUCTS:
        raise ValueError(f"--product must be one of {', '.join(PRODUCTS)}, got {product!r}")


@actions_app.command("record")
@friendly_errors
def actions_record(
    action_id: Annotated[
        str, typer.Argument(help="The action's id, as `kapok actions list` shows it.")
    ],
    outcome: Annotated[str, typer.Option(help="What was done or found, e.g. 'limit reduced'.")],
    officer: Annotated[str, typer.Option(help="Who records it.")],
    close: Annotated[
        bool, typer.Option("--close", help="The outcome closes the action (else: a note).")
    ] = False,
) -> None:
    """Append an outcome to an action (a new row; the action's own row never changes). With
    --close the action is closed and leaves `kapok actions list`; an action is closed once."""
    from review.actions import ActionStore

    with ActionStore() as store:
        done = store.record(action_id, outcome, officer, close=close)
    state = "closed" if done.status == "closed" else "still open"
    console.print(
        f"recorded the outcome of {done.action_id} ({done.action}, {done.enterprise_id}): {state}",
        highlight=False,
    )


# -- audit: the decision log's hash chain -------------------------------------------------------
LogOption = Annotated[
    str | None,
    typer.Option(
        "--log",
        help="The decision log's SQLAlchemy URL (default: KAPOK_DECISION_LOG, else SQLite "
        "under KAPOK_HOME/decisions).",
    ),
]


# -- the referral queue ----------------------------------------------------------------------------
@queue_app.command("list")
@friendly_errors
def queue_list(
    product: Annotated[
        str | None, typer.Option(help="microloan, guarantee or insurance (default: all).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Referred on or after this day, YYYY-MM-DD.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Referred up to this day, inclusive.")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many.", min=1)] = 100,
) -> None:
    """The open referrals (no officer has decided them yet), the longest waiting first."""
    from features.schema import PRODUCTS
    from review.backfill import window_bounds
    from serving.decision_log import DecisionLog
    from serving.queue import open_queue

    if product is not None and product not in PRODUCTS:
        raise ValueError(f"--product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    start, end = window_bounds(since, until)
    with DecisionLog() as log:
        queue = open_queue(log, product, start, end, limit)
    items = queue["items"]
    if not items:
        console.print("the referral queue is empty" + (f" for {product}" if product else ""))
        return
    shown = f" (showing {len(items):,})" if len(items) < queue["count"] else ""
    table = Table(title=f"{queue['count']:,} open referrals, {queue['order']}{shown}")
    for name in ("request_id", "referred (UTC)", "product", "enterprise"):
        table.add_column(name, no_wrap=True)
    for name in ("amount", "term", "pd", "grade"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("why referred")
    for item in items:
        steps = [s for s in item["referred_because"] if s.endswith("-> refer")]
        why = ", ".join(item["knockouts"]) or "; ".join(steps[:1])
        amount = f"{item['amount']:,.0f}" if item["amount"] is not None else ""
        table.add_row(
            item["request_id"], item["decided_at"][:16].replace("T", " "), item["product"],
            item["enterprise_id"], amount, str(item["term_months"] or ""), f"{item['pd']:.2%}",
            item["grade"], why,
        )  # fmt: skip
    out = Console()
    if not out.is_terminal:  # a file or a pipe: whole request ids, one row a line
        out = Console(width=240)
    out.print(table)


@queue_app.command("decide")
@friendly_errors
def queue_decide(
    request_id: Annotated[str, typer.Argument(help="The referred decision's request_id.")],
    officer: Annotated[str, typer.Option(help="The credit officer deciding (logged).")],
    reason: Annotated[str, typer.Option(help="Why (required, logged with the decision).")],
    approve: Annotated[bool, typer.Option("--approve", help="Approve the application.")] = False,
    decline: Annotated[bool, typer.Option("--decline", help="Decline the application.")] = False,
    limit: Annotated[
        float | None,
        typer.Option(help="Approve only: the limit in CNY (default: the model's, if any)."),
    ] = None,
    price: Annotated[
        float | None,
        typer.Option(
            help="The headline annual rate / fee / premium, e.g. 0.18 (default: the model's)."
        ),
    ] = None,
) -> None:
    """Approve or decline a referred application: an override record in the decision log,
    linked to the referral (the same rules as POST /queue/{request_id})."""
    from serving.decision_log import DecisionLog
    from serving.policy import load_policy
    from serving.queue import Override, override

    if approve == decline:
        raise ValueError("say --approve or --decline (one of them)")
    given = Override("approve" if approve else "decline", reason, officer, limit, price)
    with DecisionLog() as log:
        record = override(log, load_policy(), request_id, given, caller=officer)
    limit_said = f", limit CNY {record.limit_amount:,.0f}" if record.limit_amount else ""
    console.print(
        f"{record.decision} by {officer}{limit_said}: override {record.request_id} of "
        f"{request_id} logged"
    )
    print(record.request_id)


@audit_app.command("verify")
@friendly_errors
def audit_verify(
    log: LogOption = None,
    anchor: Annotated[
        str | None,
        typer.Option(
            help="SEQ:HASH from an earlier `kapok audit anchor`: that record must "
            "still have that hash."
        ),
    ] = None,
) -> None:
    """Walk the decision log's hash chain in order and recompute every record's hash. Exit 0:
    "N records, chain intact, head HASH"; exit 1 naming the first edited, deleted, reordered or
    inserted record (its seq and request_id)."""
    from serving.audit import anchor as anchor_head
    from serving.audit import verify
    from serving.decision_log import DecisionLogError

    anchored = None
    if anchor is not None:
        seq, _, digest = anchor.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise ValueError(f"--anchor must be SEQ:HASH (64 hex digits), got {anchor!r}")
        anchored = (int(seq), digest.lower())
    try:
        total = anchor_head(log).seq  # for the progress bar; the walk reads the head again
    except DecisionLogError:
        total = None  # e.g. no head row: the walk says what it finds, or fails the same way
    with progress_bar("verifying the decision log", total) as advance:
        verdict = verify(log, progress=advance, anchor=anchored)
    if verdict.unchained:
        console.print(
            f"{verdict.unchained:,} records before chaining began (not covered)", highlight=False
        )
    if verdict.finding is not None:
        _error_line(verdict.finding)
        raise typer.Exit(1)
    print(f"{verdict.records:,} records, chain intact, head {verdict.head.hash}")


@audit_app.command("anchor")
@friendly_errors
def audit_anchor(
    log: LogOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Print the decision log's head (seq, hash, its record and the time now) to keep outside
    Kapok, e.g. with a lender's records or a notary; `kapok audit verify --anchor SEQ:HASH`
    later checks the log still holds it. Does not verify the chain."""
    import datetime as dt
    import json

    from serving.audit import anchor

    head = anchor(log)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if json_out:
        print(json.dumps({
            "seq": head.seq,
            "hash": head.hash,
            "request_id": head.request_id,
            "decided_at": None if head.decided_at is None else head.decided_at.isoformat(),
            "anchored_at": now,
        }))  # fmt: skip
        return
    of = f" ({head.request_id})" if head.request_id else " (no record yet)"
    print(f"seq {head.seq}{of} head {head.hash} at {now}")


# -- the main job --------------------------------------------------------------------------------
@app.command("run")
@friendly_errors
def run(
    enterprises: Annotated[int, typer.Option(help="Enterprises to simulate.")] = 100_000,
    months: Annotated[int, typer.Option(help="Months of history.")] = 36,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
    trials: Annotated[int, typer.Option(help="Optuna trials per product.")] = 10,
    timeout: Annotated[float, typer.Option(help="Tuning time limit per product, s.")] = 90,
) -> None:
    """The main job on embedded defaults: simulate, build features, feast apply, materialize,
    then train one model per product (registered in MLflow)."""
    from features.schema import PRODUCTS

    data_generate(enterprises=enterprises, months=months, seed=seed, start="2023-01", out=None)
    features_build()
    features_apply()
    features_materialize(full=False)
    for product in PRODUCTS:
        train_command(product=product, dataset=None, trials=trials, timeout=timeout, seed=seed,
                      valid_months=None, test_months=None)  # fmt: skip


if __name__ == "__main__":
    app()
