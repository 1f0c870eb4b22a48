"""Append-only log of every lending decision, written before the API responds.
SQLite at $KAPOK_HOME/decisions/decisions.db, or the SQLAlchemy URL in KAPOK_DECISION_LOG.

Group commit: every write hands its records to one background writer thread and blocks until the
transaction holding them has committed ("logged before answered"). Records that arrive while a
transaction is in flight go together into the next one, so concurrent API requests share one
commit (one fsync) instead of queueing on the database lock one transaction each.

Storage: JSON fields are compact UTF-8 JSON (sorted keys, no spaces, no \\u escapes). The
`response` column leaves out the keys whose value is exactly what the row's own columns give
(request_id, reasons, price, rounded pd and score, ...) and lists them under "@derived"; `get`,
`recent`, `between` and `frame` put them back, so what is read equals what was written.

Tamper evidence: every record carries `seq` (1, 2, 3, ... per log, the chain order), `prev_hash`
and `hash` = sha256(prev_hash || canonical(record)), where canonical() is a fixed byte encoding of
the row's stored columns (`canonical`). The head (last seq and hash) is kept in the one-row table
`decisions_chain`, read and moved inside the very transaction that inserts the records, under a
lock (PostgreSQL: SELECT ... FOR UPDATE on that row; SQLite: BEGIN IMMEDIATE), so the chain has
one order even with several processes writing to one log. `serving/audit.py` verifies it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from kapok.settings import paths
from serving.append_only import AppendOnly, store_url
from serving.sqlite_race import retry_racing

if TYPE_CHECKING:
    import polars as pl

ENV_VAR = "KAPOK_DECISION_LOG"
# the lending decisions an applicant asked for: what monitoring, back-tests, the watch's book
# and replay read by default
APPLICATION_ENDPOINTS = ("score", "limit", "price", "screen")
# a pre-approved offer made without an application (`kapok prospect`) and a credit officer's
# decision on a referred application (its request names the decision it overrides): records in
# the same hash-chained log, never mixed into the applications' figures unless asked for
ENDPOINTS = frozenset({*APPLICATION_ENDPOINTS, "prospect", "override"})
_ENDPOINT_CHECK = "endpoint IN ({})".format(", ".join(f"'{e}'" for e in sorted(ENDPOINTS)))
APPEND_ONLY_MESSAGE = "decision log is append-only"

_JSON_FIELDS = ("request", "features", "feature_timestamps", "price", "reasons", "response")
_ADVISORY_LOCK_KEY = 7_460_318_214  # serialises schema set-up across API workers (PostgreSQL)
DEFAULT_TIMEOUT = 45.0  # seconds a write waits for its commit: the API can still answer 503
# within BentoML's 60 s request timeout
MAX_BATCH_ROWS = 2_000  # rows per group-commit transaction (one caller's list is never split)
SQLITE_BUSY_MS = 30_000  # how long a SQLite writer waits for another process's write lock
GENESIS_HASH = "0" * 64  # prev_hash of a log's first chained record
CANONICAL_VERSION = b"kapok-decision-v1\n"  # first bytes of every canonical encoding


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
    kind = type(value)  # the plain types first: a decision is mostly these (the hot path)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is dict:
        return {k if type(k) is str else str(k): json_safe(v) for k, v in value.items()}
    if kind is list:
        return [json_safe(v) for v in value]
    return _json_safe_other(value)


def _json_safe_other(value: Any) -> Any:
    if isinstance(value, str | bool | int):
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


class JSONText(str):
    """A JSON object already encoded, for a record's `features`: batch jobs encode every row's
    feature vector in one polars call (`core.Decisions.features_json`) instead of one Python
    encoding per record. It must read back (json.loads) to the dict the record would otherwise
    hold: keys sorted, NaN and infinities as null; it is stored as it is."""

    __slots__ = ()


def _dumps(value: Any) -> str | None:
    """Compact JSON text: sorted keys, no spaces, UTF-8 kept as is (Chinese text is 3 bytes a
    character, not a 6-byte \\u escape). Reads back to the same value as before."""
    if value is None:
        return None
    if type(value) is JSONText:
        return str(value)
    return _json_text(json_safe(value))


_ENCODER = json.JSONEncoder(
    allow_nan=False, ensure_ascii=False, sort_keys=True, separators=(",", ":")
)


def _json_text(value: Any) -> str:
    return _ENCODER.encode(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# -- the response column without what the row already holds ------------------------------------
#
# The API's response body repeats the row: request_id, product, model, decided_at, grade,
# decision, the reasons and the price (about 1.6 kB of the 2 kB body), and pd / score rounded.
# A response key is left out only when the JSON text of its value is exactly the JSON text that
# the function below derives from the row's stored columns; the left-out keys are listed under
# DERIVED_KEY, and reading derives the same text from the same stored columns, so the value read
# back is the one written (types included: 80000 and 80000.0 differ in text and stay stored).
DERIVED_KEY = "@derived"


def _text_of(column: str) -> Callable[[Mapping[str, Any]], str | None]:
    return lambda row: row[column] if isinstance(row[column], str) else None


def _text(column: str) -> Callable[[Mapping[str, Any]], str | None]:
    return lambda row: _json_text(row[column]) if isinstance(row[column], str) else None


def _number(column: str, digits: int | None = None) -> Callable[[Mapping[str, Any]], str | None]:
    """A DOUBLE column (None stays null), optionally rounded as the API rounds it."""

    def derive(row: Mapping[str, Any]) -> str | None:
        value = row[column]
        if value is None and digits is None:
            return "null"
        if not isinstance(value, float):
            return None
        return _json_text(value if digits is None else round(value, digits))

    return derive


def _decided_at_text(row: Mapping[str, Any]) -> str | None:
    return _json_text(_utc(row["decided_at"]).isoformat())


def _features_as_of(row: Mapping[str, Any]) -> str | None:
    stamps = _loads(row["feature_timestamps"])
    if not isinstance(stamps, dict) or not stamps:
        return None
    values = list(stamps.values())
    if not all(isinstance(v, str) for v in values):
        return None
    return _json_text(max(values))


def _requested_amount(row: Mapping[str, Any]) -> str | None:
    request = _loads(row["request"])
    if not isinstance(request, dict) or "requested_amount" not in request:
        return None
    return _json_text(request["requested_amount"])


# response key -> JSON text derived from the stored row (None: nothing to derive)
_DERIVABLE: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "request_id": _text("request_id"),
    "product": _text("product"),
    "enterprise_id": _text("enterprise_id"),
    "model_name": _text("model_name"),
    "model_version": _text("model_version"),
    "grade": _text("grade"),
    "decision": _text("decision"),
    "decided_at": _decided_at_text,
    "pd": _number("pd", 6),
    "score": _number("score", 1),
    "limit": _number("limit_amount"),
    "reasons": _text_of("reasons"),
    "price": _text_of("price"),
    "features_as_of": _features_as_of,
    "requested_amount": _requested_amount,
}
_RESPONSE_SOURCES = ("request_id", "decided_at", "enterprise_id", "product", "request",
                     "model_name", "model_version", "feature_timestamps", "pd", "score", "grade",
                     "decision", "limit_amount", "price", "reasons")  # fmt: skip


_TEXT_COLUMNS = {"request_id", "product", "enterprise_id", "model_name", "model_version",
                 "grade", "decision"}  # fmt: skip
_ROUNDED = {"pd": ("pd", 6), "score": ("score", 1)}


def _same_value(key: str, row: Mapping[str, Any], value: Any) -> bool | None:
    """Whether the response's `value` has the JSON text _DERIVABLE[key] derives from `row`,
    decided without encoding either where that is certain (two str are the same JSON text
    exactly when they are equal; two floats when they are equal and of the same sign); None
    where only comparing the texts can tell."""
    if key in _TEXT_COLUMNS:
        column = row[key]
        if type(value) is str and type(column) is str:
            return value == column
        return None
    if key in _ROUNDED:
        name, digits = _ROUNDED[key]
        column = row[name]
        if type(value) is float and type(column) is float:
            derived = round(column, digits)
            return value == derived and math.copysign(1, value) == math.copysign(1, derived)
        return None
    return None


def _compact_response(
    row: Mapping[str, Any], response: Any, encoded: Mapping[str, Any] | None = None
) -> str | None:
    """The response's JSON text for the row, without the keys the row derives exactly.

    `encoded` maps a response key to the object whose JSON text the row's column of that name
    holds (the record's reasons and price): a response value that is that very object derives
    exactly, without encoding it a second time to compare the texts."""
    if encoded and isinstance(response, dict) and DERIVED_KEY not in response:
        same = {
            k for k, v in encoded.items() if k in response and response[k] is v and v is not None
        }
        if same:
            rest = _compact_response(row, {k: v for k, v in response.items() if k not in same})
            return _merge_derived(rest, same)
    safe = json_safe(response)
    if not isinstance(safe, dict):
        return None if safe is None else _json_text(safe)
    derived = []
    for key, derive in _DERIVABLE.items():
        if key in safe:
            same = _same_value(key, row, safe[key])
            if same is not None:  # decided without encoding: equal values, equal texts
                if same:
                    derived.append(key)
                continue
            try:
                text = derive(row)
            except (TypeError, ValueError):  # e.g. timestamps that do not compare
                continue
            if text is not None and text == _json_text(safe[key]):
                derived.append(key)
    if not derived and DERIVED_KEY not in safe:
        return _json_text(safe)
    kept = {k: v for k, v in safe.items() if k not in derived}
    if DERIVED_KEY in safe:  # a response that has the marker key itself keeps it, escaped
        kept[DERIVED_KEY] = {"keys": derived, "value": safe[DERIVED_KEY]}
    else:
        kept[DERIVED_KEY] = derived
    return _json_text(kept)


def _merge_derived(text: str | None, keys: set[str]) -> str:
    """`text` (a compacted response object) with `keys` added to its derived keys, in the
    order _DERIVABLE lists them, as _compact_response would have written it."""
    kept = json.loads(text) if text is not None else {}
    derived = set(kept.pop(DERIVED_KEY, [])) | keys
    kept[DERIVED_KEY] = [k for k in _DERIVABLE if k in derived]
    return _json_text(kept)


def _restored(response: Any, row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored response with the derived keys put back (keys sorted), or None when it has
    none to put back (stored as written: an older row, or nothing was derivable)."""
    if not isinstance(response, dict) or DERIVED_KEY not in response:
        return None
    marker = response[DERIVED_KEY]
    escaped = isinstance(marker, dict) and set(marker) == {"keys", "value"}
    keys = marker["keys"] if escaped else marker
    if not isinstance(keys, list) or not all(
        isinstance(k, str) and k in _DERIVABLE and k not in response for k in keys
    ):
        return None  # not ours (a row written by another tool): leave it as it is
    restored = {k: v for k, v in response.items() if k != DERIVED_KEY}
    if escaped:
        restored[DERIVED_KEY] = marker["value"]
    for key in keys:
        text = _DERIVABLE[key](row)
        if text is None:
            raise ValueError(f"response key {key!r} cannot be derived from the row")
        restored[key] = json.loads(text)
    return dict(sorted(restored.items()))


def _full_response(row: Mapping[str, Any]) -> Any:
    """The response as written."""
    response = _loads(row["response"])
    restored = _restored(response, row)
    return response if restored is None else restored


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
    # the hash chain; NULL only in rows written before chaining began (an older Kapok)
    sa.Column("seq", sa.BigInteger, nullable=True),
    sa.Column("prev_hash", sa.Text, nullable=True),
    sa.Column("hash", sa.Text, nullable=True),
    sa.CheckConstraint(_ENDPOINT_CHECK, name="decisions_endpoint_check"),
    sa.Index("decisions_decided_at_idx", "decided_at"),
    sa.Index("decisions_endpoint_idx", "endpoint", "decided_at"),
    # the referral queue (open_referrals): only the refer decisions, oldest first; covers the
    # queue's count (a refer is always an application's decision: offers approve, overrides
    # approve or decline)
    sa.Index(
        "decisions_referrals_idx",
        "decided_at",
        "request_id",
        "product",
        "endpoint",
        sqlite_where=sa.text("decision = 'refer'"),
        postgresql_where=sa.text("decision = 'refer'"),
    ),
    sa.Index("decisions_enterprise_idx", "enterprise_id", "decided_at"),
)
CHAIN_COLUMNS = ("seq", "prev_hash", "hash")
# what a record is: every stored column but the chain's, in the table's (the canonical) order
RECORD_COLUMNS = tuple(c.name for c in decisions.columns if c.name not in CHAIN_COLUMNS)
_FLOAT_COLUMNS = frozenset({"pd", "score", "limit_amount"})
_SEQ_INDEX = sa.Index("decisions_seq_idx", decisions.c.seq, unique=True)

# the chain's head: one row (id 1), moved in the transaction that appends records
decisions_chain = sa.Table(
    "decisions_chain",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),  # the last record's seq, 0 before any
    sa.Column("hash", sa.Text, nullable=False),  # the last record's hash, GENESIS_HASH before any
    sa.Column("unchained", sa.BigInteger, nullable=False),  # records already there, not covered
    sa.Column("started_at", sa.Text, nullable=False),  # when chaining began, ISO 8601 UTC
)
# the request ids of the records written before chaining began (their content is not covered):
# a record without seq that is not listed here was added since, one listed and gone was deleted
decisions_unchained = sa.Table(
    "decisions_unchained", _metadata, sa.Column("request_id", sa.Text, primary_key=True)
)


def canonical(row: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: every stored column of RECORD_COLUMNS in that order, as
    one JSON array (UTF-8, no spaces), after a version line. Text columns (the JSON fields too)
    as the exact text stored; pd, score and limit_amount as floats in Python's shortest
    round-trip form (null for NULL); decided_at as ISO 8601 UTC with microseconds. The same bytes
    come from the row as written (`_to_row`) and as read back from SQLite or PostgreSQL."""
    values: list[Any] = []
    for name in RECORD_COLUMNS:
        value = row[name]
        if name == "decided_at":
            value = _utc(value).isoformat(timespec="microseconds")
        elif name in _FLOAT_COLUMNS and value is not None:
            value = float(value)
        values.append(value)
    text = _CANONICAL_ENCODER.encode(values)
    return CANONICAL_VERSION + text.encode("utf-8", "surrogatepass")


_CANONICAL_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=True)


def chain_hash(prev_hash: str, content: bytes) -> str:
    """sha256(prev_hash || content) as 64 hex digits: the hash a record carries."""
    return hashlib.sha256(prev_hash.encode("ascii") + content).hexdigest()


# UPDATE, DELETE (and TRUNCATE) refused by the database (serving/append_only.py)
_GUARD = AppendOnly("decisions", APPEND_ONLY_MESSAGE)
_SQLITE_TRIGGERS = _GUARD.sqlite_triggers
_PG_FUNCTION = _GUARD.pg_function
_PG_TRIGGERS = _GUARD.pg_triggers


def _reason(error: BaseException) -> str:
    """The driver's message without SQLAlchemy's echo of the statement and parameters."""
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def _is_connection_error(error: BaseException) -> bool:
    """Errors of the database or the connection, not of one caller's rows (locked, down, full)."""
    if isinstance(error, _InDoubt):
        return True
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, exc.OperationalError | exc.InterfaceError | exc.TimeoutError)


_FULL_TEXTS = ("database or disk is full", "no space left on device", "disk quota exceeded")


def _store_state(error: BaseException) -> str | None:
    """What a store-wide failure says about the store: 'full' (SQLITE_FULL, PostgreSQL's
    disk_full 53100, ENOSPC), 'unreachable' (no connection, or the connection was lost),
    'unavailable' (it answered with an error of its own: starting up, shutting down, locked,
    too many connections); None for an error of the rows themselves."""
    cause = getattr(error, "orig", None) or error
    text = str(cause).lower()
    if getattr(cause, "pgcode", None) == "53100" or any(t in text for t in _FULL_TEXTS):
        return "full"
    if isinstance(error, _InDoubt) or (
        isinstance(error, exc.DBAPIError) and error.connection_invalidated
    ):
        return "unreachable"
    if isinstance(error, exc.OperationalError | exc.InterfaceError | exc.TimeoutError):
        # psycopg2 gives the server's errors a SQLSTATE; a failed or lost connection has none
        has_code = getattr(cause, "pgcode", None) is not None
        return "unavailable" if has_code or isinstance(cause, sqlite3.Error) else "unreachable"
    if isinstance(error, OSError):
        return "unavailable"
    return None


class _InDoubt(Exception):
    """The connection to a database server was lost while it committed: the transaction may or
    may not have committed, and nothing can tell until the server answers again."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.orig = getattr(error, "orig", None) or error


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Set on every new SQLite connection (the pool's connect event).

    busy_timeout: wait for another process's write lock instead of failing at once.
    journal_mode=WAL: readers (get, recent, the review jobs) never block the writer and the writer
    never blocks them; a commit appends to the -wal file instead of rewriting database pages.
    synchronous=FULL: in WAL mode the default NORMAL does not fsync the WAL at commit, so the last
    transactions can vanish on power loss or an OS crash although commit() returned; the API
    answers only after the commit, so an answered decision must survive that: FULL fsyncs the WAL
    at every commit. Group commit is what makes that one fsync per batch, not per decision.
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")  # 'memory' for an in-memory database
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


class _ChainHeadMissing(RuntimeError):
    """The decisions_chain row is gone: nothing can be chained until it is restored."""


class _WriterStopped(RuntimeError):
    """The writer thread ended with records still in its hands."""


@dataclass(eq=False)
class _Pending:
    """One caller's records on their way to the database, and how it went."""

    rows: list[dict[str, Any]]
    contents: list[bytes]  # canonical(row) of each row, computed by the caller's thread
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()


@dataclass(eq=False)
class _Writer:
    thread: threading.Thread | None = None
    stop: bool = False


class DecisionLog:
    """The decisions table behind SQLAlchemy Core: write, write_many, get, recent, count.

    There is deliberately no update or delete; database triggers reject them as well.
    Thread-safe: writes from any number of threads are group-committed by one writer thread.
    """

    def __init__(self, url: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        raw = url if url is not None else default_url()
        self._url = store_url(raw, ENV_VAR, "decision log", DecisionLogError)
        self._backend = self._url.get_backend_name()
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        self._timeout = float(timeout)
        options: dict[str, Any] = {"pool_pre_ping": True}
        connect_args: dict[str, Any] = {}
        # one shared connection for an in-memory database (each connection would be a database
        # of its own); every use of it is then serialised by self._serial
        self._serial: AbstractContextManager[Any] = nullcontext()
        if self._backend == "sqlite":
            connect_args = {"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False}
            if self._in_memory():
                options["poolclass"] = StaticPool
                self._serial = threading.RLock()
        elif self._url.get_driver_name() == "psycopg2":
            connect_args = {"connect_timeout": 5}
        try:
            self._engine = sa.create_engine(self._url, connect_args=connect_args, **options)
        except Exception as e:  # missing DBAPI driver, bad options
            raise DecisionLogError(f"decision log {self.url}: {_reason(e)}") from e
        if self._backend == "sqlite":
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self._ready = False
        self._schema_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Pending] = deque()
        self._writer: _Writer | None = None

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self._url.render_as_string(hide_password=True)

    def describe(self) -> str:
        """Which store the log is in, for messages: 'the decision log (PostgreSQL at
        127.0.0.1:5432, database kapok)' or '… (SQLite at /path/decisions.db)'; no password."""
        if self._backend == "sqlite":
            return f"the decision log (SQLite at {self._url.database or ':memory:'})"
        host = self._url.host or self._url.query.get("host") or "the local socket"
        where = f"{host}:{self._url.port or 5432}" if self._url.host else str(host)
        return f"the decision log (PostgreSQL at {where}, database {self._url.database})"

    def _error(self, error: BaseException, what: str) -> DecisionLogError:
        """The DecisionLogError for a failure of the store while doing `what` ('decision req_…
        not written'): names the store and says what state it is in; never the password."""
        reason = _reason(error)
        if isinstance(error, _InDoubt):
            return DecisionLogError(
                f"{self.describe()} stopped answering while it committed: {what} "
                f"({reason}); it may or may not be in the log"
            )
        state = _store_state(error)
        if state is None:
            return DecisionLogError(f"decision log {self.url}: {what} ({reason})")
        return DecisionLogError(f"{self.describe()} is {state}: {what} ({reason})")

    def ping(self) -> None:
        """DecisionLogError unless the store answers now (a readiness probe's check): one
        SELECT 1. A SQLite log that does not exist yet is not created (its first write does)."""
        if self._backend == "sqlite" and not self._in_memory():
            database = self._url.database or ""
            if not database.startswith("file:") and not Path(database).exists():
                return
        try:
            with self._serial, self._engine.connect() as conn:
                conn.execute(sa.text("SELECT 1")).all()
        except (OSError, exc.SQLAlchemyError) as e:
            raise self._error(e, "readiness check failed") from e

    def _in_memory(self) -> bool:
        database = self._url.database or ""
        mode = str(self._url.query.get("mode", ""))
        return database in ("", ":memory:") or "mode=memory" in database or mode == "memory"

    # -- schema ------------------------------------------------------------------------------

    def _ensure_schema(self) -> None:
        """Create the table and append-only triggers on first use (idempotent, retried)."""
        if self._ready:
            return
        with self._schema_lock, self._serial:
            if self._ready:
                return
            self._create_schema()
            self._ready = True

    def _create_schema(self) -> None:
        # two API worker processes starting on a new SQLite log race to create it
        # (serving.sqlite_race): one of the two CREATEs fails with "already exists", or SQLite
        # refuses one side at once with "database is locked" (seen in the soak: the first
        # /screen of a fresh server answered 503 decision_log_unavailable)
        def racing(e: BaseException) -> bool:
            text = str(e)
            return isinstance(e, DecisionLogError) and any(
                s in text for s in ("already exists", "duplicate column", "database is locked")
            )

        retry_racing(self._create_schema_once, racing)

    def _create_schema_once(self) -> None:
        try:
            if self._backend == "sqlite":
                database = self._url.database
                if database and database != ":memory:" and not database.startswith("file:"):
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
            with self._engine.begin() as conn, warnings.catch_warnings():
                # SQLAlchemy cannot reflect the expression index of _OVERRIDE_ONCE and says so
                # each time a checkfirst create below inspects the table (it has its own
                # CREATE ... IF NOT EXISTS)
                warnings.filterwarnings(
                    "ignore", "Skipped unsupported reflection of expression-based index",
                    exc.SAWarning,
                )  # fmt: skip
                if self._backend == "postgresql":
                    conn.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY}
                    )
                _metadata.create_all(conn, checkfirst=True)
                _add_chain_columns(conn)
                _widen_endpoints(conn, self._backend)
                conn.exec_driver_sql(_OVERRIDE_ONCE[self._backend])
                _GUARD.install(conn, self._backend)
        except (OSError, exc.SQLAlchemyError) as e:
            raise self._error(e, "cannot create the decisions table") from e

    # -- writing -----------------------------------------------------------------------------

    def write(self, record: DecisionRecord) -> None:
        """Append one decision, committed when this returns; duplicates and DB errors →
        DecisionLogError."""
        self._commit([record], f"decision {record.request_id}")

    def write_many(self, records: Iterable[DecisionRecord]) -> None:
        """Append a batch (/screen): all of it or none of it, committed when this returns."""
        batch = list(records)
        self._commit(batch, f"batch of {len(batch)} decisions")

    def commit(self, records: list[DecisionRecord]) -> None:
        """Append `records` (all or none) and return once the transaction holding them has
        committed: a decision is logged before it is answered.

        The records go to the writer thread, which commits whatever callers have handed it in
        one transaction (group commit). If that transaction fails, each caller's records are
        retried in a transaction of their own, so a duplicate request_id fails its own caller
        only. Every failure (duplicate, database down, no commit within `timeout` seconds, the
        writer gone) raises DecisionLogError here, in the calling thread.
        """
        batch = list(records)
        if len(batch) == 1:
            self._commit(batch, f"decision {batch[0].request_id}")
        else:
            self._commit(batch, f"batch of {len(batch)} decisions")

    def _commit(self, batch: list[DecisionRecord], what: str) -> None:
        if not batch:
            return
        try:
            rows = [_to_row(r) for r in batch]
            contents = [canonical(row) for row in rows]
        except (TypeError, ValueError) as e:
            raise DecisionLogError(f"decision log {self.url}: cannot encode {what}: {e}") from e
        self._ensure_schema()
        pending = _Pending(rows, contents)
        self._submit(pending)
        self._wait(pending, what)

    def _submit(self, pending: _Pending) -> None:
        with self._cond:
            self._queue.append(pending)
            if self._writer is None:
                writer = _Writer()
                writer.thread = threading.Thread(
                    target=self._run_writer, args=(writer,), name="kapok-decision-log", daemon=True
                )
                self._writer = writer
                writer.thread.start()
            self._cond.notify()

    def _wait(self, pending: _Pending, what: str) -> None:
        deadline = time.monotonic() + self._timeout
        while not pending.done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            with self._cond:
                queued = pending in self._queue
                writer = self._writer
                alive = writer is not None and writer.thread is not None
                alive = alive and writer.thread.is_alive()  # type: ignore[union-attr]
                if queued and (not alive or time.monotonic() >= deadline):
                    self._queue.remove(pending)  # never reaches the database
                    why = (
                        "the decision-log writer has stopped"
                        if not alive
                        else f"the writer did not get to it within {self._timeout:g}s"
                    )
                    raise DecisionLogError(f"decision log {self.url}: {what} not written: {why}")
            if pending.done.is_set():
                break
            if time.monotonic() >= deadline:
                raise DecisionLogError(
                    f"decision log {self.url}: {what} not confirmed within {self._timeout:g}s "
                    "(the database did not answer; it may still be committed)"
                )
        if pending.error is not None:
            raise self._failure(pending.error, what) from pending.error

    def _failure(self, error: BaseException, what: str) -> DecisionLogError:
        if isinstance(error, _WriterStopped):
            return DecisionLogError(f"decision log {self.url}: {what} not written: {error}")
        if isinstance(error, exc.IntegrityError):
            return DecisionLogError(
                f"decision log {self.url}: {what} not written: request_id already logged "
                f"or invalid row ({_reason(error)}); the log is append-only"
            )
        if isinstance(error, _InDoubt):
            return self._error(error, what)
        return self._error(error, f"{what} not written")

    def _run_writer(self, writer: _Writer) -> None:
        """The writer thread: take everything queued (up to MAX_BATCH_ROWS), commit it in one
        transaction, tell each caller; until close() and the queue is empty."""
        batch: list[_Pending] = []
        try:
            while True:
                with self._cond:
                    while not self._queue and not writer.stop:
                        self._cond.wait()
                    if not self._queue:
                        if self._writer is writer:
                            self._writer = None
                        return
                    batch = [self._queue.popleft()]
                    rows = len(batch[0].rows)
                    while self._queue and rows + len(self._queue[0].rows) <= MAX_BATCH_ROWS:
                        rows += len(self._queue[0].rows)
                        batch.append(self._queue.popleft())
                self._commit_batch(batch)
                batch = []
        except BaseException as e:  # a bug or the interpreter going down: nobody waits forever
            with self._cond:
                if self._writer is writer:
                    self._writer = None
                orphans = [*batch, *self._queue]
                self._queue.clear()
            stopped = _WriterStopped(f"the decision-log writer stopped ({type(e).__name__}: {e})")
            for p in orphans:
                if not p.done.is_set():
                    p.finish(stopped)
            raise

    def _commit_batch(self, batch: list[_Pending]) -> None:
        try:
            self._insert(
                [row for p in batch for row in p.rows], [c for p in batch for c in p.contents]
            )
        except Exception as e:
            if len(batch) == 1 or _is_connection_error(e):
                for p in batch:
                    p.finish(e)
                return
            for p in batch:  # find whose rows failed: each caller in a transaction of its own
                try:
                    self._insert(p.rows, p.contents)
                except Exception as own:
                    p.finish(own)
                else:
                    p.finish()
            return
        for p in batch:
            p.finish()

    def _insert(self, rows: list[dict[str, Any]], contents: list[bytes]) -> None:
        """One transaction (executemany) that chains the rows, in their order, after the head and
        moves the head; raises whatever the driver raised.

        The head is read under a lock held to the commit, so writers in other processes chain
        after this transaction, never beside it: on PostgreSQL the head row is locked (SELECT ...
        FOR UPDATE); on SQLite the transaction takes the database's write lock first (BEGIN
        IMMEDIATE; a plain BEGIN would read the head before holding it). Raises _InDoubt when the
        connection to the PostgreSQL server was lost during the COMMIT itself (SQLite's commit
        either happened or not: it is this process's own)."""
        with self._serial, self._engine.connect() as conn:
            if self._backend == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            head = conn.execute(
                sa.select(decisions_chain.c.seq, decisions_chain.c.hash)
                .where(decisions_chain.c.id == 1)
                .with_for_update()
            ).first()
            if head is None:  # created with the table; gone only if someone deleted it
                raise _ChainHeadMissing(
                    "the chain's head row (decisions_chain) is missing: run kapok audit verify"
                )
            seq, prev = head
            for row, content in zip(rows, contents, strict=True):
                seq += 1
                row["seq"], row["prev_hash"] = seq, prev
                row["hash"] = prev = chain_hash(prev, content)
            conn.execute(decisions.insert(), rows)
            conn.execute(
                decisions_chain.update().where(decisions_chain.c.id == 1).values(seq=seq, hash=prev)
            )
            try:
                conn.commit()
            except exc.DBAPIError as e:
                if self._backend == "postgresql" and _store_state(e) == "unreachable":
                    raise _InDoubt(e) from e
                raise

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
        endpoints: Iterable[str] | None = APPLICATION_ENDPOINTS,
    ) -> list[DecisionRecord]:
        """Decisions with since <= decided_at < until (either bound optional), oldest first.
        `endpoints`: the kinds of record (default: the applications' decisions, not prospect
        offers or officers' overrides; None for every record)."""
        query = self._window(sa.select(decisions), since, until, product, endpoints)
        query = query.order_by(decisions.c.decided_at.asc(), decisions.c.request_id.asc())
        return [_from_row(row) for row in self._select(query, "between")]

    def frame(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        product: str | None = None,
        columns: Iterable[str] | None = None,
        endpoints: Iterable[str] | None = APPLICATION_ENDPOINTS,
    ) -> pl.DataFrame:
        """The same window (and kinds of record) as `between` as one polars frame, oldest first,
        for volume work.

        JSON fields (features, request, reasons, ...) stay JSON text; decode what you need with
        `pl.col("features").str.json_decode(dtype)`. `decided_at` is a UTC datetime column.
        `response` is the whole response as written (the keys the row derives put back).
        """
        import polars as pl

        names = list(columns) if columns is not None else list(RECORD_COLUMNS)
        unknown = [n for n in names if n not in decisions.c]
        if unknown:
            raise ValueError(f"decision log has no column(s) {', '.join(unknown)}")
        fetched = list(names)
        if "response" in names:  # restoring it reads the columns it derives from
            fetched += [n for n in _RESPONSE_SOURCES if n not in fetched]
        query = self._window(
            sa.select(*(decisions.c[n] for n in fetched)), since, until, product, endpoints
        ).order_by(decisions.c.decided_at.asc(), decisions.c.request_id.asc())
        rows = self._select(query, "frame")
        types = {"decided_at": pl.Datetime("us", "UTC"), "pd": pl.Float64,
                 "score": pl.Float64, "limit_amount": pl.Float64, "seq": pl.Int64}  # fmt: skip
        schema = {n: types.get(n, pl.String) for n in names}
        data = {n: [r[i] for r in rows] for i, n in enumerate(names)}
        if "response" in data:
            data["response"] = [_response_text(r._mapping) for r in rows]
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
        endpoints: Iterable[str] | None = None,
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
        if endpoints is not None:
            kinds = sorted(set(endpoints))
            unknown = [e for e in kinds if e not in ENDPOINTS]
            if unknown:
                raise ValueError(f"unknown endpoint(s) {', '.join(unknown)}")
            query = query.where(decisions.c.endpoint.in_(kinds))
        return query

    # -- the referral queue (serving/queue.py) -------------------------------------------------

    def _overridden(self, table: Any) -> Any:
        """The request id an override record of `table` overrides (its request.overrides), as
        the expression of the unique index `_OVERRIDE_ONCE`: written out, not bound, so that
        the database matches it (and `endpoint = 'override'`) to that partial index (with bound
        parameters SQLite scanned every override for every referral: 16 s for a queue of 5,000
        referrals)."""
        if self._backend == "sqlite":
            return sa.func.json_extract(table.c.request, sa.literal_column("'$.overrides'"))
        from sqlalchemy.dialects.postgresql import JSONB

        return sa.cast(table.c.request, JSONB).op("->>")(sa.literal_column("'overrides'"))

    def override_of(self, request_id: str) -> DecisionRecord | None:
        """The override record that links to the decision `request_id`, or None."""
        query = sa.select(decisions).where(
            (decisions.c.endpoint == _OVERRIDE) & (self._overridden(decisions) == request_id)
        )
        rows = self._select(query, f"override of {request_id}")
        return _from_row(rows[0]) if rows else None

    def open_referrals(
        self,
        product: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = None,
    ) -> tuple[list[DecisionRecord], int]:
        """The referral queue: the applications' decisions (APPLICATION_ENDPOINTS) that are a
        refer and that no override record links to yet, oldest first (the longest waiting
        first), at most `limit` of them; and how many there are in all."""
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        # the overridden ids once (NOT IN: one pass over the override records into a hashed
        # set), not a search per referral
        done = decisions.alias("done")
        overridden = self._overridden(done)
        linked = decisions.c.request_id.in_(
            sa.select(overridden).where((done.c.endpoint == _OVERRIDE) & overridden.is_not(None))
        )
        # a refer is only ever an application's decision (an offer approves, an officer
        # approves or declines), so no endpoint filter: with one, the planners chose the
        # endpoint index and read every application's record (1.1 s on 519,039 decisions); and
        # 'refer' written out, not bound, so that the partial index of referrals serves the
        # count and the page (18 ms)
        refer = decisions.c.decision == sa.literal_column("'refer'")
        counted = sa.select(sa.func.count()).select_from(decisions).where(refer, ~linked)
        counted = self._window(counted, since, until, product)
        total = self._select(counted, "referral count")[0][0]
        query = self._window(sa.select(decisions).where(refer, ~linked), since, until, product)
        query = query.order_by(decisions.c.decided_at.asc(), decisions.c.request_id.asc())
        if limit is not None:
            query = query.limit(limit)
        return [_from_row(row) for row in self._select(query, "referrals")], int(total)

    def tally(
        self,
        by: Iterable[str],
        *,
        endpoints: Iterable[str] | None = APPLICATION_ENDPOINTS,
        model_name: str | None = None,
        model_version: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """How many records there are per value of the columns `by` (one GROUP BY): rows of
        (*values, count), of the kinds of record `endpoints` (None: every kind), optionally of
        one model (and version)."""
        columns = [decisions.c[name] for name in by]
        query = self._window(sa.select(*columns, sa.func.count()), None, None, None, endpoints)
        if model_name is not None:
            query = query.where(decisions.c.model_name == model_name)
        if model_version is not None:
            query = query.where(decisions.c.model_version == model_version)
        return [tuple(row) for row in self._select(query.group_by(*columns), "tally")]

    def count(self) -> int:
        """Number of logged decisions."""
        rows = self._select(sa.select(sa.func.count()).select_from(decisions), "count")
        return int(rows[0][0])

    def last_decision_by_caller(self) -> dict[str, dt.datetime]:
        """The latest decided_at (UTC) of each caller's decisions: one GROUP BY query.

        Only reads: a log that does not exist yet (no SQLite file, no decisions table) is {},
        and neither the file nor the table is created.
        """
        query = sa.select(decisions.c.caller, sa.func.max(decisions.c.decided_at)).group_by(
            decisions.c.caller
        )
        if self._backend == "sqlite" and not self._in_memory():
            database = self._url.database or ""
            if not database.startswith("file:") and not Path(database).exists():
                return {}  # connecting would create an empty database file
        try:
            with self._serial, self._engine.connect() as conn:
                if not self._ready and not sa.inspect(conn).has_table(decisions.name):
                    return {}
                rows = list(conn.execute(query))
        except exc.SQLAlchemyError as e:
            raise self._error(e, "last decision by caller failed") from e
        return {caller: _utc(at) for caller, at in rows if at is not None}

    def _select(self, query: sa.Select, what: str) -> list[sa.Row]:
        self._ensure_schema()
        try:
            with self._serial, self._engine.connect() as conn:
                return list(conn.execute(query))
        except exc.SQLAlchemyError as e:
            raise self._error(e, f"{what} failed") from e

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the writer thread once it has committed what it was given, then release pooled
        connections. A later write starts a new writer."""
        with self._cond:
            writer = self._writer
            if writer is not None:
                writer.stop = True
                self._cond.notify_all()
        thread = writer.thread if writer is not None else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._timeout)
        self._engine.dispose()

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DecisionLog({self.url!r})"


def _add_chain_columns(conn: sa.Connection) -> None:
    """Chain a log written before the hash chain existed: add the seq / prev_hash / hash columns
    (NULL in the rows already there, which are neither rewritten nor covered), list those rows'
    request ids in decisions_unchained and create the head row, which counts them as
    `unchained`; the next record is seq 1 after GENESIS_HASH."""
    present = {c["name"] for c in sa.inspect(conn).get_columns(decisions.name)}
    for name in CHAIN_COLUMNS:
        if name not in present:  # ADD COLUMN without a default rewrites no row, fires no trigger
            kind = "BIGINT" if name == "seq" else "TEXT"
            conn.exec_driver_sql(f"ALTER TABLE decisions ADD COLUMN {name} {kind}")
    _SEQ_INDEX.create(conn, checkfirst=True)
    if conn.execute(sa.select(decisions_chain.c.id)).first() is not None:
        return
    if conn.execute(
        sa.select(decisions.c.seq).where(decisions.c.seq.is_not(None)).limit(1)
    ).first():
        return  # chained records and no head: deleted, and not silently restarted at seq 1
    conn.exec_driver_sql(
        "INSERT INTO decisions_unchained (request_id) "
        "SELECT request_id FROM decisions WHERE seq IS NULL ON CONFLICT (request_id) DO NOTHING"
    )
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    conn.execute(
        sa.text(
            "INSERT INTO decisions_chain (id, seq, hash, unchained, started_at) "
            "SELECT 1, 0, :genesis, count(*), :started FROM decisions WHERE seq IS NULL "
            "ON CONFLICT (id) DO NOTHING"
        ),
        {"genesis": GENESIS_HASH, "started": started},
    )


def _widen_endpoints(conn: sa.Connection, backend: str) -> None:
    """A log created before `prospect` and `override` records existed: widen its endpoint
    CHECK constraint to today's ENDPOINTS and add the endpoint index. No row is rewritten. On
    SQLite, which cannot alter a constraint, the table's schema text is edited in place the way
    SQLite documents for changes that leave the stored rows valid (writable_schema, in this
    transaction, with the schema version bumped)."""
    if backend == "sqlite":
        sql = conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'decisions'"
        ).scalar_one()
        widened = re.sub(r"endpoint IN \([^)]*\)", _ENDPOINT_CHECK, sql, count=1)
        if widened != sql:
            version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
            conn.exec_driver_sql("PRAGMA writable_schema = ON")
            conn.execute(
                sa.text(
                    "UPDATE sqlite_master SET sql = :sql "
                    "WHERE type = 'table' AND name = 'decisions'"
                ),
                {"sql": widened},
            )
            conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
            conn.exec_driver_sql("PRAGMA writable_schema = OFF")
    else:
        current = conn.execute(
            sa.text(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conname = 'decisions_endpoint_check' AND conrelid = 'decisions'::regclass"
            )
        ).scalar()
        if current is None or any(f"'{e}'" not in current for e in ENDPOINTS):
            conn.exec_driver_sql(
                "ALTER TABLE decisions DROP CONSTRAINT IF EXISTS decisions_endpoint_check, "
                f"ADD CONSTRAINT decisions_endpoint_check CHECK ({_ENDPOINT_CHECK})"
            )
    for index in decisions.indexes:
        index.create(conn, checkfirst=True)


# One override per referred decision, whoever writes it and from whichever process: a unique
# index on the overridden request id (the override record's request.overrides), over the
# override records only. Two officers racing on one referral both pass any check made before
# the write; the database refuses the second insert (IntegrityError), and the caller names the
# override that won. The same expression is used to find a referral's override (`overridden`).
_OVERRIDE = sa.literal_column("'override'")  # a literal, as in the index's WHERE
_OVERRIDE_ONCE = {
    "sqlite": "CREATE UNIQUE INDEX IF NOT EXISTS decisions_override_once_idx ON decisions "
    "(json_extract(request, '$.overrides')) WHERE endpoint = 'override'",
    "postgresql": "CREATE UNIQUE INDEX IF NOT EXISTS decisions_override_once_idx ON decisions "
    "(((request::jsonb) ->> 'overrides')) WHERE endpoint = 'override'",
}


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
        if name != "response":
            row[name] = _dumps(getattr(record, name))
    row["response"] = _compact_response(
        row, record.response, {"reasons": record.reasons, "price": record.price}
    )
    return row


def _response_text(row: Mapping[str, Any]) -> str | None:
    """The response column as it was before the derived keys were left out."""
    text = row["response"]
    if text is None or DERIVED_KEY not in text:
        return text
    restored = _restored(json.loads(text), row)
    return text if restored is None else _json_text(restored)


def _from_row(row: sa.Row) -> DecisionRecord:
    m = row._mapping
    values = {name: m[name] for name in RECORD_COLUMNS}
    values["response"] = _full_response(m)
    for name in _JSON_FIELDS:
        if name != "response":
            values[name] = _loads(values[name])
    values["decided_at"] = _utc(values["decided_at"])
    return DecisionRecord(**values)
