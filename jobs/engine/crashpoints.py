"""Crash points: named places in a run where a worker kills itself with SIGKILL (no cleanup, no
ack, like the OOM killer), armed only by tests through `ONCELERY_CRASH_POINTS`."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from config.settings import CrashPoint, CrashRule

logger = logging.getLogger(__name__)


class Crasher:
    """Kills this process at armed crash points. A rule armed `once` leaves a marker file
    first, so the next run of the same job passes.

    Args:
        rules: the armed points (none in production).
        marker_dir: where `once` rules remember which jobs they already killed.
    """

    def __init__(self, rules: Sequence[CrashRule], marker_dir: Path) -> None:
        self.rules = tuple(rules)
        self.marker_dir = marker_dir

    def __call__(self, point: CrashPoint, step: str, job_id: str) -> None:
        """Die here if a rule says so."""
        for rule in self.rules:
            if rule.point is point and rule.step == step and rule.job in job_id:
                if not rule.always and not self._first_time(rule, job_id):
                    continue
                logger.warning(
                    "crash point %s of %s armed: killing this process",
                    point,
                    step,
                    extra={"action": "crash_point", "job_id": job_id, "step": step},
                )
                os.kill(os.getpid(), signal.SIGKILL)

    def _first_time(self, rule: CrashRule, job_id: str) -> bool:
        name = hashlib.sha256(f"{rule}|{job_id}".encode()).hexdigest()[:32]
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        try:
            (self.marker_dir / name).touch(exist_ok=False)
        except FileExistsError:
            return False
        return True
