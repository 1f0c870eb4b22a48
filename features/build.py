"""`kapok features build`: run every family's pipeline over the raw tables, chunk by chunk.

Output: <features>/<family>/part-CCCC.parquet, the offline store Feast's FileSources read.
The previous output stays in place until the new one is complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date
from pathlib import Path

import polars as pl

from features.pipelines import build_family
from features.schema import FAMILIES, SCHEMA_VERSION
from kapok.bigdata.generate import TABLES, chunk_name, read_manifest, scan
from kapok.staging import staged_folder

INPUT_TABLES = tuple(t for t in TABLES if t not in ("applications", "oracle"))
MANIFEST = "_manifest.json"


def raw_chunk(raw: Path, chunk: int) -> dict[str, pl.LazyFrame]:
    return {table: scan(raw, table, chunk) for table in INPUT_TABLES}


def build(raw: Path, out: Path, progress: Callable[[str], None] | None = None) -> dict:
    manifest = read_manifest(raw)
    start = date.fromisoformat(manifest["start"] + "-01")
    rows = dict.fromkeys((f.name for f in FAMILIES), 0)
    summary = {
        "schema_version": SCHEMA_VERSION,
        "raw": manifest,
        "rows": rows,
        "first_snapshot": f"{start:%Y-%m}",
        "months": manifest["months"],
    }
    with staged_folder(out) as staging:
        for chunk in range(manifest["chunks"]):
            tables = raw_chunk(raw, chunk)
            for fam in FAMILIES:
                frame = build_family(fam.name, tables, manifest["months"], start).collect()
                target = staging / fam.name / chunk_name(chunk)
                target.parent.mkdir(parents=True, exist_ok=True)
                frame.write_parquet(target, compression="zstd", statistics=True)
                rows[fam.name] += frame.height
                if progress:
                    progress(fam.name)
        (staging / MANIFEST).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def read_summary(features: Path) -> dict:
    path = features / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no feature tables at {features}: run `kapok features build` first"
        )
    return json.loads(path.read_text())
