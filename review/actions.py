"""Early-warning actions (处置): what the lender does about a borrower `kapok watch` flags.

The policy's action table (`[[early_warning.actions]]` in serving/policy.toml, validated by
serving/policy.py) maps a watch flag (its trigger, optionally with a size: grades down, PD ratio)
to an action and the days it is due in. `planned` applies it to a watchlist: one row per flagged
borrower and action that applies, due on the as-of date + due_days, with why (the watch's reasons
for that flag). `ActionStore` keeps them in the table `actions`, in the decision log's database
(serving/decision_log.py `default_url()`: SQLite under KAPOK_HOME/decisions, or
KAPOK_DECISION_LOG) but a table of its own, append-only:

    event "action"   an action opened by a watch: action_id, product, enterprise_id, as_of,
                     trigger, details (why), action, description, due_date, status "open"
    event "outcome"  what came of it, recorded by an officer: the action_id it answers, outcome,
                     officer, status "closed" (it closes the action) or "open" (a note, the
                     action stays open); never an update of the action's row

Database triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL), as they do on the
decision log's table. Re-running a watch for the same date opens nothing twice: an action is
identified by product, enterprise, trigger, action and as-of date (a unique index, and the insert
skips those already there). An action is closed at most once (another unique index).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy import event, exc

from review.portfolio import ID
from review.watch import RISK_DRIVERS
from serving.append_only import AppendOnly, store_url
from serving.decision_log import _reason, _sqlite_pragmas, default_url
from serving.policy import EarlyWarningAction
from serving.sqlite_race import retry_racing

APPEND_ONLY_MESSAGE = "actions store is append-only"
_ADVISORY_LOCK_KEY = 7_460_318_215  # serialises schema set-up (PostgreSQL); the log's key + 1
CHUNK = 5_000  # rows per INSERT
MEASURES = {"grade_drop": "grades_down", "pd_doubled": "pd_ratio"}  # what at_least compares


class ActionsError(RuntimeError):
    """The actions store cannot be read or written, or an action id / outcome is wrong."""


# -- what the policy says to do ------------------------------------------------------------------
PLANNED_SCHEMA = {
    ID: pl.String,
    "trigger": pl.String,
    "action": pl.String,
    "due_date": pl.Date,
    "description": pl.String,
    "description_zh": pl.String,
    "details": pl.String,
    "details_zh": pl.String,
}


def planned(
    flagged: pl.DataFrame, entries: Sequence[EarlyWarningAction], as_of: dt.date
) -> pl.DataFrame:
    """One row per flagged borrower and policy entry that applies to it: its trigger flag is set
    and, for grade_drop / pd_doubled with at_least, grades down / PD ratio >= at_least. `details`
    are the watch's reasons for that flag (for a model flag, with the risk drivers)."""
    rows: dict[str, list[Any]] = {name: [] for name in PLANNED_SCHEMA}
    reasons_of = "reason_flags" in flagged.columns
    for entry in entries:
        hit = pl.col(f"flag_{entry.trigger}")
        if entry.at_least is not None:
            hit = hit & (pl.col(MEASURES[entry.trigger]) >= entry.at_least)
        chosen = flagged.filter(hit.fill_null(False))
        if chosen.height == 0:
            continue
        wanted = {entry.trigger, RISK_DRIVERS} if entry.trigger in MEASURES else {entry.trigger}
        for row in chosen.iter_rows(named=True):
            tags = row["reason_flags"] if reasons_of else [entry.trigger] * len(row["reasons"])
            keep = [i for i, tag in enumerate(tags) if tag in wanted]
            rows[ID].append(row[ID])
            rows["trigger"].append(entry.trigger)
            rows["action"].append(entry.action)
            rows["due_date"].append(as_of + dt.timedelta(days=entry.due_days))
            rows["description"].append(entry.description)
            rows["description_zh"].append(entry.description_zh)
            rows["details"].append(" | ".join(row["reasons"][i] for i in keep))
            rows["details_zh"].append(" | ".join(row["reasons_zh"][i] for i in keep))
    return pl.DataFrame(rows, schema=PLANNED_SCHEMA)


# -- the store -----------------------------------------------------------------------------------
_metadata = sa.MetaData()
_ACTION = sa.text("event = 'action'")
_CLOSING = sa.text("event = 'outcome' AND status = 'closed'")

actions = sa.Table(
    "actions",
    _metadata,
    # the order rows were written in
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("event", sa.Text, nullable=False),  # "action" | "outcome"
    sa.Column("action_id", sa.Text, nullable=False),  # the action opened, or answered
    sa.Column("created_at", sa.Text, nullable=False),  # ISO 8601 UTC; an outcome's recorded_at
    sa.Column("product", sa.Text, nullable=False),
    sa.Column("enterprise_id", sa.Text, nullable=False),
    sa.Column("as_of", sa.Date, nullable=True),  # the watch's date (actions)
    sa.Column("trigger", sa.Text, nullable=True),
    sa.Column("details", sa.Text, nullable=True),  # why, in English
    sa.Column("details_zh", sa.Text, nullable=True),
    sa.Column("action", sa.Text, nullable=True),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("due_date", sa.Date, nullable=True),
    sa.Column("status", sa.Text, nullable=False),  # the action's status once this row is written
    sa.Column("outcome", sa.Text, nullable=True),  # outcomes
    sa.Column("officer", sa.Text, nullable=True),
    sa.CheckConstraint("status IN ('open', 'closed')", name="actions_status_check"),
    sa.CheckConstraint(
        "(event = 'action' AND status = 'open' AND as_of IS NOT NULL AND trigger IS NOT NULL"
        " AND action IS NOT NULL AND due_date IS NOT NULL AND outcome IS NULL)"
        " OR (event = 'outcome' AND outcome IS NOT NULL AND officer IS NOT NULL)",
        name="actions_event_check",
    ),
    sa.Index("actions_id_idx", "action_id", unique=True, sqlite_where=_ACTION,
             postgresql_where=_ACTION),
    sa.Index("actions_once_idx", "product", "enterprise_id", "trigger", "action", "as_of",
             unique=True, sqlite_where=_ACTION, postgresql_where=_ACTION),
    sa.Index("actions_closed_once_idx", "action_id", unique=True, sqlite_where=_CLOSING,
             postgresql_where=_CLOSING),
    sa.Index("actions_answers_idx", "action_id", "seq"),
)  # fmt: skip

# UPDATE, DELETE (and TRUNCATE) refused by the database, as for the decision log
_GUARD = AppendOnly("actions", APPEND_ONLY_MESSAGE)

# every action with its status now: what `kapok actions list` shows
LIST_SCHEMA = {
    "action_id": pl.String,
    "product": pl.String,
    ID: pl.String,
    "as_of": pl.Date,
    "trigger": pl.String,
    "action": pl.String,
    "description": pl.String,
    "due_date": pl.Date,
    "status": pl.String,  # open | closed
    "overdue": pl.Boolean,  # open and due before the reference date
    "days_overdue": pl.Int64,
    "details": pl.String,
    "details_zh": pl.String,
    "created_at": pl.String,
    "outcomes": pl.Int64,  # outcome rows recorded
    "last_outcome": pl.String,
    "officer": pl.String,
    "outcome_at": pl.String,
}


@dataclass(frozen=True)
class Outcome:
    action_id: str
    enterprise_id: str
    action: str
    status: str  # the action's status after it
    recorded_at: str


def new_action_id() -> str:
    """A fresh action id: 'act_' + 12 hex digits (short enough to type)."""
    return "act_" + uuid.uuid4().hex[:12]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


class ActionStore:
    """The `actions` table: open actions, record outcomes, read them. No update, no delete."""

    def __init__(self, url: str | None = None) -> None:
        raw = url if url is not None else default_url()
        self._url = store_url(raw, "actions store", "actions store", ActionsError)
        self._backend = self._url.get_backend_name()
        connect_args: dict[str, Any] = {}
        if self._backend == "sqlite":
            connect_args = {"timeout": 30}
        elif self._url.get_driver_name() == "psycopg2":
            connect_args = {"connect_timeout": 5}
        try:
            self._engine = sa.create_engine(
                self._url, connect_args=connect_args, pool_pre_ping=True
            )
        except Exception as e:  # missing DBAPI driver, bad options
            raise ActionsError(f"actions store {self.url}: {_reason(e)}") from e
        if self._backend == "sqlite":  # the decision log's settings: same file, same WAL
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self._ready = False

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self._url.render_as_string(hide_password=True)

    def _error(self, error: BaseException, what: str) -> ActionsError:
        return ActionsError(f"actions store {self.url}: {what} ({_reason(error)})")

    # -- schema ------------------------------------------------------------------------------
    def _ensure_schema(self) -> None:
        if self._ready:
            return

        def racing(e: BaseException) -> bool:
            return any(s in str(e) for s in ("already exists", "database is locked"))

        retry_racing(self._create_schema_once, racing)
        self._ready = True

    def _create_schema_once(self) -> None:
        try:
            if (file := self._local_file()) is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
            with self._engine.begin() as conn:
                if self._backend == "postgresql":
                    conn.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY}
                    )
                _metadata.create_all(conn, checkfirst=True)
                _GUARD.install(conn, self._backend)
        except (OSError, exc.SQLAlchemyError) as e:
            raise self._error(e, "cannot create the actions table") from e

    def _local_file(self) -> Path | None:
        """The SQLite database file, None for PostgreSQL or an in-memory database."""
        database = self._url.database or ""
        if (
            self._backend != "sqlite"
            or database in ("", ":memory:")
            or database.startswith("file:")
        ):
            return None
        return Path(database)

    def _exists(self) -> bool:
        """Whether the table is there (reading creates nothing, not even the SQLite file)."""
        if self._ready:
            return True
        if (file := self._local_file()) is not None and not file.exists():
            return False
        try:
            with self._engine.connect() as conn:
                return sa.inspect(conn).has_table("actions")
        except (OSError, exc.SQLAlchemyError) as e:
            raise self._error(e, "cannot read") from e

    # -- writing -----------------------------------------------------------------------------
    def open(self, plan: pl.DataFrame, product: str, as_of: dt.date) -> int:
        """Append the planned actions of one watch (`planned`) not already there for the same
        product, enterprise, trigger, action and as-of date; how many were new. One
        transaction."""
        self._ensure_schema()
        if plan.height == 0:
            return 0
        c = actions.c
        key = ("enterprise_id", "trigger", "action")
        try:
            with self._engine.begin() as conn:
                there = {
                    tuple(r)
                    for r in conn.execute(
                        sa.select(c.enterprise_id, c.trigger, c.action).where(
                            (c.event == "action") & (c.product == product) & (c.as_of == as_of)
                        )
                    )
                }
                at = _now()
                rows = [
                    {
                        "event": "action",
                        "action_id": new_action_id(),
                        "created_at": at,
                        "product": product,
                        "as_of": as_of,
                        "status": "open",
                        "outcome": None,
                        "officer": None,
                        **{k: r[k] for k in PLANNED_SCHEMA if k not in ("description_zh",)},
                    }
                    for r in plan.iter_rows(named=True)
                    if tuple(r[k] for k in key) not in there
                ]
                insert = _insert_skipping_duplicates(self._backend)
                for start in range(0, len(rows), CHUNK):
                    conn.execute(insert, rows[start : start + CHUNK])
        except (OSError, exc.SQLAlchemyError) as e:
            raise self._error(e, f"{len(plan)} actions not written") from e
        return len(rows)

    def record(self, action_id: str, outcome: str, officer: str, *, close: bool = False) -> Outcome:
        """Append an outcome row for `action_id`; with `close`, it closes the action.
        ActionsError for an unknown or already closed action, or a blank outcome or officer."""
        outcome, officer = (outcome or "").strip(), (officer or "").strip()
        if not outcome:
            raise ActionsError("--outcome must not be empty: say what was done or found")
        if not officer:
            raise ActionsError("--officer must not be empty: who records this outcome")
        if not self._exists():
            raise ActionsError(
                f"no action {action_id!r}: the actions store {self.url} holds no action yet "
                "(kapok watch opens them)"
            )
        self._ensure_schema()
        c = actions.c
        status = "closed" if close else "open"
        at = _now()
        try:
            with self._engine.begin() as conn:
                found = conn.execute(
                    sa.select(c.product, c.enterprise_id, c.action).where(
                        (c.event == "action") & (c.action_id == action_id)
                    )
                ).first()
                if found is None:
                    raise ActionsError(
                        f"no action {action_id!r} in the actions store {self.url} "
                        "(kapok actions list shows the open ones)"
                    )
                closed = conn.execute(
                    sa.select(c.created_at, c.officer).where(
                        (c.event == "outcome") & (c.action_id == action_id) & (c.status == "closed")
                    )
                ).first()
                if closed is not None:
                    raise ActionsError(
                        f"action {action_id} was already closed by {closed.officer} at "
                        f"{closed.created_at[:19]}Z; an action is closed once"
                    )
                conn.execute(
                    actions.insert(),
                    {
                        "event": "outcome",
                        "action_id": action_id,
                        "created_at": at,
                        "product": found.product,
                        "enterprise_id": found.enterprise_id,
                        "status": status,
                        "outcome": outcome,
                        "officer": officer,
                    },
                )
        except exc.IntegrityError as e:  # another officer closed it meanwhile
            raise self._error(e, f"action {action_id} was closed meanwhile") from e
        except (OSError, exc.SQLAlchemyError) as e:
            raise self._error(e, f"outcome for {action_id} not written") from e
        return Outcome(action_id, found.enterprise_id, found.action, status, at)

    # -- reading -----------------------------------------------------------------------------
    def rows(self) -> pl.DataFrame:
        """Every row as stored, in the order written."""
        if not self._exists():
            return pl.DataFrame()
        try:
            with self._engine.connect() as conn:
                result = conn.execute(sa.select(actions).order_by(actions.c.seq))
                names = list(result.keys())
                data = [tuple(r) for r in result]
        except (OSError, exc.SQLAlchemyError) as e:
            raise self._error(e, "cannot read") from e
        return pl.DataFrame(data, schema=names, orient="row", infer_schema_length=None)

    def frame(
        self,
        product: str | None = None,
        on: dt.date | None = None,
        *,
        include_closed: bool = False,
    ) -> pl.DataFrame:
        """Every action (open ones only unless `include_closed`) with its status now, the last
        outcome recorded, and whether it is overdue on `on` (default: today, UTC): open and its
        due date before `on`. Most overdue first, then by due date."""
        on = on or dt.datetime.now(dt.UTC).date()
        if not self._exists():
            return pl.DataFrame(schema=LIST_SCHEMA)
        c = actions.c
        where = c.product == product if product else sa.true()
        try:
            with self._engine.connect() as conn:
                opened = conn.execute(
                    sa.select(
                        c.action_id, c.product, c.enterprise_id, c.as_of, c.trigger, c.action,
                        c.description, c.due_date, c.details, c.details_zh, c.created_at,
                    ).where((c.event == "action") & where).order_by(c.seq)
                ).all()  # fmt: skip
                answers = conn.execute(
                    sa.select(c.action_id, c.status, c.outcome, c.officer, c.created_at)
                    .where((c.event == "outcome") & where)
                    .order_by(c.seq)
                ).all()
        except (OSError, exc.SQLAlchemyError) as e:
            raise self._error(e, "cannot read") from e
        base = pl.DataFrame(
            [tuple(r) for r in opened],
            schema={k: LIST_SCHEMA[k] for k in (
                "action_id", "product", ID, "as_of", "trigger", "action", "description",
                "due_date", "details", "details_zh", "created_at")},
            orient="row",
        )  # fmt: skip
        last = (
            pl.DataFrame(
                [tuple(r) for r in answers],
                schema={
                    "action_id": pl.String,
                    "status": pl.String,
                    "last_outcome": pl.String,
                    "officer": pl.String,
                    "outcome_at": pl.String,
                },
                orient="row",
            )
            .group_by("action_id", maintain_order=True)
            .agg(pl.all().last(), pl.len().cast(pl.Int64).alias("outcomes"))
        )
        out = (
            base.join(last, on="action_id", how="left")
            .with_columns(
                pl.col("status").fill_null("open"),
                pl.col("outcomes").fill_null(0),
            )
            .with_columns(
                days_overdue=pl.when(pl.col("status") == "open")
                .then((pl.lit(on) - pl.col("due_date")).dt.total_days())
                .otherwise(0)
                .clip(lower_bound=0)
                .cast(pl.Int64)
            )
            .with_columns(overdue=pl.col("days_overdue") > 0)
        )
        if not include_closed:
            out = out.filter(pl.col("status") == "open")
        return out.select(list(LIST_SCHEMA)).sort(
            ["days_overdue", "due_date", "action_id"], descending=[True, False, False]
        )

    def counts(self, product: str, on: dt.date) -> pl.DataFrame:
        """Per action: open, overdue on `on`, closed (every as-of date of `product`)."""
        every = self.frame(product, on, include_closed=True)
        return every.group_by("action").agg(
            open=(pl.col("status") == "open").sum().cast(pl.Int64),
            overdue=pl.col("overdue").sum().cast(pl.Int64),
            closed=(pl.col("status") == "closed").sum().cast(pl.Int64),
        )

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> ActionStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _insert_skipping_duplicates(backend: str) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING: an action another watch of the same date wrote
    meanwhile is skipped, not an error."""
    if backend == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert(actions).on_conflict_do_nothing()


# -- the watch's summary -------------------------------------------------------------------------
def summary(
    plan: pl.DataFrame, counts: pl.DataFrame, entries: Iterable[EarlyWarningAction]
) -> pl.DataFrame:
    """Per action of the policy: what it means, borrowers it applies to in this watch, and in the
    store (this product, every date) open, overdue and closed."""
    texts: dict[str, list[str]] = {}
    for e in entries:
        texts.setdefault(e.action, []).append(e.description)
    applies = plan.group_by("action").agg(this_watch=pl.col(ID).n_unique().cast(pl.Int64))
    names = list(dict.fromkeys([*texts, *counts["action"].to_list()]))
    frame = pl.DataFrame({"action": names}, schema={"action": pl.String})
    return (
        frame.with_columns(
            description=pl.col("action").replace_strict(
                {k: "; ".join(v) for k, v in texts.items()}, default=""
            )
        )
        .join(applies, on="action", how="left")
        .join(counts, on="action", how="left")
        .fill_null(0)
    )
