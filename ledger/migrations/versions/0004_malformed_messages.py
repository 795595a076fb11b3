"""step messages that could not be a delivery, counted per task and reason

Revision ID: 0004_malformed_messages
Revises: 0003_outbox_and_stats
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_malformed_messages"
down_revision: str | None = "0003_outbox_and_stats"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "malformed_messages",
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("task", "reason", name="pk_malformed_messages"),
    )


def downgrade() -> None:
    op.drop_table("malformed_messages")
