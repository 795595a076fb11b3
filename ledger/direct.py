"""The step protocol's statements on a psycopg connection of their own, past SQLAlchemy's
engine (Postgres only): the same SQL and values, a third of the client's CPU. Must not import
celery, kombu, jobs or config."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import psycopg
import sqlalchemy as sa
from psycopg.rows import DictRow, dict_row
from sqlalchemy.engine import Engine
from sqlalchemy.sql.compiler import SQLCompiler

from ledger.db import classify_message
from ledger.errors import DatabaseUnavailable, LedgerError, StatementRejected

logger = logging.getLogger(__name__)

#: Connections inherited from a parent process: never closed nor collected here, since
#: closing one would end the parent's session (libpq says goodbye on the shared socket).
_INHERITED: list[psycopg.Connection[DictRow]] = []

_BY_ENGINE: weakref.WeakKeyDictionary[Engine, DirectStatements] = weakref.WeakKeyDictionary()
_BY_ENGINE_LOCK = threading.Lock()


def for_engine(engine: Engine) -> DirectStatements:
    """The direct statements of a Postgres engine (one set of connections per engine)."""
    with _BY_ENGINE_LOCK:
        found = _BY_ENGINE.get(engine)
        if found is None:
            found = _BY_ENGINE[engine] = DirectStatements(engine)
            # Disposing of the engine closes its connections: these too.
            sa.event.listen(engine, "engine_disposed", lambda _engine: found.close())
        return found


#: A named placeholder of psycopg's dialect, or an escaped percent sign.
_PYFORMAT = re.compile(r"%\((\w+)\)s|%%")


@dataclass(frozen=True)
class CompiledTemplate:
    """A template's SQL (with `$n` placeholders), the parameter each `$n` stands for, its
    constant parameters, and the processors of its typed ones."""

    sql: str
    order: Sequence[str]
    defaults: Mapping[str, Any]
    processors: Mapping[str, Callable[[Any], Any]]

    def parameters(self, values: Mapping[str, Any]) -> list[Any]:
        """The driver's parameters, in `$n` order: the template's constants, then `values`,
        processed."""
        merged = {**self.defaults, **values}
        for name, process in self.processors.items():
            merged[name] = process(merged[name])
        return [merged[name] for name in self.order]


def numbered(pyformat_sql: str) -> tuple[str, list[str]]:
    """SQL with `%(name)s` placeholders as SQL with `$n` ones, and the name of each `$n` (a
    name used twice keeps its number)."""
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    return _PYFORMAT.sub(number, pyformat_sql), order


class DirectStatements:
    """Runs compiled templates on psycopg connections in autocommit, one per process and
    thread; use `for_engine` rather than building one.

    Running a statement through `Connection.execute` costs ~0.2 ms of client CPU (pool
    checkout, the autocommit switch and back, the cache key, parameter and result
    processing), three times what psycopg itself costs, and four such statements make an order
    on the fast path. Here each statement is compiled once to SQL, with SQLAlchemy's own bind
    processors kept for its parameters, and run on one autocommit connection per process and
    thread, shared by everything built on the same engine. A batch of jobs at the same step
    runs with `many`: one transaction, sent in one pipeline, one round trip and one commit.

    Each statement is an idle order's latency, so the connection spares what it can per run:
    the SQL goes out with `$n` placeholders, rewritten once per template, on a raw cursor
    (psycopg parses a `%(name)s` query on every run once it is longer than its cache allows,
    4 KiB, as the read-only step's record is); rows come back as dicts straight from the
    result's column names. Planning is left to Postgres (`plan_cache_mode = auto`): forcing
    generic plans would spare the read its planning on every run, but a generic plan made while
    the tables are nearly empty (a fresh ledger) scans them whole, and keeps doing so as they
    grow, until an ANALYZE (a bench row measured at a tenth of its speed).

    Args:
        engine: the ledger's Postgres engine: its URL, connect arguments and dialect.
    """

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        self._connect_args: tuple[list[Any], dict[str, Any]] = (list(args), dict(kwargs))
        self._compiled: dict[sa.ClauseElement, CompiledTemplate] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[psycopg.Connection[DictRow]] = []
        self._pid = os.getpid()
        # Whoever forgets to close: the connections close when this object goes.
        weakref.finalize(self, _close_all, self._opened, self._pid)
        #: Called with each statement's SQL before it runs (tests count round trips with it).
        self.listeners: list[Callable[[str], None]] = []

    def one(self, template: sa.ClauseElement, values: Mapping[str, Any]) -> dict[str, Any] | None:
        """Run a template that answers at most one row; that row by column name, or None.

        Raises:
            DatabaseUnavailable: the connection failed (the next call opens a new one).
            StatementRejected: Postgres refused the values.
            SchemaMissing: the ledger's tables are not there.
        """
        compiled = self._compile(template)
        parameters = compiled.parameters(values)
        for listener in self.listeners:
            listener(compiled.sql)
        with self._translated_errors():
            return _one_row(self._connect().execute(compiled.sql, parameters).fetchall())

    def rows(self, template: sa.ClauseElement, values: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run a template that reads; its rows by column name.

        Raises:
            DatabaseUnavailable, StatementRejected, SchemaMissing: as `one`.
        """
        compiled = self._compile(template)
        parameters = compiled.parameters(values)
        for listener in self.listeners:
            listener(compiled.sql)
        with self._translated_errors():
            return self._connect().execute(compiled.sql, parameters).fetchall()

    def many(
        self, template: sa.ClauseElement, values: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any] | None]:
        """Run a one-row template once per set of values, in one transaction sent as one
        pipeline; each run's row (or None), in order. The runs see each other's writes as if
        they had run one after the other, and commit together or not at all.

        Raises:
            DatabaseUnavailable: the connection failed, or Postgres broke a deadlock by
                rolling this transaction back (nothing was written; run it again).
            StatementRejected: Postgres refused one of the runs (nothing was written).
            SchemaMissing: the ledger's tables are not there.
        """
        compiled = self._compile(template)
        batch = [compiled.parameters(each) for each in values]
        for listener in self.listeners:
            for sql in ("BEGIN", *[compiled.sql] * len(batch), "COMMIT"):
                listener(sql)
        with self._translated_errors():
            connection = self._connect()
            try:
                # BEGIN, the statements and COMMIT go together: one round trip, one commit.
                with connection.pipeline():
                    connection.execute("BEGIN")
                    cursors = [connection.execute(compiled.sql, each) for each in batch]
                    connection.execute("COMMIT")
            except psycopg.Error:
                _end_failed_transaction(connection)
                raise
            return [_one_row(cursor.fetchall()) for cursor in cursors]

    def close(self) -> None:
        """Close this process's connections (inherited ones are left to their owner); the
        next statement opens a new one."""
        self._forget_inherited()
        with self._lock:
            opened = list(self._opened)
            self._opened.clear()
            self._local = threading.local()
        _close_all(opened, self._pid)

    def _compile(self, template: sa.ClauseElement) -> CompiledTemplate:
        found = self._compiled.get(template)
        if found is None:
            compiled = cast(
                SQLCompiler,
                template.compile(dialect=self.dialect, compile_kwargs={"render_postcompile": True}),
            )
            processors = {}
            for name, bind in compiled.binds.items():
                process = bind.type.dialect_impl(self.dialect).bind_processor(self.dialect)
                if process is not None and name in compiled.params:
                    processors[name] = process
            sql, order = numbered(str(compiled))
            found = CompiledTemplate(sql, order, dict(compiled.params), processors)
            self._compiled[template] = found
        return found

    def _connect(self) -> psycopg.Connection[DictRow]:
        self._forget_inherited()
        connection: psycopg.Connection[DictRow] | None = getattr(self._local, "connection", None)
        if connection is None or connection.closed:
            args, kwargs = self._connect_args
            connection = psycopg.connect(
                *args,
                **kwargs,
                autocommit=True,
                cursor_factory=psycopg.RawCursor,
                row_factory=dict_row,
            )
            self._local.connection = connection
            with self._lock:
                self._opened.append(connection)
        return connection

    def _forget_inherited(self) -> None:
        """After a fork, the parent's connections stay the parent's: set them aside."""
        if self._pid != os.getpid():
            with self._lock:
                _INHERITED.extend(self._opened)
                self._opened.clear()
                self._local, self._pid = threading.local(), os.getpid()

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        """psycopg's errors as the ledger's, as `db.wrap_errors` does for the engine's."""
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop_if_broken()
            raise DatabaseUnavailable(_first_line(exc)) from exc
        except psycopg.ProgrammingError as exc:
            self._drop_if_broken()
            raise classify_message(str(exc), _first_line(exc)) from exc
        except psycopg.Error as exc:
            self._drop_if_broken()
            raise StatementRejected(_first_line(exc)) from exc

    def _drop_if_broken(self) -> None:
        connection: psycopg.Connection[DictRow] | None = getattr(self._local, "connection", None)
        if connection is not None and _unusable(connection):
            logger.info("ledger connection lost; the next statement reconnects")
            self._local.connection = None
            with self._lock:
                if connection in self._opened:
                    self._opened.remove(connection)
            connection.close()


def _unusable(connection: psycopg.Connection[DictRow]) -> bool:
    """Whether a connection that just failed cannot serve the next statement: broken, closed,
    or left inside a command (libpq can fail that way when Postgres drops the connection,
    without calling it broken: every statement after is refused, "another command is already
    in progress"). A statement Postgres refused leaves it idle, and usable."""
    return (
        connection.broken
        or connection.closed
        or connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    )


def _end_failed_transaction(connection: psycopg.Connection[DictRow]) -> None:
    """After a refused statement of an explicit transaction the session is left in it,
    aborted: roll it back so that the connection serves the next statement."""
    if connection.broken or connection.closed:
        return
    if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        with contextlib.suppress(psycopg.Error):
            connection.execute("ROLLBACK")


def _one_row(rows: list[DictRow]) -> dict[str, Any] | None:
    if len(rows) > 1:
        raise LedgerError(f"a one-row statement answered {len(rows)} rows")
    return rows[0] if rows else None


def _close_all(connections: list[psycopg.Connection[DictRow]], pid: int) -> None:
    """Close connections this process opened (a child leaves its parent's alone)."""
    if pid != os.getpid():
        return
    for connection in connections:
        connection.close()


def _first_line(exc: psycopg.Error) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
