"""The durable incident store: SQLite in WAL mode, or PostgreSQL, with the same schema and behaviour.

Versioned migrations are applied at start. The rule "at most one open incident per key" is the
database's, not ours: a unique index over open incidents, so it holds with several gateways on one
PostgreSQL. Every write is a transaction; SQLite runs with ``synchronous=FULL`` so a committed
incident survives a crash of the process or the machine.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

#: (version, what it does, SQLite DDL, PostgreSQL DDL)
MIGRATIONS: list[tuple[int, str, list[str], list[str]]] = []


_INCIDENTS = """
CREATE TABLE incidents (
    id TEXT PRIMARY KEY,
    dedup_key TEXT NOT NULL,
    is_open INTEGER NOT NULL,
    state TEXT NOT NULL,
    kind TEXT NOT NULL,
    rule TEXT NOT NULL,
    site TEXT NOT NULL,
    device_id TEXT,
    port INTEGER,
    members TEXT NOT NULL,
    severity TEXT NOT NULL,
    opened_severity TEXT NOT NULL,
    team TEXT,
    fire_station TEXT,
    assignee TEXT,
    title_zh TEXT NOT NULL,
    title_en TEXT NOT NULL,
    alert_id TEXT,
    alert_active INTEGER NOT NULL,
    inhibited_by TEXT,
    silenced_by TEXT,
    occurrences INTEGER NOT NULL,
    last_value DOUBLE PRECISION,
    last_ts DOUBLE PRECISION,
    opened_at DOUBLE PRECISION NOT NULL,
    acknowledged_at DOUBLE PRECISION,
    dispatched_at DOUBLE PRECISION,
    on_site_at DOUBLE PRECISION,
    resolved_at DOUBLE PRECISION,
    closed_at DOUBLE PRECISION,
    dispatch_deadline DOUBLE PRECISION,
    arrive_deadline DOUBLE PRECISION,
    resolve_deadline DOUBLE PRECISION,
    sla_warned TEXT NOT NULL,
    sla_breached TEXT NOT NULL,
    result TEXT,
    updated_at DOUBLE PRECISION NOT NULL
)"""
_OPEN_INDEX = "CREATE UNIQUE INDEX incidents_one_open ON incidents (dedup_key) WHERE is_open = 1"
_OCCURRENCES = """
CREATE TABLE occurrences (
    incident_id TEXT NOT NULL REFERENCES incidents (id),
    alert_id TEXT NOT NULL,
    event TEXT NOT NULL,
    device_id TEXT NOT NULL,
    severity TEXT NOT NULL,
    value DOUBLE PRECISION,
    ts DOUBLE PRECISION NOT NULL,
    gateway_time DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (incident_id, alert_id, event, ts)
)"""
# Alerts that opened no incident because an inhibition rule or a silence held them: still on record.
_SUPPRESSED = """
CREATE TABLE suppressed (
    alert_id TEXT NOT NULL,
    event TEXT NOT NULL,
    rule TEXT NOT NULL,
    kind TEXT NOT NULL,
    site TEXT NOT NULL,
    device_id TEXT NOT NULL,
    severity TEXT NOT NULL,
    value DOUBLE PRECISION,
    ts DOUBLE PRECISION NOT NULL,
    gateway_time DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    by_id TEXT NOT NULL,
    PRIMARY KEY (alert_id, event, ts)
)"""
_SILENCES = """
CREATE TABLE silences (
    id TEXT PRIMARY KEY,
    device_id TEXT,
    rule TEXT,
    site TEXT,
    starts_at DOUBLE PRECISION NOT NULL,
    ends_at DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    cancelled_at DOUBLE PRECISION
)"""
_AUDIT_SQLITE = """
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id TEXT NOT NULL REFERENCES incidents (id),
    at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    note TEXT,
    detail TEXT
)"""
_AUDIT_PG = _AUDIT_SQLITE.replace("seq INTEGER PRIMARY KEY AUTOINCREMENT", "seq BIGSERIAL PRIMARY KEY")
# The audit trail is append-only: the database refuses to change or delete a line of it.
_AUDIT_IMMUTABLE_SQLITE = [
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END",
    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END",
]
_AUDIT_IMMUTABLE_PG = [
    """CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$""",
    "CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit FOR EACH ROW EXECUTE FUNCTION audit_append_only()",
]
_INDEXES = [
    "CREATE INDEX incidents_state ON incidents (state, opened_at)",
    "CREATE INDEX incidents_open_site_rule ON incidents (site, rule, opened_at) WHERE is_open = 1",
    "CREATE INDEX audit_incident ON audit (incident_id, seq)",
    "CREATE INDEX occurrences_incident ON occurrences (incident_id, ts)",
    # an alert event is on record once, whichever incident it went to (a redelivery after a crash
    # may find its first incident merged into a storm)
    "CREATE UNIQUE INDEX occurrences_once ON occurrences (alert_id, event, ts)",
]

MIGRATIONS.append((1, "incidents, occurrences, suppressed alerts, audit trail, silences",
                   [_INCIDENTS, _OPEN_INDEX, _OCCURRENCES, _SUPPRESSED, _SILENCES, _AUDIT_SQLITE,
                    *_AUDIT_IMMUTABLE_SQLITE, *_INDEXES],
                   [_INCIDENTS, _OPEN_INDEX, _OCCURRENCES, _SUPPRESSED, _SILENCES, _AUDIT_PG,
                    *_AUDIT_IMMUTABLE_PG, *_INDEXES]))


# The SLA tick used to read every open incident each time; it now reads those whose next warning or
# deadline is due (``sla.next_check``). Incidents open at the upgrade are due at once: the first tick
# looks at each and schedules it.
_SLA_NEXT = [
    "ALTER TABLE incidents ADD COLUMN sla_next_at DOUBLE PRECISION",
    "UPDATE incidents SET sla_next_at = opened_at WHERE is_open = 1",
    "CREATE INDEX incidents_sla_next ON incidents (sla_next_at) WHERE sla_next_at IS NOT NULL",
]
MIGRATIONS.append((2, "incidents.sla_next_at: the SLA tick reads only the incidents that are due", _SLA_NEXT, _SLA_NEXT))


MIGRATION_LOCK = 0x5EB7A1  # the advisory lock id that serialises migrations on PostgreSQL


class StoreError(RuntimeError):
    pass


class Conflict(StoreError):
    """A uniqueness rule of the database refused the write (another writer got there first)."""


class Database:
    """One connection, used by one thread at a time; ``?`` placeholders in both dialects."""

    def __init__(self, url: str, base: Path | None = None):
        self.url = url
        self.lock = threading.RLock()
        if url.startswith("sqlite:///"):
            self.dialect = "sqlite"
            path = Path(url[len("sqlite:///"):])
            if not path.is_absolute() and base is not None:
                path = base / path
            path.parent.mkdir(parents=True, exist_ok=True)
            self.path = path
            self.conn: Any = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
        elif url.startswith(("postgresql://", "postgres://")):
            import psycopg

            self.dialect = "postgresql"
            try:
                self.conn = psycopg.connect(url, autocommit=True)
            except psycopg.OperationalError as exc:
                raise StoreError(f"cannot connect to the incident store: {str(exc).strip()}") from None
        else:
            raise StoreError(f"incidents.url {url!r}: expected sqlite:///PATH or postgresql://…")
        self.migrate()

    def _sql(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s") if self.dialect == "postgresql" else sql

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
            try:
                yield self
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.lock:
            try:
                cursor = self.conn.execute(self._sql(sql), tuple(params))
            except Exception as exc:
                if _is_unique_violation(exc):
                    raise Conflict(str(exc)) from exc
                raise
            return cursor.rowcount

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self.lock:
            cursor = self.conn.execute(self._sql(sql), tuple(params))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.fetchall(sql, params)
        return rows[0] if rows else None

    def migrate(self) -> int:
        """Apply the migrations this database has not seen; returns its schema version."""
        with self.transaction():
            if self.dialect == "postgresql":
                # Several gateways starting at once on a new database: one migrates, the others wait
                # (CREATE TABLE IF NOT EXISTS itself is not safe against a concurrent twin).
                self.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            self.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                         "description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
            row = self.fetchone("SELECT MAX(version) AS v FROM schema_version")
            current = int(row["v"]) if row and row["v"] is not None else 0
            for version, description, sqlite_ddl, pg_ddl in MIGRATIONS:
                if version <= current:
                    continue
                for statement in sqlite_ddl if self.dialect == "sqlite" else pg_ddl:
                    self.execute(statement)
                self.execute("INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                             (version, description, time.time()))
                current = version
        return current

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def _is_unique_violation(exc: Exception) -> bool:
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc)
    return type(exc).__name__ == "UniqueViolation"
