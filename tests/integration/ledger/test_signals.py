"""Signals as rows on the real ledger (Postgres and SQLite): recorded once per id, a
duplicate id changes nothing, the same id with other content is a conflict that writes
nothing, and a signal no job waits for is kept."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from ledger import JSON, NewSignal, SignalConflict, SignalLedger, SignalOutcome
from ledger.schema import signals


def _nowhere(pipeline: str, step: str) -> str | None:
    raise AssertionError(f"no job waits here, yet {pipeline}.{step} was routed")


def rows(engine: sa.Engine) -> list[sa.Row[tuple[object, ...]]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(signals).order_by(signals.c.id)))


def test_a_signal_is_recorded_once_per_id_and_kept_while_nobody_waits(engine: sa.Engine) -> None:
    ledger = SignalLedger(engine=engine)
    shipped = NewSignal("shipped", "order-1", "carrier-42", {"carrier": "DHL"})

    first = ledger.send(shipped, route=_nowhere)
    again = ledger.send(shipped, route=_nowhere)
    other = ledger.send(NewSignal("shipped", "order-1", "carrier-43"), route=_nowhere)

    assert (first.outcome, again.outcome, other.outcome) == (
        SignalOutcome.RECORDED,
        SignalOutcome.DUPLICATE,
        SignalOutcome.RECORDED,
    )
    assert first.woke is None
    found = rows(engine)
    assert [(r.name, r.key, r.signal_id, r.data) for r in found] == [
        ("shipped", "order-1", "carrier-42", {"carrier": "DHL"}),
        ("shipped", "order-1", "carrier-43", None),
    ]
    # Kept: no wait took them.
    assert [(r.job_id, r.step, r.consumed_at, r.dispatched_at) for r in found] == [
        (None, None, None, None)
    ] * 2
    assert ledger.counts() == (2, 0)


@pytest.mark.parametrize(
    "changed",
    [
        NewSignal("shipped", "order-1", "carrier-42", {"carrier": "UPS"}),
        NewSignal("shipped", "order-2", "carrier-42", {"carrier": "DHL"}),
        NewSignal("shipped", "order-1", "carrier-42"),
    ],
)
def test_the_same_id_with_other_content_is_a_conflict_that_writes_nothing(
    engine: sa.Engine, changed: NewSignal
) -> None:
    ledger = SignalLedger(engine=engine)
    ledger.send(NewSignal("shipped", "order-1", "carrier-42", {"carrier": "DHL"}), route=_nowhere)

    with pytest.raises(SignalConflict, match="'carrier-42'"):
        ledger.send(changed, route=_nowhere)

    assert len(rows(engine)) == 1


@pytest.mark.parametrize(
    ("first", "again", "same"),
    [
        ({"n": 1}, {"n": 1.0}, True),
        ([1.0, {"a": 2, "b": [3]}], [1, {"b": [3.0], "a": 2.0}], True),
        ({"big": 10**20}, {"big": 1e20}, True),
        ({"n": 1}, {"n": True}, False),
        ({"n": 0}, {"n": False}, False),
        ({"n": 1}, {"n": 1.5}, False),
        ({"n": 1}, {"n": "1"}, False),
    ],
)
def test_equal_numbers_in_the_data_are_the_same_signal(
    engine: sa.Engine, first: JSON, again: JSON, same: bool
) -> None:
    """`1` and `1.0` are one JSON number (a sender's serializer may write either): the same
    id with either is a duplicate, not a conflict. A boolean is never a number."""
    ledger = SignalLedger(engine=engine)
    ledger.send(NewSignal("shipped", "order-1", "s-1", first), route=_nowhere)

    if same:
        sent = ledger.send(NewSignal("shipped", "order-1", "s-1", again), route=_nowhere)
        assert sent.outcome is SignalOutcome.DUPLICATE
    else:
        with pytest.raises(SignalConflict):
            ledger.send(NewSignal("shipped", "order-1", "s-1", again), route=_nowhere)
    assert [row.data for row in rows(engine)] == [first]


def test_the_same_id_under_another_name_is_another_signal(engine: sa.Engine) -> None:
    ledger = SignalLedger(engine=engine)

    ledger.send(NewSignal("shipped", "order-1", "s-1"), route=_nowhere)
    sent = ledger.send(NewSignal("returned", "order-1", "s-1"), route=_nowhere)

    assert sent.outcome is SignalOutcome.RECORDED
    assert len(rows(engine)) == 2
