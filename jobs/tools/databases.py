"""The bench's own Postgres database (`<name>_bench`, so that seeded rows never land in the
user's ledger), and the statement counts pg_stat_statements keeps for it."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from jobs.tools.bench import BenchFailed, sql
from ledger import LedgerError, create_engine, upgrade

logger = logging.getLogger(__name__)

#: The database every Postgres server has, where databases are created and statistics read.
MAINTENANCE_DATABASE = "postgres"
#: What `DROP DATABASE … WITH (FORCE)` answers while a process it may not end is connected.
_INSUFFICIENT_PRIVILEGE = "42501"


@contextlib.contextmanager
def bench_errors(doing: str) -> Iterator[None]:
    """Report a database error of the bench's own statements as one line."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else repr(exc)
        raise BenchFailed(f"{doing}: {first}") from exc
    except LedgerError as exc:
        raise BenchFailed(f"{doing}: {exc}") from exc
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise BenchFailed(f"{doing}: {first}") from exc


def bench_database_url(database_url: str) -> str:
    """The bench database's URL: the same server and role, the database `<name>_bench`."""
    url = sa.make_url(database_url)
    return url.set(database=f"{url.database or 'postgres'}_bench").render_as_string(
        hide_password=False
    )


def database_name(database_url: str) -> str:
    """The database a URL names."""
    return sa.make_url(database_url).database or MAINTENANCE_DATABASE


def maintenance_engine(database_url: str) -> Engine:
    """An autocommit engine on the server's maintenance database."""
    url = sa.make_url(database_url).set(database=MAINTENANCE_DATABASE)
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=1)


def prepare_bench_database(bench_url: str) -> Engine:
    """Create the bench database if it is missing, migrate it, and return an engine on it."""
    name = database_name(bench_url)
    admin = maintenance_engine(bench_url)
    try:
        with bench_errors(f"creating database {name}"), admin.connect() as conn:
            if conn.execute(sql.database_exists(name)).first() is None:
                logger.info("creating the bench database %s", name)
                quoted = admin.dialect.identifier_preparer.quote(name)
                conn.execute(sql.create_database(quoted))
    finally:
        admin.dispose()
    engine = create_engine(bench_url)
    with bench_errors(f"migrating database {name}"):
        upgrade(engine)
    with bench_errors(f"preparing database {name}"), engine.begin() as conn:
        for statement in sql.announce_probes():
            conn.execute(statement)
    return engine


def drop_bench_database(bench_url: str) -> None:
    """Drop the bench database (tests do, after a smoke run)."""
    name = database_name(bench_url)
    admin = maintenance_engine(bench_url)
    try:
        with bench_errors(f"dropping database {name}"):
            drop_database(admin, name)
    finally:
        admin.dispose()


def drop_database(admin: Engine, name: str, *, patience: float = 30.0) -> None:
    """Drop a database and end its sessions. `WITH (FORCE)` refuses while an autovacuum worker
    is in it (a process of no role: "must be a member of the role whose process is being
    terminated"), as one may be after thousands of rows were written: wait for it to leave."""
    quoted = admin.dialect.identifier_preparer.quote(name)
    deadline = time.monotonic() + patience
    while True:
        try:
            with admin.connect() as conn:
                conn.execute(sql.drop_database(quoted))
            return
        except sa.exc.DBAPIError as exc:
            refused = getattr(exc.orig, "sqlstate", None) == _INSUFFICIENT_PRIVILEGE
            if not refused or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def empty_ledger(engine: Engine) -> None:
    """Empty the bench database's ledger tables, so each row starts alike."""
    with bench_errors("emptying the bench database"), engine.begin() as conn:
        conn.execute(sql.empty_ledger())


def server_version_of(database_url: str) -> str:
    """The Postgres server's version."""
    engine = maintenance_engine(database_url)
    try:
        with bench_errors("reading the server version"), engine.connect() as conn:
            return str(conn.execute(sql.server_version()).scalar_one())
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Calls:
    """Statements run in the bench database so far."""

    #: Calls pg_stat_statements counted, transaction control left out.
    statements: int

    def __sub__(self, other: Calls) -> Calls:
        return Calls(self.statements - other.statements)


class StatementCounter:
    """Reads pg_stat_statements for the bench database, from the maintenance database (so
    reading it adds nothing to what it counts).

    Args:
        bench_url: the bench database's URL.
    """

    def __init__(self, bench_url: str) -> None:
        self.database = database_name(bench_url)
        self.engine = maintenance_engine(bench_url)
        #: Why statements cannot be counted (None when they can).
        self.unavailable: str | None = None
        try:
            self.read_or_fail()
        except sa.exc.DBAPIError as exc:
            message = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else "?"
            self.unavailable = _explain_unavailable(message)

    def read_or_fail(self) -> Calls:
        """The counts now (raises the driver's error if pg_stat_statements cannot be read)."""
        with self.engine.connect() as conn:
            row = conn.execute(sql.statement_calls(self.database)).one()
        return Calls(int(row.statements))

    def read(self) -> Calls | None:
        """The counts now, or None when pg_stat_statements is unavailable."""
        if self.unavailable is not None:
            return None
        with bench_errors("reading pg_stat_statements"):
            return self.read_or_fail()

    def close(self) -> None:
        """Close its connections."""
        self.engine.dispose()


def _explain_unavailable(message: str) -> str:
    if re.search(r"pg_stat_statements.*does not exist", message):
        return (
            "pg_stat_statements is not installed in the maintenance database "
            "(run scripts/services.sh as root)"
        )
    if "shared_preload_libraries" in message:
        return (
            "pg_stat_statements is not loaded (shared_preload_libraries; run scripts/services.sh)"
        )
    return f"pg_stat_statements cannot be read: {message}"
