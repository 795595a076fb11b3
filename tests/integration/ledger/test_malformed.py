"""Malformed step messages counted on real Postgres and SQLite: one row per task and reason,
however many arrive."""

from __future__ import annotations

import sqlalchemy as sa

from ledger import MalformedMessages


def test_malformed_messages_are_counted_per_task_and_reason(engine: sa.Engine) -> None:
    # Given no malformed message yet
    malformed = MalformedMessages(engine=engine)
    assert malformed.counts() == []

    # When two of one kind arrive for one task, and one of another kind
    malformed.count("oncelery.toy.measure", "arguments", "keyword arguments ['job_id']")
    malformed.count("oncelery.toy.measure", "arguments", "2 arguments")
    malformed.count("oncelery.toy.measure", "job_id", "'x' is not a UUID")

    # Then each reason has its count and the last detail
    found = {(c.task, c.reason): (c.count, c.last_detail) for c in malformed.counts()}
    assert found == {
        ("oncelery.toy.measure", "arguments"): (2, "2 arguments"),
        ("oncelery.toy.measure", "job_id"): (1, "'x' is not a UUID"),
    }
