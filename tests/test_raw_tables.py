"""The raw-table contract (features.raw_tables): files that break it are refused with the table,
file and column named; the simulator writes exactly to it; nothing reads raw tables through the
simulator."""

from __future__ import annotations

import ast
import functools
from datetime import date, datetime
from pathlib import Path

import polars as pl
import pytest

from features import raw_tables as rt
from features.raw_tables import RawTableError, check_files, part_path, read_manifest, scan
from kapok.bigdata import generate as gen
from kapok.bigdata.simulate import SimulationConfig

ROOT = Path(__file__).resolve().parents[1]
UTC_NOON = datetime(2023, 2, 5, 12)


def _one_row(table: str) -> pl.DataFrame:
    """One row of `table` with the contract's columns and dtypes."""
    values = {
        pl.String: "x",
        pl.Date: date(2023, 1, 1),
        pl.Float64: 1.5,
        pl.Boolean: True,
        pl.Int8: 1,
        pl.Int16: 1,
        pl.Int32: 1,
    }
    row = {
        column: UTC_NOON if isinstance(dtype, pl.Datetime) else values[type(dtype)]
        for column, dtype in rt.raw_table(table).schema.items()
    }
    frame = pl.DataFrame({c: [v] for c, v in row.items()}, schema=rt.raw_table(table).schema)
    rt.check_frame(table, frame)
    return frame


def _write(raw: Path, table: str, frame: pl.DataFrame, chunk: int = 0) -> Path:
    month = date(2023, 1, 1) if rt.raw_table(table).monthly else None
    path = part_path(raw, table, chunk, month)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)
    return path


@pytest.mark.parametrize(
    ("table", "column"), [("electricity", "kwh"), ("registration", "district")]
)
def test_a_file_missing_a_column_is_refused_naming_table_file_and_column(tmp_path, table, column):
    _write(tmp_path, table, _one_row(table), chunk=0)
    bad = _write(tmp_path, table, _one_row(table).drop(column), chunk=1)
    with pytest.raises(RawTableError) as e:
        scan(tmp_path, table)
    message = str(e.value)
    assert f"raw table {table}" in message
    assert str(bad) in message
    assert f"no column {column!r}" in message
    scan(tmp_path, table, chunk=0).collect()  # the good chunk alone still reads


@pytest.mark.parametrize(
    ("table", "column", "wrong", "expected"),
    [
        ("tax", "declared_sales", pl.String, "Float64"),
        ("registration", "registered_capital", pl.Int64, "Float64"),
        ("applications", "applied_at", pl.Datetime("us"), str(rt.UTC_US)),
        ("credit_history", "dpd30", pl.Int8, "Boolean"),
    ],
)  # fmt: skip
def test_a_file_with_a_wrong_dtype_is_refused_naming_table_file_and_column(
    tmp_path, table, column, wrong, expected
):
    frame = _one_row(table)
    if isinstance(frame.schema[column], pl.Datetime):
        frame = frame.with_columns(pl.col(column).dt.replace_time_zone(None))
    else:
        frame = frame.with_columns(pl.col(column).cast(wrong))
    bad = _write(tmp_path, table, frame)
    with pytest.raises(RawTableError) as e:
        scan(tmp_path, table, chunk=0)
    message = str(e.value)
    assert f"raw table {table}" in message
    assert str(bad) in message
    assert f"column {column!r} is {wrong}" in message
    assert f"expected {expected}" in message


def test_errors_are_value_errors_and_missing_files_say_where(tmp_path):
    """The CLI shows ValueError and FileNotFoundError as one line (kapok.cli.friendly_errors)."""
    assert issubclass(RawTableError, ValueError)
    with pytest.raises(FileNotFoundError, match=r"raw table payments: no files for part-0003"):
        scan(tmp_path, "payments", chunk=3)
    with pytest.raises(RawTableError, match="unknown raw table 'loans'"):
        scan(tmp_path, "loans")
    with pytest.raises(FileNotFoundError, match="kapok data generate"):
        read_manifest(tmp_path)
    (tmp_path / rt.MANIFEST).write_text('{"start": "2023-01"}')
    with pytest.raises(RawTableError, match="lacks months, chunks"):
        read_manifest(tmp_path)


def test_extra_columns_are_not_read(tmp_path):
    _write(tmp_path, "oracle", _one_row("oracle").with_columns(note=pl.lit("extra")))
    frame = scan(tmp_path, "oracle").collect()
    assert frame.columns == list(rt.raw_table("oracle").schema)


def test_every_table_is_described_and_laid_out():
    assert len(rt.TABLES) == len(set(rt.TABLES)) == 13
    for table in rt.RAW_TABLES.values():
        assert table.description.endswith(".") and "\n" not in table.description, table.name
        assert table.schema, table.name
        if table.regional:
            assert table.layout == f"{table.name}/period=YYYY-MM/region.parquet"
        elif table.monthly:
            assert rt.PARTITION_COLUMN in table.schema, table.name
            assert table.layout == f"{table.name}/period=YYYY-MM/part-CCCC.parquet"
        else:
            assert table.layout == f"{table.name}/part-CCCC.parquet"
    assert set(rt.MONTHLY_TABLES) == {
        "tax", "electricity", "social_insurance", "payments", "receivables_payables",
        "credit_history", "credit_aggregates",
    }  # fmt: skip
    assert rt.REGIONAL_TABLES == ("credit_aggregates",)


def test_a_regional_table_is_read_whole_not_by_chunk(tmp_path):
    """The published aggregates describe the region, not a chunk of enterprises: asking for a
    chunk of them is a mistake the reader is told about, not an empty frame."""
    with pytest.raises(RawTableError, match="credit_aggregates is regional"):
        scan(tmp_path, "credit_aggregates", chunk=0)
    with pytest.raises(RawTableError, match="payments is written chunk by chunk"):
        part_path(tmp_path, "payments", None, date(2023, 1, 1))


# -- the simulator writes the contract -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory) -> Path:
    """300 enterprises in two chunks of 150, 24 months."""
    out = tmp_path_factory.mktemp("tiny") / "raw"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "CHUNK_SIZE", 150)
        gen.generate(SimulationConfig(enterprises=300, months=24, seed=3), out)
    return out


def test_the_simulators_tables_conform_to_the_contract(tiny_raw):
    manifest = read_manifest(tiny_raw)
    assert set(rt.MANIFEST_KEYS) <= set(manifest)
    assert manifest["chunks"] == 2
    written = {p.relative_to(tiny_raw).parts[0] for p in tiny_raw.rglob("*.parquet")}
    assert written == set(rt.TABLES)
    for name, table in rt.RAW_TABLES.items():
        for chunk in [None] if table.regional else range(manifest["chunks"]):
            files = check_files(tiny_raw, name, chunk)
            for path in files:
                # exactly the contract: same columns, same order, same dtypes
                assert pl.read_parquet_schema(path) == table.schema, path
                if table.monthly:
                    assert path.parent.parent == tiny_raw / name
                    months = pl.read_parquet(path)[rt.PARTITION_COLUMN].unique().to_list()
                    assert [rt.period_name(m) for m in months] == [path.parent.name], path
                else:
                    assert path == part_path(tiny_raw, name, chunk)
            if not table.monthly:
                assert len(files) == 1
        rows = scan(tiny_raw, name).select(pl.len()).collect().item()
        assert rows == manifest["rows"][name], name


def test_the_simulator_refuses_to_write_a_frame_that_breaks_the_contract(tmp_path, monkeypatch):
    real = gen.simulate_chunk

    def renamed(*args, **kwargs):
        tables = real(*args, **kwargs)
        tables["payments"] = tables["payments"].rename({"inflow": "inflows"})
        return tables

    monkeypatch.setattr(gen, "simulate_chunk", renamed)
    with pytest.raises(RawTableError, match="raw table payments: simulated chunk 0 has no column"):
        gen.generate(SimulationConfig(enterprises=100, months=24, seed=1), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# -- nothing reads raw tables through the simulator ----------------------------------------------
SCANNED = ("features", "training", "review", "serving", "kapok", "feature_repo", "bench")
# What may be imported from kapok.bigdata outside it: what runs the simulator to make data ...
RUNS_SIMULATOR = {
    "generate",
    "SimulationConfig",
    "simulate_macro",
    "simulate_chunk",
    "simulate_chunk_with_state",
    "BURN_IN",
    "CHUNK_SIZE",
}
# ... and only where data is made: `kapok data generate`, and bench scripts.
MAKES_DATA = {("kapok/cli.py", "data_generate")}
# Still reading through the simulator, in a file this change could not edit: kapok/cli.py should
# import these from features.raw_tables. Remove an entry once it does.


@functools.cache
def _simulator_imports() -> list[tuple[str, str, str]]:
    """(file, enclosing top-level function or '<module>', name) of every import of kapok.bigdata
    outside kapok/bigdata; a whole-module import is recorded under the module's name."""
    found = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("kapok/bigdata/"):
                continue
            tree = ast.parse(path.read_text(), rel)
            for top in tree.body:
                where = (
                    top.name
                    if isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                    else "<module>"
                )
                for node in ast.walk(top):
                    if isinstance(node, ast.Import):
                        found += [
                            (rel, where, a.name)
                            for a in node.names
                            if a.name == "kapok.bigdata" or a.name.startswith("kapok.bigdata.")
                        ]
                    elif isinstance(node, ast.ImportFrom) and node.module:
                        module = node.module
                        if module == "kapok":
                            found += [
                                (rel, where, f"kapok.{a.name}")
                                for a in node.names
                                if a.name == "bigdata"
                            ]
                        elif module == "kapok.bigdata" or module.startswith("kapok.bigdata."):
                            found += [(rel, where, a.name) for a in node.names]
    return found


def test_nothing_outside_the_simulator_imports_it_to_read_raw_tables():
    imports = _simulator_imports()
    assert any(f == "kapok/cli.py" and w == "data_generate" for f, w, _ in imports)  # sanity
    wrong = [
        (file, where, name)
        for file, where, name in imports
        if not (
            name in RUNS_SIMULATOR and (file.startswith("bench/") or (file, where) in MAKES_DATA)
        )
    ]
    assert not wrong, (
        f"read raw tables through features.raw_tables, not the simulator (kapok.bigdata): {wrong}"
    )
