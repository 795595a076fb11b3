"""`jobs.engine.step_messages`: what a step message must carry, and why one cannot be run."""

from __future__ import annotations

import uuid

import pytest

from jobs.engine.step_messages import Malformed, MalformedReason, job_id_of

JOB = "0b6f3c1e-5d0a-4d8e-9a37-2f4c8e1b7a90"


def test_one_uuid_argument_is_a_job_id_in_canonical_form() -> None:
    assert job_id_of([JOB], {}) == JOB
    assert job_id_of((JOB.upper(),), {}) == JOB
    assert job_id_of([uuid.UUID(JOB).hex], {}) == JOB


@pytest.mark.parametrize(
    ("args", "kwargs", "reason", "detail"),
    [
        ([], {"job_id": JOB}, MalformedReason.ARGUMENTS, "keyword arguments ['job_id']"),
        # A keyword must not pick another step for a well-formed job id either.
        ([JOB], {"_step": "act"}, MalformedReason.ARGUMENTS, "keyword arguments ['_step']"),
        ([], {}, MalformedReason.ARGUMENTS, "arguments [] (0)"),
        ([JOB, JOB], {}, MalformedReason.ARGUMENTS, "(2)"),
        ("abc", {}, MalformedReason.ARGUMENTS, "arguments 'abc' (3)"),
        (None, {}, MalformedReason.ARGUMENTS, "(NoneType)"),
        (["not-a-uuid"], {}, MalformedReason.JOB_ID, "job id 'not-a-uuid' is not a UUID"),
        ([42], {}, MalformedReason.JOB_ID, "job id 42 is not a UUID"),
        ([None], {}, MalformedReason.JOB_ID, "job id None is not a UUID"),
        ([{"id": JOB}], {}, MalformedReason.JOB_ID, "is not a UUID"),
    ],
)
def test_other_arguments_cannot_be_a_delivery(
    args: object, kwargs: object, reason: MalformedReason, detail: str
) -> None:
    found = job_id_of(args, kwargs)

    assert isinstance(found, Malformed)
    assert found.reason is reason
    assert detail in found.detail


def test_a_huge_bad_value_is_shown_short() -> None:
    found = job_id_of(["x" * 10_000], {})

    assert isinstance(found, Malformed)
    assert len(found.detail) < 120
