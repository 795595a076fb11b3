"""`jobs.ops.audit`: reconciling ledger entries with the provider's effects, one drift kind at a
time, and the scope of a reconciliation."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from jobs.ops.audit import AuditReport, Scope, effect_steps, order_amounts, reconcile
from jobs.ops.effects import Drift, Effect
from jobs.orders import order_job, order_placed
from jobs.sandbox import unit_amount
from ledger import JobStore, StepEntry, StepState, create_engine, upgrade
from tests.factories import order

AT = datetime(2026, 1, 1, tzinfo=UTC)


def entry(key: str, state: StepState = StepState.SUCCEEDED, *, step: str = "act") -> StepEntry:
    """A ledger entry as `JobStore.entries_of_steps` returns it."""
    return StepEntry(
        key=key,
        job_id=uuid.uuid4(),
        step=step,
        state=state,
        fingerprint="f" * 64,
        attempts=1,
        result={"id": "ch_1"} if state is StepState.SUCCEEDED else None,
        error=None,
        locked_until=None,
        started_at=AT,
        finished_at=AT if state is not StepState.STARTED else None,
    )


def charge(order_id: str, key: str | None = "default") -> Effect:
    """A charge effect; its key defaults to the order's charge key."""
    return Effect(
        "charge", f"order:{order_id}:charge" if key == "default" else key, order_id, amount=700
    )


def notification(order_id: str) -> Effect:
    return Effect("notification", f"order:{order_id}:notify", order_id)


KINDS = {
    "order:o1:charge": "charge",
    "order:o2:charge": "charge",
    "order:o1:notify": "notification",
}


# --- clean ----------------------------------------------------------------------------------


def test_one_effect_per_successful_key_is_clean() -> None:
    entries = [entry("order:o1:charge"), entry("order:o1:notify", step="publish")]

    report = reconcile(entries, KINDS, [charge("o1"), notification("o1")])

    assert report == AuditReport(
        effects={"charge": 1, "notification": 1},
        duplicates={"charge": 0, "notification": 0},
        ledger_entries=2,
        in_flight=0,
        drift=(),
    )
    assert report.clean is True


def test_nothing_at_all_is_clean() -> None:
    report = reconcile([], {}, [])

    assert report.clean is True
    assert (report.effects, report.duplicates, report.ledger_entries) == ({}, {}, 0)


# --- each kind of drift ---------------------------------------------------------------------


def test_effect_without_key() -> None:
    report = reconcile([], {}, [charge("o1", key=None)])

    assert report.drift == (Drift("effect_without_key", "charge", None, "o1"),)
    assert report.clean is False


def test_two_effects_for_one_key() -> None:
    report = reconcile([entry("order:o1:charge")], KINDS, [charge("o1"), charge("o1")])

    assert report.drift == (
        Drift("duplicate_effect", "charge", "order:o1:charge", "o1", "2 effects for one key"),
        Drift("duplicate_effect_for_order", "charge", None, "o1", "2 charge effects for one order"),
    )
    assert report.duplicates == {"charge": 1}
    assert report.effects == {"charge": 2}


def test_effect_without_ledger_record() -> None:
    report = reconcile([], {}, [charge("o1")])

    assert report.drift == (
        Drift("effect_without_ledger_record", "charge", "order:o1:charge", "o1"),
    )


def test_effect_for_failed_step() -> None:
    report = reconcile([entry("order:o1:charge", StepState.FAILED)], KINDS, [charge("o1")])

    assert report.drift == (
        Drift("effect_for_failed_step", "charge", "order:o1:charge", "o1", "ledger says failed"),
    )


def test_success_without_effect_names_the_kind_of_the_step() -> None:
    entries = [entry("order:o1:notify", step="publish"), entry("order:o9:refund", step="refund")]

    report = reconcile(entries, KINDS, [])

    assert report.drift == (
        Drift("success_without_effect", "notification", "order:o1:notify"),
        Drift("success_without_effect", "?", "order:o9:refund"),
    )


def test_two_charges_for_one_order_under_different_keys() -> None:
    entries = [entry("order:o1:charge"), entry("order:o1:charge:again")]

    report = reconcile(entries, KINDS, [charge("o1"), charge("o1", key="order:o1:charge:again")])

    assert report.drift == (
        Drift("duplicate_effect_for_order", "charge", None, "o1", "2 charge effects for one order"),
    )
    assert report.duplicates == {"charge": 1}


def test_a_charge_and_a_notification_for_one_order_are_not_duplicates() -> None:
    entries = [entry("order:o1:charge"), entry("order:o1:notify", step="publish")]

    report = reconcile(entries, KINDS, [charge("o1"), notification("o1")])

    assert report.clean is True


def test_notifications_of_two_templates_for_one_order_are_not_duplicates_of_one_are() -> None:
    """A fulfilment order is told it was confirmed, then that it shipped: each once."""
    kinds = {"k1": "notification", "k2": "notification", "k3": "notification"}
    entries = [entry(key, step="publish") for key in kinds]
    confirmed = Effect("notification", "k1", "o1", template="order_confirmed")
    shipped = Effect("notification", "k2", "o1", template="order_shipped")

    assert reconcile(entries[:2], kinds, [confirmed, shipped]).clean is True
    again = Effect("notification", "k3", "o1", template="order_shipped")
    report = reconcile(entries, kinds, [confirmed, shipped, again])
    assert [(d.problem, d.detail) for d in report.drift] == [
        ("duplicate_effect_for_order", "2 notification (order_shipped) effects for one order")
    ]


def test_a_charge_of_the_wrong_amount_is_drift() -> None:
    """One charge per order, each under its key, yet one of them is not what its order
    says: counting effects alone would call this clean."""
    entries = [entry("order:o1:charge"), entry("order:o2:charge")]
    effects = [charge("o1"), charge("o2")]  # 700 each

    report = reconcile(
        entries, KINDS, effects, amounts={"order:o1:charge": 700, "order:o2:charge": 1400}
    )

    assert [(d.problem, d.key, d.detail) for d in report.drift] == [
        ("wrong_amount", "order:o2:charge", "applied 700, the order says 1400")
    ]


def test_order_amounts_price_the_orders_row(tmp_path: Path) -> None:
    """The amount comes from the job's own row (its items at the sandbox's prices), never
    from what a step recorded."""
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    upgrade(engine)
    store = JobStore(engine=engine)
    job = order_job(order(items=[{"sku": "SKU-1", "quantity": 2}]))
    [(job_id, _)] = store.create_jobs([job])
    charged = replace(entry(job.step_keys["act"]), job_id=job_id)
    other = entry("note:1", step="publish")

    amounts = order_amounts([charged, other], {charged.key: "charge", other.key: "x"}, store)

    assert amounts == {charged.key: 2 * unit_amount("SKU-1")}
    engine.dispose()


# --- states that are not drift --------------------------------------------------------------


def test_a_started_key_with_its_effect_is_in_flight() -> None:
    report = reconcile([entry("order:o1:charge", StepState.STARTED)], KINDS, [charge("o1")])

    assert report.clean is True
    assert report.in_flight == 1


def test_a_started_key_without_an_effect_yet_is_not_drift() -> None:
    report = reconcile([entry("order:o1:charge", StepState.STARTED)], KINDS, [])

    assert report.clean is True
    assert report.in_flight == 0


@pytest.mark.parametrize("applied", [True, False])
def test_an_unknown_key_may_or_may_not_have_acted(applied: bool) -> None:
    effects = [charge("o1")] if applied else []

    report = reconcile([entry("order:o1:charge", StepState.UNKNOWN)], KINDS, effects)

    assert report.clean is True


def test_a_failed_key_without_an_effect_is_not_drift() -> None:
    report = reconcile([entry("order:o1:charge", StepState.FAILED)], KINDS, [])

    assert report.clean is True


# --- counts ---------------------------------------------------------------------------------


def test_counts_by_kind_and_problem() -> None:
    entries = [
        entry("order:o1:charge"),
        entry("order:o2:charge"),
        entry("order:o3:charge", StepState.FAILED),
        entry("order:o4:charge"),
        entry("order:o1:notify", step="publish"),
        entry("order:o5:notify", StepState.STARTED, step="publish"),
    ]
    effects = [
        charge("o1"),
        charge("o2"),
        charge("o2"),
        charge("o3"),
        charge("o6"),
        charge("o7", key=None),
        notification("o1"),
        notification("o5"),
    ]

    report = reconcile(entries, KINDS, effects)

    assert report.effects == {"charge": 6, "notification": 2}
    assert report.duplicates == {"charge": 1, "notification": 0}
    assert report.ledger_entries == 6
    assert report.in_flight == 1
    assert Counter(drift.problem for drift in report.drift) == {
        "effect_without_key": 1,
        "duplicate_effect": 1,
        "effect_for_failed_step": 1,
        "effect_without_ledger_record": 1,
        "success_without_effect": 1,
        "duplicate_effect_for_order": 1,
    }


def test_report_as_json() -> None:
    report = reconcile([], {}, [charge("o1")])

    assert report.as_json() == {
        "clean": False,
        "effects": {"charge": 1},
        "duplicates": {"charge": 0},
        "ledger_entries": 0,
        "in_flight": 0,
        "drift": [
            {
                "problem": "effect_without_ledger_record",
                "kind": "charge",
                "key": "order:o1:charge",
                "order_id": "o1",
                "detail": "",
            }
        ],
    }


_order_ids = st.lists(st.sampled_from([f"o{n}" for n in range(8)]), unique=True, max_size=8)


@hypothesis_settings(max_examples=100, deadline=None)
@given(orders=_order_ids, extra=st.lists(st.sampled_from(["o1", "o2", "o3"]), max_size=3))
def test_each_extra_charge_is_one_duplicate(orders: list[str], extra: list[str]) -> None:
    # Given one succeeded charge key and its effect per order, plus repeats of some effects,
    entries = [entry(f"order:{order_id}:charge") for order_id in orders]
    effects = [charge(order_id) for order_id in orders + [o for o in extra if o in orders]]

    # When reconciled,
    report = reconcile(entries, {}, effects)

    # Then every repeat counts once, and only repeats are drift.
    repeats = len(effects) - len(orders)
    assert report.duplicates.get("charge", 0) == repeats
    assert report.clean is (repeats == 0)
    assert report.effects.get("charge", 0) == len(effects)


# --- scope and helpers ----------------------------------------------------------------------


def test_the_default_scope_covers_every_effect() -> None:
    assert Scope().covers_effect(charge("anything")) is True
    assert Scope().covers_effect(charge("o1", key=None)) is True


def test_a_scope_of_keys_or_an_order_prefix() -> None:
    scope = Scope(keys=frozenset({"order:o1:charge"}), order_prefix="demo-")

    assert scope.covers_effect(charge("o1")) is True
    assert scope.covers_effect(charge("demo-7")) is True
    assert scope.covers_effect(charge("o2")) is False
    assert scope.covers_effect(charge("other", key=None)) is False
    assert Scope(keys=frozenset({"order:o1:charge"})).covers_effect(charge("demo-7")) is False
    assert Scope(order_prefix="demo-").covers_effect(charge("o1")) is False


def test_effect_from_the_sandbox_json() -> None:
    assert Effect.from_json(
        {"kind": "charge", "idempotency_key": "k", "order_id": "o1", "amount": 700, "at": "now"}
    ) == Effect("charge", "k", "o1", 700)
    assert Effect.from_json(
        {"kind": "notification", "idempotency_key": None, "order_id": 5, "amount": "7"}
    ) == Effect("notification", None, None, None)


def test_effect_steps_of_the_order_pipeline() -> None:
    assert effect_steps([order_placed]) == {  # type: ignore[list-item]
        ("order-placed", "act"): "charge",
        ("order-placed", "publish"): "notification",
    }
