"""The map `oncelery chaos --map N` runs under fire: `visit` fans out into N items, each
sending one notification under its own key; an item whose id ends in 0 splits into three
more (twice deep); `join` streams every item and sends one more. Workers load it with
`ONCELERY_PIPELINES=jobs.tools.visits`."""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from config import Settings
from jobs.maps import Expand, ItemContext, MapStep
from jobs.pipelines import Pipeline, Step, StepContext
from jobs.provider import ProviderClient
from ledger import JSON

#: How many times an item may split.
DEPTH: Final = 2
#: The notification template of an item, and of the join.
VISITED, JOINED = "item_visited", "map_joined"


class Visits(BaseModel):
    """A run of visits: its name (every notification's order id starts with it) and roots."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(min_length=1, max_length=120)
    roots: int = Field(ge=0, le=1_000_000)


def order_of(run: str, item_id: str) -> str:
    """The order id an item's notification carries (the audit allows one per order)."""
    return f"{run}/{item_id}"


def _roots(ctx: StepContext[ProviderClient]) -> JSON:
    roots = ctx.context["roots"]
    if not isinstance(roots, int):
        raise TypeError("roots: expected an int")
    return [{"id": str(n), "depth": 0} for n in range(roots)]


def _visit(ctx: ItemContext[ProviderClient]) -> JSON | Expand:
    run = str(ctx.context["run"])
    ctx.resources.post(
        "/notifications",
        {
            "order_id": order_of(run, ctx.item_id),
            "customer_id": "visits",
            "template": VISITED,
            "data": {"item": ctx.item_id},
        },
        idempotency_key=ctx.key,
    )
    depth = ctx.item["depth"] if isinstance(ctx.item, dict) else DEPTH
    if isinstance(depth, int) and depth < DEPTH and ctx.item_id.endswith("0"):
        more: list[JSON] = [{"id": f"{ctx.item_id}.{n}", "depth": depth + 1} for n in range(3)]
        return Expand(items=more, result={"split": ctx.item_id})
    return {"visited": ctx.item_id}


def _join(ctx: StepContext[ProviderClient]) -> JSON:
    seen = sum(1 for item in ctx.items("visit") if item.result is not None)
    run = str(ctx.context["run"])
    ctx.resources.post(
        "/notifications",
        {
            "order_id": order_of(run, "join"),
            "customer_id": "visits",
            "template": JOINED,
            "data": {"items": seen},
        },
        idempotency_key=ctx.key,
    )
    return {"items": seen}


def expected_items(roots: int) -> list[str]:
    """The ids of every item a map of `roots` roots has, in item order."""

    def below(item_id: str, depth: int) -> list[str]:
        if depth < DEPTH and item_id.endswith("0"):
            return [item_id] + [i for n in range(3) for i in below(f"{item_id}.{n}", depth + 1)]
        return [item_id]

    return [i for n in range(roots) for i in below(str(n), 0)]


def _provider(settings: Settings) -> ProviderClient:
    return ProviderClient(base_url=settings.provider_url, timeout=settings.provider_timeout)


visits: Pipeline[ProviderClient] = Pipeline(
    name="visits",
    steps=[
        MapStep(
            "visit",
            _roots,
            key="visits:{run}:visit",
            each=_visit,
            item_id=lambda item: str(item["id"]) if isinstance(item, dict) else str(item),
            effect="notification",
        ),
        Step("join", _join, key="visits:{run}:join", effect="notification"),
    ],
    resources=_provider,
    input=Visits,
)
