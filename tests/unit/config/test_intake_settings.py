"""`config.settings` for the HTTP intake: its Postgres timeouts and threads, and when the
pages' session cookie is `Secure`."""

from __future__ import annotations

import pytest

from config import ConfigError, CookieSecurity, load_settings


def test_the_intake_gives_up_on_postgres_by_default() -> None:
    settings = load_settings()

    limits = (
        settings.intake_connect_timeout,
        settings.intake_statement_timeout,
        settings.intake_keepalive,
    )
    assert limits == (5.0, 10.0, 30.0)
    assert settings.intake_database_threads == 8
    assert settings.session_cookie_secure is CookieSecurity.AUTO


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", CookieSecurity.AUTO),
        (" TRUE ", CookieSecurity.TRUE),
        ("false", CookieSecurity.FALSE),
    ],
)
def test_cookie_security_is_read_in_any_case(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: CookieSecurity
) -> None:
    monkeypatch.setenv("ONCELERY_SESSION_COOKIE_SECURE", value)

    assert load_settings().session_cookie_secure is expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ONCELERY_SESSION_COOKIE_SECURE", "sometimes"),
        ("ONCELERY_INTAKE_CONNECT_TIMEOUT", "1"),
        ("ONCELERY_INTAKE_STATEMENT_TIMEOUT", "0"),
        ("ONCELERY_INTAKE_KEEPALIVE", "soon"),
        ("ONCELERY_INTAKE_DATABASE_THREADS", "0"),
    ],
)
def test_an_unusable_intake_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert caught.value.variable == variable
