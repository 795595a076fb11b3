"""The rows `oncelery bench --timers` starts from, inserted with set-based SQL: jobs of the
bench pipeline asleep at `nap`, each with its pending timer — far in the future (the bulk
that must cost nothing), or due at a steady rate from a given time (the stream measured)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from jobs.tools.bench.timer_pipeline import BENCH_TIMERS_PIPELINE
from jobs.tools.databases import bench_errors

#: Jobs (and timers) per seeding statement.
CHUNK: Final = 100_000

# (chr(58) is ":", which `sa.text` would read as the start of a bound parameter.)
_SEED = """
WITH made AS (
    INSERT INTO jobs (id, pipeline, event_id, state, context, fingerprint, step_keys,
                      results, current_step, created_at, updated_at, started_at, dispatched_at)
    SELECT md5(CAST(:run AS text) || '-' || g)::uuid, CAST(:pipeline AS text),
           CAST(:run AS text) || '-' || g, 'running',
           jsonb_build_object('run', CAST(:run AS text), 'n', g),
           md5(CAST(:run AS text) || g) || md5(g || CAST(:run AS text)),
           jsonb_build_object(
               'start', 'bench-timers' || chr(58) || CAST(:run AS text) || chr(58) || g
                        || chr(58) || 'start',
               'nap', 'sleep' || chr(58) || 'nap' || chr(58) || CAST(:run AS text)
                      || chr(58) || g,
               'done', 'bench-timers' || chr(58) || CAST(:run AS text) || chr(58) || g
                       || chr(58) || 'done'),
           '{}'::jsonb, 'nap', now(), now(), now(), now()
    FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g
    RETURNING id, CAST(context->>'n' AS bigint) AS n
)
INSERT INTO timers (job_id, step, kind, state, due_at, created_at)
SELECT id, 'nap', 'sleep', 'pending', DUE, now() FROM made
"""

#: Far in the future: 30 days from now and on, a second apart.
_FAR = "now() + interval '30 days' + n * interval '1 second'"
#: Due from `:start`, `:rate` a second.
_STREAM = (
    "CAST(:start AS timestamptz) + CAST(n - :first AS float8) / CAST(:rate AS float8) "
    "* interval '1 second'"
)


def _seed(due: str) -> sa.TextClause:
    return sa.text(_SEED.replace("DUE", due)).bindparams(pipeline=BENCH_TIMERS_PIPELINE)


def seed_far(engine: Engine, run: str, count: int, log: Callable[[str], None]) -> float:
    """Insert `count` sleeping jobs whose timers are due in a month or more; the seconds it
    took (a VACUUM ANALYZE after, as autovacuum would)."""
    began = time.perf_counter()
    with bench_errors("seeding pending timers"):
        for first in range(1, count + 1, CHUNK):
            last = min(first + CHUNK - 1, count)
            with engine.begin() as conn:
                conn.execute(_seed(_FAR), {"run": run, "first": first, "last": last})
            log(f"seeded {last:,} of {count:,} pending timers")
        vacuum(engine)
    return time.perf_counter() - began


def seed_stream(engine: Engine, run: str, count: int, *, start: datetime, rate: float) -> None:
    """Insert `count` sleeping jobs whose timers fall due `rate` a second from `start`."""
    with bench_errors("seeding the stream of due timers"), engine.begin() as conn:
        conn.execute(
            _seed(_STREAM),
            {"run": run, "first": 1, "last": count, "start": start, "rate": rate},
        )


def vacuum(engine: Engine) -> None:
    """VACUUM (ANALYZE) the tables seeded, as autovacuum would soon."""
    with engine.connect() as conn:
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        auto.execute(sa.text("VACUUM (ANALYZE) jobs, timers"))
