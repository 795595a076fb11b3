"""A sleep step with real workers and beat's timer loop: step → sleep 1 s → step, a worker
SIGKILLed while the jobs sleep; the step after the sleep runs once per job, not before the
timer is due; and one cancelled while it sleeps, whose timer never fires. On RabbitMQ and
on the embedded default."""

from __future__ import annotations

import json
import signal
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from ledger import JobState
from ledger.schema import timers
from tests.system.conftest import SystemFactory, per_order

pytestmark = pytest.mark.system

JOBS = 12
#: Quick sweeps, so that a killed worker's messages are found in seconds.
SETTINGS = {
    "ONCELERY_STEP_LEASE": "3",
    "ONCELERY_SWEEP_INTERVAL": "1",
    "ONCELERY_SWEEP_STALLED_AFTER": "5",
}


# (Redis: the timer loop's publish there is what `test_fulfilment`'s timeouts and
# `test_retry_timers` go through; one run fewer keeps the suite within its time.)
@pytest.mark.parametrize("where", ["amqp", "embedded"])
def test_the_step_after_a_sleep_runs_once_after_it_with_a_worker_killed_meanwhile(
    where: str, request: pytest.FixtureRequest, system_factory: SystemFactory
) -> None:
    # Given workers and beat (the timer loop) on Postgres and a broker, or all embedded
    if where == "embedded":
        database_url = broker_url = None
    else:
        database_url = str(request.getfixturevalue("postgres_url"))
        broker_url = str(request.getfixturevalue(f"{where}_url"))
    system = system_factory(
        database_url=database_url, broker_url=broker_url, workers=2, extra_env=SETTINGS
    )
    system.start_beat()
    prefix = f"sleep-{uuid.uuid4().hex[:6]}-"
    events = [{"event_id": f"{prefix}{n}", "word": f"{prefix}{n}"} for n in range(JOBS)]
    lines = "".join(json.dumps(event) + "\n" for event in events)
    done = system.cli("enqueue", "--pipeline", "toy-sleep", "-", stdin=lines)
    assert done.returncode == 0, done.stderr
    job_ids = done.stdout.split()
    # and one that sleeps for an hour, to be cancelled
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    waiting = {"event_id": f"{prefix}wait", "word": f"{prefix}wait", "wake_at": later}
    done = system.cli("enqueue", "--pipeline", "toy-wait", "-", stdin=json.dumps(waiting) + "\n")
    assert done.returncode == 0, done.stderr
    [cancelled_id] = done.stdout.split()

    # When a worker is SIGKILLed while jobs sleep (their timers pending)
    def sleeping() -> bool:
        with system.store.engine.connect() as conn:
            pending = sa.select(sa.func.count()).where(timers.c.state == "pending")
            return bool(conn.execute(pending).scalar_one())

    system.wait_for(sleeping, "a job to sleep", timeout=60)
    killed = system.started[1]
    assert killed.name == "worker0"
    killed.signal(signal.SIGKILL)
    killed.stop()
    system.started.remove(killed)

    # and the hour-long sleeper is cancelled with `oncelery cancel` while it sleeps
    system.wait_for(
        lambda: bool(system.history(cancelled_id)["waiting"]), "the long sleeper to sleep"
    )
    assert system.cli_json("history", cancelled_id)["waiting"] == f"sleeping until {later}"
    assert system.cli_json("cancel", cancelled_id)["cancelled"] is True

    # Then every job ends, its step after the sleep run once, not before its timer was due
    counts = system.wait_finished(prefix, JOBS + 1, timeout=120)
    assert (counts[JobState.SUCCEEDED], counts[JobState.CANCELLED]) == (JOBS, 1), counts
    notified = per_order(system.effects(), "notification")
    assert notified == {f"toy-{event['word']}": 1 for event in events}
    with system.store.engine.connect() as conn:
        rows = conn.execute(sa.select(timers.c.job_id, timers.c.state, timers.c.due_at))
        due = {str(row.job_id): (row.state, row.due_at) for row in rows}
    assert due.pop(cancelled_id)[0] == "cancelled"  # and never fires
    assert {state for state, _ in due.values()} == {"fired"}
    assert sorted(due) == sorted(job_ids)
    for job_id in job_ids:
        steps = {step["name"]: step for step in system.history(job_id)["steps"]}
        measured = datetime.fromisoformat(steps["measure"]["finished_at"])
        announced = datetime.fromisoformat(steps["announce"]["started_at"])
        woke = steps["cool_off"]["output"]
        assert steps["announce"]["state"] == "succeeded"
        assert datetime.fromisoformat(woke["due_at"]) <= datetime.fromisoformat(woke["fired_at"])
        assert (announced - measured).total_seconds() >= 1.0, (job_id, measured, announced)
    timers_seen = system.cli_json("status")["timers"]
    assert timers_seen["waiting_jobs"] == 0
    assert timers_seen["fired_last_5m"] == JOBS
    assert timers_seen["lateness_max_seconds"] is not None
    audit = system.cli_json("audit")
    assert audit["clean"], audit["drift"]
