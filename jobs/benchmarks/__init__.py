"""The parts of `oncelery bench` (see `jobs/bench.py`): the bare Celery app of the baseline, the
null-provider pipeline, the bench database, the measured rows and their figures, and the
seeded-history timings of the sweeper's and `status`'s queries."""

from __future__ import annotations
