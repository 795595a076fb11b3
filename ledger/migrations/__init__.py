"""The ledger's Alembic migrations, and `upgrade` to apply them to an engine's database.

Must not import celery, kombu, jobs or config: the caller hands over the engine.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from ledger import db

_HERE = Path(__file__).resolve().parent


def _alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    # env.py runs on this engine instead of reading a URL from a file or the environment.
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision` (idempotent: at head, nothing happens)."""
    with db.wrap_errors():
        command.upgrade(_alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, None before the first migration."""
    with db.wrap_errors(), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The newest revision this code knows."""
    return ScriptDirectory(str(_HERE)).get_current_head()
