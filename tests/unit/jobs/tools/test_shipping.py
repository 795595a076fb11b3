"""The fulfilment demo's and chaos run's warehouse: which orders ship, when, how often."""

from __future__ import annotations

from collections import Counter

from jobs.tools.shipping import ShippingPlan, Warehouse
from ledger import JSON


def test_half_the_orders_ship_some_early_some_twice() -> None:
    orders = [f"o{n}" for n in range(40)]

    plan = ShippingPlan.for_orders(orders)

    shipped = set(plan.early) | set(plan.late)
    assert shipped == set(orders[::2])
    assert not set(plan.early) & set(plan.late)
    assert (len(plan.early), len(plan.late), len(plan.twice)) == (5, 15, 7)
    assert plan.twice <= shipped


def test_the_warehouse_sends_round_robin_and_again_after_a_failure() -> None:
    sent: list[tuple[str, str]] = []
    failed = {"once": True}

    def flaky(order_id: str, signal_id: str, data: JSON) -> str:
        if failed["once"]:
            failed["once"] = False
            raise ConnectionError("restarting")
        sent.append(("flaky", signal_id))
        return "recorded"

    def steady(order_id: str, signal_id: str, data: JSON) -> str:
        sent.append(("steady", signal_id))
        return "duplicate" if ("steady", signal_id) in sent[:-1] else "recorded"

    plan = ShippingPlan(early=("a", "b"), late=(), twice=frozenset({"b"}))
    warehouse = Warehouse(plan, [("flaky", flaky), ("steady", steady)])

    warehouse.ship_early()

    assert sent == [("flaky", "ship-a"), ("steady", "ship-b"), ("flaky", "ship-b")]
    assert warehouse.ways == Counter({"flaky": 2, "steady": 1})
    assert warehouse.failures == []
