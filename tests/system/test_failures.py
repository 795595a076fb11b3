"""Failures end in one of two places: done exactly once, or a dead letter a person can inspect
and replay. Real workers, a real sandbox, Postgres and RabbitMQ or Redis."""

from __future__ import annotations

import json
import signal
import uuid
from typing import Any

import httpx
import pytest

from config import DEAD_QUEUE
from ledger import JobState, StepState
from tests.conftest import queue_length
from tests.factories import order_event
from tests.system.conftest import System, SystemFactory, per_order

pytestmark = pytest.mark.system

#: Four tries for the charge, quickly: dead letters come within seconds.
FEW_ATTEMPTS = {"ONCELERY_STEP_POLICIES": json.dumps({"order-placed.act": {"max_attempts": 4}})}


@pytest.fixture(params=["amqp", "redis"])
def broker(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(kind, URL) of each real broker."""
    return request.param, str(request.getfixturevalue(f"{request.param}_url"))


def events(prefix: str, count: int, **fields: object) -> list[dict[str, object]]:
    return [
        order_event(event_id=f"{prefix}{n}", order_id=f"{prefix}{n}", **fields)
        for n in range(count)
    ]


def kinds(history: dict[str, Any], step: str) -> list[str]:
    [found] = [s for s in history["steps"] if s["name"] == step]
    return [event["kind"] for event in found["events"]]


def customer_lookups(system: System) -> int:
    return sum(1 for r in system.requests() if r["service"] == "customers")


def test_a_declined_card_is_dead_lettered_at_once(
    postgres_url: str, broker: tuple[str, str], system_factory: SystemFactory
) -> None:
    kind, broker_url = broker
    system = system_factory(database_url=postgres_url, broker_url=broker_url)
    prefix = f"declined-{uuid.uuid4().hex[:6]}-"

    [job_id] = system.enqueue(events(prefix, 1, customer_id="declined-card"))
    system.wait_finished(prefix, 1)

    history = system.history(job_id)
    assert history["state"] == "dead_lettered"
    act = next(s for s in history["steps"] if s["name"] == "act")
    assert (act["state"], act["attempts"]) == ("failed", 1)
    [letter] = system.cli_json("dlq", "list")["dead_letters"]
    assert (letter["job_id"], letter["step"], letter["reason"]) == (job_id, "act", "permanent")
    assert letter["error_type"] == "PermanentError"
    assert "402" in letter["message"]
    assert letter["input"]["context"]["customer_id"] == "declined-card"
    assert "Traceback" in letter["traceback"]
    assert per_order(system.effects(), "charge") == {}
    if kind == "amqp":
        system.wait_for(lambda: queue_length(broker_url, DEAD_QUEUE) == 1, "the rejected message")

    # Purging the dead letter purges RabbitMQ's copy of it too (Redis keeps none)
    purged = system.cli_json("dlq", "purge", str(letter["id"]))
    assert purged == {"purged": 1, "broker_copies": 1 if kind == "amqp" else 0}
    assert queue_length(broker_url, DEAD_QUEUE) == 0


@pytest.mark.parametrize("fast_path", [False, True], ids=["chained", "fast"])
def test_exhausted_retries_dead_letter_and_a_replay_charges_once(
    fast_path: bool, postgres_url: str, broker: tuple[str, str], system_factory: SystemFactory
) -> None:
    # Given payments that answer 503 to every charge (each step its own message, or not)
    _, broker_url = broker
    env = {**FEW_ATTEMPTS, "ONCELERY_FAST_PATH": str(fast_path).lower()}
    system = system_factory(database_url=postgres_url, broker_url=broker_url, extra_env=env)
    system.faults(service="payments", fault_rate=1.0)
    prefix = f"exhaust-{uuid.uuid4().hex[:6]}-"

    # When three orders run out of attempts
    job_ids = system.enqueue(events(prefix, 3))
    assert system.wait_finished(prefix, 3)[JobState.DEAD_LETTERED] == 3
    letters = system.cli_json("dlq", "list")["dead_letters"]
    assert {(letter["reason"], letter["attempts"]) for letter in letters} == {
        ("attempts_exhausted", 4)
    }
    assert customer_lookups(system) == 3

    # Then a dry run shows the plan and changes nothing
    plans = system.cli_json("dlq", "replay", "--all", "--dry-run")["plans"]
    assert [(p["skip"], p["rerun"], p["refused"]) for p in plans] == [
        (["gather"], ["act", "publish"], None)
    ] * 3
    assert len(system.cli_json("dlq", "list")["dead_letters"]) == 3

    # When the processor recovers and the dead letters are replayed
    system.faults(service="payments", fault_rate=0.0)
    results = system.cli_json("dlq", "replay", "--all", "--by", "ops")["results"]
    assert [r["done"] for r in results] == [True] * 3
    system.wait_for(
        lambda: system.store.count_by_state(event_prefix=prefix)[JobState.SUCCEEDED] == 3,
        "the replayed jobs",
    )

    # Then each order is charged once, gather did not run again, and the history has both runs
    assert per_order(system.effects(), "charge") == {f"{prefix}{n}": 1 for n in range(3)}
    assert customer_lookups(system) == 3
    history = system.history(job_ids[0])
    assert kinds(history, "act") == [
        "failed",
        "failed",
        "failed",
        "dead_lettered",
        "replayed",
        "succeeded",
    ]
    assert kinds(history, "gather") == ["succeeded"]

    # And replaying the same dead letter again runs nothing
    again = system.cli_json("dlq", "replay", str(letters[0]["id"]), expect=1)["results"]
    assert again[0]["done"] is False
    assert "replayed" in again[0]["detail"]
    assert len(system.effects()) == 6


def test_an_unknown_outcome_needs_force_or_a_decision(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    from jobs.engine.enqueue import start_jobs
    from jobs.pipelines import registry
    from jobs.worker import CeleryDispatch, client_app
    from tests.conftest import settings_for
    from tests.toy_pipeline import toy_once  # noqa: F401 - declares the pipeline

    # Given notifications that ignore keys and lose every reply (the effect happens, the
    # answer never comes), for a step declared at-most-once
    system = system_factory(
        database_url=postgres_url,
        broker_url=redis_url,
        sandbox_options=["--no-idempotency"],
        extra_env={"ONCELERY_PROVIDER_TIMEOUT": "1"},
    )
    system.faults(service="notifications", lost_reply_rate=1.0)
    settings = settings_for(
        database_url=postgres_url, broker_url=redis_url, data_dir=system.data_dir
    )
    pipeline = registry.get("toy-once")
    words = [f"resolve{uuid.uuid4().hex[:6]}", f"force{uuid.uuid4().hex[:6]}"]
    plans = [pipeline.new_job(f"once-{w}", {"word": w}) for w in words]
    start_jobs(system.store, CeleryDispatch(sender=client_app(settings)), pipeline, plans)
    system.wait_finished("once-", 2)

    letters = system.cli_json("dlq", "list")["dead_letters"]
    assert [letter["reason"] for letter in letters] == ["outcome_unknown"] * 2
    assert per_order(system.effects(), "notification") == {f"toy-{w}": 1 for w in words}
    by_word = {letter["input"]["context"]["word"]: letter for letter in letters}

    # When replayed without --force, it is refused: resending could notify twice
    refused = system.cli_json("dlq", "replay", str(by_word[words[0]]["id"]), expect=1)["results"]
    assert "--force" in refused[0]["detail"]

    # When a person checked and says it happened, the job finishes without resending
    system.cli_json(
        "dlq", "resolve", str(by_word[words[0]]["id"]), "--as", "succeeded", "--by", "alice"
    )
    history = system.history(by_word[words[0]]["job_id"])
    assert history["state"] == "succeeded"
    resolved = [e for e in history["steps"][1]["events"] if e["kind"] == "resolved"]
    assert resolved[0]["detail"]["by"] == "alice"

    # And --force re-runs the other one, knowingly, once the provider answers again
    system.faults(service="notifications", lost_reply_rate=0.0)
    system.cli_json("dlq", "replay", str(by_word[words[1]]["id"]), "--force")
    system.wait_for(
        lambda: system.history(by_word[words[1]]["job_id"])["state"] == "succeeded",
        "the forced replay",
    )
    assert per_order(system.effects(), "notification") == {
        f"toy-{words[0]}": 1,
        f"toy-{words[1]}": 2,
    }


def test_lost_messages_are_sent_again_by_the_sweeper(
    postgres_url: str, broker: tuple[str, str], system_factory: SystemFactory
) -> None:
    from tests.conftest import purge_queues

    # Given orders whose messages the broker lost before any worker saw them
    _, broker_url = broker
    system = system_factory(database_url=postgres_url, broker_url=broker_url, workers=0)
    prefix = f"lost-{uuid.uuid4().hex[:6]}-"
    job_ids = system.enqueue(events(prefix, 20))
    purge_queues(broker_url)
    system.start_worker("late")
    assert system.store.count_by_state(event_prefix=prefix)[JobState.PENDING] == 20

    # When the sweeper runs
    swept = system.cli_json("sweep", "--stalled-after", "0")
    assert swept["redriven"] == 20

    # Then every order completes, once
    assert system.wait_finished(prefix, 20)[JobState.SUCCEEDED] == 20
    assert per_order(system.effects(), "charge") == {f"{prefix}{n}": 1 for n in range(20)}
    assert kinds(system.history(job_ids[0]), "gather") == ["redriven", "succeeded"]


def test_beat_recovers_jobs_whose_messages_vanish_mid_pipeline(
    postgres_url: str, redis_url: str, tmp_path: object, system_factory: SystemFactory
) -> None:
    from tests.conftest import purge_queues

    # Given slow payments, and beat sweeping every second for jobs stalled three seconds
    system = system_factory(
        database_url=postgres_url,
        broker_url=redis_url,
        extra_env={"ONCELERY_SWEEP_INTERVAL": "1", "ONCELERY_SWEEP_STALLED_AFTER": "3"},
    )
    system.faults(service="payments", latency_ms=300)
    system.start_beat()
    prefix = f"vanish-{uuid.uuid4().hex[:6]}-"

    # When the queues are emptied while the orders are under way
    system.enqueue(events(prefix, 20))
    system.wait_for(
        lambda: any(e["kind"] == "charge" for e in system.effects()), "the first charge"
    )
    purge_queues(redis_url)

    # Then beat's sweeper re-drives what was lost, and each order is charged once
    assert system.wait_finished(prefix, 20, timeout=120)[JobState.SUCCEEDED] == 20
    assert per_order(system.effects(), "charge") == {f"{prefix}{n}": 1 for n in range(20)}
    assert per_order(system.effects(), "notification") == {f"{prefix}{n}": 1 for n in range(20)}


def test_a_job_cancelled_between_steps_goes_no_further(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    # Given a gather step that takes 4 s (slow prices, asked after the customer): long enough
    # for the `cancel` CLI process to start on a loaded machine, and within the provider timeout
    system = system_factory(
        database_url=postgres_url,
        broker_url=redis_url,
        workers=1,
        extra_env={"ONCELERY_PROVIDER_TIMEOUT": "10"},
    )
    system.faults(service="prices", latency_ms=4000)
    prefix = f"cancel-{uuid.uuid4().hex[:6]}-"
    [job_id] = system.enqueue(events(prefix, 1))
    # Gather reads, unclaimed: it shows in the provider's requests, not yet in the ledger.
    system.wait_for(
        lambda: any(r["service"] == "customers" for r in system.requests()), "gather to start"
    )

    # When the job is cancelled while gather runs
    cancelled = system.cli_json("cancel", job_id, "--by", "bob", "--reason", "customer asked")
    assert cancelled["cancelled"] is True

    # Then gather's result is recorded, but act never runs: no charge
    system.wait_for(
        lambda: system.history(job_id)["steps"][0]["state"] == "succeeded", "gather to finish"
    )
    history = system.history(job_id)
    assert history["state"] == "cancelled"
    assert [s["state"] for s in history["steps"]] == ["succeeded", "not_started", "not_started"]
    assert per_order(system.effects(), "charge") == {}
    assert kinds(history, "gather")[-1] == "succeeded"
    [event] = [e for s in history["steps"] for e in s["events"] if e["kind"] == "cancelled"]
    assert event["detail"] == {"by": "bob", "reason": "customer asked"}

    # And cancelling again says so
    assert system.cli_json("cancel", job_id, expect=1)["cancelled"] is False


def test_cancelling_after_a_charge_reports_it(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    # The notification is slow (within the provider timeout) so the job is still running when
    # `cancel` starts: the CLI process alone can take over a second to start on a loaded machine.
    system = system_factory(
        database_url=postgres_url,
        broker_url=redis_url,
        workers=1,
        extra_env={"ONCELERY_PROVIDER_TIMEOUT": "10"},
    )
    system.faults(service="notifications", latency_ms=6000)
    prefix = f"charged-{uuid.uuid4().hex[:6]}-"
    [job_id] = system.enqueue(events(prefix, 1))
    # Read from the ledger in-process: polling through the CLI spends the window by itself.
    system.wait_for(
        lambda: any(
            entry.step == "act" and entry.state is StepState.SUCCEEDED
            for entry in system.store.history(uuid.UUID(job_id)).entries
        ),
        "the charge",
    )

    cancelled = system.cli_json("cancel", job_id)

    assert cancelled["cancelled"] is True
    assert cancelled["steps_already_done"]["act"]["charge_id"].startswith("ch_")


def test_retries_do_not_starve_new_orders(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    # Given 300 orders whose payment processor is down
    env = {
        "ONCELERY_STEP_POLICIES": json.dumps(
            {"order-placed.act": {"max_attempts": 8, "backoff_base": 0.3, "backoff_max": 1.5}}
        )
    }
    system = system_factory(database_url=postgres_url, broker_url=redis_url, extra_env=env)
    storm, fresh = f"storm-{uuid.uuid4().hex[:6]}-", f"fresh-{uuid.uuid4().hex[:6]}-"
    # When 30 new orders arrive right behind them (one enqueue: a second CLI process would give
    # the storm a head start of its start-up time)
    system.enqueue(events(storm, 300, customer_id="unavailable-1") + events(fresh, 30))
    system.wait_finished(fresh, 30)

    # Then the new orders completed while most of the failing ones were still retrying
    still_retrying = system.store.count_by_state(event_prefix=storm)
    unfinished = still_retrying[JobState.RUNNING] + still_retrying[JobState.PENDING]
    assert unfinished > 150, still_retrying
    assert system.store.count_by_state(event_prefix=fresh)[JobState.SUCCEEDED] == 30
    # (Killed, not stopped: a warm shutdown waited out the storm's retries, 30 s of the suite.)
    for process in system.started:
        process.signal(signal.SIGKILL)


def test_a_step_that_hangs_is_cut_by_its_time_limit(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    from jobs.engine.enqueue import start_jobs
    from jobs.pipelines import registry
    from jobs.worker import CeleryDispatch, client_app
    from tests.conftest import settings_for
    from tests.toy_pipeline import toy_slow  # noqa: F401 - declares the pipeline

    policies = {"toy-slow.nap": {"time_limit": 1, "max_attempts": 2}}
    system = system_factory(
        database_url=postgres_url,
        broker_url=redis_url,
        workers=1,
        extra_env={"ONCELERY_STEP_POLICIES": json.dumps(policies)},
    )
    settings = settings_for(
        database_url=postgres_url,
        broker_url=redis_url,
        data_dir=system.data_dir,
        step_policies=policies,
    )
    pipeline = registry.get("toy-slow")
    plan = pipeline.new_job(f"slow-{uuid.uuid4().hex[:6]}", {"name": "sleepy", "seconds": 60})

    [job] = start_jobs(
        system.store,
        CeleryDispatch(sender=client_app(settings), settings=settings),
        pipeline,
        [plan],
    )
    system.wait_finished("slow-", 1, timeout=60)

    history = system.history(job.job_id)
    assert history["state"] == "dead_lettered"
    errors = [e["detail"]["error"]["type"] for e in history["steps"][0]["events"]]
    assert errors == ["SoftTimeLimitExceeded", "SoftTimeLimitExceeded"]


def test_dlq_commands_refuse_bad_input_in_one_line(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    system = system_factory(database_url=postgres_url, broker_url=redis_url, workers=0)
    for args in (
        ["dlq", "replay"],
        ["dlq", "replay", "1", "--all"],
        ["dlq", "list", "--older-than", "soon"],
        ["prune", "--older-than", "x"],
        ["cancel", "not-a-job"],
        ["dlq", "resolve", "1", "--as", "maybe"],
    ):
        done = system.cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, args
        assert "Traceback" not in done.stderr, args
    # Naming something that does not exist is a failed lookup (1), not malformed input (2).
    for args in (["dlq", "purge", "999"], ["dlq", "show", "999"], ["dlq", "replay", "999"]):
        done = system.cli(*args)
        assert (done.returncode, done.stderr.strip()) == (1, "error: no dead letter 999"), args
    assert httpx.get(f"{system.provider_url}/healthz", timeout=5).status_code == 200
