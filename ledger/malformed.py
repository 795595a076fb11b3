"""`MalformedMessages`: how many step messages could not be a delivery, per task and reason
(kept in the ledger so that every process's count reaches the metrics and survives restarts).
Must not import celery, kombu, jobs or config."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Engine

from ledger import db
from ledger.queries import malformed as malformed_queries


@dataclass(frozen=True)
class MalformedCount:
    """One task's malformed messages for one reason."""

    task: str
    reason: str
    count: int
    last_at: datetime
    #: What was wrong with the last of them.
    last_detail: str


class MalformedMessages:
    """The counts of malformed step messages over one engine.

    Args:
        engine: where the ledger lives.
    """

    def __init__(self, *, engine: Engine) -> None:
        self.engine = engine

    def count(self, task: str, reason: str, detail: str) -> None:
        """Count one more malformed message of `task` for `reason` (`detail`: what was wrong).

        Raises:
            LedgerError: the database could not count it (e.g. `DatabaseUnavailable`).
        """
        statement = malformed_queries.count_malformed(
            self.engine.dialect.name, task, reason, detail
        )
        with db.transaction(self.engine) as conn:
            conn.execute(statement)

    def counts(self) -> list[MalformedCount]:
        """Every task's count, by reason."""
        with db.single_statement(self.engine) as conn:
            rows = conn.execute(malformed_queries.select_malformed()).mappings()
            return [
                MalformedCount(
                    task=row["task"],
                    reason=row["reason"],
                    count=int(row["count"]),
                    last_at=row["last_at"],
                    last_detail=row["last_detail"],
                )
                for row in rows
            ]
