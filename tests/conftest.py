"""Shared fixtures: real Postgres databases cloned from a migrated template, SQLite files,
brokers purged before and after, and the environment stripped of oncelery's variables."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from kombu import Connection, Queue

from config import DEAD_QUEUE, MAIN_QUEUE, RETRY_QUEUE, Settings, get_settings
from jobs.tools.databases import drop_database
from ledger import create_engine, upgrade
from ledger.direct import for_engine

# Strip what would point the code under test elsewhere: tests configure it explicitly.
for _name in list(os.environ):
    if _name.startswith("ONCELERY_") or _name in (
        "DATABASE_URL",
        "BROKER_URL",
        "PROVIDER_URL",
        "WEBHOOK_SECRET",
        "API_TOKEN",
        "FLOWER_BASIC_AUTH",
    ):
        del os.environ[_name]

#: Where the test services are; `scripts/services.sh` sets them up this way.
POSTGRES_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+psycopg://oncelery:oncelery@127.0.0.1:5432/oncelery"
)
#: The pytest-xdist process running this one's tests (`gw0`, `gw1`, …), or None.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def _own_broker(amqp: str, redis_url: str) -> tuple[str, str]:
    """The brokers of this test process: under pytest-xdist each process has a RabbitMQ
    virtual host (`oncelery-test-gwN`, made by scripts/services.sh) and a Redis database of
    its own, so that purging one test's queues never empties another's."""
    if XDIST_WORKER is None:
        return amqp, redis_url
    number = int(XDIST_WORKER.removeprefix("gw"))
    amqp_parts = urlsplit(amqp)
    redis_parts = urlsplit(redis_url)
    database = int(redis_parts.path.lstrip("/") or 0) + 1 + number
    return (
        amqp_parts._replace(path=f"/oncelery-test-{XDIST_WORKER}").geturl(),
        redis_parts._replace(path=f"/{database}").geturl(),
    )


AMQP_URL, REDIS_URL = _own_broker(
    os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/1"),
)
IN_CI = os.environ.get("CI", "").lower() == "true"
REPO_ROOT = Path(__file__).resolve().parent.parent


def unavailable(service: str, problem: object) -> None:
    """Fail under `CI=true`, skip (saying why) elsewhere: a test that needs a service never
    silently passes."""
    message = f"{service} is not reachable ({problem}); run scripts/services.sh"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _services_shared(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under pytest-xdist, a test marked `disruptive` (it stops or restarts a service every
    test process shares) runs alone: it waits for the running tests to end, and none starts
    until it is done."""
    if XDIST_WORKER is None:
        yield
        return
    with _service_lock(exclusive=request.node.get_closest_marker("disruptive") is not None):
        yield


@contextlib.contextmanager
def _service_lock(*, exclusive: bool) -> Iterator[None]:
    # A readers-writer lock over flock(2): every test holds `services` shared, a disruptive
    # one exclusive. The turnstile keeps tests that keep arriving from starving the latter.
    folder = Path(tempfile.gettempdir()) / f"oncelery-tests-{os.environ['PYTEST_XDIST_TESTRUNUID']}"
    folder.mkdir(exist_ok=True)
    with open(folder / "turnstile", "a") as turnstile, open(folder / "services", "a") as services:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(services, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# --- databases ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[sa.Engine]:
    """An autocommit engine on the server's maintenance database, for CREATE/DROP DATABASE."""
    url = sa.make_url(POSTGRES_URL).set(database="postgres")
    # Pre-ping: the chaos suite restarts Postgres under this long-lived engine.
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        unavailable("Postgres", str(exc.orig).strip().splitlines()[0])
    yield engine
    engine.dispose()


def _database_url(name: str) -> str:
    return sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_template(postgres_admin: sa.Engine) -> Iterator[str]:
    """A database migrated once per run; each test clones it (see `setup_db` in procrastinate)."""
    name = f"oncelery_template_{uuid.uuid4().hex[:8]}"
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(_database_url(name))
    upgrade(engine)
    engine.dispose()
    yield name
    drop_database(postgres_admin, name)


@pytest.fixture
def postgres_url(postgres_admin: sa.Engine, postgres_template: str) -> Iterator[str]:
    """A fresh, migrated Postgres database for one test, dropped after it."""
    name = f"oncelery_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"'))
    yield _database_url(name)
    drop_database(postgres_admin, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh, migrated SQLite ledger file for one test."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    engine = create_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each ledger test runs on Postgres and on SQLite."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine on the test's database."""
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def statements(engine: sa.Engine) -> Iterator[list[str]]:
    """Every statement the test's engine sends (BEGIN and PRAGMA aside), to count round trips."""
    seen: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "PRAGMA")):
            seen.append(statement)

    def count_direct(statement: str) -> None:
        seen.append(statement)

    # The protocol's hot statements run on the ledger's direct connection, past the engine.
    direct = for_engine(engine) if engine.dialect.name == "postgresql" else None
    sa.event.listen(engine, "before_cursor_execute", count)
    if direct is not None:
        direct.listeners.append(count_direct)
    yield seen
    sa.event.remove(engine, "before_cursor_execute", count)
    if direct is not None:
        direct.listeners.remove(count_direct)


# --- brokers -----------------------------------------------------------------------------


def purge_queues(url: str) -> None:
    """Empty oncelery's queues on a broker."""
    with Connection(url, connect_timeout=5) as conn:
        for name in (MAIN_QUEUE, RETRY_QUEUE, DEAD_QUEUE):
            # A queue no worker declared yet has nothing to purge (RabbitMQ says NOT_FOUND).
            with contextlib.suppress(*conn.channel_errors):
                Queue(name, channel=conn.channel()).purge()


def delete_queues(url: str) -> None:
    """Remove oncelery's queues, so each test declares them afresh (RabbitMQ refuses to
    redeclare a queue with other arguments, e.g. one left by an older version)."""
    with Connection(url, connect_timeout=5) as conn:
        for name in (MAIN_QUEUE, RETRY_QUEUE, DEAD_QUEUE):
            with contextlib.suppress(*conn.channel_errors):
                Queue(name, channel=conn.channel()).delete()


def queue_length(url: str, name: str) -> int:
    """How many messages wait in a queue (0 if it does not exist)."""
    with Connection(url, connect_timeout=5) as conn:
        try:
            declared = Queue(name, channel=conn.channel()).queue_declare(passive=True)
        except conn.channel_errors:
            return 0
        # py-amqp answers (queue, message_count, consumer_count).
        return int(declared[1]) if isinstance(declared, tuple) else 0


def forget_everything(url: str) -> None:
    """Empty the broker's namespace for the next test: oncelery's queues, and on Redis the
    whole database (the tests have one of their own), since kombu keeps a killed worker's
    unacknowledged messages apart from the queues and puts them back into them later — into
    the next test's, naming jobs it never had."""
    delete_queues(url)
    if url.startswith("redis"):
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        try:
            client.flushdb()
        finally:
            client.close()


def _broker(url: str, name: str) -> Iterator[str]:
    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - whatever the transport raises, it is unreachable
        unavailable(name, exc)
    forget_everything(url)
    yield url
    forget_everything(url)


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """The real RabbitMQ, its oncelery queues purged before and after the test."""
    yield from _broker(AMQP_URL, "RabbitMQ")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The real Redis (a database of its own), emptied before and after the test."""
    yield from _broker(REDIS_URL, "Redis")


def settings_for(
    *, database_url: str, broker_url: str | None, data_dir: Path, **extra: object
) -> Settings:
    """Settings built explicitly (the environment is stripped)."""
    return Settings.model_validate(
        {
            "DATABASE_URL": database_url,
            "BROKER_URL": broker_url,
            "ONCELERY_DATA_DIR": str(data_dir),
            **extra,
        }
    )


# --- hypothesis ----------------------------------------------------------------------------

#: The protocol's model-based test (tests/integration/jobs/engine/test_protocol_model.py) in CI: a
#: fixed seed (derandomized), bounded examples, no example database.
hypothesis_settings.register_profile(
    "protocol-ci",
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    database=None,
    # One failure, shrunk: several at once multiply the time shrinking takes.
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    # Not `explain`: tracing every line of the engine makes a failure take minutes to report.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
#: `--hypothesis-profile protocol-long`: minutes of fresh examples, longer runs, and every
#: distinct failure reported (each shrunk).
hypothesis_settings.register_profile(
    "protocol-long",
    max_examples=2_000,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    # Not `explain`: tracing every line of the engine makes a failure take minutes to report.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
