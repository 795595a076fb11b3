"""How long the steps a task message runs may take: on the fast path, each step under an alarm
of its own (`step_timer`), the task's Celery limits being their sum; a map step's own run
under an alarm too, its message allowing for the fan-out after it."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Final

from billiard.exceptions import SoftTimeLimitExceeded

from config import Settings
from jobs import retry
from jobs.engine.run import StepTimer
from jobs.maps import is_map
from jobs.pipelines import Step

#: Seconds a map step's own message may take beyond its steps' limits: after its run, the
#: fan-out's record and publish take time that grows with its items (100,000 items: about
#: 10 s to write, 30–50 s to publish on a loaded 2-core box), and a limit that struck there
#: would roll back the record or leave the rest of the publish to the sweeper.
FAN_OUT_ALLOWANCE: Final = 600.0

# A step cut by its time limit (Celery's, or `step_timer`'s) is tried again.
retry.treat_as_transient(SoftTimeLimitExceeded)


@contextmanager
def step_timer(seconds: float) -> Iterator[None]:
    """Interrupt the step running inside with `SoftTimeLimitExceeded` after `seconds`, as
    Celery's soft time limit interrupts a task (a batch's child only: the alarm is per
    process, and a prefork child runs one thing at a time)."""

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise SoftTimeLimitExceeded(f"step time limit ({seconds:g}s) exceeded")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def step_timer_for(settings: Settings, step: Step[Any]) -> StepTimer | None:
    """What bounds each step of a task message in time. On the fast path one message runs
    several steps, and the task's limit is their sum: each step gets its own, from an alarm
    (a signal, so only where the task runs on the main thread, as in a prefork child). A
    message of the chained mode runs one step, which the task's limit bounds — but for a
    map step's, whose limit allows for the fan-out (`FAN_OUT_ALLOWANCE`): its run has the
    alarm."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return step_timer if settings.fast_path or is_map(step) else None
