"""The order-placed pipeline's step functions: gather, act (charge), publish (notify)."""

from __future__ import annotations

from jobs.orders.steps.act import charge
from jobs.orders.steps.gather import gather
from jobs.orders.steps.publish import notify

__all__ = ["charge", "gather", "notify"]
