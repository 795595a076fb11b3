"""A map step's pipeline for the system tests: `split` fans out into numbered items, every one
ending in 0 splitting into three more (twice), each sending a notification under its own key;
`join` reads them all and sends one more. Workers load it through `ONCELERY_PIPELINES`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from config import Settings
from jobs import PermanentError, Pipeline, Step, StepContext
from jobs.maps import Expand, ItemContext, MapStep
from jobs.provider import ProviderClient
from jobs.tools.visits import DEPTH, expected_items
from ledger import JSON

__all__ = ["DEPTH", "expected_items", "toy_map"]


@dataclass
class Tools:
    """The provider, and where a test leaves a file that fails an item (`failing`)."""

    provider: ProviderClient
    data_dir: Path

    def close(self) -> None:
        self.provider.close()


def failing(data_dir: Path, word: str, item_id: str) -> Path:
    """The file whose presence fails an item for good (a test removes it, then replays)."""
    return data_dir / f"fail-{word}-{item_id}"


def roots(ctx: StepContext[Tools]) -> JSON:
    count = ctx.context["roots"]
    assert isinstance(count, int)
    return [{"id": str(n), "depth": 0} for n in range(count)]


def visit(ctx: ItemContext[Tools]) -> JSON | Expand:
    word = str(ctx.context["word"])
    if failing(ctx.resources.data_dir, word, ctx.item_id).exists():
        raise PermanentError(f"item {ctx.item_id} is refused")
    ctx.resources.provider.post(
        "/notifications",
        {
            # One "order" per item: the audit allows one notification per order.
            "order_id": f"map-{word}/{ctx.item_id}",
            "customer_id": "map",
            "template": "item_visited",
            "data": {"item": ctx.item_id},
        },
        idempotency_key=ctx.key,
    )
    item = ctx.item
    assert isinstance(item, dict)
    depth = item["depth"]
    assert isinstance(depth, int)
    if depth < DEPTH and ctx.item_id.endswith("0"):
        more: list[JSON] = [{"id": f"{ctx.item_id}.{n}", "depth": depth + 1} for n in range(3)]
        return Expand(items=more, result={"split": ctx.item_id})
    return {"visited": ctx.item_id}


def join(ctx: StepContext[Tools]) -> JSON:
    ids: list[JSON] = [each.item_id for each in ctx.items("split") if each.result is not None]
    ctx.resources.provider.post(
        "/notifications",
        {
            "order_id": f"map-{ctx.context['word']}/join",
            "customer_id": "map",
            "template": "map_joined",
            "data": {"items": len(ids)},
        },
        idempotency_key=ctx.key,
    )
    return {"items": len(ids), "first": ids[:3]}


def _tools(settings: Settings) -> Tools:
    provider = ProviderClient(base_url=settings.provider_url, timeout=settings.provider_timeout)
    return Tools(provider, settings.data_dir)


toy_map: Pipeline[Tools] = Pipeline(
    name="toy-map",
    steps=[
        MapStep(
            "split",
            roots,
            key="toy-map:{word}:split",
            each=visit,
            item_id=lambda item: str(item["id"]) if isinstance(item, dict) else str(item),
            effect="notification",
        ),
        Step("join", join, key="toy-map:{word}:join", effect="notification"),
    ],
    resources=_tools,
)
