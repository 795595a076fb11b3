"""Beat's relay of announced jobs (`jobs.engine.outbox`) on real Postgres and RabbitMQ: a job is
sent once however many relays hear it; with the broker unreachable the jobs stay in the outbox,
the first failed send ending the try."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from config import MAIN_QUEUE
from jobs.engine.outbox import relay_announced
from jobs.engine.runtime import Runtime, load_pipelines
from jobs.worker import CeleryDispatch, client_app
from ledger import DeadLetterReason, DeadLetterStore, JobState
from tests.conftest import declare_queues, queue_length, settings_for
from tests.integration.jobs.engine.test_enqueue import in_outbox
from tests.toy_pipeline import toy_typed


@pytest.fixture
def runtime(postgres_url: str, tmp_path: Path) -> Iterator[Runtime]:
    settings = settings_for(database_url=postgres_url, broker_url=None, data_dir=tmp_path)
    load_pipelines(settings)
    rt = Runtime.from_settings(settings)
    yield rt
    rt.close()


def dispatch_to(broker_url: str, tmp_path: Path, *, reachable: bool = True) -> CeleryDispatch:
    settings = settings_for(database_url="sqlite://", broker_url=broker_url, data_dir=tmp_path)
    if reachable:
        declare_queues(settings)
    return CeleryDispatch(sender=client_app(settings), settings=settings)


def committed(runtime: Runtime, count: int) -> list[UUID]:
    """Jobs a caller's transaction left in the outbox."""
    jobs = [toy_typed.new_job(f"o-{n}", {"word": f"w{n}", "times": 1}) for n in range(count)]
    with runtime.engine.begin() as conn:
        return [job_id for job_id, _ in runtime.store.create_jobs_in(conn, jobs)]


def test_an_announced_job_is_sent_once_however_many_relays_hear_it(
    runtime: Runtime, amqp_url: str, tmp_path: Path
) -> None:
    job_ids = committed(runtime, 3)
    dispatch = dispatch_to(amqp_url, tmp_path)

    first = relay_announced(runtime, dispatch, job_ids)
    second = relay_announced(runtime, dispatch, job_ids)

    assert (first, second) == (3, 0)
    assert in_outbox(runtime) == 0
    assert queue_length(amqp_url, MAIN_QUEUE) == 3


def test_with_the_broker_unreachable_announced_jobs_stay_in_the_outbox(
    runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job_ids = committed(runtime, 3)
    dispatch = dispatch_to("amqp://guest:guest@127.0.0.1:1//", tmp_path, reachable=False)

    with caplog.at_level(logging.WARNING, logger="jobs"):
        sent = relay_announced(runtime, dispatch, job_ids)

    assert sent == 0
    assert in_outbox(runtime) == 3
    # One try: the jobs after a failed send go back without waiting for the broker again.
    assert caplog.text.count("relay of ") == 1


def test_a_job_of_a_pipeline_not_loaded_here_is_dead_lettered_naming_it_not_marked_sent(
    runtime: Runtime, amqp_url: str, tmp_path: Path
) -> None:
    # Given a job of a pipeline this process does not load (not in ONCELERY_PIPELINES), and
    # one of a pipeline it does, both left in the outbox by their caller's transaction
    stray = dataclasses.replace(toy_typed.new_job("o-stray", {"word": "w", "times": 1}),
                                pipeline="not-loaded")  # fmt: skip
    with runtime.engine.begin() as conn:
        [(stray_id, _), (loaded_id, _)] = runtime.store.create_jobs_in(
            conn, [stray, toy_typed.new_job("o-loaded", {"word": "w", "times": 1})]
        )

    # When the relay takes them
    sent = relay_announced(runtime, dispatch_to(amqp_url, tmp_path), [stray_id, loaded_id])

    # Then it sends the one it can route, and dead-letters the other with a reason naming
    # its pipeline (an operator sees it in `dlq list`), instead of calling it sent
    assert sent == 1
    assert queue_length(amqp_url, MAIN_QUEUE) == 1
    assert runtime.store.get_job(stray_id).state is JobState.DEAD_LETTERED
    [letter] = DeadLetterStore(engine=runtime.engine).list()
    assert (letter.job_id, letter.pipeline, letter.reason) == (
        stray_id,
        "not-loaded",
        DeadLetterReason.UNKNOWN_PIPELINE,
    )
    assert "'not-loaded' is not loaded" in letter.message
