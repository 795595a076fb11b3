"""`jobs.engine.dispatch`: the reading a job's first message brings, as a header, and what a worker
makes of any header it finds there."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.engine.dispatch import READING_LIMIT, message_reading, reading_header
from ledger import first_reading

JOB = str(uuid.uuid4())


def test_a_reading_comes_back_from_its_header() -> None:
    reading = first_reading(uuid.UUID(JOB), "gather", "k:1", {"n": 1, "items": [{"a": None}]})

    header = reading_header(reading)

    assert header is not None
    assert message_reading(header, JOB, "gather") == reading


def test_a_reading_too_long_for_a_header_stays_home() -> None:
    big = {"note": "x" * READING_LIMIT}

    assert reading_header(first_reading(uuid.UUID(JOB), "gather", "k:1", big)) is None


@pytest.mark.parametrize(
    "header",
    [
        None,
        7,
        "",
        "not json",
        "[1, 2]",
        '"text"',
        json.dumps({"key": "k"}),
        json.dumps({"context": {}}),
        json.dumps({"key": 1, "context": {}}),
        json.dumps({"key": "k", "context": [1]}),
        "[" * 100_000,
    ],
)
def test_a_malformed_header_brings_nothing(header: object) -> None:
    assert message_reading(header, JOB, "gather") is None


def test_a_header_for_a_malformed_job_id_brings_nothing() -> None:
    assert message_reading(json.dumps({"key": "k", "context": {}}), "not-a-uuid", "s") is None


@given(
    st.one_of(
        st.text(), st.binary(), st.integers(), st.none(), st.dictionaries(st.text(), st.text())
    )
)
def test_any_header_brings_a_reading_or_nothing(header: object) -> None:
    found = message_reading(header, JOB, "gather")

    assert found is None or (found.assumed and found.attempt == 1 and found.results == {})
