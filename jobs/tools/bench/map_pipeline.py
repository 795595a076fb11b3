"""The map step `oncelery bench --map` measures against a chord: `items` fans out into N
numbered no-op items, each stamping its end as the chord's items do; `join` streams their
results and marks the map joined. Workers load it with
`ONCELERY_PIPELINES=jobs.tools.bench.map_pipeline`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from config import Settings
from jobs.maps import ItemContext, MapStep
from jobs.pipelines import Pipeline, Step, StepContext
from jobs.tools.bench import chord
from ledger import JSON

#: The pipeline's name.
BENCH_MAP_PIPELINE: Final = "bench-map"


def _items(ctx: StepContext[None]) -> Iterator[int]:
    count = ctx.context["items"]
    if not isinstance(count, int):
        raise TypeError("items: expected an int")
    # A generator, as a map of 100,000 would be written: its items are never all in memory.
    return iter(range(count))


def _each(ctx: ItemContext[None]) -> JSON:
    chord.stamp(Path(str(ctx.context["folder"])))
    return ctx.item


def _join(ctx: StepContext[None]) -> JSON:
    began = time.time()
    # Streamed, as a join over 100,000 items would be: no list of results is built.
    count = sum(1 for _ in ctx.items("items"))
    chord.write_joined(Path(str(ctx.context["folder"])), count, began)
    return {"items": count}


def _no_resources(_settings: Settings) -> None:
    return None


bench_map: Pipeline[None] = Pipeline(
    name=BENCH_MAP_PIPELINE,
    steps=[
        MapStep(
            "items",
            _items,
            key="bench-map:{run}:items",
            each=_each,
            item_id=str,
        ),
        Step("join", _join, key="bench-map:{run}:join"),
    ],
    resources=_no_resources,
)
