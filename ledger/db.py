"""Engines, transactions and the few places where Postgres and SQLite differ.

Must not import celery, kombu, jobs or config: the ledger is used and tested on its own.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from ledger.errors import DatabaseUnavailable, LedgerError, SchemaMissing, StatementRejected

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a SQLite writer waits for the file lock before giving up.
_SQLITE_BUSY_TIMEOUT: Final = 30.0


def retry_while_unavailable(call: Callable[[], T], *, for_seconds: float) -> T:
    """Run `call`, again and again (backing off up to 2 s) while it raises
    `DatabaseUnavailable`, for at most `for_seconds`; then the error is raised.

    Only for calls that are safe to repeat: one whose commit was applied but whose answer was
    lost runs again (the protocol's statements are idempotent per owner token).
    """
    deadline = time.monotonic() + for_seconds
    delay = 0.1
    while True:
        try:
            return call()
        except DatabaseUnavailable as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning(
                "database unavailable, retrying in %.1fs: %s",
                delay,
                exc.detail,
                extra={"action": "db_retry"},
            )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


@dataclass(frozen=True)
class PostgresLimits:
    """How long a Postgres connection may wait, so a hung or vanished server fails its
    callers instead of holding them forever.

    Attributes:
        connect_timeout: seconds to open a connection (libpq counts whole seconds, at least 2).
        statement_timeout: seconds Postgres lets one statement run before cancelling it.
        keepalive_idle: seconds a connection may be silent before TCP probes whether the
            server is still there (three probes, a third of this apart, then it is closed).
    """

    connect_timeout: float
    statement_timeout: float
    keepalive_idle: float

    def connect_parameters(self) -> dict[str, str]:
        """The libpq connection parameters (set on the URL, so every connection made from the
        engine's URL, `ledger.direct`'s included, has them)."""
        idle = max(1, math.ceil(self.keepalive_idle))
        return {
            "connect_timeout": str(max(2, math.ceil(self.connect_timeout))),
            "keepalives": "1",
            "keepalives_idle": str(idle),
            "keepalives_interval": str(max(1, idle // 3)),
            "keepalives_count": "3",
            "options": f"-c statement_timeout={max(1, round(self.statement_timeout * 1000))}",
        }


def create_engine(url: str, *, pool_size: int = 5, limits: PostgresLimits | None = None) -> Engine:
    """An engine for `url`, tuned for the ledger.

    Create one per process: a pooled connection inherited across `fork` is shared by parent
    and child and corrupts both (see DESIGN.md, hazard 7).

    Args:
        url: a `postgresql+psycopg://` or `sqlite://` URL.
        pool_size: connections kept open (as many more may be opened under load).
        limits: Postgres only: connect and statement timeouts and TCP keepalives.
    """
    if url.startswith("sqlite"):
        database = sa.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT, "isolation_level": None}
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_immediate)
        return engine
    # No pre-ping: it would cost every statement a second round trip. After a Postgres restart
    # the first statement on a dead pooled connection fails as a disconnect, SQLAlchemy then
    # discards the whole pool, and the ledger's calls retry (each is idempotent per owner).
    if limits is not None:
        parsed = sa.make_url(url)
        parameters = limits.connect_parameters()
        if "options" in parsed.query:
            parameters["options"] = f"{parsed.query['options']} {parameters['options']}"
        url = parsed.update_query_dict(parameters).render_as_string(hide_password=False)
    return sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size)


def _configure_sqlite(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers and one writer share the file across worker processes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_immediate(connection: Connection) -> None:
    # A deferred transaction that reads and then writes can fail with "database is locked"
    # without waiting; taking the write lock up front makes SQLite queue writers instead.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def is_postgres(engine_or_connection: Engine | Connection) -> bool:
    """True on Postgres, False on SQLite."""
    return engine_or_connection.dialect.name == "postgresql"


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction, committed on exit; driver errors come out as ledger errors."""
    with wrap_errors(), engine.begin() as conn:
        yield conn


@contextmanager
def single_statement(engine: Engine) -> Iterator[Connection]:
    """A connection for one statement: on Postgres in autocommit, one round trip with no
    BEGIN and COMMIT around it; on SQLite a transaction, which costs no round trip."""
    if not is_postgres(engine):
        with transaction(engine) as conn:
            yield conn
        return
    with wrap_errors(), engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def wrap_errors() -> Iterator[None]:
    """Turn driver errors into `LedgerError`s, so no psycopg or sqlite3 type escapes."""
    try:
        yield
    except (OperationalError, ProgrammingError) as exc:
        raise classify_error(exc) from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise DatabaseUnavailable(_first_line(exc)) from exc
        # Integrity and data errors: the statement itself is refused; retrying cannot help.
        raise StatementRejected(_first_line(exc)) from exc


def classify_error(exc: DBAPIError) -> LedgerError:
    """The ledger error a driver error stands for."""
    return classify_message(str(exc.orig), _first_line(exc))


def classify_message(message: str, detail: str) -> LedgerError:
    """The ledger error an operational or programming error's message stands for: a missing
    table or column is a schema not migrated; anything else, a database not available."""
    message = message.lower()
    missing = ("no such table", "no such column")
    if any(m in message for m in missing) or (
        ("relation" in message or "column" in message) and "does not exist" in message
    ):
        return SchemaMissing()
    return DatabaseUnavailable(detail)


def _first_line(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc).__name__


def insert_for(dialect_name: str) -> Any:
    """The dialect's `insert` construct, which knows `ON CONFLICT`."""
    return postgresql.insert if dialect_name == "postgresql" else sqlite.insert


def for_update_skip_locked(select: sa.Select[Any], dialect_name: str) -> sa.Select[Any]:
    """Lock the selected rows, skipping rows other sessions hold (Postgres); SQLite has one
    writer at a time, which already serialises sweepers."""
    if dialect_name == "postgresql":
        return select.with_for_update(skip_locked=True)
    return select


def json_values(column: ColumnElement[Any], dialect_name: str) -> Any:
    """A table of the values of a JSON object column (one row each, as `value`): Postgres'
    `jsonb_each_text`, SQLite's `json_each`."""
    each = sa.func.jsonb_each_text if dialect_name == "postgresql" else sa.func.json_each
    return each(column).table_valued("key", "value")


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive timestamps; they are UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class utcnow(FunctionElement[datetime]):  # noqa: N801 - reads as the SQL function it renders
    """The database's clock, so leases compare against one clock, not each worker's."""

    type = sa.DateTime(timezone=True)
    inherit_cache = True


class utcnow_plus(FunctionElement[datetime]):  # noqa: N801
    """The database's clock plus a number of seconds (a bound parameter)."""

    type = sa.DateTime(timezone=True)
    inherit_cache = True


class json_set_key(FunctionElement[Any]):  # noqa: N801
    """A JSON object with one more key: `json_set_key(column, key, value)`."""

    inherit_cache = True


@compiles(utcnow, "postgresql")
def _utcnow_pg(_element: utcnow, _compiler: SQLCompiler, **_kw: Any) -> str:
    return "statement_timestamp()"


# SQLite's clock has milliseconds ("SS.SSS"); SQLAlchemy stores Python datetimes with six
# digits ("SS.SSSSSS"). Timestamps are compared as text, so both must have six.
_SQLITE_MICROSECONDS = "'000'"


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(_element: utcnow, _compiler: SQLCompiler, **_kw: Any) -> str:
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now') || {_SQLITE_MICROSECONDS})"


@compiles(utcnow_plus, "postgresql")
def _utcnow_plus_pg(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    return f"statement_timestamp() + make_interval(secs => {compiler.process(seconds, **kw)})"


@compiles(utcnow_plus, "sqlite")
def _utcnow_plus_sqlite(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    modifier = f"printf('%+f seconds', {compiler.process(seconds, **kw)})"
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', {modifier}) || {_SQLITE_MICROSECONDS})"


@compiles(json_set_key, "postgresql")
def _json_set_key_pg(element: json_set_key, compiler: SQLCompiler, **kw: Any) -> str:
    column, key, value = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"({column} || jsonb_build_object({key}::text, {value}))"


@compiles(json_set_key, "sqlite")
def _json_set_key_sqlite(element: json_set_key, compiler: SQLCompiler, **kw: Any) -> str:
    column, key, value = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"json_set({column}, '$.\"' || {key} || '\"', json({value}))"


def seconds(value: float) -> ColumnElement[float]:
    """A bound number of seconds for `utcnow_plus`."""
    return sa.literal(value, sa.Float())


class minute_of(FunctionElement[str]):  # noqa: N801
    """A timestamp truncated to its minute, as text (`YYYY-MM-DD HH:MM`), for grouping."""

    type = sa.String()
    inherit_cache = True


class seconds_between(FunctionElement[float]):  # noqa: N801
    """`seconds_between(later, earlier)`: the seconds from one timestamp to another."""

    type = sa.Float()
    inherit_cache = True


@compiles(minute_of, "postgresql")
def _minute_of_pg(element: minute_of, compiler: SQLCompiler, **kw: Any) -> str:
    (column,) = element.clauses
    moment = compiler.process(column, **kw)
    return f"to_char({moment} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')"


@compiles(minute_of, "sqlite")
def _minute_of_sqlite(element: minute_of, compiler: SQLCompiler, **kw: Any) -> str:
    (column,) = element.clauses
    return f"substr({compiler.process(column, **kw)}, 1, 16)"


@compiles(seconds_between, "postgresql")
def _seconds_between_pg(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    later, earlier = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"extract(epoch from ({later} - {earlier}))"


@compiles(seconds_between, "sqlite")
def _seconds_between_sqlite(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    later, earlier = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"((julianday({later}) - julianday({earlier})) * 86400.0)"


class epoch_now(FunctionElement[float]):  # noqa: N801
    """The database's clock in seconds since the epoch (a float), for a rate limit's
    arithmetic, which both databases do alike on numbers. On Postgres the clock as the
    expression is evaluated, not as the statement began: a token is timed when its row is
    updated, after any wait for the row's lock."""

    type = sa.Float()
    inherit_cache = True


class greatest(FunctionElement[Any]):  # noqa: N801
    """The largest of its (numeric) arguments: Postgres' `greatest`, SQLite's `max`."""

    type = sa.Float()
    inherit_cache = True


@compiles(epoch_now, "postgresql")
def _epoch_now_pg(_element: epoch_now, _compiler: SQLCompiler, **_kw: Any) -> str:
    return "CAST(extract(epoch from clock_timestamp()) AS double precision)"


@compiles(epoch_now, "sqlite")
def _epoch_now_sqlite(_element: epoch_now, _compiler: SQLCompiler, **_kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(greatest, "postgresql")
def _greatest_pg(element: greatest, compiler: SQLCompiler, **kw: Any) -> str:
    return f"greatest({compiler.process(element.clauses, **kw)})"


@compiles(greatest, "sqlite")
def _greatest_sqlite(element: greatest, compiler: SQLCompiler, **kw: Any) -> str:
    return f"max({compiler.process(element.clauses, **kw)})"
