"""`kapok data generate`: simulate the big-data system in chunks and write its raw tables.

Layout under the output folder (one folder per table; monthly tables partitioned by month):
    raw/<table>/period=YYYY-MM/part-CCCC.parquet   monthly tables
    raw/<table>/part-CCCC.parquet                  the others
    raw/_manifest.json                             arguments, chunking, row counts
Chunk CCCC always holds the same enterprises in every table, so later stages can work chunk by
chunk in bounded memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl

from kapok.bigdata.simulate import SimulationConfig, simulate_chunk, simulate_macro
from kapok.staging import staged_folder

CHUNK_SIZE = 20_000  # enterprises per chunk; fixed so that output does not depend on the machine
MONTHLY_TABLES = (
    "tax",
    "electricity",
    "social_insurance",
    "payments",
    "receivables_payables",
    "credit_history",
)
TABLES = (
    "registration",
    "registration_events",
    "tax",
    "tax_credit_rating",
    "electricity",
    "social_insurance",
    "payments",
    "receivables_payables",
    "judicial_events",
    "credit_history",
    "applications",
    "oracle",
)
MANIFEST = "_manifest.json"


def chunk_name(chunk: int) -> str:
    return f"part-{chunk:04d}.parquet"


def _write(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path, compression="zstd", statistics=True)


def write_chunk(tables: dict[str, pl.DataFrame], out: Path, chunk: int) -> dict[str, int]:
    counts = {}
    for name, frame in tables.items():
        counts[name] = frame.height
        if name in MONTHLY_TABLES:
            for (month,), part in frame.partition_by(
                "month", as_dict=True, maintain_order=True
            ).items():
                _write(part, out / name / f"period={month:%Y-%m}" / chunk_name(chunk))
        else:
            _write(frame, out / name / chunk_name(chunk))
    return counts


def generate(
    config: SimulationConfig,
    out: Path,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write the raw tables of `config` to `out` (replaced atomically on success)."""
    if config.enterprises < 1:
        raise ValueError(f"--enterprises must be at least 1, got {config.enterprises}")
    if not 12 <= config.months <= 120:
        raise ValueError(f"--months must be between 12 and 120, got {config.months}")
    macro = simulate_macro(config)
    totals: dict[str, int] = dict.fromkeys(TABLES, 0)
    n_chunks = -(-config.enterprises // CHUNK_SIZE)
    manifest = {
        "enterprises": config.enterprises,
        "months": config.months,
        "seed": config.seed,
        "start": config.start,
        "downturn_month": config.downturn_month,
        "chunk_size": CHUNK_SIZE,
        "chunks": n_chunks,
        "rows": totals,
    }
    with staged_folder(out) as staging:
        for chunk in range(n_chunks):
            first = chunk * CHUNK_SIZE
            n = min(CHUNK_SIZE, config.enterprises - first)
            counts = write_chunk(simulate_chunk(config, macro, chunk, first, n), staging, chunk)
            for name, count in counts.items():
                totals[name] += count
            if progress:
                progress(n)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(raw: Path) -> dict:
    path = raw / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no simulated data at {raw}: run `kapok data generate` first (missing {MANIFEST})"
        )
    return json.loads(path.read_text())


def scan(raw: Path, table: str, chunk: int | None = None) -> pl.LazyFrame:
    """Lazily read one raw table, all chunks or one."""
    name = "*.parquet" if chunk is None else chunk_name(chunk)
    pattern = raw / table / ("*/" if table in MONTHLY_TABLES else "") / name
    return pl.scan_parquet(str(pattern).replace("//", "/"), hive_partitioning=False)
