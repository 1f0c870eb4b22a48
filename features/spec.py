"""Bring-your-own-data dataset specs: a small TOML file that names a CSV/Parquet file, its label,
id, timestamp, features and segments, and a loader that turns it into a validated polars frame.

Spec format (paths are relative to the spec file's folder)::

    name = "german_credit"
    description = "..."                  # optional
    path = "german_credit.csv"           # .csv or .parquet
    id = "row_id"                        # optional; omitted -> a UInt32 `row_id` (file row number)
    timestamp = "applied_at"             # optional; strings are parsed to Datetime
    segments = ["purpose"]               # optional; columns for per-segment reports
    [label]
    column = "creditability"
    bad = "bad"                          # the value meaning bad (string, number or boolean)
    [features.duration_in_month]
    direction = 1                        # -1, 0 or 1; optional, default 0 (no constraint)
    [features.purpose]
    categorical = true                   # optional, default false; requires direction 0
    description = "..."                  # optional

Or every column of the file but a listed few (a file with dozens of columns)::

    features = "*"                       # every column but label, id, timestamp and exclude
    exclude = ["customer_name", "decision_note"]

`features = "*"` is short for a table `[features."*"]` with no keys; written as that table, it
can sit next to `[features.<column>]` tables that annotate or override single columns (a
direction, a description, `categorical = true` on a numeric code), e.g.::

    exclude = ["customer_name"]
    [features."*"]
    [features.debt_ratio]
    direction = 1

With `*`, features come in the file's column order; a column that reads as text is categorical
unless its table says otherwise; numbers and booleans are numeric; an undeclared direction is 0,
so LightGBM gets no monotone constraint for it; segment columns are features too unless
excluded; a date or nested column must be excluded (or be the timestamp).

`load_dataset` returns the id column, the timestamp (if any), the features in spec order, the
segment columns that are not features, and `label` (Int8: 1 = bad, 0 = otherwise). Categorical
features are returned as `pl.String` (not `pl.Categorical`), so frames from different files and
train/score splits never disagree on a categorical dictionary; encode them downstream.
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import polars as pl
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "LABEL",
    "ROW_ID",
    "DatasetSpec",
    "FeatureSpec",
    "SpecError",
    "SpecFile",
    "load_dataset",
    "load_spec",
]

log = logging.getLogger(__name__)

ROW_ID = "row_id"
"""Name of the id column added when the spec declares no `id`."""
LABEL = "label"
"""Name of the 0/1 target column in the frame returned by `load_dataset`."""
SUPPORTED_SUFFIXES = (".csv", ".parquet")
EVERY_COLUMN = "*"
"""The feature name that stands for every column not named elsewhere (`features = "*"`)."""


class SpecError(ValueError):
    """A dataset spec, or the data it points at, is invalid. The message names file and field."""


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    direction: int = 0
    """Risk direction: +1 = higher value means riskier, -1 = safer, 0 = unknown / no constraint."""
    categorical: bool = False
    description: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    path: Path
    """Absolute, resolved path of the data file."""
    id_column: str | None
    timestamp_column: str | None
    label_column: str
    bad_value: str | int | float | bool
    features: tuple[FeatureSpec, ...]
    segments: tuple[str, ...]
    source: Path
    """Absolute, resolved path of the spec file itself."""
    every_column: bool = False
    """`features = "*"`: the features are the file's columns but `excluded` and the roles."""
    excluded: tuple[str, ...] = ()

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def categorical_features(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.categorical)


def _star_hint(source: Path) -> str:
    """TOML cannot hold both `features = "*"` and `[features.<column>]` tables: say what can."""
    text = source.read_text(errors="replace")
    star = re.search(r"""^\s*features\s*=\s*["']\*["']""", text, re.MULTILINE)
    if star and re.search(r"^\s*\[\s*features\s*\.", text, re.MULTILINE):
        return (
            f'; next to [features.<column>] tables, write [features."{EVERY_COLUMN}"] instead '
            f'of features = "{EVERY_COLUMN}"'
        )
    return ""


def _type_name(value: object) -> str:
    return type(value).__name__


# -- the spec file, as pydantic checks it (`SpecFile.model_json_schema()` is its schema) ----------
class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_Text = Annotated[str, Field(strict=True, pattern=r"\S")]  # not empty or blank
_Str = Annotated[str, Field(strict=True)]


class _Label(_Frozen):
    column: _Text
    bad: str | int | float | bool  # the value meaning bad


class _Feature(_Frozen):
    # before direction, which reads it; None: not said (false, or from the dtype with "*")
    categorical: Annotated[bool | None, Field(strict=True)] = None
    direction: Literal[-1, 0, 1] = 0
    description: _Str = ""

    @field_validator("direction", mode="before")
    @classmethod
    def _direction(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, bool | float):  # the Literal would read true and 1.0 as 1
            raise ValueError(f"must be -1, 0 or 1, got {value!r}")
        if info.data.get("categorical") and value != 0:
            raise ValueError(f"must be 0 for a categorical feature, got {value!r}")
        return value


class SpecFile(_Frozen):
    """A dataset spec as written (see the module docs)."""

    name: _Text
    description: _Str = ""
    path: _Text
    id: _Text | None = None
    timestamp: _Text | None = None
    segments: Annotated[list[str], Field(strict=True)] = []
    label: _Label
    features: dict[str, _Feature] = Field(min_length=1)
    exclude: Annotated[list[str], Field(strict=True)] = []  # only with "*"

    @model_validator(mode="before")
    @classmethod
    def _every_column(cls, data: object) -> object:
        """`features = "*"` is the table `[features."*"]` with no keys."""
        if isinstance(data, dict) and isinstance(data.get("features"), str):
            if data["features"] != EVERY_COLUMN:
                raise ValueError(
                    f'features must be "{EVERY_COLUMN}" (every column) or a table of '
                    f"[features.<column>] tables, got {data['features']!r}"
                )
            return {**data, "features": {EVERY_COLUMN: {}}}
        return data

    @model_validator(mode="after")
    def _roles(self) -> SpecFile:
        """Each column has one role, and none takes the name of the 0/1 target."""
        if len(set(self.segments)) != len(self.segments):
            raise ValueError(f"segments contains duplicates: {self.segments!r}")
        if EVERY_COLUMN in self.features:
            if self.features[EVERY_COLUMN].model_fields_set:
                keys = ", ".join(sorted(self.features[EVERY_COLUMN].model_fields_set))
                raise ValueError(
                    f'features."{EVERY_COLUMN}" takes no keys (it stands for every column not '
                    f"named elsewhere), got {keys}; give a column its own [features.<column>]"
                )
            if len(set(self.exclude)) != len(self.exclude):
                raise ValueError(f"exclude contains duplicates: {self.exclude!r}")
            both = [c for c in self.exclude if c in self.features]
            if both:
                raise ValueError(f"exclude names {both[0]!r}, which has a [features] table too")
        elif self.exclude:
            raise ValueError(
                f'exclude is only used with features = "{EVERY_COLUMN}" (every other column)'
            )
        id_name = self.id or ROW_ID
        roles = {"label.column": self.label.column, "id": id_name, "timestamp": self.timestamp}
        seen: dict[str, str] = {}
        for field, col in roles.items():
            if col is not None and seen.setdefault(col, field) != field:
                raise ValueError(f"{field} and {seen[col]} both name column {col!r}")
        named = [f for f in self.features if f != EVERY_COLUMN]
        for name in named:
            if name in seen:
                raise ValueError(f"features.{name} is also declared as {seen[name]}")
        outputs = [("id", id_name), ("timestamp", self.timestamp)]
        outputs += [(f"features.{f}", f) for f in named]
        outputs += [("segments", s) for s in self.segments]
        for field, col in outputs:
            if col == LABEL:
                raise ValueError(f"{field}: {LABEL!r} is reserved for the 0/1 target column")
            if col == self.label.column and field == "segments":
                raise ValueError(f"segments: {col!r} is the label column")
        return self


_MUST = {  # pydantic's error type -> what the value must do; otherwise pydantic's own words
    "string_type": "be a string",
    "string_pattern_mismatch": "be a non-empty string",
    "bool_type": "be true or false",
    "list_type": "be a list of column names",  # segments is the only list
    "dict_type": "be a table",
    "model_type": "be a table",
}


def _problem(error: ValidationError) -> str:
    """The spec's first problem as one line naming the field (no pydantic URL); unknown keys
    first, all of one table's at once (a misspelt key also leaves a required key missing)."""
    errors = error.errors()
    unknown = [e["loc"] for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        table = unknown[0][:-1]
        keys = ", ".join(str(loc[-1]) for loc in unknown if loc[:-1] == table)
        model = (SpecFile, _Label, _Feature)[len(table)]  # top level, [label], [features.<col>]
        where = f"key(s) in {_path(table)}" if table else "top-level key(s)"
        return f"unknown {where}: {keys} (allowed: {', '.join(sorted(model.model_fields))})"
    e = errors[0]
    loc, kind, path = e["loc"], e["type"], _path(e["loc"])
    if kind == "missing":
        table = loc in (("label",), ("features",))
        return f"missing required table [{path}]" if table else f"missing required key {path}"
    if kind == "too_short":  # [features] is the only table with a minimum
        return f"{path} must declare at least one feature"
    if kind == "value_error":  # a rule of ours: the field validators' words follow the path
        return f"{path} {e['ctx']['error']}".strip()
    if loc[:2] == ("label", "bad"):  # every type of the union refused it
        return f"label.bad must be a string, number or boolean, got {e['input']!r}"
    must = _MUST.get(kind) or "be " + e["msg"].removeprefix("Input should be ")
    return f"{path} must {must}, got {e['input']!r}"


def _path(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".")


def load_spec(path: str | Path) -> DatasetSpec:
    """Parse and validate a dataset spec; every problem is raised as a `SpecError` up front."""
    source = Path(path).resolve()
    where = source.name
    try:
        with source.open("rb") as fh:
            spec = SpecFile.model_validate(tomllib.load(fh))
    except FileNotFoundError:
        raise SpecError(f"{where}: spec file not found: {source}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{where}: invalid TOML: {exc}{_star_hint(source)}") from exc
    except ValidationError as exc:
        raise SpecError(f"{where}: {_problem(exc)}") from None

    data_path = (source.parent / spec.path).resolve()
    if data_path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise SpecError(
            f"{where}: path {spec.path!r} has unsupported extension {data_path.suffix!r} "
            f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    if not data_path.is_file():
        raise SpecError(f"{where}: path {spec.path!r} does not exist (resolved to {data_path})")

    if EVERY_COLUMN in spec.features:
        features = _every_column(where, data_path, spec)
    else:
        features = tuple(
            FeatureSpec(name, f.direction, bool(f.categorical), f.description)
            for name, f in spec.features.items()
        )
    return DatasetSpec(
        name=spec.name,
        description=spec.description,
        path=data_path,
        id_column=spec.id,
        timestamp_column=spec.timestamp,
        label_column=spec.label.column,
        bad_value=spec.label.bad,
        features=features,
        segments=tuple(spec.segments),
        source=source,
        every_column=EVERY_COLUMN in spec.features,
        excluded=tuple(spec.exclude),
    )


def _textual(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)


def _schema(where: str, data_path: Path) -> pl.Schema:
    """The data file's columns and dtypes, inferred as `load_dataset` reads them."""
    try:
        if data_path.suffix.lower() == ".parquet":
            return pl.read_parquet_schema(data_path)
        return pl.scan_csv(data_path, infer_schema_length=None).collect_schema()
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise SpecError(f"{where}: cannot read {data_path.name}: {exc}") from exc


def _every_column(where: str, data_path: Path, spec: SpecFile) -> tuple[FeatureSpec, ...]:
    """`features = "*"`: the file's columns, in its order, but the label, id, timestamp and
    `exclude`; a `[features.<column>]` table annotates or overrides its column."""
    schema = _schema(where, data_path)
    named = {name: f for name, f in spec.features.items() if name != EVERY_COLUMN}
    unknown = [(c, "exclude") for c in spec.exclude if c not in schema]
    unknown += [(c, f"features.{c}") for c in named if c not in schema]
    if unknown:
        listed = ", ".join(f"{col!r} ({field})" for col, field in unknown)
        raise SpecError(
            f"{where}: column(s) named in the spec are missing from {data_path.name}: {listed}; "
            f"available columns: {', '.join(schema)}"
        )
    roles = {spec.label.column, spec.id, spec.timestamp}
    features, unusable = [], []
    for name, dtype in schema.items():
        if name in roles or name in spec.exclude:
            continue
        given = named.get(name, _Feature())
        if name == LABEL:
            raise SpecError(
                f'{where}: features = "{EVERY_COLUMN}" takes column {LABEL!r}, a name reserved '
                f"for the 0/1 target column: add it to exclude"
            )
        categorical = _textual(dtype) if given.categorical is None else given.categorical
        if name not in named and not (
            categorical or dtype.is_numeric() or dtype in (pl.Boolean, pl.Null)
        ):
            unusable.append(f"{name} ({dtype})")
            continue
        if categorical and given.direction != 0:
            raise SpecError(
                f"{where}: features.{name}.direction must be 0 for a categorical feature "
                f"(column {name!r} reads as {dtype}), got {given.direction}"
            )
        features.append(FeatureSpec(name, given.direction, categorical, given.description))
    if unusable:
        raise SpecError(
            f'{where}: features = "{EVERY_COLUMN}" takes column(s) that cannot be features: '
            f"{', '.join(unusable)}; add them to exclude (or name one as the timestamp)"
        )
    if not features:
        raise SpecError(
            f'{where}: features = "{EVERY_COLUMN}" leaves no feature column in {data_path.name} '
            f"once the label, id, timestamp and exclude are taken out"
        )
    return tuple(features)


def _read(spec: DatasetSpec) -> pl.DataFrame:
    where = spec.source.name
    try:
        if spec.path.suffix.lower() == ".parquet":
            return pl.read_parquet(spec.path)
        return pl.read_csv(spec.path, infer_schema_length=None)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise SpecError(f"{where}: cannot read {spec.path.name}: {exc}") from exc


def _bad_value_matches(dtype: pl.DataType, bad: object) -> bool:
    if dtype == pl.Boolean:
        return isinstance(bad, bool)
    if isinstance(bad, bool):
        return False
    if dtype.is_numeric():
        return isinstance(bad, int | float)
    if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
        return isinstance(bad, str)
    return False


def load_dataset(spec: DatasetSpec) -> pl.DataFrame:
    """Read the spec's data file and return the validated modelling frame (see module docs)."""
    where = spec.source.name
    df = _read(spec)

    declared: list[tuple[str, str]] = [(spec.label_column, "label.column")]
    if spec.id_column is not None:
        declared.append((spec.id_column, "id"))
    if spec.timestamp_column is not None:
        declared.append((spec.timestamp_column, "timestamp"))
    declared += [(f.name, f"features.{f.name}") for f in spec.features]
    declared += [(s, "segments") for s in spec.segments]
    missing = [(col, field) for col, field in declared if col not in df.columns]
    if missing:
        listed = ", ".join(f"{col!r} ({field})" for col, field in missing)
        raise SpecError(
            f"{where}: column(s) declared in the spec are missing from {spec.path.name}: "
            f"{listed}; available columns: {', '.join(df.columns)}"
        )

    # id: declared -> must be unique and non-null; absent -> row number in the file
    if spec.id_column is None:
        if ROW_ID in df.columns:
            raise SpecError(
                f"{where}: id is not declared but {spec.path.name} already has a {ROW_ID!r} "
                f'column; declare id = "{ROW_ID}" or rename it'
            )
        df = df.with_row_index(ROW_ID)
        id_name = ROW_ID
    else:
        id_name = spec.id_column
        ids = df.get_column(id_name)
        if ids.null_count() or ids.n_unique() != df.height:
            raise SpecError(
                f"{where}: id column {id_name!r} must be unique and non-null "
                f"({ids.null_count()} nulls, {df.height - ids.n_unique()} duplicates)"
            )

    # label: drop null rows, check the bad value's type and that both classes occur
    label_col = df.get_column(spec.label_column)
    n_null = label_col.null_count()
    if n_null:
        log.warning(
            "%s: dropped %d of %d rows with a null label in column %r",
            where,
            n_null,
            df.height,
            spec.label_column,
        )
        df = df.filter(pl.col(spec.label_column).is_not_null())
        label_col = df.get_column(spec.label_column)
    if not _bad_value_matches(label_col.dtype, spec.bad_value):
        raise SpecError(
            f"{where}: label.bad is {_type_name(spec.bad_value)} {spec.bad_value!r} but label "
            f"column {spec.label_column!r} has dtype {label_col.dtype}"
        )
    is_bad = label_col == spec.bad_value
    n_bad = int(is_bad.sum())
    if n_bad == 0 or n_bad == df.height:
        seen = label_col.unique().sort().head(10).to_list()
        what = "does not occur" if n_bad == 0 else "is the only value"
        raise SpecError(
            f"{where}: label.bad value {spec.bad_value!r} {what} in column "
            f"{spec.label_column!r} (values seen: {seen}); need both bad and non-bad rows"
        )

    # timestamp: strings parsed to Datetime, dates widened, other dtypes rejected
    exprs: list[pl.Expr] = [pl.col(id_name)]
    if spec.timestamp_column is not None:
        ts = spec.timestamp_column
        dtype = df.schema[ts]
        if dtype == pl.String:
            try:
                parsed = df.get_column(ts).str.to_datetime(strict=True)
            except pl.exceptions.PolarsError as exc:
                raise SpecError(
                    f"{where}: timestamp column {ts!r} cannot be parsed as a datetime: "
                    f"{str(exc).splitlines()[0]}"
                ) from exc
            df = df.with_columns(parsed)
        elif dtype == pl.Date:
            df = df.with_columns(pl.col(ts).cast(pl.Datetime))
        elif not isinstance(dtype, pl.Datetime):
            raise SpecError(
                f"{where}: timestamp column {ts!r} must be a string, date or datetime, got {dtype}"
            )
        exprs.append(pl.col(ts))

    # features: categoricals as String; a string feature not marked categorical is a spec error
    for feat in spec.features:
        dtype = df.schema[feat.name]
        if feat.categorical:
            exprs.append(pl.col(feat.name).cast(pl.String))
        elif _textual(dtype):
            raise SpecError(
                f"{where}: features.{feat.name}: column has dtype {dtype}; mark it "
                f"categorical = true (or fix the data so it reads as numeric)"
            )
        else:
            exprs.append(pl.col(feat.name))

    taken = {id_name, spec.timestamp_column, *spec.feature_names}
    exprs += [pl.col(s) for s in spec.segments if s not in taken]
    label = (pl.col(spec.label_column) == pl.lit(spec.bad_value)).cast(pl.Int8).alias(LABEL)
    return df.select([*exprs, label])
