"""The pages for people: server-rendered HTML behind a login with the API token.

(To be written: see the issue "A page for people".)
"""

from __future__ import annotations

from fastapi import APIRouter

#: Mounted by `jobs.intake.create_app`.
router = APIRouter()
