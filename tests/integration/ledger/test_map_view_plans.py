"""A page of a map's items reads its page, whatever Postgres's statistics say about the map:
a new map of thousands of items among many small analysed ones looks, to the planner, like a
map of five, cheaper read whole and sorted than walked in order. Each statement `MapViews`
sends for a page is run again, in order, with EXPLAIN ANALYZE on its reads (rolled back),
and the rows read from `map_items` counted (tests/integration/ledger/test_map_item_plans.py
seeds the maps and counts the rows)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import ItemState
from ledger.db import create_engine
from ledger.map_views import MapViews
from tests.integration.ledger.test_map_item_plans import BIG, _read_in, _seed

#: The page's size, and a cursor in the middle of the new map.
PAGE, MIDDLE = 100, f"{BIG // 2:08d}"


@pytest.fixture
def engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(postgres_url)
    yield engine
    engine.dispose()


def rows_read(engine: sa.Engine, sent: list[tuple[str, Any]]) -> int:
    """Rows the reads of `map_items` among `sent` read, run again in order in one
    transaction (its settings too), rolled back."""
    raw = engine.raw_connection()
    read = 0
    try:
        cursor = raw.cursor()
        for statement, parameters in sent:
            if statement.lstrip().upper().startswith("SET"):
                cursor.execute(statement, parameters)
            elif "FROM map_items" in statement:
                cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters)
                [[plan]] = cursor.fetchall()
                read += _read_in(plan[0]["Plan"])
        raw.rollback()
    finally:
        raw.close()
    return read


@pytest.mark.parametrize(
    ("state", "after", "most"),
    [
        (None, None, PAGE + 1),
        (None, MIDDLE, PAGE + 1),
        (ItemState.PENDING, None, PAGE + 1),
        # A state the map has none of: the map's rows after the cursor, never more.
        (ItemState.DONE, MIDDLE, BIG // 2),
    ],
    ids=["first", "middle", "pending", "absent-state"],
)
def test_a_page_of_a_big_new_map_reads_its_page(
    engine: sa.Engine, state: ItemState | None, after: str | None, most: int
) -> None:
    # Given a big new map among many small analysed ones (whose items are all done)
    job_id = _seed(engine)
    sent: list[tuple[str, Any]] = []

    def capture(_conn: object, _cursor: object, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        # When a page of its items is read
        page = MapViews(engine=engine).items(job_id, "items", state=state, after=after)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)

    # Then it is the page, read from the map's rows in item order and no others
    assert page is not None
    expected = 0 if state is ItemState.DONE else PAGE
    assert len(page.items) == expected
    assert rows_read(engine, sent) <= most
