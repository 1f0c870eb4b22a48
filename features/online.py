"""Bulk online feature reads for a columnar decision core: N enterprises per call, cheap.

`OnlineFeatures.read(ids)` answers what `FeatureStore.get_online_features(...)
.to_dict(include_event_timestamps=True)` answers for the stored (not request-time) features, as
one polars frame, without Feast's per-value Python work: it reads Feast's online store itself —
one SQL query per feature view for SQLite, one pipeline for Redis — and decodes the serialized
`ValueProto`s with numpy, all values of a call at once.

Feast 0.67 semantics it reproduces (read from feast/infra/online_stores/{sqlite,redis}.py,
online_store.py and utils.py of that version; the package is pinned below 0.68):

- entity keys: `serialize_entity_key` with entity_key_serialization_version 3 (checked against
  Feast's own function when a reader is built); Redis keys append the project name; Redis hash
  fields are `_mmh3("<view>:<feature>")` and `_ts:<view>` (Feast's `_mmh3` helper);
- SQLite: the same query as Feast's `online_read`; a view's event timestamp is the one of the
  last row of the entity in that query's order; `event_ts` holds `int(naive_utc.timestamp())`
  (Feast's sqlite adapter) and is read back as `datetime.fromtimestamp(v)` with UTC attached —
  a round trip through the local time zone that this module repeats rather than "fixes";
- Redis: the timestamp is the `_ts:<view>` field (a protobuf Timestamp), null here when absent
  (Feast then reports 1970-01-01, i.e. `__ts` 0 in `to_dict`, as for a missing SQLite row);
- no TTL filter: Feast 0.67 checks feature-view TTLs online only on the pre-computed
  feature-service path (`precompute_online`), which Kapok does not use; a plain
  `get_online_features` returns every stored value, however old, with status PRESENT;
- a value is whatever the stored `ValueProto` holds (an int stored for a float feature stays
  that number); anything the fast decoder does not recognise goes through Feast's own
  `feast_value_type_to_python_type`.

The cache. Rows are cached per enterprise for one *materialization generation*:
`features.store.materialize` runs inside `materialization()`, which bumps the generation before
and after the load: a small JSON file per project next to the registry (replaced atomically) and,
for Redis, the key `kapok:<project>:materialized_at`. Before using the cache a reader stats that
file and, for SQLite, the database file (a write made outside Kapok, e.g. Feast's
`write_to_online_store`, changes it too); for Redis it also GETs the key, in the same pipeline as
its reads (so even a read served wholly from the cache makes one small round trip). A new
generation drops the cache; while a load runs nothing is served from or kept in the cache; rows
read while the generation moved are not kept. The cache is bounded: full, it is cleared.

Not seen by the cache: writes to Redis that bypass `features.store.materialize` (or
`materialization()`), and two writes to the SQLite file inside one kernel clock tick (a few ms)
with a read between them. A crashed load leaves the generation "running": caching stays off
until the next load finishes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain, repeat
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import polars as pl
import pyarrow as pa
from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key, serialize_entity_key_prefix
from feast.infra.online_stores.helpers import _mmh3, compute_table_id
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.protos.feast.types.Value_pb2 import ValueType as ValueTypeProto
from feast.repo_config import RepoConfig
from feast.type_map import feast_value_type_to_python_type
from google.protobuf.timestamp_pb2 import Timestamp

from features.feast_defs import enterprise
from features.schema import FAMILIES, FEATURES
from features.store import repo_config_dict
from kapok.settings import Paths

OnlineRows: TypeAlias = pl.DataFrame
"""One row per requested enterprise, in request order: `enterprise_id`, every stored feature
(schema dtypes, null when missing), `__ts_<family>` (UTC, null when the family has no row) and
`found` (False when the store has no value for any feature: the API's 404)."""

ENTITY_COLUMN = "enterprise_id"
FOUND_COLUMN = "found"
TS_PREFIX = "__ts_"
GENERATION_FILE = "materialization.{project}.json"  # next to the registry
DEFAULT_CACHE_SIZE = 200_000
REDIS_GENERATION_TTL = timedelta(days=40)  # longer than the monthly materialization cadence
SQLITE_MAX_PARAMS = 30_000  # below SQLITE_MAX_VARIABLE_NUMBER (32766 since SQLite 3.32)

POLARS_TYPE: dict[str, pl.DataType] = {
    "float": pl.Float64(),
    "int": pl.Int64(),
    "string": pl.String(),
}
TS_TYPE = pl.Datetime("us", "UTC")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def _prefetch(path: Path) -> None:
    """Ask the kernel to read the SQLite online store into the page cache in the background
    (posix_fadvise WILLNEED, returns at once), as databases pre-warm their files: the store
    keeps one row per enterprise and feature, so the first reads of enterprises spread over it
    otherwise wait on the disk for every page (a /screen of 1,000 took 6-8 s instead of 1.7 s
    on a machine whose page cache had not seen the file). Skipped when the file is larger than
    a quarter of the memory available, so that it cannot push everything else out."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        size = path.stat().st_size
        pages, free = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_AVPHYS_PAGES")
        if size > pages * free // 4:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    except (OSError, ValueError):  # an optimisation only: never a reason to fail a read
        return


def ts_column(family: str) -> str:
    return TS_PREFIX + family


def online_schema() -> pl.Schema:
    """The columns and dtypes of every frame `OnlineFeatures.read` returns."""
    cols: dict[str, pl.DataType] = {ENTITY_COLUMN: pl.String()}
    cols |= {f.name: POLARS_TYPE[f.dtype] for f in FEATURES}
    cols |= {ts_column(fam.name): TS_TYPE for fam in FAMILIES}
    cols[FOUND_COLUMN] = pl.Boolean()
    return pl.Schema(cols)


_EMPTY: list[pl.DataFrame] = []


def _empty() -> pl.DataFrame:
    """A frame of no rows with the online schema (building one from the schema costs ~300 µs)."""
    if not _EMPTY:
        _EMPTY.append(pl.DataFrame(schema=online_schema()))
    return _EMPTY[0].clear()


# -- configuration -------------------------------------------------------------------------------
def _repo_config(
    p: Paths, source: FeatureStore | RepoConfig | Mapping[str, Any] | None
) -> RepoConfig:
    if isinstance(source, FeatureStore):
        return source.config
    if isinstance(source, RepoConfig):
        return source
    config = RepoConfig(**dict(source if source is not None else repo_config_dict(p)))
    config.repo_path = p.feature_repo
    return config


def _feast_data(config: RepoConfig) -> Path:
    """The folder of the registry file (Paths.feast_data in Kapok's layout)."""
    registry = config.registry
    path = Path(registry if isinstance(registry, str) else registry.path)
    if not path.is_absolute() and config.repo_path:
        path = Path(config.repo_path) / path
    return path.parent


def generation_file(config: RepoConfig | FeatureStore) -> Path:
    """The project's materialization generation: a JSON file next to the registry."""
    cfg = config.config if isinstance(config, FeatureStore) else config
    return _feast_data(cfg) / GENERATION_FILE.format(project=cfg.project)


def redis_generation_key(project: str) -> str:
    return f"kapok:{project}:materialized_at"


def _is_redis(config: RepoConfig) -> bool:
    return config.online_store.type in ("redis", "feast.infra.online_stores.redis.RedisOnlineStore")


# A Redis that is down must fail a request in milliseconds, not after redis-py's default retries
# (3 with exponential backoff: ~4 s per call, ~11 s for one /score); a Redis that hangs, within
# seconds. One immediate retry still rides over a dropped connection.
REDIS_RETRIES = 1
REDIS_CONNECT_TIMEOUT = 2.0  # s
REDIS_SOCKET_TIMEOUT = 5.0  # s: a /screen pipeline of 1,000 enterprises takes ~0.2 s


def _redis_client(config: RepoConfig) -> Any:
    """A client built the way Feast's Redis online store builds its own, that fails fast."""
    from feast.infra.online_stores.redis import RedisOnlineStore
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = RedisOnlineStore()._get_client(config.online_store)
    with contextlib.suppress(AttributeError):  # a cluster client keeps its own policy
        client.set_retry(Retry(NoBackoff(), REDIS_RETRIES))
        kwargs = client.connection_pool.connection_kwargs
        for name, seconds in (("socket_connect_timeout", REDIS_CONNECT_TIMEOUT),
                              ("socket_timeout", REDIS_SOCKET_TIMEOUT)):  # fmt: skip
            if kwargs.get(name) is None:  # unless the connection string sets it
                kwargs[name] = seconds
    return client


# -- materialization generation ------------------------------------------------------------------
def bump_generation(config: RepoConfig | FeatureStore, *, running: bool) -> dict[str, Any]:
    """Publish a new materialization generation: the file next to the registry (atomic replace)
    and, for Redis, `kapok:<project>:materialized_at`. `running` tells readers a load is under
    way (they neither use nor fill their cache until the next, finished, generation)."""
    cfg = config.config if isinstance(config, FeatureStore) else config
    state = {
        "generation": uuid.uuid4().hex,
        "at": datetime.now(UTC).isoformat(),
        "running": running,
        "project": cfg.project,
    }
    text = json.dumps(state)
    target = generation_file(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{state['generation']}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    if _is_redis(cfg):
        # it expires so that projects torn down (tests) leave nothing behind for long; readers
        # only compare it with what they saw, so its disappearing merely drops their caches
        key = redis_generation_key(cfg.project)
        _redis_client(cfg).set(key, text, ex=REDIS_GENERATION_TTL)
    return state


@contextmanager
def materialization(config: RepoConfig | FeatureStore) -> Iterator[None]:
    """Wrap a write to the online store: readers bypass their caches while it runs and drop
    them when it ends (also when it fails: part of it may have been written)."""
    bump_generation(config, running=True)
    try:
        yield
    finally:
        bump_generation(config, running=False)


def _running(state_text: str | bytes | None) -> bool:
    if not state_text:
        return False
    try:
        return bool(json.loads(state_text).get("running", False))
    except (ValueError, AttributeError):
        return True  # unreadable: be safe, do not cache


# -- value decoding ------------------------------------------------------------------------------
_NULL, _DOUBLE, _FLOAT32, _VARINT, _STRING, _OTHER = range(6)
_CODE = {"float": 0, "int": 1, "string": 2}
_R8 = np.arange(1, 9)
_R4 = np.arange(1, 5)
_R10 = np.arange(1, 11)
_J10 = np.arange(10)
_SHIFT = (np.arange(10) * 7).astype(np.uint64)
_PAD = bytes(16)


@dataclass
class _Decoded:
    kind: np.ndarray  # per blob: _NULL, _DOUBLE, ...
    num: np.ndarray  # float64 value of _DOUBLE / _FLOAT32 / _VARINT blobs
    ints: np.ndarray  # int64 value of _VARINT blobs


def _decode(blobs: list[bytes]) -> _Decoded:
    """Classify serialized ValueProtos and decode the numeric ones, all at once.

    A set scalar ValueProto is one field: tag byte, payload. double_val (field 5) is 0x29 + 8
    bytes, float_val 0x35 + 4, int32/int64/bool_val (3, 4, 7) 0x18/0x20/0x38 + a varint,
    string_val 0x12 + length + UTF-8. An unset one (null) serializes to b"".
    """
    n = len(blobs)
    lens = np.fromiter(map(len, blobs), dtype=np.int64, count=n)
    starts = np.cumsum(lens) - lens
    buf = np.frombuffer(b"".join(blobs) + _PAD, dtype=np.uint8)
    tag = np.where(lens > 0, buf[starts], 0)
    kind = np.full(n, _OTHER, dtype=np.int8)
    kind[lens == 0] = _NULL
    num = np.zeros(n, dtype=np.float64)
    ints = np.zeros(n, dtype=np.int64)

    m = np.flatnonzero((tag == 0x29) & (lens == 9))
    if m.size:
        num[m] = np.ascontiguousarray(buf[starts[m, None] + _R8]).view("<f8")[:, 0]
        kind[m] = _DOUBLE
    m = np.flatnonzero((tag == 0x35) & (lens == 5))
    if m.size:
        num[m] = np.ascontiguousarray(buf[starts[m, None] + _R4]).view("<f4")[:, 0]
        kind[m] = _FLOAT32
    m = np.flatnonzero(((tag == 0x20) | (tag == 0x18) | (tag == 0x38)) & (lens >= 2) & (lens <= 11))
    if m.size:
        b = buf[starts[m, None] + _R10].astype(np.uint64)
        width = (lens[m] - 1)[:, None]
        inside = width > _J10
        # a well-formed varint: continuation bit on every byte but its last
        ok = np.all(((b & 0x80) != 0) == (width - 1 > _J10), axis=1, where=inside)
        value = (((b & 0x7F) << _SHIFT) * inside).sum(axis=1, dtype=np.uint64).view(np.int64)
        m, value = m[ok], value[ok]
        ints[m] = value
        num[m] = value
        kind[m] = _VARINT
    m = np.flatnonzero((tag == 0x12) & (lens >= 2) & (lens < 130))
    if m.size:
        m = m[buf[starts[m] + 1] == lens[m] - 2]  # one-byte length prefix covering the rest
        kind[m] = _STRING
    return _Decoded(kind, num, ints)


def _feast_value(blob: bytes) -> Any:
    """Feast's own conversion, for anything the fast decoder leaves alone."""
    return feast_value_type_to_python_type(ValueProto.FromString(blob))


_ARROW_TS = pa.timestamp("us", tz="UTC")
_FLOAT_IDX = np.array([j for j, f in enumerate(FEATURES) if f.dtype == "float"], dtype=np.int64)
_INT_IDX = np.array([j for j, f in enumerate(FEATURES) if f.dtype == "int"], dtype=np.int64)
_STR_IDX = [j for j, f in enumerate(FEATURES) if f.dtype == "string"]
_SLOT = {int(j): k for idx in (_FLOAT_IDX, _INT_IDX, _STR_IDX) for k, j in enumerate(idx)}
_FAMILY_OF = np.array([[x.name for x in FAMILIES].index(f.family) for f in FEATURES])
_NAMES = [ENTITY_COLUMN, *(f.name for f in FEATURES), *(ts_column(x.name) for x in FAMILIES)]
_NAMES.append(FOUND_COLUMN)
_DTYPE_CODE = np.array([_CODE[f.dtype] for f in FEATURES], dtype=np.int8)


def _assemble(
    n_rows: int,
    blobs: list[bytes],
    pos: np.ndarray,
    feat: np.ndarray,
    ts_micros: np.ndarray,
    ts_valid: np.ndarray,
    ids: list[str],
) -> pl.DataFrame:
    """The frame of `n_rows` entities from serialized values: blob i is feature `feat[i]` (an
    index into FEATURES) of entity `pos[i]`. ts_* are (family, entity) matrices."""
    dec = _decode(blobs) if blobs else _Decoded(*(np.zeros(0, t) for t in (np.int8, float, int)))
    n_feat = len(FEATURES)
    num = np.zeros((n_feat, n_rows), dtype=np.float64)
    ints = np.zeros((n_feat, n_rows), dtype=np.int64)
    valid = np.zeros((n_feat, n_rows), dtype=bool)
    code = _DTYPE_CODE[feat]
    kind = dec.kind

    fast_float = (code == 0) & ((kind == _DOUBLE) | (kind == _FLOAT32) | (kind == _VARINT))
    num[feat[fast_float], pos[fast_float]] = dec.num[fast_float]
    fast_int = (code == 1) & (kind == _VARINT)
    ints[feat[fast_int], pos[fast_int]] = dec.ints[fast_int]
    fast_str = (code == 2) & (kind == _STRING)
    is_null = kind == _NULL
    present = fast_float | fast_int | fast_str
    valid[feat[present], pos[present]] = True
    found = np.zeros(n_rows, dtype=bool)
    found[pos[present]] = True

    strings: dict[int, list[Any]] = {
        j: [None] * n_rows for j, f in enumerate(FEATURES) if f.dtype == "string"
    }
    for i in np.flatnonzero(fast_str).tolist():
        strings[int(feat[i])][int(pos[i])] = blobs[i][2:].decode("utf-8")
    # the rest: Feast's own conversion, value by value (none in Kapok's data)
    slow: dict[int, list[tuple[int, Any]]] = {}
    for i in np.flatnonzero(~(present | is_null)).tolist():
        j, row = int(feat[i]), int(pos[i])
        value = _feast_value(blobs[i])
        slow.setdefault(j, []).append((row, value))
        found[row] |= value is not None

    # One Arrow array per dtype, sliced into the columns of one struct array, converted to
    # polars in one call: per-column construction costs more than the decoding for small reads.
    n = n_rows
    floats = pa.array(num[_FLOAT_IDX].ravel(), mask=~valid[_FLOAT_IDX].ravel())
    integers = pa.array(ints[_INT_IDX].ravel(), mask=~valid[_INT_IDX].ravel())
    texts = pa.array(list(chain.from_iterable(strings[j] for j in _STR_IDX)), type=pa.string())
    group = {"float": floats, "int": integers, "string": texts}
    stamps = pa.array(ts_micros.ravel(), type=_ARROW_TS, mask=~ts_valid.ravel())
    children = [pa.array(ids, type=pa.string())]
    children += [group[f.dtype].slice(_SLOT[j] * n, n) for j, f in enumerate(FEATURES)]
    children += [stamps.slice(k * n, n) for k in range(len(FAMILIES))]
    children.append(pa.array(found, type=pa.bool_()))
    frame = pl.Series(pa.StructArray.from_arrays(children, names=_NAMES)).struct.unnest()
    if slow:
        frame = frame.with_columns(
            _patched(frame[FEATURES[j].name], values) for j, values in slow.items()
        )
    return frame


def _patched(col: pl.Series, values: list[tuple[int, Any]]) -> pl.Series:
    rows, patch = zip(*values, strict=True)
    return col.scatter(list(rows), pl.Series(patch, strict=False).cast(col.dtype, strict=False))


# -- the cache -----------------------------------------------------------------------------------
class _RowCache:
    """enterprise_id -> row of a polars frame kept in a few chunks (sizes merged like a
    log-structured tree, so adding rows costs amortized O(log n) copies and a gather stays fast).
    Cleared, not evicted, when full."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.clear()

    def clear(self) -> None:
        self.index: dict[str, int] = {}
        self._chunks: list[pl.DataFrame] = []
        self._frame: pl.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.index)

    def add(self, ids: list[str], rows: pl.DataFrame) -> None:
        if not ids or len(ids) > self.max_rows:
            return
        if len(self.index) + len(ids) > self.max_rows:
            self.clear()
        base = len(self.index)
        self.index.update(zip(ids, range(base, base + len(ids)), strict=True))
        self._chunks.append(rows.clone())  # shallow: the caller's frame may be changed in place
        while len(self._chunks) > 1 and 2 * self._chunks[-1].height >= self._chunks[-2].height:
            last = self._chunks.pop()
            self._chunks[-1] = pl.concat([self._chunks[-1], last], rechunk=True)
        self._frame = None

    def gather(self, rows: list[int]) -> pl.DataFrame:
        if self._frame is None:
            self._frame = pl.concat(self._chunks, rechunk=False)
        if len(rows) == 1:
            return self._frame.slice(rows[0], 1)  # ~10 µs; a one-row gather costs ~150 µs
        return self._frame[rows]


# -- the reader ----------------------------------------------------------------------------------
class OnlineStoreUnavailable(RuntimeError):
    """The online store cannot be read (Redis down, the SQLite file gone or unreadable): a fault
    of the store, not of the request. The message names the store."""


def _store_faults() -> tuple[type[BaseException], ...]:
    faults: tuple[type[BaseException], ...] = (sqlite3.OperationalError, sqlite3.DatabaseError)
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        faults += (RedisConnectionError, RedisTimeoutError)
    except ImportError:  # pragma: no cover - redis comes with feast[redis]
        pass
    return faults


class OnlineFeatures:
    """Reads the stored features of N enterprises at once from Feast's online store.

    `store` is the FeatureStore Kapok uses (features.store.feature_store) or its repo config (the
    dict of features.store.repo_config_dict, or a RepoConfig); default: the config of `paths`.
    Thread safe (reads are serialized). `cache=False` reads the store on every call.
    """

    def __init__(
        self,
        paths: Paths,
        store: FeatureStore | RepoConfig | Mapping[str, Any] | None = None,
        *,
        cache: bool = True,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        self.paths = paths
        self.config = _repo_config(paths, store)
        self.project: str = self.config.project
        self.backend = "redis" if _is_redis(self.config) else "sqlite"
        if self.backend == "sqlite" and self.config.online_store.type not in (
            "sqlite",
            "feast.infra.online_stores.sqlite.SqliteOnlineStore",
        ):
            raise ValueError(f"unsupported online store {self.config.online_store.type!r}")
        versioning = getattr(self.config.registry, "enable_online_feature_view_versioning", False)
        if versioning:
            raise NotImplementedError("online feature-view versioning is not supported")
        self._version = self.config.entity_key_serialization_version
        self._key_prefix = serialize_entity_key_prefix([enterprise.join_key], self._version)
        self._check_key_encoding()
        # Redis keys that expire by themselves (key_ttl_seconds) would outlive them in a cache
        expiring = getattr(self.config.online_store, "key_ttl_seconds", None)
        self._cache = _RowCache(cache_size) if cache and not expiring else None
        self._lock = threading.Lock()
        self._gen_path = generation_file(self.config)
        self._token: tuple | None = None
        self._cacheable = False
        self._redis_state: bytes | None = None
        self._ts_memo: dict[Any, int] = {}
        self.hits = 0
        self.misses = 0
        self._feature_index = {f.name: j for j, f in enumerate(FEATURES)}
        self._faults = _store_faults()
        if self.backend == "sqlite":
            from feast.infra.online_stores.sqlite import SqliteOnlineStore

            self._db_path = Path(SqliteOnlineStore._get_db_path(self.config))
            self._conn: sqlite3.Connection | None = None
            self._conn_ino: int | None = None
            self._tables = {
                fam.name: compute_table_id(self.project, _Named(fam.name), False)
                for fam in FAMILIES
            }
        else:
            self._redis = _redis_client(self.config)
            self._project_bytes = self.project.encode("utf-8")
            feature_fields = [_mmh3(f"{f.family}:{f.name}") for f in FEATURES]
            ts_fields = [f"_ts:{fam.name}".encode() for fam in FAMILIES]
            self._fields = feature_fields + ts_fields
            self._gen_key = redis_generation_key(self.project)

    # -- public ----------------------------------------------------------------------------------
    def read(self, enterprise_ids: Sequence[str]) -> OnlineRows:
        """One row per id, in the order given (duplicates repeated)."""
        ids = list(enterprise_ids)
        if not ids:
            return _empty()
        unique = list(dict.fromkeys(ids))
        with self._lock:
            try:
                rows = self._read_unique(unique)
            except (*self._faults, FileNotFoundError) as e:
                raise OnlineStoreUnavailable(f"{self.describe()} unavailable: {e}") from e
        if len(unique) == len(ids):
            return rows
        where = {e: i for i, e in enumerate(unique)}
        return rows[[where[e] for e in ids]]

    def describe(self) -> str:
        """Which store: 'the Redis online store at redis://…' or 'the SQLite online store at …'."""
        if self.backend == "redis":
            conn = getattr(self.config.online_store, "connection_string", "") or ""
            return f"the Redis online feature store ({conn.split(',')[0]})"
        return f"the SQLite online feature store ({self._db_path})"

    def ping(self) -> None:
        """OnlineStoreUnavailable unless the store answers now (a readiness probe's check:
        one Redis PING, or one SQLite query)."""
        try:
            if self.backend == "redis":
                self._redis.ping()
            else:
                with self._lock:
                    self._connection().execute("SELECT 1").fetchone()
        except (*self._faults, FileNotFoundError) as e:
            raise OnlineStoreUnavailable(f"{self.describe()} unavailable: {e}") from e

    def clear_cache(self) -> None:
        with self._lock:
            if self._cache is not None:
                self._cache.clear()

    def cache_info(self) -> dict[str, Any]:
        return {
            "enabled": self._cache is not None,
            "size": len(self._cache) if self._cache is not None else 0,
            "max_size": self._cache.max_rows if self._cache is not None else 0,
            "hits": self.hits,
            "misses": self.misses,
        }

    def close(self) -> None:
        with self._lock:
            if self.backend == "sqlite" and self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- keys ------------------------------------------------------------------------------------
    def entity_key(self, enterprise_id: str) -> bytes:
        """Feast's serialize_entity_key (v3) of one enterprise id, built from its prefix."""
        value = enterprise_id.encode("utf-8")
        return (
            self._key_prefix
            + ValueTypeProto.STRING.to_bytes(4, "little")
            + len(value).to_bytes(4, "little")
            + value
        )

    def _check_key_encoding(self) -> None:
        for sample in ("91440101MA59ABCD1X", "", "企业"):
            key = EntityKeyProto(
                join_keys=[enterprise.join_key], entity_values=[ValueProto(string_val=sample)]
            )
            if self.entity_key(sample) != serialize_entity_key(key, self._version):
                raise RuntimeError(
                    "Feast's entity key encoding changed: features/online.py needs updating"
                )

    # -- cache and generation --------------------------------------------------------------------
    def _local_token(self) -> tuple:
        """Generation file (and SQLite database file) identity: a stat or two."""
        try:
            st = os.stat(self._gen_path)
            gen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            gen = None
        if self.backend != "sqlite":
            return (gen,)
        try:
            st = os.stat(self._db_path)
            db = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            db = None
        return (gen, db)

    def _sync_local(self) -> tuple:
        token = self._local_token()
        if token != self._token:
            assert self._cache is not None
            self._cache.clear()
            self._token = token
            try:
                self._cacheable = not _running(self._gen_path.read_bytes())
            except FileNotFoundError:
                self._cacheable = True
        return token

    def _read_unique(self, unique: list[str]) -> pl.DataFrame:
        cache = self._cache
        if cache is None:
            self.misses += len(unique)
            return self._fetch(unique)[0]
        token = self._sync_local()
        slots = [cache.index.get(e) for e in unique]
        misses = [e for e, s in zip(unique, slots, strict=True) if s is None]
        fetched, state = (
            self._fetch(misses, generation=self.backend == "redis")
            if misses or self.backend == "redis"
            else (None, None)
        )
        cacheable = self._cacheable
        if self.backend == "redis":
            before, after = state
            if before != self._redis_state:  # a materialization since the cache was filled
                cache.clear()
                self._redis_state = before
                if len(misses) < len(unique):
                    slots, misses = [None] * len(unique), unique
                    fetched, (before, after) = self._fetch(misses, generation=True)
                    self._redis_state = before
            cacheable = cacheable and not _running(before) and after == before
        if self._local_token() != token:
            cacheable = False  # the generation moved while we read: do not keep these rows
        n_hits = len(unique) - len(misses)
        self.hits += n_hits
        self.misses += len(misses)
        hits = cache.gather([s for s in slots if s is not None]) if n_hits else None
        if cacheable and fetched is not None:
            cache.add(misses, fetched)
        elif not cacheable:
            cache.clear()
        if hits is None:
            assert fetched is not None
            return fetched
        if not misses:
            return hits
        assert fetched is not None
        order, h, m = [], 0, n_hits
        for s in slots:
            if s is None:
                order.append(m)
                m += 1
            else:
                order.append(h)
                h += 1
        return pl.concat([hits, fetched])[order]

    # -- store reads -----------------------------------------------------------------------------
    def _fetch(self, ids: list[str], generation: bool = False) -> tuple[pl.DataFrame, Any]:
        with _gc_paused():
            if self.backend == "redis":
                return self._fetch_redis(ids, generation)
            return (self._fetch_sqlite(ids) if ids else _empty()), None

    def _connection(self) -> sqlite3.Connection:
        try:
            ino = os.stat(self._db_path).st_ino
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"no online store at {self._db_path}: run `kapok features apply` and "
                "`kapok features materialize`"
            ) from e
        if self._conn is None or ino != self._conn_ino:  # Feast's teardown deletes the file
            if self._conn is not None:
                self._conn.close()
            self._conn = sqlite3.connect(
                f"{self._db_path.as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            self._conn_ino = ino
            _prefetch(self._db_path)
        return self._conn

    def _sqlite_rows(self, table: str, keys: list[bytes]) -> list[tuple]:
        conn = self._connection()
        rows: list[tuple] = []
        for i in range(0, len(keys), SQLITE_MAX_PARAMS):
            chunk = keys[i : i + SQLITE_MAX_PARAMS]
            # Feast's online_read query: the same rows in the same order
            sql = (
                f'SELECT entity_key, feature_name, value, event_ts FROM "{table}" '
                f"WHERE entity_key IN ({','.join('?' * len(chunk))}) ORDER BY entity_key"
            )
            rows.extend(conn.execute(sql, chunk).fetchall())
        return rows

    def _sqlite_ts(self, raw: Any) -> int:
        """Feast's reading of event_ts: datetime.fromtimestamp(int(v)), then UTC attached."""
        micros = self._ts_memo.get(raw)
        if micros is None:
            dt = datetime.fromtimestamp(int(raw)).replace(tzinfo=UTC)
            micros = (dt - _EPOCH) // _MICRO
            if len(self._ts_memo) > 100_000:
                self._ts_memo.clear()
            self._ts_memo[raw] = micros
        return micros

    def _fetch_sqlite(self, ids: list[str]) -> pl.DataFrame:
        n = len(ids)
        keys = [self.entity_key(e) for e in ids]
        rows: list[tuple] = []
        counts = []
        for fam in FAMILIES:
            got = self._sqlite_rows(self._tables[fam.name], keys)
            rows.extend(got)
            counts.append(len(got))
        ts_micros = np.zeros((len(FAMILIES), n), dtype=np.int64)
        ts_valid = np.zeros((len(FAMILIES), n), dtype=bool)
        if not rows:
            none = np.zeros(0, dtype=np.int64)
            return _assemble(n, [], none, none, ts_micros, ts_valid, ids)
        eks, names, values, stamps = zip(*rows, strict=True)
        m = len(rows)
        fam = np.repeat(np.arange(len(FAMILIES)), counts)
        pos_of = {k: i for i, k in enumerate(keys)}
        pos = np.fromiter(map(pos_of.__getitem__, eks), dtype=np.int64, count=m)
        feat = np.fromiter(map(self._feature_index.get, names, repeat(-1)), np.int64, count=m)
        # the event time of an entity in a view is the one of its last row there (a view's rows
        # come grouped by entity key, views one after the other)
        last = np.ones(m, dtype=bool)
        last[:-1] = (pos[1:] != pos[:-1]) | (fam[1:] != fam[:-1])
        where = np.flatnonzero(last)
        for i, k, row in zip(where.tolist(), fam[where].tolist(), pos[where].tolist(), strict=True):
            ts_micros[k, row] = self._sqlite_ts(stamps[i])
        ts_valid[fam[where], pos[where]] = True
        # only the view's own features (Feast reads a table's rows for its requested features)
        keep = (feat >= 0) & (_FAMILY_OF[feat] == fam)
        if keep.all():
            return _assemble(n, list(values), pos, feat, ts_micros, ts_valid, ids)
        chosen = np.flatnonzero(keep)
        blobs = [values[i] for i in chosen.tolist()]
        return _assemble(n, blobs, pos[chosen], feat[chosen], ts_micros, ts_valid, ids)

    def _redis_ts(self, blob: bytes) -> int:
        """Feast's reading of `_ts:<view>`: fromtimestamp(seconds + nanos / 1e9, UTC)."""
        micros = self._ts_memo.get(blob)
        if micros is None:
            ts = Timestamp.FromString(blob)
            dt = datetime.fromtimestamp(ts.seconds + ts.nanos / 1_000_000_000.0, tz=UTC)
            micros = (dt - _EPOCH) // _MICRO
            if len(self._ts_memo) > 100_000:
                self._ts_memo.clear()
            self._ts_memo[blob] = micros
        return micros

    def _fetch_redis(self, ids: list[str], generation: bool) -> tuple[pl.DataFrame, Any]:
        n = len(ids)
        fields = self._fields
        n_feat = len(FEATURES)
        with self._redis.pipeline(transaction=False) as pipe:
            if generation:
                pipe.get(self._gen_key)
            for e in ids:
                pipe.hmget(self.entity_key(e) + self._project_bytes, fields)
            if generation:
                pipe.get(self._gen_key)
            replies = pipe.execute()
        state = None
        if generation:
            state = (replies[0], replies[-1])
            replies = replies[1:-1]
        if not n:
            return _empty(), state
        blobs = [b or b"" for b in chain.from_iterable(r[:n_feat] for r in replies)]
        pos = np.repeat(np.arange(n, dtype=np.int64), n_feat)
        feat = np.tile(np.arange(n_feat, dtype=np.int64), n)
        ts_micros = np.zeros((len(FAMILIES), n), dtype=np.int64)
        ts_valid = np.zeros((len(FAMILIES), n), dtype=bool)
        for i, reply in enumerate(replies):
            for k, blob in enumerate(reply[n_feat:]):
                if blob:
                    ts_micros[k, i] = self._redis_ts(blob)
                    ts_valid[k, i] = True
        return _assemble(n, blobs, pos, feat, ts_micros, ts_valid, ids), state


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while a read builds its ~60 objects per entity: with Feast imported the heap
    is large and the collections those allocations trigger cost ~20% of a 1,000-id read."""
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class _Named:
    """What Feast's compute_table_id needs of a feature view when versioning is off."""

    name: str
