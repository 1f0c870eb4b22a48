"""`kapok data generate`: simulate the big-data system in chunks and write its raw tables.

What is written (table names, schemas, the layout under the output folder, the manifest) is the
contract in `features.raw_tables`: every frame is checked against it before it is written, and
everything that reads the raw tables reads them through it. Chunk CCCC always holds the same
enterprises in every table, so later stages can work chunk by chunk in bounded memory; the
regional tables (the system's published aggregates) are written once, after the last chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl

from features.raw_tables import (
    ENTERPRISE_TABLES,
    PARTITION_COLUMN,
    REGIONAL_TABLES,
    check_frame,
    part_path,
)

# Re-exported (`x as x`) for callers not yet moved to features.raw_tables: kapok/cli.py,
# notebooks/01_bigdata_tour.py and tests. New code imports them from features.raw_tables.
from features.raw_tables import MANIFEST as MANIFEST
from features.raw_tables import MONTHLY_TABLES as MONTHLY_TABLES
from features.raw_tables import TABLES as TABLES
from features.raw_tables import chunk_name as chunk_name
from features.raw_tables import read_manifest as read_manifest
from features.raw_tables import scan as scan
from kapok.bigdata import aggregates
from kapok.bigdata.simulate import SimulationConfig, simulate_chunk, simulate_macro
from kapok.staging import staged_folder

CHUNK_SIZE = 20_000  # enterprises per chunk; fixed so that output does not depend on the machine


def _write(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path, compression="zstd", statistics=True)


def write_chunk(tables: dict[str, pl.DataFrame], out: Path, chunk: int | None) -> dict[str, int]:
    """Write one chunk of every per-enterprise table (or, `chunk` None, the regional tables)
    where the contract puts it, after checking its schema."""
    expected = sorted(ENTERPRISE_TABLES if chunk is not None else REGIONAL_TABLES)
    if sorted(tables) != expected:
        raise ValueError(f"chunk {chunk} has tables {sorted(tables)}, expected {expected}")
    counts = {}
    for name, frame in tables.items():
        where = "regional tables" if chunk is None else f"simulated chunk {chunk}"
        check_frame(name, frame, where)
        counts[name] = frame.height
        if name in MONTHLY_TABLES:
            for (month,), part in frame.partition_by(
                PARTITION_COLUMN, as_dict=True, maintain_order=True
            ).items():
                _write(part, part_path(out, name, chunk, month))
        else:
            _write(frame, part_path(out, name, chunk))
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
        reports = []  # per chunk: credit reports and arrears by month and segment
        for chunk in range(n_chunks):
            first = chunk * CHUNK_SIZE
            n = min(CHUNK_SIZE, config.enterprises - first)
            tables = simulate_chunk(config, macro, chunk, first, n)
            reports.append(
                aggregates.chunk_counts(tables["credit_history"], tables["registration"])
            )
            counts = write_chunk(tables, staging, chunk)
            for name, count in counts.items():
                totals[name] += count
            if progress:
                progress(n)
        regional = {aggregates.TABLE: aggregates.published(reports)}
        totals.update(write_chunk(regional, staging, None))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
