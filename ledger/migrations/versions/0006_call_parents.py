"""an index on the parent a job's context names (a decorated Celery task's call), so that the
calls' sweeper finds recorded calls whose continuation never appeared

Revision ID: 0006_call_parents
Revises: 0005_own_pipeline
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_call_parents"
down_revision: str | None = "0005_own_pipeline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The member as `ledger.queries.sweeps.context_member` writes it, per dialect: the same
#: expression, or the index does not serve the query.
_PARENT = {"postgresql": "(context ->> 'parent')", "sqlite": "json_extract(context, '$.parent')"}


def upgrade() -> None:
    parent = _PARENT[op.get_bind().dialect.name]
    op.create_index(
        "ix_jobs_parent",
        "jobs",
        [sa.text(parent)],
        postgresql_where=sa.text(f"{parent} IS NOT NULL"),
        sqlite_where=sa.text(f"{parent} IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_parent", table_name="jobs")
