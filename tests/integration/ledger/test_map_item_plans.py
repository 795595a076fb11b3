"""A message's items are found by key, whatever Postgres's statistics say about the map: a
new map of thousands of items among many small analysed ones looks, to the planner, like a
map of five, and statements finding items by (job, step) read the whole map for every
message of 20 — quadratic in the map's size. Each statement the ledger sends for a message
is run again under EXPLAIN ANALYZE (rolled back), and the rows it reads from `map_items`
counted."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import MapLedger
from ledger.db import create_engine
from ledger.map_types import ItemClaim

#: Items of the new map, and of each small one.
BIG, SMALL, SMALL_MAPS = 5_000, 5, 2_000
#: Items of one message.
MESSAGE = 20


@pytest.fixture
def engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(postgres_url)
    yield engine
    engine.dispose()


def _seed(engine: sa.Engine) -> uuid.UUID:
    """Many small finished maps, analysed; then one big new map, running, not analysed."""
    job_id = uuid.uuid4()
    jobs = (
        "INSERT INTO jobs (id, pipeline, event_id, state, context, fingerprint, step_keys, "
        "results, current_step, created_at, updated_at) "
    )
    items = (
        "INSERT INTO map_items (job_id, step, item_id, path, key, fingerprint, item, state, "
        "children, dispatched_at, created_at, updated_at) "
    )
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                jobs + "SELECT gen_random_uuid(), 'toy', 's' || n, 'succeeded', '{}', 'f', "
                "'{}', '{}', NULL, now(), now() FROM generate_series(1, :maps) n"
            ),
            {"maps": SMALL_MAPS},
        )
        conn.execute(
            sa.text(
                items + "SELECT j.id, 'items', n::text, lpad(n::text, 8, '0'), "
                "j.id || '/' || n, 'f', to_jsonb(n), 'done', 0, now(), now(), now() "
                "FROM jobs j, generate_series(0, :small - 1) n"
            ),
            {"small": SMALL},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE jobs, map_items"))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                jobs + "VALUES (:id, 'toy', 'big', 'running', '{}', 'f', "
                "'{\"items\": \"big\"}', '{}', 'items', now(), now())"
            ),
            {"id": job_id},
        )
        conn.execute(
            sa.text(
                items + "SELECT :id, 'items', n::text, lpad(n::text, 8, '0'), 'big/' || n, "
                "'f' || n, to_jsonb(n), 'pending', 0, now(), now(), now() "
                "FROM generate_series(0, :big - 1) n"
            ),
            {"id": job_id, "big": BIG},
        )
        conn.execute(
            sa.text(
                "INSERT INTO maps (job_id, step, policy, total, done, failed, waiting, "
                "expanded, remaining, created_at, updated_at) "
                "VALUES (:id, 'items', 'all_succeed', :big, 0, 0, 0, 0, :big, now(), now())"
            ),
            {"id": job_id, "big": BIG},
        )
    return job_id


def _rows_read(engine: sa.Engine, statement: str, parameters: Any) -> int:
    """Rows a statement reads from `map_items` (those kept and those its filters removed),
    run again under EXPLAIN ANALYZE in a transaction rolled back."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters)
        [[plan]] = cursor.fetchall()
        raw.rollback()
    finally:
        raw.close()
    return _read_in(plan[0]["Plan"])


def _read_in(node: dict[str, Any]) -> int:
    own = 0
    if node.get("Relation Name") == "map_items" and "Actual Rows" in node:
        loops = node.get("Actual Loops", 1)
        removed = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Recheck", 0)
        own = (node["Actual Rows"] + removed) * loops
    return own + sum(_read_in(child) for child in node.get("Plans", []))


def test_a_message_reads_its_items_alone_from_a_big_new_map(engine: sa.Engine) -> None:
    # Given a big new map among many small analysed ones
    job_id = _seed(engine)
    maps = MapLedger(engine=engine, lease_seconds=30.0)
    sent: list[tuple[str, Any]] = []

    def capture(_conn: object, _cursor: object, statement: str, parameters: Any, *_: Any) -> None:
        if "map_items" in statement:
            sent.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        # When one message's items are claimed and recorded, and published ones marked
        ids = [str(n) for n in range(2_000, 2_000 + MESSAGE)]
        found = maps.claim_items(job_id, "items", ids)
        claims = [each for each in found if isinstance(each, ItemClaim)]
        recorded = maps.record_items([(claim, None, []) for claim in claims], next_step=None)
        maps.mark_dispatched(job_id, "items", ids)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)

    # Then each item was claimed and counted once, and no statement read more than its items
    assert len(claims) == MESSAGE
    assert all(getattr(each, "counted", False) for each in recorded)
    assert len(sent) >= 4
    for statement, parameters in sent:
        read = _rows_read(engine, statement, parameters)
        assert read <= 2 * MESSAGE, (read, statement[:200])


def test_a_page_of_the_outbox_reads_its_page_alone_from_a_big_new_map(engine: sa.Engine) -> None:
    # Given a big new map among many small analysed ones, its items all in the outbox
    job_id = _seed(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE map_items SET dispatched_at = NULL WHERE job_id = :id"), {"id": job_id}
        )
    maps = MapLedger(engine=engine, lease_seconds=30.0)
    sent: list[tuple[str, Any]] = []

    def capture(_conn: object, _cursor: object, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    # When the publish of its fan-out reads a page of it from the middle
    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        page = maps.outbox_page(job_id, "items", after="00002000", limit=MESSAGE)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)

    # Then it has the next items in item order, and read about that many rows
    assert [item_id for item_id, _ in page] == [str(n) for n in range(2_001, 2_001 + MESSAGE)]
    [(statement, parameters)] = sent
    read = _rows_read(engine, statement, parameters)
    assert read <= 2 * MESSAGE, (read, statement[:200])
