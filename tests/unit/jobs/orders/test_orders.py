"""`jobs.orders`: the order-placed pipeline and the job planned for one event. The event id only
deduplicates deliveries; the business identity (the order) makes the keys and the fingerprint,
so the same order sent as two events is done once."""

from __future__ import annotations

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from jobs.orders import OrderItem, OrderPlaced, order_job, order_placed
from jobs.pipelines import Delivery, fingerprint
from ledger import JSON
from tests.factories import order


def test_the_order_placed_pipeline() -> None:
    assert order_placed.name == "order-placed"
    assert [(step.name, step.effect, step.delivery) for step in order_placed.steps] == [
        ("gather", None, Delivery.READ_ONLY),
        ("act", "charge", Delivery.EXACTLY_ONCE),
        ("publish", "notification", Delivery.EXACTLY_ONCE),
    ]


def test_order_job_plans_every_step() -> None:
    event = OrderPlaced(
        event_id="evt-1",
        order_id="ord-42",
        customer_id="cust-7",
        currency="EUR",
        items=[OrderItem(sku="SKU-1", quantity=2)],
    )

    job = order_job(event)

    context: dict[str, JSON] = {
        "order_id": "ord-42",
        "customer_id": "cust-7",
        "currency": "EUR",
        "items": [{"sku": "SKU-1", "quantity": 2}],
    }
    assert job.pipeline == "order-placed"
    assert job.event_id == "evt-1"
    assert dict(job.context) == context
    assert job.fingerprint == fingerprint("order-placed", context)
    assert dict(job.step_keys) == {
        "gather": "order:ord-42:gather",
        "act": "order:ord-42:charge",
        "publish": "order:ord-42:notify",
    }
    assert job.first_step == "gather"


def test_the_event_id_is_not_part_of_the_context() -> None:
    job = order_job(order())

    assert "event_id" not in job.context


def test_the_same_order_under_two_event_ids_is_one_request() -> None:
    first = order(event_id="evt-a", order_id="ord-1")
    second = first.model_copy(update={"event_id": "evt-b"})

    one, two = order_job(first), order_job(second)

    assert (one.event_id, two.event_id) == ("evt-a", "evt-b")
    assert one.fingerprint == two.fingerprint
    assert one.step_keys == two.step_keys
    assert one.context == two.context


def test_changed_content_of_one_order_keeps_its_keys_but_not_its_fingerprint() -> None:
    # Same keys, different fingerprint: the ledger refuses the second (FingerprintMismatch)
    # rather than skip a charge whose amount changed.
    first = order(order_id="ord-1", items=[{"sku": "SKU-1", "quantity": 1}])
    changed = order(order_id="ord-1", items=[{"sku": "SKU-1", "quantity": 2}])

    one, two = order_job(first), order_job(changed)

    assert one.step_keys == two.step_keys
    assert one.fingerprint != two.fingerprint


def test_another_order_has_other_keys_and_fingerprint() -> None:
    one, two = order_job(order(order_id="ord-1")), order_job(order(order_id="ord-2"))

    assert set(one.step_keys.values()).isdisjoint(two.step_keys.values())
    assert one.fingerprint != two.fingerprint


_orders = st.builds(
    OrderPlaced,
    event_id=st.sampled_from(["evt-1", "evt-2"]),
    order_id=st.sampled_from(["ord-1", "ord-2"]),
    customer_id=st.sampled_from(["cust-1", "cust-2"]),
    currency=st.sampled_from(["EUR", "USD"]),
    items=st.lists(
        st.builds(OrderItem, sku=st.sampled_from(["A", "B"]), quantity=st.integers(1, 3)),
        min_size=1,
        max_size=2,
    ),
)


@hypothesis_settings(max_examples=200, deadline=None)
@given(one=_orders, two=_orders)
def test_fingerprints_match_exactly_when_the_content_does(
    one: OrderPlaced, two: OrderPlaced
) -> None:
    same_content = one.model_dump(exclude={"event_id"}) == two.model_dump(exclude={"event_id"})

    assert (order_job(one).fingerprint == order_job(two).fingerprint) is same_content
    assert (order_job(one).step_keys == order_job(two).step_keys) is (one.order_id == two.order_id)
