"""job start and dispatch times, and indexes for status and metrics

Revision ID: 0003_outbox_and_stats
Revises: 0002_dead_letters
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_outbox_and_stats"
down_revision: str | None = "0002_dead_letters"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    # Jobs from before the outbox were sent when they were created: the relay must not resend them.
    op.execute("UPDATE jobs SET dispatched_at = created_at")
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"], unique=False)
    op.create_index(
        "ix_jobs_undispatched",
        "jobs",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("dispatched_at IS NULL"),
        sqlite_where=sa.text("dispatched_at IS NULL"),
    )
    op.create_index("ix_step_events_kind_at", "step_events", ["kind", "at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_step_events_kind_at", table_name="step_events")
    op.drop_index(
        "ix_jobs_undispatched",
        table_name="jobs",
        postgresql_where=sa.text("dispatched_at IS NULL"),
        sqlite_where=sa.text("dispatched_at IS NULL"),
    )
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    op.drop_column("jobs", "dispatched_at")
    op.drop_column("jobs", "started_at")
