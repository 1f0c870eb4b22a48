"""Append-only log of every lending decision, written before the API responds.
SQLite at $KAPOK_HOME/decisions/decisions.db, or the SQLAlchemy URL in KAPOK_DECISION_LOG."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.types import TypeDecorator

from kapok.settings import paths

if TYPE_CHECKING:
    import polars as pl

ENV_VAR = "KAPOK_DECISION_LOG"
ENDPOINTS = frozenset({"score", "limit", "price", "screen"})
APPEND_ONLY_MESSAGE = "decision log is append-only"

_JSON_FIELDS = ("request", "features", "feature_timestamps", "price", "reasons", "response")
_ADVISORY_LOCK_KEY = 7_460_318_214  # serialises schema set-up across API workers (PostgreSQL)


class DecisionLogError(RuntimeError):
    """The decision could not be logged (or read back); the API answers 503."""


@dataclass(frozen=True)
class DecisionRecord:
    """One lending decision as logged; dict/list fields are plain Python objects."""

    request_id: str
    decided_at: dt.datetime  # an aware datetime or ISO 8601 text with offset; stored as UTC
    caller: str
    endpoint: str
    enterprise_id: str
    product: str
    request: dict[str, Any]
    model_name: str
    model_version: str
    features: dict[str, Any]
    feature_timestamps: dict[str, Any]
    pd: float
    score: float
    grade: str
    decision: str
    limit_amount: float | None
    price: dict[str, Any] | None
    reasons: list[Any]
    response: dict[str, Any]

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(
                f"DecisionRecord.endpoint must be one of {sorted(ENDPOINTS)}, got {self.endpoint!r}"
            )
        at = self.decided_at
        if isinstance(at, str):
            try:
                at = dt.datetime.fromisoformat(at)
            except ValueError as e:
                raise ValueError(f"DecisionRecord.decided_at: not ISO 8601: {at!r}") from e
        if not isinstance(at, dt.datetime) or at.tzinfo is None:
            raise ValueError(
                "DecisionRecord.decided_at must be a timezone-aware datetime or ISO text "
                f"with an offset, got {self.decided_at!r}"
            )
        object.__setattr__(self, "decided_at", at.astimezone(dt.UTC))


def new_request_id() -> str:
    """A fresh request id: 'req_' + uuid4 hex."""
    return "req_" + uuid.uuid4().hex


def default_url() -> str:
    """KAPOK_DECISION_LOG if set, else SQLite at $KAPOK_HOME/decisions/decisions.db."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value:
        return value
    return f"sqlite:///{paths().home / 'decisions' / 'decisions.db'}"


def json_safe(value: Any) -> Any:
    """Plain JSON values: NaN/inf → None, numpy scalars/arrays → Python, datetimes → ISO text."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if type(value).__name__ in ("NAType", "NaTType"):  # pandas missing values
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return json_safe(float(value))
    if hasattr(value, "tolist"):  # numpy arrays and scalars, pandas/polars values
        return json_safe(value.tolist())
    if hasattr(value, "item"):
        return json_safe(value.item())
    return str(value)


def _dumps(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(json_safe(value), allow_nan=False, ensure_ascii=False, sort_keys=True)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:  # SQLite rows written by other tools; the log itself writes UTC
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


class _IsoTimestamp(TypeDecorator):
    """ISO 8601 text in UTC with offset (SQLite): sorts chronologically, round-trips exactly."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        if value is None:
            return None
        return _utc(value).isoformat(timespec="microseconds")

    def process_result_value(self, value: Any, dialect: Any) -> dt.datetime | None:
        return None if value is None else dt.datetime.fromisoformat(value)


_metadata = sa.MetaData()

decisions = sa.Table(
    "decisions",
    _metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column(
        "decided_at",
        sa.DateTime(timezone=True).with_variant(_IsoTimestamp(), "sqlite"),
        nullable=False,
    ),
    sa.Column("caller", sa.Text, nullable=False),
    sa.Column("endpoint", sa.Text, nullable=False),
    sa.Column("enterprise_id", sa.Text, nullable=False),
    sa.Column("product", sa.Text, nullable=False),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("model_name", sa.Text, nullable=False),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("features", sa.Text, nullable=False),
    sa.Column("feature_timestamps", sa.Text, nullable=False),
    sa.Column("pd", sa.Double, nullable=False),
    sa.Column("score", sa.Double, nullable=False),
    sa.Column("grade", sa.Text, nullable=False),
    sa.Column("decision", sa.Text, nullable=False),
    sa.Column("limit_amount", sa.Double, nullable=True),
    sa.Column("price", sa.Text, nullable=True),
    sa.Column("reasons", sa.Text, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.CheckConstraint(
        "endpoint IN ('score', 'limit', 'price', 'screen')", name="decisions_endpoint_check"
    ),
    sa.Index("decisions_decided_at_idx", "decided_at"),
    sa.Index("decisions_enterprise_idx", "enterprise_id", "decided_at"),
)

_SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER IF NOT EXISTS decisions_no_update BEFORE UPDATE ON decisions
BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END;""",
    f"""CREATE TRIGGER IF NOT EXISTS decisions_no_delete BEFORE DELETE ON decisions
BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END;""",
]

_PG_FUNCTION = f"""CREATE OR REPLACE FUNCTION kapok_decisions_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE =
        '{APPEND_ONLY_MESSAGE}: ' || TG_OP || ' on decisions is not allowed';
END;
$$"""

_PG_TRIGGERS = {
    "decisions_no_update_delete": """CREATE TRIGGER decisions_no_update_delete
BEFORE UPDATE OR DELETE ON decisions
FOR EACH ROW EXECUTE FUNCTION kapok_decisions_append_only()""",
    "decisions_no_truncate": """CREATE TRIGGER decisions_no_truncate
BEFORE TRUNCATE ON decisions
FOR EACH STATEMENT EXECUTE FUNCTION kapok_decisions_append_only()""",
}


def _reason(error: BaseException) -> str:
    """The driver's message without SQLAlchemy's echo of the statement and parameters."""
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


class DecisionLog:
    """The decisions table behind SQLAlchemy Core: write, write_many, get, recent, count.

    There is deliberately no update or delete; database triggers reject them as well.
    """

    def __init__(self, url: str | None = None) -> None:
        raw = url if url is not None else default_url()
        try:
            self._url = sa.make_url(raw)
        except exc.ArgumentError as e:
            raise DecisionLogError(f"{ENV_VAR}: not a valid SQLAlchemy URL: {e}") from e
        self._backend = self._url.get_backend_name()
        if self._backend not in ("sqlite", "postgresql"):
            raise DecisionLogError(
                f"decision log {self.url}: unsupported backend {self._backend!r} "
                "(use sqlite or postgresql, which enforce the append-only triggers)"
            )
        connect_args: dict[str, Any] = {}
        if self._backend == "sqlite":
            connect_args = {"timeout": 30, "check_same_thread": False}
        elif self._url.get_driver_name() == "psycopg2":
            connect_args = {"connect_timeout": 5}
        try:
            self._engine = sa.create_engine(
                self._url, connect_args=connect_args, pool_pre_ping=True
            )
        except Exception as e:  # missing DBAPI driver, bad options
            raise DecisionLogError(f"decision log {self.url}: {_reason(e)}") from e
        self._ready = False

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self._url.render_as_string(hide_password=True)

    # -- schema ------------------------------------------------------------------------------

    def _ensure_schema(self) -> None:
        """Create the table and append-only triggers on first use (idempotent, retried)."""
        if self._ready:
            return
        try:
            if self._backend == "sqlite":
                database = self._url.database
                if database and database != ":memory:" and not database.startswith("file:"):
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
            with self._engine.begin() as conn:
                if self._backend == "postgresql":
                    conn.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY}
                    )
                _metadata.create_all(conn, checkfirst=True)
                if self._backend == "sqlite":
                    for statement in _SQLITE_TRIGGERS:
                        conn.exec_driver_sql(statement)
                else:
                    _create_pg_triggers(conn)
        except (OSError, exc.SQLAlchemyError) as e:
            raise DecisionLogError(
                f"decision log {self.url}: cannot create the decisions table: {_reason(e)}"
            ) from e
        self._ready = True

    # -- writing -----------------------------------------------------------------------------

    def write(self, record: DecisionRecord) -> None:
        """Append one decision in one transaction; duplicates and DB errors → DecisionLogError."""
        self._insert([record], what=f"decision {record.request_id}")

    def write_many(self, records: Iterable[DecisionRecord]) -> None:
        """Append a batch (/screen) in one transaction: all of it or none of it."""
        batch = list(records)
        if batch:
            self._insert(batch, what=f"batch of {len(batch)} decisions")

    def _insert(self, records: list[DecisionRecord], what: str) -> None:
        try:
            rows = [_to_row(r) for r in records]
        except (TypeError, ValueError) as e:
            raise DecisionLogError(f"decision log {self.url}: cannot encode {what}: {e}") from e
        self._ensure_schema()
        try:
            with self._engine.begin() as conn:
                conn.execute(decisions.insert(), rows)
        except exc.IntegrityError as e:
            raise DecisionLogError(
                f"decision log {self.url}: {what} not written: request_id already logged "
                f"or invalid row ({_reason(e)}); the log is append-only"
            ) from e
        except exc.SQLAlchemyError as e:
            raise DecisionLogError(
                f"decision log {self.url}: {what} not written: {_reason(e)}"
            ) from e

    # -- reading -----------------------------------------------------------------------------

    def get(self, request_id: str) -> DecisionRecord | None:
        """The logged decision for request_id, or None."""
        rows = self._select(
            sa.select(decisions).where(decisions.c.request_id == request_id), f"get {request_id}"
        )
        return _from_row(rows[0]) if rows else None

    def recent(
        self, limit: int = 100, enterprise_id: str | None = None, product: str | None = None
    ) -> list[DecisionRecord]:
        """Newest first, optionally for one enterprise and/or product."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        query = sa.select(decisions)
        if enterprise_id is not None:
            query = query.where(decisions.c.enterprise_id == enterprise_id)
        if product is not None:
            query = query.where(decisions.c.product == product)
        query = query.order_by(decisions.c.decided_at.desc(), decisions.c.request_id.desc())
        return [_from_row(row) for row in self._select(query.limit(limit), "recent")]

    def between(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        product: str | None = None,
    ) -> list[DecisionRecord]:
        """Decisions with since <= decided_at < until (either bound optional), oldest first."""
        query = self._window(sa.select(decisions), since, until, product)
        query = query.order_by(decisions.c.decided_at.asc(), decisions.c.request_id.asc())
        return [_from_row(row) for row in self._select(query, "between")]

    def frame(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        product: str | None = None,
        columns: Iterable[str] | None = None,
    ) -> pl.DataFrame:
        """The same window as `between` as one polars frame, oldest first, for volume work.

        JSON fields (features, request, reasons, ...) stay JSON text; decode what you need with
        `pl.col("features").str.json_decode(dtype)`. `decided_at` is a UTC datetime column.
        """
        import polars as pl

        names = list(columns) if columns is not None else [c.name for c in decisions.columns]
        unknown = [n for n in names if n not in decisions.c]
        if unknown:
            raise ValueError(f"decision log has no column(s) {', '.join(unknown)}")
        query = self._window(
            sa.select(*(decisions.c[n] for n in names)), since, until, product
        ).order_by(decisions.c.decided_at.asc(), decisions.c.request_id.asc())
        rows = self._select(query, "frame")
        types = {"decided_at": pl.Datetime("us", "UTC"), "pd": pl.Float64,
                 "score": pl.Float64, "limit_amount": pl.Float64}  # fmt: skip
        schema = {n: types.get(n, pl.String) for n in names}
        data = {n: [r[i] for r in rows] for i, n in enumerate(names)}
        if "decided_at" in data:
            data["decided_at"] = [_utc(v) for v in data["decided_at"]]
        return pl.DataFrame(data, schema=schema)

    def known(self, request_ids: Iterable[str]) -> set[str]:
        """Which of these request ids are already logged (for idempotent batch jobs)."""
        ids = list(dict.fromkeys(request_ids))
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            query = sa.select(decisions.c.request_id).where(decisions.c.request_id.in_(chunk))
            found.update(row[0] for row in self._select(query, "known"))
        return found

    @staticmethod
    def _window(
        query: sa.Select,
        since: dt.datetime | None,
        until: dt.datetime | None,
        product: str | None,
    ) -> sa.Select:
        for name, bound in (("since", since), ("until", until)):
            if bound is not None and (not isinstance(bound, dt.datetime) or bound.tzinfo is None):
                raise ValueError(f"{name} must be a timezone-aware datetime, got {bound!r}")
        if since is not None:
            query = query.where(decisions.c.decided_at >= since)
        if until is not None:
            query = query.where(decisions.c.decided_at < until)
        if product is not None:
            query = query.where(decisions.c.product == product)
        return query

    def count(self) -> int:
        """Number of logged decisions."""
        rows = self._select(sa.select(sa.func.count()).select_from(decisions), "count")
        return int(rows[0][0])

    def _select(self, query: sa.Select, what: str) -> list[sa.Row]:
        self._ensure_schema()
        try:
            with self._engine.connect() as conn:
                return list(conn.execute(query))
        except exc.SQLAlchemyError as e:
            raise DecisionLogError(f"decision log {self.url}: {what} failed: {_reason(e)}") from e

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release pooled connections."""
        self._engine.dispose()

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DecisionLog({self.url!r})"


def _create_pg_triggers(conn: sa.Connection) -> None:
    existing = set(
        conn.execute(
            sa.text(
                "SELECT tgname FROM pg_trigger "
                "WHERE tgrelid = 'decisions'::regclass AND NOT tgisinternal"
            )
        ).scalars()
    )
    missing = [name for name in _PG_TRIGGERS if name not in existing]
    if not missing:
        return
    conn.exec_driver_sql(_PG_FUNCTION)
    for name in missing:
        conn.exec_driver_sql(_PG_TRIGGERS[name])


def _to_row(record: DecisionRecord) -> dict[str, Any]:
    row = {
        "request_id": record.request_id,
        "decided_at": record.decided_at,
        "caller": record.caller,
        "endpoint": record.endpoint,
        "enterprise_id": record.enterprise_id,
        "product": record.product,
        "model_name": record.model_name,
        "model_version": record.model_version,
        "pd": float(record.pd),
        "score": float(record.score),
        "grade": record.grade,
        "decision": record.decision,
        "limit_amount": None if record.limit_amount is None else float(record.limit_amount),
    }
    for name in _JSON_FIELDS:
        row[name] = _dumps(getattr(record, name))
    return row


def _from_row(row: sa.Row) -> DecisionRecord:
    m = row._mapping
    values = {c.name: m[c.name] for c in decisions.columns}
    for name in _JSON_FIELDS:
        values[name] = _loads(values[name])
    values["decided_at"] = _utc(values["decided_at"])
    return DecisionRecord(**values)
