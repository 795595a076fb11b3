"""timers: durable waits as rows (a sleep step's due time now; signal timeouts and long
retries later), fired once by the timer loop

Revision ID: 0009_timers
Revises: 0008_sweep_indexes
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_timers"
down_revision: str | None = "0008_sweep_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_PENDING = sa.text("state = 'pending'")
_UNSENT = sa.text("state = 'fired' AND dispatched_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "timers",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("due_at", _TIME, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("fired_at", _TIME, nullable=True),
        sa.Column("dispatched_at", _TIME, nullable=True),
        sa.CheckConstraint("kind IN ('sleep', 'signal_timeout', 'retry')", name="ck_timers_kind"),
        sa.CheckConstraint("state IN ('pending', 'fired', 'cancelled')", name="ck_timers_state"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_timers_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_timers"),
        sa.UniqueConstraint("job_id", "step", "kind", name="uq_timers_job_id_step_kind"),
    )
    op.create_index(
        "ix_timers_due_at_pending",
        "timers",
        ["due_at"],
        postgresql_where=_PENDING,
        sqlite_where=_PENDING,
    )
    op.create_index(
        "ix_timers_fired_at",
        "timers",
        ["fired_at"],
        postgresql_where=sa.text("fired_at IS NOT NULL"),
        sqlite_where=sa.text("fired_at IS NOT NULL"),
    )
    op.create_index(
        "ix_timers_fired_at_unsent",
        "timers",
        ["fired_at"],
        postgresql_where=_UNSENT,
        sqlite_where=_UNSENT,
    )


def downgrade() -> None:
    op.drop_table("timers")
