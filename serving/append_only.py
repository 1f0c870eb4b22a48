"""Append-only tables: database triggers that refuse UPDATE and DELETE (and TRUNCATE on
PostgreSQL) on a table, so that a record, once committed, is never changed or removed by Kapok
or anyone else with ordinary rights. The decision log (`serving/decision_log.py`) and the
early-warning actions store (`review/actions.py`) each guard their table with one."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa


@dataclass(frozen=True)
class AppendOnly:
    """The triggers of one table; `message` starts every refusal's error text."""

    table: str
    message: str

    @property
    def sqlite_triggers(self) -> list[str]:
        t = self.table
        return [
            f"""CREATE TRIGGER IF NOT EXISTS {t}_no_{op.lower()} BEFORE {op} ON {t}
BEGIN SELECT RAISE(ABORT, '{self.message}'); END;"""
            for op in ("UPDATE", "DELETE")
        ]

    @property
    def pg_function(self) -> str:
        return f"""CREATE OR REPLACE FUNCTION kapok_{self.table}_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE =
        '{self.message}: ' || TG_OP || ' on {self.table} is not allowed';
END;
$$"""

    @property
    def pg_triggers(self) -> dict[str, str]:
        t, function = self.table, f"kapok_{self.table}_append_only()"
        return {
            f"{t}_no_update_delete": f"""CREATE TRIGGER {t}_no_update_delete
BEFORE UPDATE OR DELETE ON {t}
FOR EACH ROW EXECUTE FUNCTION {function}""",
            f"{t}_no_truncate": f"""CREATE TRIGGER {t}_no_truncate
BEFORE TRUNCATE ON {t}
FOR EACH STATEMENT EXECUTE FUNCTION {function}""",
        }

    def install(self, conn: sa.Connection, backend: str) -> None:
        """Create the triggers that are missing (idempotent), in the caller's transaction."""
        if backend == "sqlite":
            for statement in self.sqlite_triggers:
                conn.exec_driver_sql(statement)
            return
        existing = set(
            conn.execute(
                sa.text(
                    "SELECT tgname FROM pg_trigger "
                    f"WHERE tgrelid = '{self.table}'::regclass AND NOT tgisinternal"
                )
            ).scalars()
        )
        missing = [name for name in self.pg_triggers if name not in existing]
        if not missing:
            return
        conn.exec_driver_sql(self.pg_function)
        for name in missing:
            conn.exec_driver_sql(self.pg_triggers[name])


def store_url(raw: str, where: str, store: str, error: type[Exception]) -> sa.URL:
    """`raw` as the URL of a store these triggers can guard (SQLite or PostgreSQL), else
    `error` with a message that names `where` the URL came from (a bad URL) or the `store`
    (another backend), the password masked."""
    try:
        url = sa.make_url(raw)
    except sa.exc.ArgumentError as e:
        raise error(f"{where}: not a valid SQLAlchemy URL: {e}") from e
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise error(
            f"{store} {url.render_as_string(hide_password=True)}: unsupported backend "
            f"{backend!r} (use sqlite or postgresql, which enforce the append-only triggers)"
        )
    return url
