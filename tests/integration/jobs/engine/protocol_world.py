"""The world the protocol's model-based test (`test_protocol_model.py`) runs the real runner
in: orders and what they cost, a provider behind the real `ProviderClient` that answers as
each rule says and counts every effect, a broker of messages, crash points that kill a
run, and ledger commits whose answer is lost. The pipelines are made of the shipped
step functions (gather, charge, notify)."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, NoReturn, TypeVar, cast

import httpx

from config.settings import CrashPoint
from jobs.engine.crashpoints import Crasher
from jobs.engine.dispatch import reading_header
from jobs.orders.steps import charge, gather, notify
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from jobs.provider import ProviderClient
from ledger import JSON, Reading, StepLedger
from tests.factories import RetryRequested

T = TypeVar("T")

#: The pipeline whose notifications service honours idempotency keys (notify exactly once).
KEYED: Final = "model-keyed"
#: The pipeline whose notifications service ignores keys (notify at most once).
UNKEYED: Final = "model-unkeyed"
PIPELINES: Final = (KEYED, UNKEYED)
STEPS: Final = ("gather", "act", "publish")

#: Unit prices of the model's SKUs, in minor units.
PRICES: Final[Mapping[str, int]] = {"apple": 120, "pear": 95, "plum": 410}

#: How the provider answers one call; examples shrink towards the first. "-applied": the
#: service applied the effect before answering so; "lost-reply": applied, then no answer
#: within the client's timeout; "not-json", "not-object", "wrong-shape": a 2xx (applied)
#: whose body the client or the step cannot use; "bug-after": applied and answered, then the
#: step fails (a bug after the call); "cancelled-meanwhile": a person cancels the job while
#: the call is out (applied and answered).
ANSWERS: Final = (
    "ok",
    "declined",
    "429",
    "503",
    "502",
    "409-applied",
    "500-applied",
    "503-applied",
    "timeout",
    "lost-reply",
    "not-json",
    "not-object",
    "wrong-shape",
    "bug-after",
    "cancelled-meanwhile",
)


def order_context(order: int, variant: int) -> dict[str, JSON]:
    """Order number `order`'s content; another `variant` is other content for the same order
    (the same keys, another fingerprint, another amount)."""
    return {
        "order_id": f"o{order}",
        "customer_id": f"c{order}",
        "currency": "EUR",
        "items": [
            {"sku": "apple", "quantity": 1 + variant},
            {"sku": ("pear", "plum")[order % 2], "quantity": 1},
        ],
    }


def order_amount(context: Mapping[str, JSON]) -> int:
    """What an order costs, from its content (the job row's context is the truth)."""
    items = context["items"]
    assert isinstance(items, list)
    total = 0
    for item in items:
        assert isinstance(item, dict)
        sku, quantity = item["sku"], item["quantity"]
        assert isinstance(sku, str)
        assert isinstance(quantity, int)
        total += PRICES[sku] * quantity
    return total


# --- the provider ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Effect:
    """Something the provider did in the world (a charge or a notification)."""

    number: int
    kind: str
    pipeline: str
    key: str | None
    order_id: str
    amount: int | None
    #: The job whose step made the call.
    job_id: str | None

    def as_result(self) -> dict[str, JSON]:
        """The step's result a person records when they settle its dead letter by hand."""
        if self.kind == "charge":
            return {"charge_id": f"charge-{self.number}", "amount": self.amount, "currency": "EUR"}
        return {"notification_id": f"notification-{self.number}"}


class ModelProvider:
    """The customers, prices, payments and notifications services, in-process: it answers
    each call as the next of `answers` (or `read_answers`, for a read) says (ok when none is
    left), honours idempotency
    keys except where `ignores_keys` says, and keeps every effect it applies."""

    def __init__(self, *, ignores_keys: set[tuple[str, str]]) -> None:
        self.ignores_keys = ignores_keys
        self.effects: list[Effect] = []
        #: The answers to calls that may apply an effect (payments, notifications), in order.
        self.answers: deque[str] = deque()
        #: The answers to reads (customers, prices), in order.
        self.read_answers: deque[str] = deque()
        self.on_cancel: Callable[[str], None] = lambda _job: None
        self._kept: dict[tuple[str, str, str], dict[str, JSON]] = {}
        self._acting: str | None = None
        self._bug_after = False

    @contextmanager
    def acting_for(self, job_id: str) -> Iterator[None]:
        """A step of `job_id` calls the provider inside; a "bug-after" answer fails it after."""
        self._acting, self._bug_after = job_id, False
        try:
            yield
        finally:
            self._acting = None
        if self._bug_after:
            raise RuntimeError("a bug after the provider call (model)")

    def effect_for(self, key: str | None) -> Effect | None:
        """The first effect applied under `key` (what a person checking the provider sees)."""
        return next((e for e in self.effects if key is not None and e.key == key), None)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one request (the transport of the steps' `ProviderClient`)."""
        reads = request.url.path.strip("/").split("/")[1] in ("customers", "prices")
        answers = self.read_answers if reads else self.answers
        answer = answers.popleft() if answers else "ok"
        status = int(answer.split("-")[0]) if answer[0].isdigit() else None
        if answer == "timeout":
            raise httpx.ReadTimeout("model provider: no answer", request=request)
        if status is not None and not answer.endswith("-applied"):
            return httpx.Response(status, json={"error": {"type": "model"}})
        served = self._serve(request, declined=answer == "declined")
        if answer == "lost-reply":
            raise httpx.ReadTimeout("model provider: applied, then no answer", request=request)
        if status is not None:
            return httpx.Response(status, json={"error": {"type": "model"}})
        if answer == "not-json":
            return httpx.Response(200, text="<html>ok</html>")
        if answer == "not-object":
            return httpx.Response(200, json=["ok"])
        if answer == "wrong-shape":
            return httpx.Response(200, json={"status": "ok"})
        self._bug_after = answer == "bug-after"
        if answer == "cancelled-meanwhile" and self._acting is not None:
            self.on_cancel(self._acting)
        return served

    def _serve(self, request: httpx.Request, *, declined: bool) -> httpx.Response:
        pipeline, service, *rest = request.url.path.strip("/").split("/")
        body = json.loads(request.content) if request.content else {}
        if declined and service in ("customers", "prices"):
            return httpx.Response(422, json={"error": {"type": "invalid"}})
        if service == "customers":
            customer = rest[0]
            return httpx.Response(
                200, json={"id": customer, "email": f"{customer}@model", "name": "Model"}
            )
        if service == "prices":
            total = order_amount({"items": body["items"]})
            return httpx.Response(
                200, json={"currency": body["currency"], "total_amount": total, "lines": []}
            )
        return self._apply(
            pipeline, service, request.headers.get("Idempotency-Key"), body, declined
        )

    def _apply(
        self, pipeline: str, service: str, key: str | None, body: dict[str, JSON], declined: bool
    ) -> httpx.Response:
        honours = key is not None and (pipeline, service) not in self.ignores_keys
        kept = self._kept.get((pipeline, service, key or "")) if honours else None
        if kept is not None:
            # A repeat of a key: the first answer, and nothing new happens.
            return httpx.Response(200, json=kept)
        if declined:
            return httpx.Response(402, json={"error": {"type": "card_declined"}})
        kind = "charge" if service == "payments" else "notification"
        amount = body.get("amount")
        effect = Effect(
            number=len(self.effects) + 1,
            kind=kind,
            pipeline=pipeline,
            key=key,
            order_id=str(body["order_id"]),
            amount=amount if isinstance(amount, int) else None,
            job_id=self._acting,
        )
        self.effects.append(effect)
        answer: dict[str, JSON] = {"id": f"{kind}-{effect.number}", "status": "ok"}
        if honours:
            self._kept[(pipeline, service, key or "")] = answer
        return httpx.Response(201, json=answer)


class ModelClient(ProviderClient):
    """The real provider client, over the model provider instead of the network."""

    def __init__(self, provider: ModelProvider, pipeline: str) -> None:
        base_url = f"http://provider.model/{pipeline}"
        super().__init__(base_url=base_url, timeout=1.0)
        self.provider = provider
        self._model = httpx.Client(
            base_url=base_url, transport=httpx.MockTransport(provider.handle)
        )

    @property
    def client(self) -> httpx.Client:
        return self._model

    def close(self) -> None:
        self._model.close()


StepFunction = Callable[[StepContext[ProviderClient]], JSON]


def _in_model(run: StepFunction) -> StepFunction:
    """A shipped step function, with the provider told which job calls it."""

    def step(ctx: StepContext[ProviderClient]) -> JSON:
        client = ctx.resources
        assert isinstance(client, ModelClient)
        with client.provider.acting_for(ctx.job_id):
            return run(ctx)

    return step


def model_pipelines(provider: ModelProvider) -> dict[str, Pipeline[object]]:
    """The two order pipelines (declared anew, so the registry points at this provider):
    gather (read-only) → act (charge, exactly once) → publish (notify, exactly once in
    `KEYED`, at most once in `UNKEYED`)."""

    def build(name: str, notify_delivery: Delivery) -> Pipeline[object]:
        key = f"{name}:{{order_id}}"
        steps = [
            Step("gather", _in_model(gather), key=f"{key}:gather", delivery=Delivery.READ_ONLY),
            Step("act", _in_model(charge), key=f"{key}:charge", effect="charge"),
            Step(
                "publish",
                _in_model(notify),
                key=f"{key}:notify",
                delivery=notify_delivery,
                effect="notification",
            ),
        ]
        declared = Pipeline(
            name=name, steps=steps, resources=lambda _settings: ModelClient(provider, name)
        )
        return cast(Pipeline[object], declared)

    return {
        KEYED: build(KEYED, Delivery.EXACTLY_ONCE),
        UNKEYED: build(UNKEYED, Delivery.AT_MOST_ONCE),
    }


# --- the broker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A step message on the broker."""

    pipeline: str
    step: str
    job_id: str
    #: Sent again (a retry, a re-drive, a replay): it travels on the retry queue.
    resent: bool = False
    #: Delivered before (its worker died, or the broker delivered it twice).
    redelivered: bool = False
    #: The reading a job's first message brings (`jobs.engine.dispatch.READING_HEADER`).
    header: str | None = None

    @property
    def repeat(self) -> bool:
        """Whether it may repeat an attempt, as `jobs.worker.app.is_repeat` decides."""
        return self.resent or self.redelivered


class ModelBroker:
    """The queued messages, in order; `down` refuses every publish."""

    def __init__(self) -> None:
        self.queue: list[Message] = []
        self.down = False

    def publish(self, message: Message) -> None:
        if self.down:
            raise ConnectionError("model broker down")
        self.queue.append(message)

    def take(self, pick: int) -> Message:
        return self.queue.pop(pick % len(self.queue))

    def take_batch(self, pick: int, size: int) -> list[Message]:
        """The picked message and the next queued ones of its step, as a worker batches them
        (`jobs.worker.batching`: a message that may repeat an attempt always runs alone)."""
        first = self.take(pick)
        batch = [first]
        for message in list(self.queue):
            if len(batch) >= size or first.repeat:
                break
            same = (message.pipeline, message.step) == (first.pipeline, first.step)
            if same and not message.repeat:
                self.queue.remove(message)
                batch.append(message)
        return batch

    def requeue(self, message: Message) -> None:
        """Give a message back, as the broker does when its worker dies before the ack."""
        self.queue.append(replace(message, redelivered=True))


class ModelDispatch:
    """How the runner publishes, onto the model broker; `message` is the run's own (its
    retry goes back on the retry queue, as Celery's `task.retry` does)."""

    def __init__(self, broker: ModelBroker, message: Message | None = None) -> None:
        self.broker = broker
        self.message = message

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        self.broker.publish(Message(pipeline, step, job_id, resent=resend))

    def send_many(
        self,
        pipeline: str,
        step: str,
        job_ids: Sequence[str],
        *,
        readings: Mapping[str, Reading] | None = None,
    ) -> list[str]:
        unsent = []
        for job_id in job_ids:
            reading = (readings or {}).get(job_id)
            header = reading_header(reading) if reading is not None else None
            try:
                self.broker.publish(Message(pipeline, step, job_id, header=header))
            except ConnectionError:
                unsent.append(job_id)
        return unsent

    def retry_later(self, delay: float) -> NoReturn:
        assert self.message is not None
        own = self.message
        self.broker.publish(Message(own.pipeline, own.step, own.job_id, resent=True))
        raise RetryRequested(delay)


# --- faults ---------------------------------------------------------------------------------


class Killed(BaseException):
    """A worker killed at a crash point (kill -9): nothing after it runs, its claims stay
    started, its messages go back to the broker. A BaseException, so no `except Exception`
    of the engine catches it."""


class ModelCrasher(Crasher):
    """Kills the run at the armed crash point (once)."""

    def __init__(self) -> None:
        super().__init__((), Path())
        self.armed: tuple[CrashPoint, str] | None = None

    def __call__(self, point: CrashPoint, step: str, job_id: str) -> None:
        if self.armed == (point, step):
            self.armed = None
            raise Killed(f"killed at {point} of {step} (job {job_id})")


class LostAnswers:
    """Ambiguous commits: the `nth` ledger call of a run (see `arm`) commits, its answer
    is lost with the connection, and `StepLedger.retrying` runs it again, as after a
    `DatabaseUnavailable` raised past the COMMIT. (Every call of the protocol that writes
    goes through `retrying`.)"""

    def __init__(self, ledger: StepLedger) -> None:
        self._retrying = ledger.retrying
        self._nth: int | None = None
        self._calls = 0
        # The instance attribute shadows the method for every call the ledger makes.
        setattr(ledger, "retrying", self.retrying)  # noqa: B010 - a method cannot be assigned

    def arm(self, nth: int | None) -> None:
        self._nth, self._calls = nth, 0

    def retrying(self, call: Callable[[], T]) -> T:
        self._calls += 1
        if self._calls == self._nth:
            self._retrying(call)
        return self._retrying(call)
