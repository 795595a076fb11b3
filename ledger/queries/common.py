"""What the statement modules share: named parameters, JSON values, the active job states."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.expression import BindParameter, ColumnElement

from ledger.schema import JSONDocument
from ledger.types import ACTIVE_JOB_STATES, JSON

ACTIVE = [str(state) for state in ACTIVE_JOB_STATES]
#: The placeholder value of an id parameter in a statement built once (each run passes its own).
ANY_ID = UUID(int=0)


def param(name: str, value: Any, type_: Any = None) -> BindParameter[Any]:
    """A named parameter with a value. A statement built from named parameters keeps its
    shape across calls, so the step protocol builds its statements once and runs them with fresh
    values: building SQLAlchemy constructs costs more CPU than running them."""
    return sa.bindparam(f"p_{name}", value, type_=type_)


def json_value(value: JSON) -> ColumnElement[Any]:
    """A JSON document as a bound value (JSONB on Postgres)."""
    return sa.literal(value, JSONDocument)
