"""The feature build on Ray Data (KAPOK_ENGINE=ray): the same chunks, pipeline and part files as
the local build, with Ray scheduling the chunks instead of a local process pool.

A shard is one raw chunk: the simulator (and any export following features.raw_tables) puts a
fixed set of enterprises in chunk CCCC of every enterprise table, so a shard's rows are read from
its own part files and nothing is shuffled between shards. The Ray Dataset holds the shard ids,
one per block; `map_batches` with pyarrow batches of one row hands each shard to a task, which
reads that shard's raw tables, runs `features.build.build_chunk` (the very function the local
build runs) and writes <staging>/<family>/part-CCCC.parquet itself. Only a small Arrow table of
row counts goes back to the driver, so one task holds one chunk at a time and the driver holds
no feature rows at all. On a cluster the raw and staging folders must be on storage every node
sees (docs/SCALING.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import polars as pl
import pyarrow as pa

from features.build import build_chunk
from features.raw_tables import chunk_name
from features.schema import FAMILIES

SHARD = "id"  # the column ray.data.range gives the shard ids


class ShardBuildError(RuntimeError):
    """One shard of a Ray build failed; the message names the shard and its part file."""


def _shard_failure(chunk: int, error: BaseException) -> str:
    return (
        f"feature build failed on shard {chunk} ({chunk_name(chunk)} of the raw tables): "
        f"{type(error).__name__}: {error}"
    )


def _build_batch(batch: pa.Table, raw: Path, staging: Path, months: int, start: date) -> pa.Table:
    """The map_batches function: build every shard of a batch, return its row counts."""
    counts: dict[str, list[int]] = {SHARD: []} | {f.name: [] for f in FAMILIES}
    for chunk in pl.from_arrow(batch)[SHARD].to_list():
        try:
            rows = build_chunk(raw, staging, chunk, months, start)
        except Exception as e:  # a plain exception with the shard named reaches the driver
            raise ShardBuildError(_shard_failure(chunk, e)) from None
        counts[SHARD].append(chunk)
        for name, count in rows.items():
            counts[name].append(count)
    return pl.DataFrame(counts, schema=dict.fromkeys(counts, pl.Int64)).to_arrow()


def build_shards(
    raw: Path, staging: Path, chunks: int, months: int, start: date
) -> Iterator[dict[str, int]]:
    """Row counts per family of each shard, as the shards finish (in no particular order).

    A shard that raises fails the whole build with ShardBuildError naming it (Ray Data retries
    lost workers, not exceptions raised by the pipeline, which would only fail again)."""
    import ray
    from ray.data import DataContext

    from kapok.engine import ray_init

    ray_init()
    # Ray Data's own lines (execution start and end, "progress bars disabled") would break the
    # CLI's bar; its warnings and errors still show
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = DataContext.get_current()
    context.enable_progress_bars = False  # the CLI draws its own bar, per family per shard
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    # one block per shard id (`range` names its column "id")
    shards = ray.data.range(chunks, override_num_blocks=max(chunks, 1))
    built = shards.map_batches(
        _build_batch,
        fn_kwargs={"raw": raw, "staging": staging, "months": months, "start": start},
        batch_format="pyarrow",
        batch_size=1,  # one shard per call: a task holds one chunk's tables at a time
        num_cpus=1,
    )
    batches = built.iter_batches(batch_size=None, batch_format="pyarrow")
    try:
        for batch in batches:
            for row in pl.from_arrow(batch).iter_rows(named=True):
                yield {f.name: row[f.name] for f in FAMILIES}
    except Exception as e:
        raise ShardBuildError(_driver_message(e)) from None
    finally:  # stop the execution now (no new shard starts), not when the iterator is collected
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _driver_message(error: BaseException) -> str:
    """The shard's own message out of Ray's wrapping (a traceback of the worker's stack)."""
    text = str(error)
    marker = "feature build failed on shard "
    if marker in text:
        line = text[text.index(marker) :].splitlines()[0]
        return line
    return f"feature build on Ray failed: {type(error).__name__}: {text.splitlines()[0]}"
