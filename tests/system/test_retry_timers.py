"""A long retry with real workers and beat's timer loop on Redis: the sandbox answers 429 with
`Retry-After: 3600`; the retry is one timer row and no broker message (nothing queued, nothing
held unacknowledged by a worker); the job shows it waits; moved to now, the timer fires once
and the job succeeds with one notification."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
import sqlalchemy as sa

from ledger import JobState
from ledger.schema import timers
from tests.system.conftest import SystemFactory, per_order

pytestmark = pytest.mark.system

RETRY_AFTER = 3600


def held_on_redis(url: str) -> dict[str, int]:
    """What Redis holds of oncelery's messages: queued (each queue's list, its priority
    lists too), and taken by a worker but not acknowledged (kombu's `unacked` hash, which
    holds a countdown message until it is due, and its `unacked_index`)."""
    client = redis.Redis.from_url(url)
    try:
        queued = sum(client.llen(key) for key in client.scan_iter(match="oncelery*", _type="list"))
        return {
            "queued": queued,
            "unacked": int(client.hlen("unacked")),
            "unacked_index": int(client.zcard("unacked_index")),
        }
    finally:
        client.close()


def test_a_429_for_an_hour_is_one_timer_no_message_and_fires_once(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    # Given a worker and beat on Redis, and a sandbox whose notifications answer 429 for an hour
    system = system_factory(database_url=postgres_url, broker_url=redis_url, workers=1)
    system.start_beat()
    system.faults(service="notifications", rate_limited_rate=1.0, retry_after_seconds=RETRY_AFTER)
    word = f"later-{uuid.uuid4().hex[:6]}"

    # When a job's notification step is turned away
    event = json.dumps({"event_id": word, "word": word}) + "\n"
    done = system.cli("enqueue", "--pipeline", "toy", "-", stdin=event)
    assert done.returncode == 0, done.stderr
    [job_id] = done.stdout.split()

    def pending() -> list[sa.Row[tuple[object, ...]]]:
        with system.store.engine.connect() as conn:
            query = sa.select(timers).where(timers.c.job_id == uuid.UUID(job_id))
            return list(conn.execute(query))

    system.wait_for(lambda: len(pending()) == 1, "the retry timer")

    # Then its retry is one timer row, due in an hour, and no message on the broker
    [row] = pending()
    assert (row.step, row.kind, row.state) == ("announce", "retry", "pending")
    nothing = {"queued": 0, "unacked": 0, "unacked_index": 0}
    system.wait_for(lambda: held_on_redis(redis_url) == nothing, "the failed message's ack")
    waiting = system.history(job_id)["waiting"]
    assert waiting == f"retrying at {row.due_at.isoformat()}", waiting
    assert system.cli_json("status")["timers"]["waiting_jobs"] == 1

    # When the provider takes requests again and the timer is moved to now (the honest way
    # not to wait an hour)
    system.faults(service="notifications")
    with system.store.engine.begin() as conn:
        conn.execute(sa.update(timers).where(timers.c.id == row.id).values(due_at=sa.func.now()))

    # Then it fires once, and the job succeeds with one notification
    counts = system.wait_finished(word, 1, timeout=60)
    assert counts[JobState.SUCCEEDED] == 1, counts
    assert [each.state for each in pending()] == ["fired"]
    assert per_order(system.effects(), "notification") == {f"toy-{word}": 1}
    announce = next(s for s in system.history(job_id)["steps"] if s["name"] == "announce")
    kinds = [event["kind"] for event in announce["events"]]
    assert kinds == ["failed", "retry_due", "succeeded"], kinds
    assert announce["attempts"] == 2
    assert held_on_redis(redis_url) == nothing
