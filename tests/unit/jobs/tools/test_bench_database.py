"""`jobs.tools.databases.drop_database`: it waits out a process `WITH (FORCE)` may not end
(an autovacuum worker), and nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from jobs.tools.databases import drop_database


class ServerError(Exception):
    """What psycopg raises: an error carrying the server's SQLSTATE."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


class Server:
    """Answers each DROP with the next error of `refusals`, then drops."""

    def __init__(self, *refusals: str) -> None:
        self.refusals = list(refusals)
        self.statements: list[str] = []

    @contextlib.contextmanager
    def connect(self) -> Iterator[Server]:
        yield self

    def execute(self, statement: sa.TextClause) -> None:
        self.statements.append(str(statement))
        if self.refusals:
            raise sa.exc.ProgrammingError(str(statement), None, ServerError(self.refusals.pop(0)))


def admin_on(server: Server, monkeypatch: pytest.MonkeyPatch) -> sa.Engine:
    # A real Postgres dialect quotes the name; only the connection is the server's.
    engine = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    monkeypatch.setattr(engine, "connect", server.connect)
    return engine


def test_a_drop_refused_for_a_process_it_may_not_end_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = Server("42501", "42501")

    drop_database(admin_on(server, monkeypatch), "orders bench", patience=10)

    assert server.statements == ['DROP DATABASE IF EXISTS "orders bench" WITH (FORCE)'] * 3


def test_a_refusal_that_outlasts_the_patience_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server(*["42501"] * 100)

    with pytest.raises(sa.exc.ProgrammingError):
        drop_database(admin_on(server, monkeypatch), "bench", patience=0.6)
    assert 2 <= len(server.statements) < 100


def test_any_other_error_is_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server("55006")  # object in use, without FORCE's help

    with pytest.raises(sa.exc.ProgrammingError):
        drop_database(admin_on(server, monkeypatch), "bench", patience=10)
    assert len(server.statements) == 1
