"""jobs a caller waits for: the `awaited` flag, and a trigger announcing their end

Revision ID: 0005_own_pipeline
Revises: 0004_malformed_messages
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_own_pipeline"
down_revision: str | None = "0004_malformed_messages"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Must match `ledger.notices.JOB_ENDED_CHANNEL`.
_CHANNEL = "oncelery_job_ended"


def upgrade() -> None:
    # A constant default: Postgres adds the column without rewriting the table.
    op.add_column(
        "jobs", sa.Column("awaited", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite: `jobs.wait` polls
    # Only jobs somebody waits for announce their end: a NOTIFY serialises the commits that
    # send one, and the workers' finishing statements must not all pay for it.
    op.execute(
        "CREATE OR REPLACE FUNCTION oncelery_announce_job_ended() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN "
        f"PERFORM pg_notify('{_CHANNEL}', NEW.id::text); "
        "RETURN NULL; END $$"
    )
    op.execute(
        "CREATE TRIGGER oncelery_job_ended AFTER UPDATE OF state ON jobs "
        "FOR EACH ROW WHEN (NEW.awaited AND OLD.state IS DISTINCT FROM NEW.state "
        "AND NEW.state IN ('succeeded', 'dead_lettered', 'cancelled')) "
        "EXECUTE FUNCTION oncelery_announce_job_ended()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS oncelery_job_ended ON jobs")
        op.execute("DROP FUNCTION IF EXISTS oncelery_announce_job_ended()")
    op.drop_column("jobs", "awaited")
