"""The pipeline `oncelery bench --timers` seeds its jobs into, each already asleep at `nap`:
a fired timer hands its job to `done`, a no-op step a real worker claims and records.
Workers load it with `ONCELERY_PIPELINES=jobs.tools.bench.timer_pipeline`."""

from __future__ import annotations

from typing import Final

from config import Settings
from jobs.pipelines import Pipeline, Step, StepContext
from jobs.waits import Sleep
from ledger import JSON

#: The pipeline's name.
BENCH_TIMERS_PIPELINE: Final = "bench-timers"


def _noop(ctx: StepContext[None]) -> JSON:
    return {"n": ctx.context["n"]}


def _no_resources(_settings: Settings) -> None:
    return None


bench_timers: Pipeline[None] = Pipeline(
    name=BENCH_TIMERS_PIPELINE,
    steps=[
        Step("start", _noop, key="bench-timers:{run}:{n}:start"),
        Sleep("nap", seconds=1),
        Step("done", _noop, key="bench-timers:{run}:{n}:done"),
    ],
    resources=_no_resources,
)
