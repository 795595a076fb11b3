"""partial indexes for the sweeper's look for lost items: the items in the outbox by age, and
the keys started (by age of their lease), so that a sweep reads the items that look lost, not
every pending item of every map

Revision ID: 0008_sweep_indexes
Revises: 0007_map_steps
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_sweep_indexes"
down_revision: str | None = "0007_map_steps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OUTBOX = "state = 'pending' AND dispatched_at IS NULL"
_STARTED = "state = 'started'"


def upgrade() -> None:
    op.create_index(
        "ix_map_items_outbox",
        "map_items",
        ["updated_at"],
        postgresql_where=sa.text(_OUTBOX),
        sqlite_where=sa.text(_OUTBOX),
    )
    op.create_index(
        "ix_ledger_entries_started",
        "ledger_entries",
        ["locked_until"],
        postgresql_where=sa.text(_STARTED),
        sqlite_where=sa.text(_STARTED),
    )


def downgrade() -> None:
    op.drop_index("ix_ledger_entries_started", table_name="ledger_entries")
    op.drop_index("ix_map_items_outbox", table_name="map_items")
