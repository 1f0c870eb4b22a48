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
    direction = 1                        # -1, 0 or 1; optional, default 0
    [features.purpose]
    categorical = true                   # optional, default false; requires direction 0
    description = "..."                  # optional

`load_dataset` returns the id column, the timestamp (if any), the features in spec order, the
segment columns that are not features, and `label` (Int8: 1 = bad, 0 = otherwise). Categorical
features are returned as `pl.String` (not `pl.Categorical`), so frames from different files and
train/score splits never disagree on a categorical dictionary; encode them downstream.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

__all__ = [
    "LABEL",
    "ROW_ID",
    "DatasetSpec",
    "FeatureSpec",
    "SpecError",
    "load_dataset",
    "load_spec",
]

log = logging.getLogger(__name__)

ROW_ID = "row_id"
"""Name of the id column added when the spec declares no `id`."""
LABEL = "label"
"""Name of the 0/1 target column in the frame returned by `load_dataset`."""
SUPPORTED_SUFFIXES = (".csv", ".parquet")

_TOP_KEYS = {"name", "description", "path", "id", "timestamp", "segments", "label", "features"}
_LABEL_KEYS = {"column", "bad"}
_FEATURE_KEYS = {"direction", "categorical", "description"}


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

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def categorical_features(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.categorical)


def _type_name(value: object) -> str:
    return type(value).__name__


def _opt_str(table: dict[str, Any], key: str, field: str, where: str) -> str | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, str):
        raise SpecError(f"{where}: {field} must be a string, got {_type_name(value)} {value!r}")
    if not value.strip():
        raise SpecError(f"{where}: {field} must not be empty")
    return value


def _req_str(table: dict[str, Any], key: str, field: str, where: str) -> str:
    value = _opt_str(table, key, field, where)
    if value is None:
        raise SpecError(f"{where}: missing required key {field}")
    return value


def _parse_feature(name: str, raw: object, where: str) -> FeatureSpec:
    field = f"features.{name}"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: {field} must be a table, got {_type_name(raw)} {raw!r}")
    unknown = sorted(set(raw) - _FEATURE_KEYS)
    if unknown:
        raise SpecError(
            f"{where}: unknown key(s) in {field}: {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(_FEATURE_KEYS))})"
        )
    direction = raw.get("direction", 0)
    if isinstance(direction, bool) or not isinstance(direction, int) or direction not in (-1, 0, 1):
        raise SpecError(f"{where}: {field}.direction must be -1, 0 or 1, got {direction!r}")
    categorical = raw.get("categorical", False)
    if not isinstance(categorical, bool):
        raise SpecError(f"{where}: {field}.categorical must be true or false, got {categorical!r}")
    if categorical and direction != 0:
        raise SpecError(
            f"{where}: {field}.direction must be 0 for a categorical feature, got {direction}"
        )
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"{where}: {field}.description must be a string, got {description!r}")
    return FeatureSpec(name, direction, categorical, description)


def load_spec(path: str | Path) -> DatasetSpec:
    """Parse and validate a dataset spec; every problem is raised as a `SpecError` up front."""
    source = Path(path).resolve()
    where = source.name
    try:
        with source.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise SpecError(f"{where}: spec file not found: {source}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{where}: invalid TOML: {exc}") from exc

    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise SpecError(
            f"{where}: unknown top-level key(s): {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(_TOP_KEYS))})"
        )

    name = _req_str(raw, "name", "name", where)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"{where}: description must be a string, got {description!r}")
    rel_path = _req_str(raw, "path", "path", where)
    id_column = _opt_str(raw, "id", "id", where)
    timestamp_column = _opt_str(raw, "timestamp", "timestamp", where)

    # [label]
    if "label" not in raw:
        raise SpecError(f"{where}: missing required table [label]")
    label = raw["label"]
    if not isinstance(label, dict):
        raise SpecError(f"{where}: label must be a table, got {_type_name(label)} {label!r}")
    unknown = sorted(set(label) - _LABEL_KEYS)
    if unknown:
        raise SpecError(
            f"{where}: unknown key(s) in label: {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(_LABEL_KEYS))})"
        )
    label_column = _req_str(label, "column", "label.column", where)
    if "bad" not in label:
        raise SpecError(f"{where}: missing required key label.bad")
    bad_value = label["bad"]
    if not isinstance(bad_value, str | int | float | bool):
        raise SpecError(
            f"{where}: label.bad must be a string, number or boolean, "
            f"got {_type_name(bad_value)} {bad_value!r}"
        )

    # [features.*]
    if "features" not in raw:
        raise SpecError(f"{where}: missing required table [features]")
    features_raw = raw["features"]
    if not isinstance(features_raw, dict):
        raise SpecError(f"{where}: features must be a table of [features.<column>] tables")
    if not features_raw:
        raise SpecError(f"{where}: features must declare at least one feature")
    features = tuple(_parse_feature(k, v, where) for k, v in features_raw.items())

    # segments
    segments_raw = raw.get("segments", [])
    if not isinstance(segments_raw, list) or not all(isinstance(s, str) for s in segments_raw):
        raise SpecError(f"{where}: segments must be a list of column names, got {segments_raw!r}")
    if len(set(segments_raw)) != len(segments_raw):
        raise SpecError(f"{where}: segments contains duplicates: {segments_raw!r}")

    # column roles must not collide
    id_name = id_column or ROW_ID
    roles = {"label.column": label_column, "id": id_name, "timestamp": timestamp_column}
    roles_seen: dict[str, str] = {}
    for field, col in roles.items():
        if col is None:
            continue
        if col in roles_seen:
            raise SpecError(f"{where}: {field} and {roles_seen[col]} both name column {col!r}")
        roles_seen[col] = field
    for feat in features:
        if feat.name in roles_seen:
            raise SpecError(
                f"{where}: features.{feat.name} is also declared as {roles_seen[feat.name]}"
            )
    outputs = [("id", id_name), ("timestamp", timestamp_column)]
    outputs += [(f"features.{f.name}", f.name) for f in features]
    outputs += [("segments", s) for s in segments_raw]
    for field, col in outputs:
        if col == LABEL:
            raise SpecError(f"{where}: {field}: {LABEL!r} is reserved for the 0/1 target column")
        if col == label_column and field == "segments":
            raise SpecError(f"{where}: segments: {col!r} is the label column")

    # data file
    data_path = (source.parent / rel_path).resolve()
    if data_path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise SpecError(
            f"{where}: path {rel_path!r} has unsupported extension {data_path.suffix!r} "
            f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    if not data_path.is_file():
        raise SpecError(f"{where}: path {rel_path!r} does not exist (resolved to {data_path})")

    return DatasetSpec(
        name=name,
        description=description,
        path=data_path,
        id_column=id_column,
        timestamp_column=timestamp_column,
        label_column=label_column,
        bad_value=bad_value,
        features=features,
        segments=tuple(segments_raw),
        source=source,
    )


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
        elif dtype == pl.String or dtype == pl.Categorical or isinstance(dtype, pl.Enum):
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
