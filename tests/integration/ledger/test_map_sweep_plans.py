"""A sweep reads the items that look lost, not every pending item: a big map whose items are
all published and fresh costs a sweep next to nothing (it ran every few seconds, reading the
whole map each time). Its statement is run again under EXPLAIN ANALYZE (rolled back) and the
rows it reads from `map_items` counted, as `test_map_item_plans` does."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ledger import MapLedger
from tests.integration.ledger.test_map_item_plans import _rows_read, _seed, engine

__all__ = ["engine"]


def test_a_sweep_does_not_read_a_big_healthy_map(engine: sa.Engine) -> None:
    # Given a big running map (new: its statistics say nothing of it) whose items are all
    # published, 20 of them in flight and 20 retried after a lease that ran out: none lost
    job_id = _seed(engine)
    entries = (
        "INSERT INTO ledger_entries (key, job_id, step, state, fingerprint, owner, "
        "locked_until, attempts, created_at, updated_at) "
        "SELECT 'big/' || n, :id, 'items', 'started', 'f' || n, gen_random_uuid(), "
        "now() + make_interval(secs => CAST(:lease AS float)), 1, now(), now() "
        "FROM generate_series(CAST(:a AS int), CAST(:b AS int)) n"
    )
    with engine.begin() as conn:
        conn.execute(sa.text(entries), {"id": job_id, "lease": 30, "a": 0, "b": 19})
        conn.execute(sa.text(entries), {"id": job_id, "lease": -30, "a": 20, "b": 39})
    maps = MapLedger(engine=engine, lease_seconds=30.0)
    sent: list[tuple[str, Any]] = []

    def capture(_conn: object, _cursor: object, statement: str, parameters: Any, *_: Any) -> None:
        if "map_items" in statement:
            sent.append((statement, parameters))

    # When the sweeper looks for lost items
    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        taken = maps.take_lost_items(stalled_after=3600, relay_after=5, limit=500)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)

    # Then it takes none, reading next to no rows of the map
    assert taken == []
    [(statement, parameters)] = sent
    read = _rows_read(engine, statement, parameters)
    assert read <= 50, (read, statement[:300])
