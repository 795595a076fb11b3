"""Factories for events and jobs used across the tests."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Mapping
from typing import NoReturn

from jobs.orders import OrderItem, OrderPlaced
from jobs.pipelines import fingerprint
from ledger import JSON, JobStore, NewJob

_numbers = itertools.count()


def order_event(**overrides: object) -> dict[str, object]:
    """A valid order-placed event as JSON data; `overrides` replace fields."""
    number = next(_numbers)
    event: dict[str, object] = {
        "event_id": f"evt-{uuid.uuid4().hex[:10]}-{number}",
        "order_id": f"ord-{uuid.uuid4().hex[:10]}-{number}",
        "customer_id": f"cust-{number % 7}",
        "currency": "EUR",
        "items": [{"sku": "SKU-1", "quantity": 2}, {"sku": f"SKU-{number % 5 + 2}", "quantity": 1}],
    }
    event.update(overrides)
    return event


def order(**overrides: object) -> OrderPlaced:
    """A valid `OrderPlaced`."""
    data = order_event(**overrides)
    items = data.pop("items")
    assert isinstance(items, list)
    return OrderPlaced(**data, items=[OrderItem(**item) for item in items])  # type: ignore[arg-type]


def new_job(
    *,
    pipeline: str = "plain",
    steps: tuple[str, ...] = ("first", "second"),
    context: Mapping[str, JSON] | None = None,
    event_id: str | None = None,
    key_base: str | None = None,
) -> NewJob:
    """A job plan for the ledger tests: one key per step, `<key_base>:<step>`."""
    base = key_base or f"thing:{uuid.uuid4().hex[:10]}"
    ctx: Mapping[str, JSON] = context if context is not None else {"base": base}
    return NewJob(
        pipeline=pipeline,
        event_id=event_id or f"evt-{uuid.uuid4().hex}",
        context=ctx,
        fingerprint=fingerprint(pipeline, ctx),
        step_keys={step: f"{base}:{step}" for step in steps},
        first_step=steps[0],
    )


def create_job(store: JobStore, **overrides: object) -> uuid.UUID:
    """Create one job (see `new_job`) and return its id."""
    [(job_id, created)] = store.create_jobs([new_job(**overrides)])  # type: ignore[arg-type]
    assert created
    return job_id


class RetryRequested(Exception):
    """What `RecordingDispatch.retry_later` raises where Celery would retry the task."""

    def __init__(self, delay: float) -> None:
        self.delay = delay


class RecordingDispatch:
    """Records what would be published instead of publishing it; optionally fails every
    publish (a broker that is down)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[tuple[str, str, str]] = []
        #: The jobs of `sent` that went again, on the retry queue.
        self.resent: list[str] = []

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((pipeline, step, job_id))
        if resend:
            self.resent.append(job_id)

    def retry_later(self, delay: float) -> NoReturn:
        raise RetryRequested(delay)
