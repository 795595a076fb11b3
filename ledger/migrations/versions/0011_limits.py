"""limits: a row per limit key (a rate limit's arrival time, counters) and a row per leased
concurrency slot; limit waits as timers of kind 'limit', one per job, step and map item

Revision ID: 0011_limits
Revises: 0010_signals
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_limits"
down_revision: str | None = "0010_signals"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_KINDS = "kind IN ('sleep', 'signal_timeout', 'retry', 'limit')"
_OLD_KINDS = "kind IN ('sleep', 'signal_timeout', 'retry')"
#: A limit key's waits, pending and set lately, for `status` to count up to a cap.
_LIMIT_INDEXES = (
    (
        "ix_timers_limit_key_pending",
        ["limit_key"],
        sa.text("kind = 'limit' AND state = 'pending'"),
    ),
    ("ix_timers_limit_key_created_at", ["limit_key", "created_at"], sa.text("kind = 'limit'")),
)
#: The check's name as 0009 made it (its `ck_` name went through the naming convention).
_KIND_CHECK = "ck_timers_ck_timers_kind"


def upgrade() -> None:
    op.create_table(
        "limit_keys",
        sa.Column("key", sa.String(300), nullable=False),
        sa.Column("tat", sa.Float(), nullable=True),
        sa.Column("wake_at", sa.Float(), nullable=True),
        sa.Column("granted", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("throttled", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("window_at", sa.Float(), nullable=True),
        sa.Column("window_granted", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_limit_keys"),
    )
    op.create_table(
        "limit_slots",
        sa.Column("key", sa.String(300), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("holder", sa.Uuid(), nullable=False),
        sa.Column("entry_key", sa.String(300), nullable=False),
        sa.Column("locked_until", _TIME, nullable=False),
        sa.Column("taken_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("key", "slot", name="pk_limit_slots"),
    )
    op.create_index("ix_limit_slots_locked_until", "limit_slots", ["locked_until"])
    # SQLite cannot alter a constraint in place: batch mode copies the table (env.py), from
    # its definition as 0010 left it (reflecting it would reflect `jobs`, whose expression
    # index SQLAlchemy cannot). Postgres alters it in place, the check by its name on disk.
    with op.batch_alter_table("timers", copy_from=_timers_0010()) as timers:
        timers.add_column(sa.Column("item_id", sa.String(300), nullable=False, server_default=""))
        timers.add_column(sa.Column("limit_key", sa.String(300), nullable=True))
        timers.drop_constraint(op.f("uq_timers_job_id_step_kind"), type_="unique")
        timers.create_unique_constraint(
            op.f("uq_timers_job_id_step_kind_item_id"), ["job_id", "step", "kind", "item_id"]
        )
        timers.drop_constraint(op.f(_KIND_CHECK), type_="check")
        timers.create_check_constraint(op.f(_KIND_CHECK), _KINDS)
    for name, columns, where in _LIMIT_INDEXES:
        op.create_index(name, "timers", columns, postgresql_where=where, sqlite_where=where)


def downgrade() -> None:
    for name, _, _ in _LIMIT_INDEXES:
        op.drop_index(name, table_name="timers")
    op.execute("DELETE FROM timers WHERE kind = 'limit' OR item_id <> ''")
    with op.batch_alter_table("timers", copy_from=_timers_0011()) as timers:
        timers.drop_constraint(op.f(_KIND_CHECK), type_="check")
        timers.create_check_constraint(op.f(_KIND_CHECK), _OLD_KINDS)
        timers.drop_constraint(op.f("uq_timers_job_id_step_kind_item_id"), type_="unique")
        timers.create_unique_constraint(
            op.f("uq_timers_job_id_step_kind"), ["job_id", "step", "kind"]
        )
        timers.drop_column("limit_key")
        timers.drop_column("item_id")
    op.drop_index("ix_limit_slots_locked_until", table_name="limit_slots")
    op.drop_table("limit_slots")
    op.drop_table("limit_keys")


def _timers(kinds: str, unique: tuple[str, ...], *extra: sa.Column[object]) -> sa.Table:
    """The timers table as a migration left it, for batch mode to copy (SQLite)."""
    table = sa.Table(
        "timers",
        sa.MetaData(),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("due_at", _TIME, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("fired_at", _TIME, nullable=True),
        sa.Column("dispatched_at", _TIME, nullable=True),
        sa.Column("signal", sa.String(100), nullable=True),
        sa.Column("signal_key", sa.String(300), nullable=True),
        *extra,
        sa.CheckConstraint(kinds, name=_KIND_CHECK),
        sa.CheckConstraint(
            "state IN ('pending', 'fired', 'cancelled')", name="ck_timers_ck_timers_state"
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_timers_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_timers"),
        sa.UniqueConstraint(*unique, name=f"uq_timers_{'_'.join(unique)}"),
    )
    pending, unsent = (
        sa.text("state = 'pending'"),
        sa.text("state = 'fired' AND dispatched_at IS NULL"),
    )
    fired = sa.text("fired_at IS NOT NULL")
    for name, column, where in (
        ("ix_timers_due_at_pending", "due_at", pending),
        ("ix_timers_fired_at", "fired_at", fired),
        ("ix_timers_fired_at_unsent", "fired_at", unsent),
    ):
        sa.Index(name, table.c[column], postgresql_where=where, sqlite_where=where)
    waiting = sa.text("state = 'pending' AND signal IS NOT NULL")
    columns = (table.c.signal, table.c.signal_key, table.c.id)
    sa.Index("ix_timers_signal_wait", *columns, postgresql_where=waiting, sqlite_where=waiting)
    return table


def _timers_0010() -> sa.Table:
    return _timers(_OLD_KINDS, ("job_id", "step", "kind"))


def _timers_0011() -> sa.Table:
    return _timers(
        _KINDS,
        ("job_id", "step", "kind", "item_id"),
        sa.Column("item_id", sa.String(300), nullable=False, server_default=""),
        sa.Column("limit_key", sa.String(300), nullable=True),
    )
