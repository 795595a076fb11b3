"""map steps: the `maps` fan-in counters and the `map_items` items (each item's key is a
ledger entry like a step's)

Revision ID: 0007_map_steps
Revises: 0006_call_parents
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007_map_steps"
down_revision: str | None = "0006_call_parents"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TIME = sa.DateTime(timezone=True)
#: Item paths sort byte by byte on Postgres, whatever the database's collation.
_PATH = sa.String(1000).with_variant(sa.String(1000, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "maps",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("policy", sa.String(20), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("done", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("waiting", sa.BigInteger(), nullable=False),
        sa.Column("expanded", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.Column("joined_at", _TIME, nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_maps_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "step", name="pk_maps"),
    )
    op.create_table(
        "map_items",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("item_id", sa.String(300), nullable=False),
        sa.Column("path", _PATH, nullable=False),
        sa.Column("key", sa.String(300), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("item", _JSON, nullable=False),
        sa.Column("parent", sa.String(300), nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("children", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("dispatched_at", _TIME, nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.CheckConstraint(
            "state IN ('pending', 'done', 'failed', 'waiting')", name="ck_map_items_state"
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_map_items_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "step", "item_id", name="pk_map_items"),
    )
    op.create_index("ix_map_items_job_id_step_path", "map_items", ["job_id", "step", "path"])
    op.create_index("ix_map_items_key", "map_items", ["key"])
    op.create_index("ix_map_items_state_updated_at", "map_items", ["state", "updated_at"])


def downgrade() -> None:
    op.drop_table("map_items")
    op.drop_table("maps")
