"""The order-placed pipeline's step functions: gather, act (charge), publish (notify)."""

from __future__ import annotations

from jobs.steps.act import charge
from jobs.steps.gather import gather
from jobs.steps.publish import notify

__all__ = ["charge", "gather", "notify"]
