"""`config.settings` on secrets: blank means unset (the endpoints stay closed), a short one is
refused naming its variable, Flower needs both a user and a password."""

from __future__ import annotations

import pytest

from config import MIN_SECRET_LENGTH, ConfigError, load_settings

LONG_ENOUGH = "k" * MIN_SECRET_LENGTH


@pytest.mark.parametrize("variable", ["WEBHOOK_SECRET", "API_TOKEN", "FLOWER_BASIC_AUTH"])
@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_a_blank_secret_is_unset(
    monkeypatch: pytest.MonkeyPatch, variable: str, blank: str
) -> None:
    monkeypatch.setenv(variable, blank)

    settings = load_settings()

    assert (settings.webhook_secret, settings.api_token, settings.flower_basic_auth) == (None,) * 3


@pytest.mark.parametrize("variable", ["WEBHOOK_SECRET", "API_TOKEN"])
def test_a_short_secret_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, LONG_ENOUGH[1:])

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert caught.value.variable == variable
    assert f"at least {MIN_SECRET_LENGTH} characters" in caught.value.problem
    assert LONG_ENOUGH[1:] not in str(caught.value)


@pytest.mark.parametrize("variable", ["WEBHOOK_SECRET", "API_TOKEN"])
def test_a_secret_of_the_minimum_length_is_taken(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, LONG_ENOUGH)

    settings = load_settings()

    found = settings.webhook_secret if variable == "WEBHOOK_SECRET" else settings.api_token
    assert found is not None
    assert found.get_secret_value() == LONG_ENOUGH


@pytest.mark.parametrize("value", ["admin", "admin:", ":password", ":"])
def test_flower_needs_a_user_and_a_password(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FLOWER_BASIC_AUTH", value)

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert caught.value.variable == "FLOWER_BASIC_AUTH"
    assert caught.value.problem == "expected user:password"
