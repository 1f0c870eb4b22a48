"""Tamper evidence of the decision log: walk its hash chain (`verify`), read its head (`anchor`).

Every record the log writes carries seq (its place in the chain), prev_hash and hash =
sha256(prev_hash || canonical(record)) (`serving.decision_log`), and the log keeps its head (last
seq and hash) in `decisions_chain`. Someone who can write to the database, the append-only
triggers dropped, can still edit, delete, reorder or insert records; `verify` finds the first
record where the chain no longer holds and says which kind of change explains it:

- edited: the record's content (or its prev_hash) no longer gives its hash;
- deleted: a seq is missing, the record's prev_hash is no record's hash (its predecessor is
  gone), or the chain ends before the recorded head;
- reordered: the record is chained after a record stored later;
- inserted: a record beyond the recorded head, a record chained after an earlier record than the
  one before it (a fork), or a record without seq that was not in the log when chaining began.

An attacker who rewrites the chain from some record to the end, head included, leaves a
consistent chain: what catches that is an anchor, the head (seq and hash) printed by
`kapok audit anchor` and kept outside Kapok; `verify(anchor=(seq, hash))` checks the record at
that seq still has that hash.

Reads only, in chunks of `chunk` rows in seq order (keyset pages on the unique seq index), so a log
of millions of records is walked in bounded memory; writers may keep appending meanwhile.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from serving.decision_log import (
    CHAIN_COLUMNS,
    GENESIS_HASH,
    RECORD_COLUMNS,
    DecisionLog,
    DecisionLogError,
    _reason,
    canonical,
    chain_hash,
    decisions,
    decisions_chain,
    decisions_unchained,
)

CHUNK_ROWS = 5_000
HEAD_MISSING = "the chain's head row (decisions_chain) is missing"


@dataclass(frozen=True)
class Finding:
    """The first record where the chain breaks."""

    kind: str  # edited | deleted | reordered | inserted | rewritten
    # the record: the changed, moved or inserted one; for a deletion the record right after the
    # missing one(s) (None when the chain's end is missing); seq None: an unchained record
    seq: int | None
    request_id: str | None
    reason: str  # one line

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


@dataclass(frozen=True)
class Head:
    seq: int  # 0 before the first chained record
    hash: str
    unchained: int  # records written before chaining began
    started_at: str
    request_id: str | None = None  # the head record's
    decided_at: dt.datetime | None = None


@dataclass(frozen=True)
class Verdict:
    records: int  # chained records walked
    unchained: int  # records written before chaining began (not covered)
    head: Head
    finding: Finding | None

    @property
    def intact(self) -> bool:
        return self.finding is None


def anchor(url: str | None = None) -> Head:
    """The log's current head: seq, hash and the record it belongs to."""
    with _reader(url) as (conn, log):
        try:
            head = _head(conn, with_record=True)
        except exc.SQLAlchemyError as e:
            raise DecisionLogError(f"decision log {log.url}: anchor failed: {_reason(e)}") from e
        if head is None:
            raise DecisionLogError(f"decision log {log.url}: {HEAD_MISSING}")
        return head


def verify(
    url: str | None = None,
    *,
    chunk: int = CHUNK_ROWS,
    progress: Callable[[int], None] | None = None,
    anchor: tuple[int, str] | None = None,
) -> Verdict:
    """Walk the chain up to the head read at the start; the first broken record, or None.

    `progress(n)` is called after each chunk of n records walked; `anchor` = (seq, hash) from an
    earlier `anchor()`."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk!r}")
    with _reader(url) as (conn, log):
        head = _head(conn, with_record=False)
        if head is None:
            gone = Finding("deleted", None, None, HEAD_MISSING)
            return Verdict(0, 0, Head(0, GENESIS_HASH, 0, ""), gone)
        walk = _Walk(conn, head, anchor)
        columns = [decisions.c[n] for n in (*RECORD_COLUMNS, *CHAIN_COLUMNS)]
        last = 0
        try:
            while walk.finding is None and last < head.seq:
                page = conn.execute(
                    sa.select(*columns)
                    .where(decisions.c.seq > last, decisions.c.seq <= head.seq)
                    .order_by(decisions.c.seq)
                    .limit(chunk)
                ).all()
                conn.rollback()  # no snapshot held between pages (SQLite WAL, PostgreSQL)
                if not page:
                    break
                for row in page:
                    walk.step(row._mapping)
                    if walk.finding is not None:
                        break
                last = page[-1]._mapping["seq"]
                if progress is not None:
                    progress(len(page))
            finding = walk.finding or walk.end() or _beyond_head(conn) or _unchained(conn)
        except exc.SQLAlchemyError as e:
            raise DecisionLogError(f"decision log {log.url}: verify failed: {_reason(e)}") from e
        return Verdict(walk.count, head.unchained, head, finding)


class _Walk:
    def __init__(self, conn: sa.Connection, head: Head, anchor: tuple[int, str] | None) -> None:
        self.conn, self.head, self.anchor = conn, head, anchor
        self.seq, self.hash, self.request_id = 0, GENESIS_HASH, None
        self.count = 0
        self.finding: Finding | None = None

    def step(self, row: Any) -> None:
        seq, rid = row["seq"], row["request_id"]
        if seq != self.seq + 1:
            missing = _span(self.seq + 1, seq - 1)
            self.finding = Finding(
                "deleted", seq, rid,
                f"{missing} missing: the chain goes from {self._here()} to seq {seq} ({rid})",
            )  # fmt: skip
            return
        if chain_hash(row["prev_hash"] or "", canonical(row)) != row["hash"]:
            self.finding = Finding(
                "edited", seq, rid,
                f"record seq {seq} ({rid}) was changed: its content does not give its hash",
            )  # fmt: skip
            return
        if row["prev_hash"] != self.hash:
            self.finding = self._broken_link(seq, rid, row["prev_hash"])
            return
        if self.anchor is not None and seq == self.anchor[0] and row["hash"] != self.anchor[1]:
            self.finding = Finding(
                "rewritten", seq, rid,
                f"record seq {seq} ({rid}) has hash {row['hash']}, the anchor says "
                f"{self.anchor[1]}: the log was rewritten since it was anchored",
            )  # fmt: skip
            return
        self.seq, self.hash, self.request_id = seq, row["hash"], rid
        self.count += 1

    def _here(self) -> str:
        return f"seq {self.seq} ({self.request_id})" if self.seq else "the start"

    def _broken_link(self, seq: int, rid: str, prev_hash: str) -> Finding:
        """Record `seq` is sound in itself but not chained after the record before it."""
        linked = self.conn.execute(
            sa.select(decisions.c.seq, decisions.c.request_id).where(decisions.c.hash == prev_hash)
        ).first()  # a full scan, on this failure path only
        if linked is not None and linked.seq > seq:
            return Finding(
                "reordered", seq, rid,
                f"record seq {seq} ({rid}) is chained after seq {linked.seq} "
                f"({linked.request_id}), which is stored later",
            )  # fmt: skip
        if linked is not None:  # a fork: two records chained after `linked`
            # the last record forked off is the intruder; else the chain resumes with this
            # record, and the record after `linked` is the intruder
            last = seq == self.head.seq
            intruder = (seq, rid) if last else self._record_at(linked.seq + 1)
            return Finding(
                "inserted", intruder[0], intruder[1],
                f"record seq {intruder[0]} ({intruder[1]}) is not in the chain: seq {seq} ({rid}) "
                f"is chained directly after seq {linked.seq} ({linked.request_id})",
            )  # fmt: skip
        following = self.conn.execute(
            sa.select(decisions.c.prev_hash)
            .where(decisions.c.seq > seq)
            .order_by(decisions.c.seq)
            .limit(1)
        ).first()
        if following is not None and following.prev_hash == self.hash:  # the chain skips it
            return Finding(
                "inserted", seq, rid,
                f"record seq {seq} ({rid}) is not in the chain: the next record is chained "
                f"directly after {self._here()}",
            )  # fmt: skip
        return Finding(
            "deleted", seq, rid,
            f"the record before seq {seq} ({rid}) is missing: it is chained after a record "
            f"that is no longer in the log (the record before it is {self._here()})",
        )  # fmt: skip

    def _record_at(self, seq: int) -> tuple[int, str | None]:
        rid = self.conn.execute(
            sa.select(decisions.c.request_id).where(decisions.c.seq == seq)
        ).scalar()
        return seq, rid

    def end(self) -> Finding | None:
        """After the walk: the chain must reach the head, and the anchor must be in it."""
        if self.seq < self.head.seq:
            return Finding(
                "deleted", self.seq + 1, None,
                f"{_span(self.seq + 1, self.head.seq)} missing: the chain ends at {self._here()}, "
                f"the log's head is seq {self.head.seq}",
            )  # fmt: skip
        if self.head.seq and self.hash != self.head.hash:
            return Finding(
                "edited", self.seq, self.request_id,
                f"the last record, seq {self.seq} ({self.request_id}), does not have the head "
                f"hash the log recorded ({self.head.hash})",
            )  # fmt: skip
        if self.anchor is not None and self.anchor[0] > self.seq:
            return Finding(
                "deleted", self.anchor[0], None,
                f"the anchor is seq {self.anchor[0]}, the chain ends at seq {self.seq}",
            )  # fmt: skip
        return None


def _span(first: int, last: int) -> str:
    return f"record seq {first} is" if first == last else f"records seq {first}-{last} are"


def _beyond_head(conn: sa.Connection) -> Finding | None:
    """A chained record after the head the log recorded: appended by something other than the
    log (a log appends and moves the head in one transaction)."""
    head_seq = sa.select(decisions_chain.c.seq).where(decisions_chain.c.id == 1).scalar_subquery()
    row = conn.execute(
        sa.select(decisions.c.seq, decisions.c.request_id, head_seq.label("head"))
        .where(decisions.c.seq > head_seq)
        .order_by(decisions.c.seq)
        .limit(1)
    ).first()
    if row is None:
        return None
    return Finding(
        "inserted", row.seq, row.request_id,
        f"record seq {row.seq} ({row.request_id}) is beyond the log's head, seq {row.head}: "
        "it was not written by the log",
    )  # fmt: skip


def _unchained(conn: sa.Connection) -> Finding | None:
    """Records without a seq: only those written before chaining began (decisions_unchained)."""
    listed = sa.select(decisions_unchained.c.request_id).where(
        decisions_unchained.c.request_id == decisions.c.request_id
    )
    added = conn.execute(
        sa.select(decisions.c.request_id)
        .where(decisions.c.seq.is_(None), ~listed.exists())
        .order_by(decisions.c.request_id)
        .limit(1)
    ).scalar()
    if added is not None:
        return Finding(
            "inserted", None, added,
            f"record {added} is outside the chain (no seq) and was not in the log when "
            "chaining began",
        )  # fmt: skip
    present = sa.select(decisions.c.request_id).where(
        decisions.c.request_id == decisions_unchained.c.request_id, decisions.c.seq.is_(None)
    )
    gone = conn.execute(
        sa.select(decisions_unchained.c.request_id)
        .where(~present.exists())
        .order_by(decisions_unchained.c.request_id)
        .limit(1)
    ).scalar()
    if gone is not None:
        return Finding(
            "deleted", None, gone,
            f"record {gone}, written before chaining began, is missing",
        )  # fmt: skip
    return None


def _head(conn: sa.Connection, *, with_record: bool) -> Head | None:
    row = conn.execute(sa.select(decisions_chain).where(decisions_chain.c.id == 1)).first()
    if row is None:
        return None
    head = Head(row.seq, row.hash, row.unchained, row.started_at)
    if with_record and head.seq:
        record = conn.execute(
            sa.select(decisions.c.request_id, decisions.c.decided_at).where(
                decisions.c.seq == head.seq
            )
        ).first()
        if record is not None:
            head = Head(**{**head.__dict__, "request_id": record[0], "decided_at": record[1]})
    return head


class _reader:
    """A connection to an existing log that creates nothing (no file, table or column)."""

    def __init__(self, url: str | None) -> None:
        self.log = DecisionLog(url)

    def __enter__(self) -> tuple[sa.Connection, DecisionLog]:
        log = self.log
        where = f"decision log {log.url}"
        database = log._url.database or ""
        on_disk = log._backend == "sqlite" and not log._in_memory()
        if on_disk and not database.startswith("file:") and not Path(database).exists():
            log.close()  # connecting would create an empty database file
            raise DecisionLogError(f"{where}: no such file")
        try:  # the log's engine: its URL checks, SQLite settings and error messages
            self.conn = log._engine.connect()
            inspector = sa.inspect(self.conn)
            if not inspector.has_table(decisions.name):
                raise DecisionLogError(f"{where}: no decisions table")
            columns = {c["name"] for c in inspector.get_columns(decisions.name)}
            chained = all(
                inspector.has_table(t.name) for t in (decisions_chain, decisions_unchained)
            )
            if not chained or "seq" not in columns:
                count = self.conn.execute(
                    sa.select(sa.func.count()).select_from(sa.table(decisions.name))
                ).scalar_one()
                raise DecisionLogError(
                    f"{where}: not chained: its {count:,} records were written before chaining "
                    "began (not covered); the next decision this version of Kapok logs starts "
                    "the chain"
                )
            self.conn.rollback()
        except exc.SQLAlchemyError as e:
            self.__exit__()
            raise DecisionLogError(f"{where}: cannot read it: {_reason(e)}") from e
        except DecisionLogError:
            self.__exit__()
            raise
        return self.conn, log

    def __exit__(self, *exc_info: object) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
        self.log.close()
