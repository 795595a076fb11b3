"""The sandbox provider's own SQLite file: requests received, effects applied, idempotent answers.

Standard-library `sqlite3` only; this is the provider's bookkeeping, not the ledger.
"""

from __future__ import annotations

import enum
import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    started_at TEXT,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    service TEXT NOT NULL,
    idempotency_key TEXT,
    status INTEGER NOT NULL,
    fault TEXT
);
CREATE INDEX IF NOT EXISTS requests_service ON requests (service);
CREATE TABLE IF NOT EXISTS idempotency (
    service TEXT NOT NULL,
    key TEXT NOT NULL,
    request_fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    response TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (service, key)
) WITHOUT ROWID;
"""

_EFFECTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('charge', 'notification', 'places_query', 'dataset')),
    idempotency_key TEXT,
    order_id TEXT,
    amount INTEGER,
    currency TEXT,
    at TEXT NOT NULL,
    service TEXT NOT NULL,
    crawl_id TEXT,
    body TEXT,
    template TEXT
);
CREATE INDEX IF NOT EXISTS effects_order_id ON effects (order_id);
"""

_RESET = ("DELETE FROM requests", "DELETE FROM effects", "DELETE FROM idempotency")

#: `PRAGMA user_version` of a file with the schema above. Version 0 files (before the places
#: API) have an `effects` table that allows only charges and notifications; opening one
#: rebuilds that table, its rows kept. Version 1 files lack notifications' `template`:
#: opening one adds the column (NULL for the notifications already there).
SCHEMA_VERSION = 2
_COPY_VERSION_0_EFFECTS = (
    "INSERT INTO effects (id, kind, idempotency_key, order_id, amount, currency, at, service)"
    " SELECT id, kind, idempotency_key, order_id, amount, currency, at, service FROM effects_v0"
)


class EffectKind(enum.StrEnum):
    """What a service did in the world, counted by audits and system tests."""

    #: Money moved: `POST /payments/charges` answered 201.
    CHARGE = "charge"
    #: A customer was told something: `POST /notifications` answered 201.
    NOTIFICATION = "notification"
    #: A places search was billed: `POST /places/search` answered anything but a repeat.
    PLACES_QUERY = "places_query"
    #: A crawl's places were published: `POST /datasets` answered 201.
    DATASET = "dataset"


@dataclass(frozen=True)
class NewEffect:
    """An effect a service is about to apply, before the store stamps it.

    Charges and notifications name their order; places queries and datasets carry the request
    `body` they were billed or published for, and datasets their `crawl_id`.
    """

    kind: EffectKind
    order_id: str | None = None
    amount: int | None = None
    currency: str | None = None
    crawl_id: str | None = None
    body: dict[str, object] | None = None
    #: A notification's template (`order_confirmed`, `order_shipped`, …).
    template: str | None = None


@dataclass(frozen=True)
class EffectRow:
    """One applied effect, in the shape `GET /sandbox/effects` answers."""

    kind: EffectKind
    idempotency_key: str | None
    order_id: str | None
    amount: int | None
    currency: str | None
    at: str
    service: str
    crawl_id: str | None
    body: dict[str, object] | None
    template: str | None


@dataclass(frozen=True)
class RequestRow:
    """One request a service received, in the shape `GET /sandbox/requests` answers: `at`
    when it was answered (or, for a timeout, gave up on), `started_at` when it arrived."""

    at: str
    method: str
    path: str
    service: str
    idempotency_key: str | None
    status: int
    fault: str | None
    started_at: str | None = None


@dataclass(frozen=True)
class StoredResponse:
    """The final answer kept under an idempotency key, with the fingerprint of its request."""

    fingerprint: str
    status: int
    body: dict[str, object]


def utc_now() -> str:
    """Return the current time as ISO-8601 UTC with microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class SandboxStore:
    """The sandbox's SQLite file.

    Writes outside `transaction()` commit one by one; inside it they commit together. The store is
    used only from the event loop's thread, which runs one handler's synchronous section at a time,
    so it takes no lock.
    """

    def __init__(self, path: Path) -> None:
        """Open (and create if needed) the store at `path`.

        Args:
            path: The SQLite file; its parent directory is created if missing.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        # The connection may be opened on one thread and used on the event loop's (uvicorn's or a
        # test client's); it is never used from two threads at once, hence check_same_thread off.
        # isolation_level=None: autocommit, so transaction() alone decides where BEGIN goes.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL under WAL skips the fsync per commit; a power cut may lose the last commits,
        # which a test sandbox can afford, and the per-request cost stays small.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._upgrade()
        self._conn.executescript(_SCHEMA + _EFFECTS_SCHEMA)
        columns = {row["name"] for row in self._conn.execute("PRAGMA table_info(requests)")}
        if "started_at" not in columns:  # a file from before requests kept their arrival
            self._conn.execute("ALTER TABLE requests ADD COLUMN started_at TEXT")
        self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.path = path

    def _upgrade(self) -> None:
        """Rebuild a version 0 file's `effects` table with the current schema, rows kept; add
        a version 1 file's `template` column."""
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        old = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'effects'"
        ).fetchone()
        if version >= SCHEMA_VERSION or old is None:
            return
        if version == 1:
            self._conn.execute("ALTER TABLE effects ADD COLUMN template TEXT")
            logger.info("sandbox store upgraded", extra={"action": "sandbox.store_upgraded"})
            return
        # SQLite cannot alter a CHECK constraint: copy the rows into a table of the new shape.
        with self.transaction():
            self._conn.execute("ALTER TABLE effects RENAME TO effects_v0")
            self._conn.execute("DROP INDEX IF EXISTS effects_order_id")
            for statement in filter(str.strip, _EFFECTS_SCHEMA.split(";")):
                self._conn.execute(statement)
            self._conn.execute(_COPY_VERSION_0_EFFECTS)
            self._conn.execute("DROP TABLE effects_v0")
        logger.info("sandbox store upgraded", extra={"action": "sandbox.store_upgraded"})

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group the writes made inside into one commit, rolled back if the block raises."""
        self._conn.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def record_request(
        self,
        *,
        started_at: str | None = None,
        method: str,
        path: str,
        service: str,
        idempotency_key: str | None,
        status: int,
        fault: str | None,
    ) -> None:
        """Record one request a service received and the status it was answered.

        Args:
            method: The HTTP method.
            path: The URL path, without the query string.
            service: The service addressed.
            idempotency_key: The `Idempotency-Key` header, if any.
            status: The HTTP status answered (504 for timeouts and lost replies).
            fault: The injected fault (`error`, `timeout`, `lost_reply`), or `None`.
            started_at: When it arrived, if known.
        """
        self._conn.execute(
            "INSERT INTO requests"
            " (at, started_at, method, path, service, idempotency_key, status, fault)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (utc_now(), started_at, method, path, service, idempotency_key, status, fault),
        )

    def find_response(self, service: str, key: str) -> StoredResponse | None:
        """Return the answer kept under `key` for `service`, or `None` if there is none."""
        row = self._conn.execute(
            "SELECT request_fingerprint, status, response FROM idempotency"
            " WHERE service = ? AND key = ?",
            (service, key),
        ).fetchone()
        if row is None:
            return None
        body = json.loads(row["response"])
        if not isinstance(body, dict):
            raise TypeError(f"stored response for {service}/{key} is not a JSON object")
        return StoredResponse(
            fingerprint=row["request_fingerprint"], status=row["status"], body=body
        )

    def store_response(
        self, service: str, key: str, *, fingerprint: str, status: int, body: dict[str, object]
    ) -> None:
        """Keep the final answer to a request under its idempotency key.

        Args:
            service: The service the key is scoped to.
            key: The idempotency key.
            fingerprint: The sha256 of the request's canonical JSON body.
            status: The HTTP status answered.
            body: The JSON body answered.
        """
        self._conn.execute(
            "INSERT INTO idempotency (service, key, request_fingerprint, status, response, at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (service, key, fingerprint, status, json.dumps(body, separators=(",", ":")), utc_now()),
        )

    def apply_effect(self, effect: NewEffect, *, service: str, idempotency_key: str | None) -> None:
        """Apply (record) an effect in the world.

        Args:
            effect: What happened.
            service: The service that applied it.
            idempotency_key: The request's key, kept even when keys are not honoured.
        """
        body = None if effect.body is None else json.dumps(effect.body, separators=(",", ":"))
        self._conn.execute(
            "INSERT INTO effects (kind, idempotency_key, order_id, amount, currency, at, service,"
            " crawl_id, body, template) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                str(effect.kind),
                idempotency_key,
                effect.order_id,
                effect.amount,
                effect.currency,
                utc_now(),
                service,
                effect.crawl_id,
                body,
                effect.template,
            ),
        )

    def list_effects(
        self,
        *,
        kind: EffectKind | None = None,
        order_id: str | None = None,
        crawl_id: str | None = None,
    ) -> list[EffectRow]:
        """Return the effects applied, oldest first.

        Args:
            kind: Only effects of this kind.
            order_id: Only effects for this order.
            crawl_id: Only effects for this crawl.
        """
        rows = self._conn.execute(
            "SELECT kind, idempotency_key, order_id, amount, currency, at, service, crawl_id,"
            " body, template FROM effects WHERE (:kind IS NULL OR kind = :kind)"
            " AND (:order_id IS NULL OR order_id = :order_id)"
            " AND (:crawl_id IS NULL OR crawl_id = :crawl_id) ORDER BY id",
            {
                "kind": None if kind is None else str(kind),
                "order_id": order_id,
                "crawl_id": crawl_id,
            },
        ).fetchall()
        return [
            EffectRow(
                kind=EffectKind(row["kind"]),
                idempotency_key=row["idempotency_key"],
                order_id=row["order_id"],
                amount=row["amount"],
                currency=row["currency"],
                at=row["at"],
                service=row["service"],
                crawl_id=row["crawl_id"],
                body=None if row["body"] is None else json.loads(row["body"]),
                template=row["template"],
            )
            for row in rows
        ]

    def list_requests(
        self, *, service: str | None = None, limit: int | None = None
    ) -> list[RequestRow]:
        """Return the requests received, oldest first.

        Args:
            service: Only requests to this service.
            limit: Only the most recent `limit` of them (still oldest first).
        """
        # The inner query picks the newest rows; the outer one puts them back in arrival order.
        # LIMIT -1 is SQLite for "no limit".
        rows = self._conn.execute(
            "SELECT * FROM (SELECT id, at, started_at, method, path, service, idempotency_key,"
            " status, fault"
            " FROM requests WHERE (:service IS NULL OR service = :service)"
            " ORDER BY id DESC LIMIT :limit) ORDER BY id",
            {"service": service, "limit": -1 if limit is None else limit},
        ).fetchall()
        return [
            RequestRow(
                at=row["at"],
                method=row["method"],
                path=row["path"],
                service=row["service"],
                idempotency_key=row["idempotency_key"],
                status=row["status"],
                fault=row["fault"],
                started_at=row["started_at"],
            )
            for row in rows
        ]

    def reset(self) -> None:
        """Forget every request, effect and idempotent answer."""
        with self.transaction():
            for statement in _RESET:
                self._conn.execute(statement)
        logger.info("sandbox store reset", extra={"action": "sandbox.reset"})
