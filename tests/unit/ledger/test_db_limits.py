"""`ledger.db.create_engine` with `PostgresLimits`: the timeouts and keepalives ride on the URL,
so every connection made from it (the engine's pool and `ledger.direct`'s) carries them."""

from __future__ import annotations

import sqlalchemy as sa

from ledger import PostgresLimits, create_engine

LIMITS = PostgresLimits(connect_timeout=3.5, statement_timeout=2.25, keepalive_idle=30)


def connect_arguments(engine: sa.Engine) -> dict[str, object]:
    _args, kwargs = engine.dialect.create_connect_args(engine.url)
    return dict(kwargs)


def test_the_limits_become_libpq_parameters() -> None:
    engine = create_engine("postgresql+psycopg://app:pw@db/orders", limits=LIMITS)

    found = connect_arguments(engine)

    assert found["connect_timeout"] == "4"
    assert found["options"] == "-c statement_timeout=2250"
    assert (found["keepalives"], found["keepalives_idle"]) == ("1", "30")
    assert (found["keepalives_interval"], found["keepalives_count"]) == ("10", "3")
    assert (found["user"], found["password"], found["dbname"]) == ("app", "pw", "orders")


def test_options_already_on_the_url_are_kept() -> None:
    url = "postgresql+psycopg://app:pw@db/orders?options=-c%20search_path%3Dledger"

    found = connect_arguments(create_engine(url, limits=LIMITS))

    assert found["options"] == "-c search_path=ledger -c statement_timeout=2250"


def test_without_limits_the_url_is_left_alone() -> None:
    found = connect_arguments(create_engine("postgresql+psycopg://app:pw@db/orders"))

    assert "connect_timeout" not in found
    assert "options" not in found


def test_libpq_minimums_are_respected() -> None:
    tiny = PostgresLimits(connect_timeout=0.1, statement_timeout=0.0001, keepalive_idle=0.5)

    found = tiny.connect_parameters()

    assert found["connect_timeout"] == "2"
    assert found["options"] == "-c statement_timeout=1"
    assert (found["keepalives_idle"], found["keepalives_interval"]) == ("1", "1")
