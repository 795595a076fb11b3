"""Taking the moves past a wait whose publish was lost (`TimerLedger`'s and `SignalLedger`'s
`take_unsent`): each row names the step its job left, so the step to send again is known
from the row, and sent only while the job is still there. Must not import celery, kombu,
jobs or config."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ledger import db
from ledger.queries import wait_outbox
from ledger.queries.timers import select_jobs_to_resend

#: The step a move past `step` of a job of `pipeline` sent (`again`: `step` itself, a retry
#: timer's); a `LookupError` when the pipeline has no such step (nothing is sent).
ResendRoute = Callable[[str, str, bool], str | None]


def take_unsent(
    engine: Engine, take: sa.Update, route: ResendRoute
) -> list[tuple[int, UUID, str, str, str]]:
    """Run `take` (a `wait_outbox.take_unsent`), which marks its rows sent; (row id, job id,
    pipeline, step to send, map item to send or "") for each whose job is active and still
    at the step its move sent (`route`). A job elsewhere got that step's message, or went
    past it: a copy sent now would be a message of the job's current step, which its move
    never published."""
    with db.transaction(engine) as conn:
        rows = list(conn.execute(take))
        if not rows:
            return []
        found = conn.execute(select_jobs_to_resend([row.job_id for row in rows]))
        active = {job.id: job for job in found}
        resend: list[tuple[int, UUID, str, str, str]] = []
        for row in rows:
            job = active.get(row.job_id)
            if job is None:
                continue
            try:
                step = route(job.pipeline, row.step, bool(row.again))
            except LookupError:
                continue
            if step is not None and step == job.current_step:
                resend.append((row.id, job.id, job.pipeline, step, row.item_id))
        return resend


def undo_sent(engine: Engine, table: sa.Table, row_ids: Sequence[int]) -> None:
    """Put rows of `table` back in the outbox (the resend after them failed)."""
    if row_ids:
        with db.single_statement(engine) as conn:
            conn.execute(wait_outbox.undo_sent(table, row_ids))
