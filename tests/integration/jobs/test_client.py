"""`jobs.enqueue` and `jobs.wait` on the real Postgres and RabbitMQ: validated, deduplicated
by event id, joined to the caller's transaction (rolled back: no job, no message; committed:
sent by the relay moments later), and waited for without polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
import sqlalchemy as sa

import jobs
from config import MAIN_QUEUE, Settings, get_settings
from jobs.engine.outbox import relay_forever
from jobs.engine.runtime import Runtime
from jobs.worker import CeleryDispatch, client_app
from ledger import EventConflict, JobState, JobStore, create_engine
from tests.conftest import declare_queues, queue_length
from tests.toy_pipeline import Word
from tests.waiting import wait_for


@pytest.fixture
def settings(
    postgres_url: str, amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The environment a user's process has: the ledger, the broker, their pipelines."""
    for name, value in {
        "DATABASE_URL": postgres_url,
        "BROKER_URL": amqp_url,
        "ONCELERY_PIPELINES": "tests.toy_pipeline",
        "ONCELERY_DATA_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    settings = get_settings()
    declare_queues(settings)
    return settings


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    engine = create_engine(settings.database_url)
    yield JobStore(engine=engine)
    engine.dispose()


@pytest.fixture
def user_engine(settings: Settings) -> Iterator[sa.Engine]:
    """The user's own engine on the same database, with a table of their own."""
    engine = sa.create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE signups (email text PRIMARY KEY)"))
    yield engine
    engine.dispose()


@pytest.fixture
def relay(settings: Settings) -> Iterator[None]:
    """The relay beat runs (`jobs.engine.outbox.relay_forever`), on a thread here."""
    rt = Runtime.from_settings(settings)
    stop = threading.Event()
    dispatch = CeleryDispatch(sender=client_app(settings), settings=settings)
    thread = threading.Thread(target=relay_forever, args=(rt, dispatch, stop), daemon=True)
    thread.start()
    listening = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query = 'LISTEN oncelery_outbox'"
    )

    def ready() -> bool:
        with rt.engine.connect() as conn:
            return bool(conn.execute(listening).scalar_one())

    # Listening before the test commits anything: a commit before then is the relay's
    # periodic round's to find, seconds later.
    wait_for(ready, "the relay to listen", timeout=10, interval=0.02)
    yield
    stop.set()
    thread.join(timeout=10)
    rt.close()


def test_enqueue_validates_deduplicates_and_publishes(settings: Settings, store: JobStore) -> None:
    job_id = jobs.enqueue("toy-typed", {"word": "hello"}, event_id="e1")

    assert jobs.enqueue("toy-typed", Word(word="hello"), event_id="e1") == job_id
    # Published at once, confirmed by the broker: the job is not left in the outbox.
    assert store.take_undispatched(older_than=0) == []
    job = store.get_job(UUID(job_id))
    assert (job.pipeline, job.context) == ("toy-typed", {"word": "hello", "times": 1})
    with pytest.raises(EventConflict):
        jobs.enqueue("toy-typed", {"word": "other"}, event_id="e1")
    with pytest.raises(jobs.InvalidEvent, match=r"^times: Input should be a valid integer$"):
        jobs.enqueue("toy-typed", {"word": "x", "times": "2"}, event_id="e2")
    with pytest.raises(jobs.UnknownPipeline, match="'nope'"):
        jobs.enqueue("nope", {}, event_id="e3")
    assert store.list_jobs(pipeline="toy-typed") == [store.get_job(UUID(job_id))]


def _messages(amqp_url: str, count: int) -> None:
    """Wait until the main queue holds `count` messages."""
    wait_for(
        lambda: queue_length(amqp_url, MAIN_QUEUE) == count,
        lambda: f"{count} messages in the queue, not {queue_length(amqp_url, MAIN_QUEUE)}",
        timeout=10,
        interval=0.02,
    )


def _marker(user_engine: sa.Engine, event_id: str) -> str:
    """A job committed on its own: once the relay has sent it, it has dealt with every
    announcement made before (it hears them in commit order, on one connection)."""
    with user_engine.begin() as conn:
        return jobs.enqueue("toy-typed", {"word": event_id}, event_id=event_id, connection=conn)


def test_a_rolled_back_transaction_leaves_no_job_and_no_message(
    user_engine: sa.Engine, store: JobStore, amqp_url: str, relay: None
) -> None:
    # Given the relay listening, when a caller enqueues in its transaction and rolls back
    with user_engine.connect() as conn, conn.begin() as transaction:
        conn.execute(sa.text("INSERT INTO signups VALUES ('a@example.com')"))
        jobs.enqueue("toy-typed", {"word": "gone"}, event_id="r1", connection=conn)
        transaction.rollback()
    marker = _marker(user_engine, "marker")

    # then once the relay sent a job committed after it, neither the caller's row nor its
    # job exists, and the marker's message is the only one published
    _messages(amqp_url, 1)
    assert [str(job.id) for job in store.list_jobs()] == [marker]
    with user_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM signups")).scalar_one() == 0
    assert queue_length(amqp_url, MAIN_QUEUE) == 1


def test_a_committed_transaction_is_sent_moments_after_the_commit(
    user_engine: sa.Engine, store: JobStore, amqp_url: str, relay: None
) -> None:
    # Given the relay listening, when a caller enqueues in its transaction
    with user_engine.connect() as conn, conn.begin():
        conn.execute(sa.text("INSERT INTO signups VALUES ('b@example.com')"))
        job_id = jobs.enqueue("toy-typed", {"word": "kept"}, event_id="c1", connection=conn)
        # then nothing is published before the commit (the relay sent a job committed
        # meanwhile, and only that one),
        _marker(user_engine, "marker")
        _messages(amqp_url, 1)
    committed = time.perf_counter()

    # and the relay takes the job moments after it (not at its next round), and publishes it
    taken = sa.text("SELECT dispatched_at IS NOT NULL FROM jobs WHERE id = :id")

    def sent() -> bool:
        with user_engine.connect() as conn:
            return bool(conn.execute(taken, {"id": job_id}).scalar_one())

    wait_for(sent, "the relay to take the job", timeout=5, interval=0.002)
    latency = time.perf_counter() - committed
    assert latency < 0.5, latency
    _messages(amqp_url, 2)
    assert store.take_undispatched(older_than=0) == [], "the job left the outbox"
    assert store.get_job(UUID(job_id)).state is JobState.PENDING
    print(f"commit to relay: {latency * 1000:.1f} ms")


def test_a_connection_outside_a_transaction_is_refused(user_engine: sa.Engine) -> None:
    with user_engine.connect() as conn, pytest.raises(ValueError, match="open transaction"):
        jobs.enqueue("toy-typed", {"word": "x"}, event_id="t1", connection=conn)


def _cancel_soon(store: JobStore, job_id: str, after: float) -> threading.Thread:
    def cancel() -> None:
        time.sleep(after)
        store.cancel(UUID(job_id), by="test")

    thread = threading.Thread(target=cancel)
    thread.start()
    return thread


def test_wait_returns_the_view_when_the_job_ends(user_engine: sa.Engine, store: JobStore) -> None:
    with user_engine.begin() as conn:  # in the outbox: no worker will touch it
        job_id = jobs.enqueue("toy-typed", {"word": "w"}, event_id="w1", connection=conn)
    ender = _cancel_soon(store, job_id, after=0.5)

    began = time.perf_counter()
    view = jobs.wait(job_id, timeout=10)
    waited = time.perf_counter() - began
    ender.join()

    assert view["state"] == str(JobState.CANCELLED)
    assert view["job_id"] == job_id
    # Heard: not found by the look it takes every ten seconds while nothing is announced.
    assert 0.5 <= waited < 5.0, waited
    # An ended job answers at once.
    assert jobs.wait(job_id, timeout=0)["state"] == str(JobState.CANCELLED)


def test_waits_of_one_process_share_one_listening_connection(
    user_engine: sa.Engine, store: JobStore
) -> None:
    # Given ten jobs, each waited for by a thread of its own
    with user_engine.begin() as conn:
        job_ids = [
            jobs.enqueue("toy-typed", {"word": "w"}, event_id=f"many{n}", connection=conn)
            for n in range(10)
        ]
    views: dict[str, dict[str, object]] = {}
    waiters = [
        threading.Thread(target=lambda j=job_id: views.update({j: jobs.wait(j, timeout=30)}))
        for job_id in job_ids
    ]
    for waiter in waiters:
        waiter.start()
    listening = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query = 'LISTEN oncelery_job_ended'"
    )

    def awaited() -> int:
        with user_engine.connect() as conn:
            marked = "SELECT count(*) FROM jobs WHERE awaited"
            return int(conn.execute(sa.text(marked)).scalar_one())

    # When all of them are waiting
    wait_for(lambda: awaited() == len(job_ids), "every job marked awaited", timeout=30)
    with user_engine.connect() as conn:
        connections = int(conn.execute(listening).scalar_one())

    # Then they listen on one connection, and each hears its own job's end
    assert connections == 1
    for job_id in job_ids:
        store.cancel(UUID(job_id), by="test")
    for waiter in waiters:
        waiter.join(timeout=30)
    assert {views[j]["state"] for j in job_ids} == {str(JobState.CANCELLED)}


def test_wait_raises_timeout_error_for_a_job_that_does_not_end(
    user_engine: sa.Engine,
) -> None:
    with user_engine.begin() as conn:
        job_id = jobs.enqueue("toy-typed", {"word": "w"}, event_id="w2", connection=conn)

    with pytest.raises(TimeoutError, match=job_id):
        jobs.wait(job_id, timeout=0.3)


def test_wait_polls_on_sqlite(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("ONCELERY_PIPELINES", "tests.toy_pipeline")
    monkeypatch.setenv("ONCELERY_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    engine = create_engine(sqlite_url)
    store = JobStore(engine=engine)
    with engine.begin() as conn:
        job_id = jobs.enqueue("toy-typed", {"word": "s"}, event_id="s1", connection=conn)
    with pytest.raises(TimeoutError):
        jobs.wait(job_id, timeout=0.2)
    ender = _cancel_soon(store, job_id, after=0.3)

    assert jobs.wait(job_id, timeout=10)["state"] == str(JobState.CANCELLED)
    ender.join()
    engine.dispose()


def test_signal_is_kept_once_by_id_and_refuses_a_conflict(
    settings: Settings, store: JobStore
) -> None:
    """`jobs.signal` with no job waiting: kept (a wait to come takes it), the same id again a
    duplicate, the same id with other data a conflict, a bad key named."""
    key = f"word-{time.time_ns()}"

    assert jobs.signal("go", key, signal_id=f"{key}-1", data={"n": 1}) == "recorded"
    again = jobs.signal("go", key, signal_id=f"{key}-1", data={"n": 1})
    assert again is jobs.SignalOutcome.DUPLICATE
    with pytest.raises(jobs.SignalConflict, match="another key or other data"):
        jobs.signal("go", key, signal_id=f"{key}-1", data={"n": 2})
    with pytest.raises(jobs.InvalidSignal, match="key"):
        jobs.signal("go", "", signal_id=f"{key}-2")
    assert store.engine.dialect.name == "postgresql"
