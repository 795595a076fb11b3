"""More pipelines, declared with the same public API as order-placed: the engine is not
order-specific. Workers load them through `ONCELERY_PIPELINES=tests.toy_pipeline`."""

from __future__ import annotations

import time
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from config import Settings
from jobs import Delivery, PermanentError, Pipeline, Sleep, Step, StepContext, WaitForSignal
from jobs.provider import ProviderClient
from ledger import JSON


def measure(ctx: StepContext[ProviderClient]) -> JSON:
    """A pure step: no outside world at all."""
    word = str(ctx.context["word"])
    return {"letters": len(word), "upper": word.upper()}


def announce(ctx: StepContext[ProviderClient]) -> JSON:
    """An effectful step: one notification per word, deduplicated by the step's key."""
    measured = ctx.results["measure"]
    assert isinstance(measured, dict)
    sent = ctx.resources.post(
        "/notifications",
        {
            "order_id": f"toy-{ctx.context['word']}",
            "customer_id": "toy",
            "template": "word_measured",
            "data": {"letters": measured["letters"]},
        },
        idempotency_key=ctx.key,
    )
    return {"notification_id": sent["id"]}


def _provider(settings: Settings) -> ProviderClient:
    return ProviderClient(base_url=settings.provider_url, timeout=settings.provider_timeout)


#: A pure step, then an exactly-once notification.
toy: Pipeline[ProviderClient] = Pipeline(
    name="toy",
    steps=[
        Step("measure", measure, key="toy:{word}:measure"),
        Step("announce", announce, key="toy:{word}:announce", effect="notification"),
    ],
    resources=_provider,
)


#: The same notification declared at-most-once (as if the provider ignored keys).
toy_once: Pipeline[ProviderClient] = Pipeline(
    name="toy-once",
    steps=[
        Step("measure", measure, key="toy-once:{word}:measure"),
        Step(
            "announce",
            announce,
            key="toy-once:{word}:announce",
            effect="notification",
            delivery=Delivery.AT_MOST_ONCE,
        ),
    ],
    resources=_provider,
)


def nap(ctx: StepContext[None]) -> JSON:
    """Sleeps as long as the job says: a step that hangs, for time limits."""
    seconds = ctx.context["seconds"]
    assert isinstance(seconds, int | float)
    time.sleep(seconds)
    return {"slept": seconds}


#: A step that sleeps `seconds`, to meet time limits.
toy_slow: Pipeline[None] = Pipeline(
    name="toy-slow",
    steps=[Step("nap", nap, key="toy-slow:{name}:nap")],
    resources=lambda _settings: None,
)


class Word(BaseModel):
    """The input of `toy-typed`: a word, and how many times to count it."""

    model_config = ConfigDict(extra="forbid")

    word: str = Field(min_length=1, max_length=100)
    times: int = Field(default=1, gt=0)


def count(ctx: StepContext[None]) -> JSON:
    """A pure step over a typed input; a word starting with `refused` fails for good (a dead
    letter of a pipeline of one's own)."""
    word, times = ctx.context["word"], ctx.context["times"]
    assert isinstance(word, str)
    assert isinstance(times, int)
    if word.startswith("refused"):
        raise PermanentError(f"{word!r} is refused")
    return {"letters": len(word) * times}


#: A pipeline whose input is a pydantic model (`jobs.enqueue`, `enqueue --pipeline`).
toy_typed: Pipeline[None] = Pipeline(
    name="toy-typed",
    steps=[Step("count", count, key="toy-typed:{word}:count")],
    resources=lambda _settings: None,
    input=Word,
)


#: A pure step, a one-second sleep (a timer row), then an exactly-once notification.
toy_sleep: Pipeline[ProviderClient] = Pipeline(
    name="toy-sleep",
    steps=[
        Step("measure", measure, key="toy-sleep:{word}:measure"),
        Sleep("cool_off", seconds=1.0),
        Step("announce", announce, key="toy-sleep:{word}:announce", effect="notification"),
    ],
    resources=_provider,
)


#: As `toy-sleep`, but sleeping until the job's `wake_at` (an ISO 8601 time).
toy_wait: Pipeline[ProviderClient] = Pipeline(
    name="toy-wait",
    steps=[
        Step("measure", measure, key="toy-wait:{word}:measure"),
        Sleep("cool_off", until="wake_at"),
        Step("announce", announce, key="toy-wait:{word}:announce", effect="notification"),
    ],
    resources=_provider,
)


def answer(ctx: StepContext[ProviderClient]) -> JSON:
    """An effectful step after a wait for a signal: one notification whose template says
    which won (the wait's result), under one key whichever it was."""
    waited = ctx.results["await_go"]
    assert isinstance(waited, dict)
    template = "word_signalled" if waited["by"] == "signal" else "word_timed_out"
    sent = ctx.resources.post(
        "/notifications",
        {
            "order_id": f"toy-{ctx.context['word']}",
            "customer_id": "toy",
            "template": template,
            "data": {"signal_id": waited["signal_id"]},
        },
        idempotency_key=ctx.key,
    )
    return {"notification_id": sent["id"], "template": template}


def _timeout(context: Mapping[str, JSON], _results: Mapping[str, JSON]) -> float:
    seconds = context.get("timeout", 60)
    assert isinstance(seconds, int | float)
    return float(seconds)


#: A pure step, a wait for signal `go` keyed by the word (up to the job's `timeout`
#: seconds, 60 by default), then an exactly-once notification saying which came first.
toy_signal: Pipeline[ProviderClient] = Pipeline(
    name="toy-signal",
    steps=[
        Step("measure", measure, key="toy-signal:{word}:measure"),
        WaitForSignal("await_go", signal="go", key="{word}", timeout=_timeout),
        Step("answer", answer, key="toy-signal:{word}:answer", effect="notification"),
    ],
    resources=_provider,
)
