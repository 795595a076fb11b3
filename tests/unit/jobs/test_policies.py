"""Per-step policies: the settings override the step's own policy field by field."""

from __future__ import annotations

from config.settings import StepPolicy
from jobs.retry import RetryPolicy, effective_policy

DEFAULT = RetryPolicy(max_attempts=8, backoff_base=0.5, backoff_max=30.0)


def test_the_default_applies_when_nothing_else_does() -> None:
    assert effective_policy(DEFAULT, None, None) == DEFAULT


def test_a_steps_own_policy_beats_the_default() -> None:
    own = RetryPolicy(max_attempts=2, backoff_base=1.0, backoff_max=5.0)
    assert effective_policy(DEFAULT, own, None) == own


def test_settings_override_field_by_field() -> None:
    own = RetryPolicy(max_attempts=2, backoff_base=1.0, backoff_max=5.0)
    configured = StepPolicy(max_attempts=5)
    assert effective_policy(DEFAULT, own, configured) == RetryPolicy(5, 1.0, 5.0)
    assert effective_policy(DEFAULT, None, StepPolicy(backoff_max=2.0)) == RetryPolicy(8, 0.5, 2.0)
