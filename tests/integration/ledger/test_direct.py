"""The hot path's direct connection (`ledger.direct`): the same answers as the engine, and the
engine's behaviour when Postgres drops the connection or the process forks."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from ledger import (
    DatabaseUnavailable,
    JobState,
    JobStore,
    PostgresStepLedger,
    StepLedger,
    create_engine,
    queries,
)
from ledger.direct import DirectStatements, for_engine
from tests.factories import create_job


@pytest.fixture
def engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(postgres_url)
    yield engine
    engine.dispose()


def _claim(job_id: uuid.UUID, owner: uuid.UUID) -> dict[str, object]:
    return queries.claim_params(job_id, "first", owner, 30.0)


def _backend_pid(direct: DirectStatements) -> int:
    row = direct.one(sa.select(sa.func.pg_backend_pid().label("pid")), {})
    assert row is not None
    return int(str(row["pid"]))


def test_a_template_answers_the_same_through_the_engine_and_directly(engine: sa.Engine) -> None:
    store = JobStore(engine=engine)
    via_engine, via_direct = create_job(store), create_job(store)
    template = queries.claim_template(True)

    with engine.connect() as conn:
        expected = dict(
            conn.execute(template, _claim(via_engine, uuid.UUID(int=1))).mappings().one()
        )
    found = for_engine(engine).one(template, _claim(via_direct, uuid.UUID(int=1)))

    assert found is not None
    assert found.keys() == expected.keys()
    differ = {"key", "context", "fingerprint"}
    for name in expected.keys() - differ:
        assert (name, found[name]) == (name, expected[name])
    for name in differ:
        assert type(found[name]) is type(expected[name]), name


def test_a_dropped_connection_is_unavailable_once_then_reopened(engine: sa.Engine) -> None:
    direct = for_engine(engine)
    victim = _backend_pid(direct)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": victim})

    with pytest.raises(DatabaseUnavailable):
        _backend_pid(direct)
    assert _backend_pid(direct) != victim


def test_a_connection_left_inside_a_command_is_dropped_not_kept(engine: sa.Engine) -> None:
    """A connection can fail with libpq still in its command (seen once when Postgres dropped
    it: "connection socket closed", then "another command is already in progress" on every
    statement after, for good). Such a connection is replaced like a broken one."""
    direct = for_engine(engine)
    victim = _backend_pid(direct)
    connection = direct._connect()
    # A command sent and never read: the state the failure left behind.
    connection.pgconn.send_query(b"SELECT 1")

    with pytest.raises(DatabaseUnavailable, match="another command is already in progress"):
        _backend_pid(direct)
    assert _backend_pid(direct) != victim
    assert connection.closed


def test_the_ledger_retries_through_a_dropped_connection(engine: sa.Engine) -> None:
    store, ledger = JobStore(engine=engine), StepLedger(engine=engine, lease_seconds=30)
    job_id = create_job(store)
    assert isinstance(ledger, PostgresStepLedger)
    with engine.connect() as conn:
        conn.execute(
            sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": _backend_pid(ledger.direct)}
        )

    claim = ledger.claim_step(job_id, "first")

    assert claim.job_id == job_id
    assert store.get_job(job_id).state is JobState.RUNNING


def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents(engine: sa.Engine) -> None:
    direct = for_engine(engine)
    parent = _backend_pid(direct)

    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            code = 0 if _backend_pid(direct) != parent else 3
            direct.close()
        except BaseException:  # noqa: BLE001 - the child reports by exit code only
            code = 4
        os._exit(code)
    _, status = os.waitpid(child, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert _backend_pid(direct) == parent


def test_disposing_of_the_engine_closes_the_direct_connections(engine: sa.Engine) -> None:
    direct = for_engine(engine)
    pid = _backend_pid(direct)

    engine.dispose()

    with engine.connect() as conn:
        alive: int = conn.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        ).scalar_one()
    assert alive == 0
