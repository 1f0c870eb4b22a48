"""The raw tables of the regional big-data system: the contract between what writes them and
everything that reads them.

The simulator (`kapok.bigdata`, `kapok data generate`) writes these tables and checks what it
writes against this module; feature builds, training, review, serving and the benches read them
only through `scan` and `read_manifest` here, so a real export that follows this contract can
replace the simulator's output without any of them changing.

Layout under the raw folder (one folder per table; chunk CCCC holds the same enterprises in every
table, so later stages can work chunk by chunk in bounded memory):

    <raw>/<table>/period=YYYY-MM/part-CCCC.parquet   monthly tables, one folder per `month`
    <raw>/<table>/part-CCCC.parquet                  the other tables
    <raw>/<table>/period=YYYY-MM/region.parquet      regional tables (REGIONAL_TABLES)
    <raw>/_manifest.json                             see MANIFEST_KEYS

Regional tables describe the whole region, not enterprises (the system's published aggregates),
so they are not split into chunks: one file per month holds every row of that month.

Each table has exactly the columns of its schema, in that order, with those polars dtypes;
timestamps are microseconds in UTC. `scan` checks every file it is about to read against the
schema and names the table, file and column of the first difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl

UTC_US = pl.Datetime("us", "UTC")
PARTITION_COLUMN = "month"  # monthly tables are partitioned by this column: period=YYYY-MM
MANIFEST = "_manifest.json"
MANIFEST_KEYS = {
    "enterprises": "number of enterprises (rows of registration)",
    "months": "number of months covered",
    "start": "first month covered, YYYY-MM",
    "chunk_size": "enterprises per chunk (the last chunk may hold fewer)",
    "chunks": "number of chunks: part-0000 .. part-{chunks - 1}",
    "rows": "rows written per table",
}
READ_KEYS = ("start", "months", "chunks")  # what readers rely on; the rest is information
# The simulator also records its arguments: seed and downturn_month.


class RawTableError(ValueError):
    """A raw table file, or a frame about to be written, that does not follow the contract."""


@dataclass(frozen=True)
class RawTable:
    name: str
    description: str  # what this table of the big-data system holds, in one line
    schema: pl.Schema  # column -> polars dtype, in file order
    monthly: bool  # partitioned by PARTITION_COLUMN into period=YYYY-MM folders
    regional: bool = False  # about the region, not enterprises: one file per period, no chunks

    @property
    def layout(self) -> str:
        """Where its files are, relative to the raw folder."""
        period = "period=YYYY-MM/" if self.monthly else ""
        return f"{self.name}/{period}{REGIONAL_FILE if self.regional else 'part-CCCC.parquet'}"


REGIONAL_FILE = "region.parquet"


def _table(
    name: str, monthly: bool, description: str, regional: bool = False, **columns: pl.DataType
) -> RawTable:
    return RawTable(name, description, pl.Schema(columns), monthly, regional)


S, F8, D, B = pl.String(), pl.Float64(), pl.Date(), pl.Boolean()

RAW_TABLES: dict[str, RawTable] = {
    t.name: t
    for t in (
        _table(
            "registration", False,
            "Business registration (工商): one row per enterprise, with its industry section, "
            "district, founding date, registered capital and size class.",
            enterprise_id=S, industry=S, district=S, founded_on=D, registered_capital=F8,
            size_class=S, available_at=UTC_US,
        ),
        _table(
            "registration_events", False,
            "Registration events: legal-representative changes and abnormal-operations listings "
            "and removals, one row per event.",
            enterprise_id=S, event_type=S, event_date=D, available_at=UTC_US,
        ),
        _table(
            "tax", True,
            "Monthly tax filings (税务): declared sales, VAT and income tax paid, overdue tax and "
            "whether the filing was late, one row per enterprise and month filed.",
            enterprise_id=S, month=D, declared_sales=F8, vat_paid=F8, income_tax_paid=F8,
            overdue_tax=F8, filed_late=B, available_at=UTC_US,
        ),
        _table(
            "tax_credit_rating", False,
            "Yearly tax-credit rating (A, B, M, C, D) of each enterprise, published on 30 April "
            "of the following year.",
            enterprise_id=S, rating_year=pl.Int16(), rating=S, available_at=UTC_US,
        ),
        _table(
            "electricity", True,
            "Monthly electricity use (企业用电) in kWh of enterprises with a meter of their own.",
            enterprise_id=S, month=D, kwh=F8, available_at=UTC_US,
        ),
        _table(
            "social_insurance", True,
            "Monthly social-insurance headcount (政务) of enterprises that insure their staff.",
            enterprise_id=S, month=D, insured_headcount=pl.Int32(), available_at=UTC_US,
        ),
        _table(
            "payments", True,
            "Monthly payment flows (交易支付) on the payment network: inflow, outflow, number of "
            "counterparties and the largest counterparty's share.",
            enterprise_id=S, month=D, inflow=F8, outflow=F8, counterparties=pl.Int32(),
            top_counterparty_share=F8, available_at=UTC_US,
        ),
        _table(
            "receivables_payables", True,
            "Monthly receivables and payables (应收应付) reported by enterprises: receivables, "
            "overdue receivables, payables and days payable.",
            enterprise_id=S, month=D, receivables=F8, overdue_receivables=F8, payables=F8,
            days_payable=F8, available_at=UTC_US,
        ),
        _table(
            "judicial_events", False,
            "Court and administrative records (司法与处罚): lawsuits as defendant, enforcement, "
            "dishonest-debtor listings and penalties, one row per event with its amount.",
            enterprise_id=S, event_type=S, event_date=D, amount=F8, available_at=UTC_US,
        ),
        _table(
            "credit_history", True,
            "Monthly credit reports (征信) of banks, microloan and guarantee companies, one row "
            "per enterprise, month and reporter type.",
            enterprise_id=S, month=D, reporter_type=S, loans=pl.Int16(), balance=F8, dpd30=B,
            dpd90=B, guarantee_compensations=pl.Int16(), available_at=UTC_US,
        ),
        _table(
            "applications", False,
            "Applications for microloans, guarantees and insurance, with their outcome (null "
            "until the outcome window has matured).",
            application_id=S, enterprise_id=S, product=S, applied_at=UTC_US,
            requested_amount=F8, term_months=pl.Int16(), outcome_window_months=pl.Int16(),
            outcome_known_at=UTC_US, outcome=pl.Int8(), matured=B,
        ),
        _table(
            "oracle", False,
            "The simulator's true default probability of each application (no real system has "
            "it; never a feature).",
            application_id=S, product=S, pd_true=F8,
        ),
        _table(
            "credit_aggregates", True,
            "Monthly credit aggregates the system publishes from the lenders' own reports "
            "(征信统计): credit reports, 30+ and 90+ days past due, and their rates, for the city, "
            "each district and each industry section.",
            regional=True,
            month=D, dimension=S, segment=S, reports=pl.Int32(), dpd30_reports=pl.Int32(),
            dpd90_reports=pl.Int32(), dpd30_rate=F8, dpd90_rate=F8, available_at=UTC_US,
        ),
    )
}  # fmt: skip

TABLES: tuple[str, ...] = tuple(RAW_TABLES)
MONTHLY_TABLES: tuple[str, ...] = tuple(t.name for t in RAW_TABLES.values() if t.monthly)
# per enterprise, split into chunks of enterprises / about the whole region, one file per period
ENTERPRISE_TABLES: tuple[str, ...] = tuple(t.name for t in RAW_TABLES.values() if not t.regional)
REGIONAL_TABLES: tuple[str, ...] = tuple(t.name for t in RAW_TABLES.values() if t.regional)

# Day of the month after month m on which the big-data system publishes month m of each monthly
# table (its rows' available_at); feature snapshots of month m are cut on these days.
PUBLICATION_DAY: dict[str, int] = {
    "payments": 3,
    "electricity": 5,
    "social_insurance": 10,
    "credit_history": 10,
    "tax": 15,
    "receivables_payables": 20,
    "credit_aggregates": 25,
}

# credit_aggregates.dimension -> what its `segment` holds: "all" for the city, a district's English
# name (as registration.district) or an industry section code (as registration.industry)
AGGREGATE_DIMENSIONS: dict[str, str | None] = {"city": None, "district": "district",
                                               "industry": "industry"}  # fmt: skip
CITY_SEGMENT = "all"


# -- values of the coded columns -----------------------------------------------------------------
# What the coded columns hold, with each value's name in English and Chinese (features.labels
# shows them to people; the simulator draws from them).
Names = tuple[str, str]  # (English, Chinese)

# registration.industry: a section (门类) of GB/T 4754-2017, the national industry classification.
INDUSTRY_SECTIONS: dict[str, Names] = {
    "A": ("Agriculture, forestry, animal husbandry, fishery", "农、林、牧、渔业"),
    "B": ("Mining", "采矿业"),
    "C": ("Manufacturing", "制造业"),
    "D": ("Electricity, heat, gas and water production and supply",
          "电力、热力、燃气及水生产和供应业"),
    "E": ("Construction", "建筑业"),
    "F": ("Wholesale and retail trade", "批发和零售业"),
    "G": ("Transport, storage and postal services", "交通运输、仓储和邮政业"),
    "H": ("Accommodation and catering", "住宿和餐饮业"),
    "I": ("Information transmission, software and IT services", "信息传输、软件和信息技术服务业"),
    "J": ("Finance", "金融业"),
    "K": ("Real estate", "房地产业"),
    "L": ("Leasing and business services", "租赁和商务服务业"),
    "M": ("Scientific research and technical services", "科学研究和技术服务业"),
    "N": ("Water conservancy, environment and public facilities management",
          "水利、环境和公共设施管理业"),
    "O": ("Resident services, repair and other services", "居民服务、修理和其他服务业"),
    "P": ("Education", "教育"),
    "Q": ("Health and social work", "卫生和社会工作"),
    "R": ("Culture, sports and entertainment", "文化、体育和娱乐业"),
    "S": ("Public administration, social security and social organisations",
          "公共管理、社会保障和社会组织"),
    "T": ("International organisations", "国际组织"),
}  # fmt: skip

# registration.district: a district of Guangzhou (广州市) by its English name, as (administrative
# division code, i.e. digits 3-8 of a USCC; English name; Chinese name).
DISTRICTS: tuple[tuple[str, str, str], ...] = (
    ("440103", "Liwan", "荔湾区"),
    ("440104", "Yuexiu", "越秀区"),
    ("440105", "Haizhu", "海珠区"),
    ("440106", "Tianhe", "天河区"),
    ("440111", "Baiyun", "白云区"),
    ("440112", "Huangpu", "黄埔区"),
    ("440113", "Panyu", "番禺区"),
    ("440114", "Huadu", "花都区"),
    ("440115", "Nansha", "南沙区"),
    ("440117", "Conghua", "从化区"),
    ("440118", "Zengcheng", "增城区"),
)

# registration.size_class: the enterprise size class (中小企业划型标准).
SIZE_CLASSES: dict[str, Names] = {
    "micro": ("micro", "微型"),
    "small": ("small", "小型"),
    "medium": ("medium", "中型"),
    "large": ("large", "大型"),
}

# tax_credit_rating.rating, best to worst; M is for newly established firms.
TAX_RATINGS: tuple[str, ...] = ("A", "B", "M", "C", "D")


def raw_table(name: str) -> RawTable:
    try:
        return RAW_TABLES[name]
    except KeyError:
        raise RawTableError(
            f"unknown raw table {name!r}: the raw tables are {', '.join(TABLES)}"
        ) from None


# -- layout --------------------------------------------------------------------------------------
def chunk_name(chunk: int) -> str:
    """The file name of chunk `chunk` (also used for the feature tables built from it)."""
    return f"part-{chunk:04d}.parquet"


def period_name(month: date) -> str:
    return f"period={month:%Y-%m}"


def part_path(raw: Path, table: str, chunk: int | None, month: date | None = None) -> Path:
    """Where chunk `chunk` of `table` is written; a monthly table needs the `month` too, a
    regional table has no chunks (`chunk` None)."""
    spec = raw_table(table)
    if spec.monthly != (month is not None):
        need = "needs the month" if spec.monthly else "has no month folders"
        raise RawTableError(f"raw table {table} {need}")
    _check_chunk(table, chunk, required=True)
    folder = raw / table / period_name(month) if month is not None else raw / table
    return folder / (REGIONAL_FILE if chunk is None else chunk_name(chunk))


def _check_chunk(table: str, chunk: int | None, required: bool) -> None:
    regional = raw_table(table).regional
    if regional and chunk is not None:
        raise RawTableError(
            f"raw table {table} is regional: one file per period, not split into chunks of "
            "enterprises (read it whole)"
        )
    if required and not regional and chunk is None:
        raise RawTableError(f"raw table {table} is written chunk by chunk: give the chunk")


def _glob(table: str, chunk: int | None) -> str:
    """Files of one chunk (or all), relative to the table's folder."""
    _check_chunk(table, chunk, required=False)
    name = "*.parquet" if chunk is None else chunk_name(chunk)
    return f"*/{name}" if raw_table(table).monthly else name


# -- checking ------------------------------------------------------------------------------------
def check_schema(table: str, schema: pl.Schema | dict[str, pl.DataType], where: str) -> None:
    """Raise RawTableError naming the table, `where` (a file, or what is being written) and the
    column when `schema` lacks a column of the contract or has it with another dtype."""
    spec = raw_table(table)
    for column, dtype in spec.schema.items():
        if column not in schema:
            have = ", ".join(schema) or "none"
            raise RawTableError(
                f"raw table {table}: {where} has no column {column!r} "
                f"(expected {dtype}; its columns: {have})"
            )
        if schema[column] != dtype:
            raise RawTableError(
                f"raw table {table}: {where}: column {column!r} is {schema[column]}, "
                f"expected {dtype}"
            )


def check_frame(table: str, frame: pl.DataFrame, where: str = "frame to write") -> None:
    """What a writer checks before writing: the contract's columns, dtypes and order, no more."""
    check_schema(table, frame.schema, where)
    expected = list(raw_table(table).schema)
    if frame.columns != expected:
        raise RawTableError(
            f"raw table {table}: {where} has columns {frame.columns}, expected exactly {expected}"
        )


def check_files(raw: Path, table: str, chunk: int | None = None) -> list[Path]:
    """The files `scan` would read, each checked against the contract (footers only). A
    regional table is read whole: asking it for a chunk is an error."""
    raw_table(table)
    folder = raw / table
    files = sorted(folder.glob(_glob(table, chunk)))
    if not files:
        what = "any chunk" if chunk is None else chunk_name(chunk)
        raise FileNotFoundError(
            f"raw table {table}: no files for {what} under {folder} "
            f"(expected {raw_table(table).layout})"
        )
    for path in files:
        try:
            schema = pl.read_parquet_schema(path)
        except Exception as e:  # not a Parquet file, truncated, unreadable
            raise RawTableError(f"raw table {table}: cannot read {path}: {e}") from e
        check_schema(table, schema, str(path))
    return files


# -- reading -------------------------------------------------------------------------------------
def scan(raw: Path, table: str, chunk: int | None = None) -> pl.LazyFrame:
    """Lazily read one raw table, all chunks or one, with exactly the contract's columns.

    Every file is checked first: a missing column or a wrong dtype raises RawTableError naming
    the table, the file and the column; extra columns a file may carry are not read.
    """
    check_files(raw, table, chunk)
    return pl.scan_parquet(
        str(raw / table / _glob(table, chunk)),
        hive_partitioning=False,
        schema=raw_table(table).schema,
        extra_columns="ignore",
    )


def read_manifest(raw: Path) -> dict:
    """The raw folder's manifest (MANIFEST_KEYS): how many chunks, months, from when."""
    path = raw / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no simulated data at {raw}: run `kapok data generate` first (missing {MANIFEST})"
        )
    manifest = json.loads(path.read_text())
    missing = [key for key in READ_KEYS if key not in manifest]
    if missing:
        raise RawTableError(f"{path} lacks {', '.join(missing)} (see features.raw_tables)")
    return manifest


def enterprise_ids(raw: Path) -> pl.Series:
    """Every enterprise of the raw folder, in file order (registration has one row each)."""
    return scan(raw, "registration").select("enterprise_id").collect().to_series()
