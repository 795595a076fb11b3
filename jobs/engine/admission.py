"""Fair queues for limited steps: a run is sent to a limited step only while its key has
room (`ledger.limit_admission`); a key's backlog waits in the ledger as timers that the
timer loop sends key by key as they come due, so another key's run is not queued behind it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from uuid import UUID

from sqlalchemy.engine import Engine

from config import get_settings
from jobs.limits import effective_limits, rules_of
from jobs.maps import is_map
from jobs.pipelines import Pipeline, Step
from ledger import JSON, LedgerError, LimitRules
from ledger.limit_admission import admit

logger = logging.getLogger(__name__)


def rules_for(pipeline: Pipeline[object], step: Step[object]) -> LimitRules | None:
    """The limits a claim of `step` takes, from the settings and the step (as
    `Runtime.limits_for`), for a process that has no runtime; None for a map step (its
    limits are its items')."""
    if is_map(step):
        return None
    configured = get_settings().limits.get(f"{pipeline.name}.{step.name}")
    return rules_of(effective_limits(step.limits, configured), items=False)


def admitted(
    engine: Engine,
    step: Step[object],
    rules: LimitRules | None,
    runs: Sequence[tuple[str, Mapping[str, JSON]]],
) -> list[str]:
    """Of `runs` (job id, context) to send to `step`, those to send now (all of them when it
    has no limits); the rest wait in line for their keys (`ledger.limit_admission.admit`)."""
    everyone = [job_id for job_id, _ in runs]
    if rules is None or not runs:
        return everyone
    keyed = [(UUID(job_id), context) for job_id, context in runs]
    try:
        sent = admit(engine, step.name, rules, keyed)
    except LedgerError as exc:
        # Sent all the same: each claim still takes its limit (or waits for it); only the
        # queue's fairness is lost, not a limit.
        logger.warning("limited runs sent without admission: %s", exc, extra={"step": step.name})
        return everyone
    return [str(job_id) for job_id in sent]
