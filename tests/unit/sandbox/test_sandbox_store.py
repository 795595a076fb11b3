"""Unit tests of `jobs.sandbox.store.SandboxStore` on its own SQLite file."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from jobs.sandbox import SandboxStore
from jobs.sandbox.store import EffectKind, NewEffect


def _charge(order_id: str, amount: int = 100) -> NewEffect:
    return NewEffect(kind=EffectKind.CHARGE, order_id=order_id, amount=amount, currency="EUR")


def test_opens_in_wal_mode_and_creates_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "sandbox.sqlite3"

    SandboxStore(path).close()

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"requests", "effects", "idempotency"} <= tables


def test_effects_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.sqlite3"
    first = SandboxStore(path)
    first.apply_effect(_charge("o-1"), service="payments", idempotency_key="k-1")
    first.close()

    second = SandboxStore(path)
    try:
        [effect] = second.list_effects()
    finally:
        second.close()
    assert (effect.order_id, effect.idempotency_key, effect.amount) == ("o-1", "k-1", 100)


def test_effect_rows_carry_every_field(store: SandboxStore) -> None:
    store.apply_effect(_charge("o-1", 250), service="payments", idempotency_key=None)

    [effect] = store.list_effects()

    assert effect.kind is EffectKind.CHARGE
    assert (effect.order_id, effect.amount, effect.currency) == ("o-1", 250, "EUR")
    assert effect.idempotency_key is None
    assert effect.service == "payments"
    assert datetime.fromisoformat(effect.at).utcoffset() is not None


def test_effects_filter_by_kind_and_order(store: SandboxStore) -> None:
    store.apply_effect(_charge("o-1"), service="payments", idempotency_key="a")
    store.apply_effect(
        NewEffect(kind=EffectKind.NOTIFICATION, order_id="o-1"),
        service="notifications",
        idempotency_key="b",
    )
    store.apply_effect(_charge("o-2"), service="payments", idempotency_key="c")

    def keys(kind: EffectKind | None = None, order_id: str | None = None) -> list[str | None]:
        return [e.idempotency_key for e in store.list_effects(kind=kind, order_id=order_id)]

    assert keys() == ["a", "b", "c"]
    assert keys(kind=EffectKind.CHARGE) == ["a", "c"]
    assert keys(order_id="o-1") == ["a", "b"]
    assert keys(kind=EffectKind.NOTIFICATION, order_id="o-2") == []


def test_requests_filter_by_service_and_keep_the_latest_under_limit(store: SandboxStore) -> None:
    for index, service in enumerate(["payments", "customers", "payments", "payments"]):
        store.record_request(
            method="POST",
            path=f"/{service}",
            service=service,
            idempotency_key=f"k-{index}",
            status=201,
            fault=None,
        )

    def keys(service: str | None = None, limit: int | None = None) -> list[str | None]:
        return [r.idempotency_key for r in store.list_requests(service=service, limit=limit)]

    assert keys() == ["k-0", "k-1", "k-2", "k-3"]
    assert keys(service="payments") == ["k-0", "k-2", "k-3"]
    assert keys(service="payments", limit=2) == ["k-2", "k-3"]
    assert keys(limit=1) == ["k-3"]


def test_response_round_trip_and_per_service_scope(store: SandboxStore) -> None:
    store.store_response("payments", "k", fingerprint="f", status=201, body={"id": "ch_1"})

    stored = store.find_response("payments", "k")

    assert stored is not None
    assert (stored.fingerprint, stored.status, stored.body) == ("f", 201, {"id": "ch_1"})
    assert store.find_response("notifications", "k") is None
    assert store.find_response("payments", "other") is None


def test_a_key_is_kept_once(store: SandboxStore) -> None:
    store.store_response("payments", "k", fingerprint="f", status=201, body={})

    with pytest.raises(sqlite3.IntegrityError):
        store.store_response("payments", "k", fingerprint="f", status=201, body={})


def test_transaction_rolls_back_on_error(store: SandboxStore) -> None:
    def apply_then_fail() -> None:
        with store.transaction():
            store.apply_effect(_charge("o-1"), service="payments", idempotency_key="k")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        apply_then_fail()

    assert store.list_effects() == []


def test_reset_forgets_everything(store: SandboxStore) -> None:
    store.apply_effect(_charge("o-1"), service="payments", idempotency_key="k")
    store.store_response("payments", "k", fingerprint="f", status=201, body={})
    store.record_request(
        method="GET",
        path="/customers/c",
        service="customers",
        idempotency_key=None,
        status=200,
        fault=None,
    )

    store.reset()

    assert store.list_effects() == []
    assert store.list_requests() == []
    assert store.find_response("payments", "k") is None


#: The `effects` table as files made before the places API have it.
_VERSION_0_EFFECTS = """
CREATE TABLE effects (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('charge', 'notification')),
    idempotency_key TEXT,
    order_id TEXT NOT NULL,
    amount INTEGER,
    currency TEXT,
    at TEXT NOT NULL,
    service TEXT NOT NULL
);
CREATE INDEX effects_order_id ON effects (order_id);
INSERT INTO effects (kind, idempotency_key, order_id, amount, currency, at, service)
VALUES ('charge', 'k-1', 'o-1', 100, 'EUR', '2026-01-01T00:00:00+00:00', 'payments');
"""


def test_a_file_from_before_the_places_api_is_upgraded_with_its_effects_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sandbox.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(_VERSION_0_EFFECTS)

    store = SandboxStore(path)
    try:
        store.apply_effect(
            NewEffect(kind=EffectKind.PLACES_QUERY, body={"radius_m": 10.0}),
            service="places",
            idempotency_key="q-1",
        )
        effects = store.list_effects()
    finally:
        store.close()

    assert [(e.kind, e.order_id, e.body) for e in effects] == [
        (EffectKind.CHARGE, "o-1", None),
        (EffectKind.PLACES_QUERY, None, {"radius_m": 10.0}),
    ]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        indexes = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    assert ("effects_order_id",) in indexes


def test_a_file_from_before_templates_gains_the_column_with_its_effects_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sandbox.sqlite3"
    SandboxStore(path).close()
    with sqlite3.connect(path) as conn:
        # As version 1 had it: no template column.
        conn.execute("ALTER TABLE effects DROP COLUMN template")
        conn.execute(
            "INSERT INTO effects (kind, idempotency_key, order_id, at, service)"
            " VALUES ('notification', 'k-1', 'o-1', '2026-01-01T00:00:00+00:00', 'notifications')"
        )
        conn.execute("PRAGMA user_version = 1")

    store = SandboxStore(path)
    try:
        store.apply_effect(
            NewEffect(kind=EffectKind.NOTIFICATION, order_id="o-2", template="order_shipped"),
            service="notifications",
            idempotency_key="k-2",
        )
        effects = store.list_effects()
    finally:
        store.close()

    assert [(e.order_id, e.template) for e in effects] == [("o-1", None), ("o-2", "order_shipped")]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
