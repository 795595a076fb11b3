"""A second pipeline, declared with the same public API as order-placed: the engine is not
order-specific. Workers load it through `ONCELERY_PIPELINES=tests.toy_pipeline`."""

from __future__ import annotations

from config import Settings
from jobs import Pipeline, Step, StepContext
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


toy: Pipeline[ProviderClient] = Pipeline(
    name="toy",
    steps=[
        Step("measure", measure, key="toy:{word}:measure"),
        Step("announce", announce, key="toy:{word}:announce", effect="notification"),
    ],
    resources=_provider,
)
