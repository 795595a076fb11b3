"""Unit tests of `jobs.sandbox.faults`: validation, the decision bands, the plan and its updates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from jobs.sandbox.faults import FaultPlan, Faults, FaultUpdate, Outcome, decide
from jobs.sandbox.services import Service

rates = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def test_faults_default_to_none() -> None:
    assert Faults() == Faults(fault_rate=0, timeout_rate=0, lost_reply_rate=0, latency_ms=0)


@pytest.mark.parametrize(
    "fields",
    [
        {"fault_rate": 1.5},
        {"timeout_rate": -0.1},
        {"latency_ms": -1},
        {"fault_rate": 0.5, "timeout_rate": 0.3, "lost_reply_rate": 0.3},
        {"retry_rate": 0.1},
    ],
)
def test_faults_rejects_bad_values(fields: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        Faults.model_validate(fields)


def test_rates_summing_to_one_with_float_error_are_accepted() -> None:
    faults = Faults(fault_rate=0.1, timeout_rate=0.2, lost_reply_rate=0.7)

    assert decide(faults, 0.999999) is Outcome.LOST_REPLY


def test_decide_cuts_bands_in_order() -> None:
    # Binary fractions, so the band edges are exact.
    faults = Faults(fault_rate=0.125, timeout_rate=0.25, lost_reply_rate=0.375)

    assert decide(faults, 0.0) is Outcome.ERROR
    assert decide(faults, 0.124) is Outcome.ERROR
    assert decide(faults, 0.125) is Outcome.TIMEOUT
    assert decide(faults, 0.374) is Outcome.TIMEOUT
    assert decide(faults, 0.375) is Outcome.LOST_REPLY
    assert decide(faults, 0.749) is Outcome.LOST_REPLY
    assert decide(faults, 0.75) is Outcome.OK


@given(rate=rates, roll=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_a_single_rate_fires_exactly_below_it(rate: float, roll: float) -> None:
    assert (decide(Faults(fault_rate=rate), roll) is Outcome.ERROR) == (roll < rate)
    assert (decide(Faults(timeout_rate=rate), roll) is Outcome.TIMEOUT) == (roll < rate)
    assert (decide(Faults(lost_reply_rate=rate), roll) is Outcome.LOST_REPLY) == (roll < rate)
    limited = decide(Faults(rate_limited_rate=rate), roll) is Outcome.RATE_LIMITED
    assert limited == (roll < rate)


def test_rate_one_always_fires_and_zero_never() -> None:
    for roll in (0.0, 0.5, 0.999999):
        assert decide(Faults(fault_rate=1.0), roll) is Outcome.ERROR
        assert decide(Faults(), roll) is Outcome.OK


def test_plan_override_replaces_global_set_for_its_service_only() -> None:
    plan = FaultPlan(global_faults=Faults(fault_rate=0.5, latency_ms=10))

    plan.apply(FaultUpdate(service=Service.PAYMENTS, timeout_rate=1.0))

    assert plan.for_service(Service.PAYMENTS) == Faults(timeout_rate=1.0)
    assert plan.for_service(Service.CUSTOMERS) == Faults(fault_rate=0.5, latency_ms=10)


def test_update_without_service_replaces_global_and_resets_unnamed_fields() -> None:
    plan = FaultPlan(global_faults=Faults(fault_rate=0.5, latency_ms=10))
    plan.apply(FaultUpdate(service=Service.PAYMENTS, fault_rate=1.0))

    plan.apply(FaultUpdate(timeout_rate=0.25))

    assert plan.global_faults == Faults(timeout_rate=0.25)
    assert plan.for_service(Service.PAYMENTS) == Faults(fault_rate=1.0)


def test_update_naming_only_honour_keys_keeps_faults() -> None:
    plan = FaultPlan(global_faults=Faults(fault_rate=0.5))

    plan.apply(FaultUpdate.model_validate({"honour_keys": False}))

    assert plan.global_faults == Faults(fault_rate=0.5)


def test_empty_update_clears_global_faults() -> None:
    plan = FaultPlan(global_faults=Faults(fault_rate=0.5))

    plan.apply(FaultUpdate.model_validate({}))

    assert plan.global_faults == Faults()


def test_update_rejects_unknown_service() -> None:
    with pytest.raises(ValidationError):
        FaultUpdate.model_validate({"service": "inventory"})


def test_plan_json_shape() -> None:
    plan = FaultPlan(global_faults=Faults(latency_ms=5))
    plan.apply(FaultUpdate(service=Service.NOTIFICATIONS, fault_rate=0.5))

    none = {
        "timeout_rate": 0.0,
        "lost_reply_rate": 0.0,
        "rate_limited_rate": 0.0,
        "retry_after_seconds": 1,
    }
    assert plan.to_json() == {
        "global": {"fault_rate": 0.0, **none, "latency_ms": 5},
        "services": {"notifications": {"fault_rate": 0.5, **none, "latency_ms": 0}},
    }
