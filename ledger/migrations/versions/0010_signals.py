"""signals: named messages kept as rows until a wait takes them (idempotent by signal id),
and the wait for one on its timer row (the signal and key it waits for)

Revision ID: 0010_signals
Revises: 0009_timers
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_signals"
down_revision: str | None = "0009_timers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_KEPT = sa.text("consumed_at IS NULL")
_UNSENT = sa.text("consumed_at IS NOT NULL AND dispatched_at IS NULL")
_WAITING = sa.text("state = 'pending' AND signal IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "signals",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("key", sa.String(300), nullable=False),
        sa.Column("signal_id", sa.String(200), nullable=False),
        sa.Column(
            "data",
            sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql"),
            nullable=True,
        ),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("step", sa.String(100), nullable=True),
        sa.Column("consumed_at", _TIME, nullable=True),
        sa.Column("dispatched_at", _TIME, nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_signals_job_id_jobs", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_signals"),
        sa.UniqueConstraint("name", "signal_id", name="uq_signals_name_signal_id"),
    )
    op.create_index(
        "ix_signals_kept",
        "signals",
        ["name", "key", "id"],
        postgresql_where=_KEPT,
        sqlite_where=_KEPT,
    )
    op.create_index("ix_signals_job_id", "signals", ["job_id"])
    op.create_index(
        "ix_signals_unsent",
        "signals",
        ["consumed_at"],
        postgresql_where=_UNSENT,
        sqlite_where=_UNSENT,
    )
    # Nullable columns with no default: neither database rewrites the table.
    op.add_column("timers", sa.Column("signal", sa.String(100), nullable=True))
    op.add_column("timers", sa.Column("signal_key", sa.String(300), nullable=True))
    op.create_index(
        "ix_timers_signal_wait",
        "timers",
        ["signal", "signal_key", "id"],
        postgresql_where=_WAITING,
        sqlite_where=_WAITING,
    )


def downgrade() -> None:
    op.drop_index("ix_timers_signal_wait", table_name="timers")
    with op.batch_alter_table("timers") as batch:
        batch.drop_column("signal_key")
        batch.drop_column("signal")
    op.drop_table("signals")
