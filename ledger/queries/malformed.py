"""Statements counting step messages that could not be a delivery."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ledger import db
from ledger.schema import malformed_messages


def count_malformed(dialect_name: str, task: str, reason: str, detail: str) -> Any:
    """Add one to a task's count of malformed messages for a reason, keeping the last detail."""
    row = {
        "task": task,
        "reason": reason,
        "count": 1,
        "last_at": db.utcnow(),
        "last_detail": detail,
    }
    insert = db.insert_for(dialect_name)(malformed_messages).values(row)
    return insert.on_conflict_do_update(
        index_elements=[malformed_messages.c.task, malformed_messages.c.reason],
        set_={
            "count": malformed_messages.c.count + 1,
            "last_at": insert.excluded.last_at,
            "last_detail": insert.excluded.last_detail,
        },
    )


def select_malformed() -> sa.Select[Any]:
    """Every task's count of malformed messages, by reason."""
    table = malformed_messages.c
    return sa.select(table.task, table.reason, table.count, table.last_at, table.last_detail)
