"""The sandbox provider: a real HTTP server playing the downstream services, with faults.

Self-contained: imports nothing from the rest of `jobs`, nor Celery, nor `config`.
"""

from __future__ import annotations

from .app import create_app
from .faults import Faults
from .server import serve
from .services import SERVICES, unit_amount
from .store import SandboxStore

__all__ = ["SERVICES", "Faults", "SandboxStore", "create_app", "serve", "unit_amount"]
