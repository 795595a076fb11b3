"""The parts of `oncelery bench` (see `command.py`): the bare Celery app of the baseline,
the null-provider pipeline, the bench database, the measured rows and their figures, and the
seeded-history timings of the sweeper's and `status`'s queries."""

from __future__ import annotations

from jobs.errors import JobError

__all__ = ["BenchFailed"]


class BenchFailed(JobError):
    """Raised when a bench cannot be measured: a worker died, orders did not finish in time,
    some were dead-lettered, another worker consumes the bench's queue, or the bench database
    cannot be prepared. The message says which, and where the logs are."""
