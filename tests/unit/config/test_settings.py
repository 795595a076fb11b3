"""`config.settings`: the embedded default, one `ConfigError` per unusable variable (naming it,
never echoing a password), URL normalisation, and a `repr` that keeps secrets out of logs."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from config import DEFAULT_PROVIDER_URL, ConfigError, Settings, get_settings, load_settings

#: A password that appears nowhere in oncelery's own messages.
SECRET = "Qz7sEcReT9"

#: Every variable `Settings` reads.
VARIABLES = (
    "DATABASE_URL",
    "BROKER_URL",
    "PROVIDER_URL",
    "WEBHOOK_SECRET",
    "API_TOKEN",
    "FLOWER_BASIC_AUTH",
    "ONCELERY_DATA_DIR",
    "ONCELERY_PROVIDER_TIMEOUT",
    "ONCELERY_STEP_LEASE",
    "ONCELERY_STEP_TIME_LIMIT",
    "ONCELERY_RETRY_MAX_ATTEMPTS",
    "ONCELERY_RETRY_BACKOFF_BASE",
    "ONCELERY_RETRY_BACKOFF_MAX",
    "ONCELERY_PIPELINES",
    "ONCELERY_TASK_EVENTS",
    "ONCELERY_BATCH_SIZE",
    "ONCELERY_INTAKE_CONNECT_TIMEOUT",
    "ONCELERY_INTAKE_STATEMENT_TIMEOUT",
    "ONCELERY_INTAKE_KEEPALIVE",
    "ONCELERY_INTAKE_DATABASE_THREADS",
    "ONCELERY_SESSION_COOKIE_SECURE",
)


def _config_error(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> ConfigError:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    return caught.value


def _load_error(environment: dict[str, str]) -> ConfigError | None:
    """The error loading the settings with `environment` raises, if any (Hypothesis examples
    cannot use the function-scoped `monkeypatch`)."""
    with mock.patch.dict(os.environ, environment):
        try:
            load_settings()
        except ConfigError as error:
            return error
    return None


# --- the embedded default -------------------------------------------------------------------


def test_no_environment_means_the_embedded_setup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)

    settings = load_settings()

    data_dir = tmp_path.resolve() / ".oncelery"
    assert settings.data_dir == Path(".oncelery")
    assert settings.embedded_database is True
    assert settings.database_url == f"sqlite:///{data_dir / 'ledger.sqlite3'}"
    assert settings.broker_url == "filesystem://"
    assert settings.broker_kind == "filesystem"
    assert settings.broker_dir == data_dir / "broker"
    assert settings.provider_url == DEFAULT_PROVIDER_URL == "http://127.0.0.1:8765"
    assert (settings.webhook_secret, settings.api_token, settings.flower_basic_auth) == (None,) * 3
    assert (settings.pipelines, settings.task_events) == ((), True)
    tuning = (settings.provider_timeout, settings.step_lease, settings.step_time_limit)
    assert tuning == (5.0, 15.0, 30.0)
    retry = (settings.retry_max_attempts, settings.retry_backoff_base, settings.retry_backoff_max)
    assert retry == (8, 0.5, 30.0)


def test_data_dir_holds_the_ledger_file_and_the_broker_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ONCELERY_DATA_DIR", str(tmp_path / "data"))

    settings = load_settings()

    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite3'}"
    assert settings.broker_dir == tmp_path / "data" / "broker"
    assert settings.broker_url == "filesystem://"


def test_blank_urls_mean_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "   ")
    monkeypatch.setenv("BROKER_URL", "")

    settings = load_settings()

    assert settings.embedded_database is True
    assert settings.database_url.startswith("sqlite:///")
    assert settings.broker_url == "filesystem://"


def test_get_settings_reads_once_until_the_cache_is_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ONCELERY_RETRY_MAX_ATTEMPTS", "3")
    first = get_settings()
    monkeypatch.setenv("ONCELERY_RETRY_MAX_ATTEMPTS", "4")

    assert get_settings() is first
    assert first.retry_max_attempts == 3
    get_settings.cache_clear()
    assert get_settings().retry_max_attempts == 4


# --- accepted values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_url", "expected"),
    [
        ("postgresql://app:pw@db:5432/orders", "postgresql+psycopg://app:pw@db:5432/orders"),
        ("postgres://app:pw@db:5432/orders", "postgresql+psycopg://app:pw@db:5432/orders"),
        ("postgresql://app:p%40ss@db/orders", "postgresql+psycopg://app:p%40ss@db/orders"),
        ("postgresql+psycopg://app:pw@db/orders", "postgresql+psycopg://app:pw@db/orders"),
        ("  sqlite:////var/lib/oncelery/ledger.db ", "sqlite:////var/lib/oncelery/ledger.db"),
    ],
)
def test_database_url_is_normalised_to_psycopg_3(
    monkeypatch: pytest.MonkeyPatch, given_url: str, expected: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", given_url)

    settings = load_settings()

    assert settings.database_url == expected
    assert settings.embedded_database is False


@pytest.mark.parametrize(
    ("broker_url", "kind"),
    [
        ("amqp://guest:guest@rabbit:5672//", "amqp"),
        ("pyamqp://guest:guest@rabbit//", "amqp"),
        ("redis://cache:6379/0", "redis"),
        ("rediss://cache:6380/0", "redis"),
        (" filesystem:// ", "filesystem"),
    ],
)
def test_broker_url_and_its_family(
    monkeypatch: pytest.MonkeyPatch, broker_url: str, kind: str
) -> None:
    monkeypatch.setenv("BROKER_URL", broker_url)

    settings = load_settings()

    assert settings.broker_url == broker_url.strip()
    assert settings.broker_kind == kind


def test_provider_url_loses_its_trailing_slash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDER_URL", " https://provider.example:8443/ ")

    assert load_settings().provider_url == "https://provider.example:8443"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tests.toy_pipeline", ("tests.toy_pipeline",)),
        ("tests.toy_pipeline, shop.refunds,,  ", ("tests.toy_pipeline", "shop.refunds")),
        ("", ()),
        (" , ", ()),
    ],
)
def test_pipelines_split_on_commas(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, ...]
) -> None:
    monkeypatch.setenv("ONCELERY_PIPELINES", value)

    assert load_settings().pipelines == expected


def test_tuning_variables_are_read_with_the_oncelery_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ONCELERY_PROVIDER_TIMEOUT", "2.5")
    monkeypatch.setenv("ONCELERY_RETRY_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("ONCELERY_TASK_EVENTS", "false")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", f"admin:{SECRET}")
    assert load_settings().ship_reminder_after == 3 * 86_400
    monkeypatch.setenv("ONCELERY_SHIP_REMINDER_AFTER", "90")

    settings = load_settings()

    assert settings.ship_reminder_after == 90.0
    assert settings.provider_timeout == 2.5
    assert settings.retry_max_attempts == 3
    assert settings.task_events is False
    assert settings.flower_basic_auth is not None
    assert settings.flower_basic_auth.get_secret_value() == f"admin:{SECRET}"


# --- unusable values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("DATABASE_URL", f"mysql://app:{SECRET}@db/orders", "scheme 'mysql' is not supported"),
        ("DATABASE_URL", f"postgresql+psycopg2://app:{SECRET}@db/orders", "is not supported"),
        ("DATABASE_URL", f"app:{SECRET}@db/orders", "is not a URL"),
        ("DATABASE_URL", "garbage", "is not a URL"),
        ("DATABASE_URL", f"postgresql://app:{SECRET}@db:fivefour/orders", "is not a URL"),
        ("BROKER_URL", f"http://guest:{SECRET}@rabbit:5672//", "scheme 'http'"),
        ("BROKER_URL", f"sqs://key:{SECRET}@", "scheme 'sqs'"),
        ("PROVIDER_URL", f"ftp://user:{SECRET}@provider/", "expected an http:// or https:// URL"),
        ("PROVIDER_URL", "127.0.0.1:8765", "expected an http:// or https:// URL"),
        ("PROVIDER_URL", "http://", "expected an http:// or https:// URL"),
        ("ONCELERY_PROVIDER_TIMEOUT", "abc", "valid number"),
        ("ONCELERY_PROVIDER_TIMEOUT", "-1", "greater than 0"),
        ("ONCELERY_PROVIDER_TIMEOUT", "0", "greater than 0"),
        ("FLOWER_BASIC_AUTH", f"admin{SECRET}", "expected user:password"),
        ("ONCELERY_RETRY_MAX_ATTEMPTS", "0", "greater than or equal to 1"),
        ("ONCELERY_RETRY_MAX_ATTEMPTS", "2.5", "valid integer"),
        ("ONCELERY_STEP_LEASE", "-5", "greater than or equal to 1"),
        ("ONCELERY_TASK_EVENTS", "maybe", "valid boolean"),
        ("ONCELERY_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("ONCELERY_BATCH_SIZE", "many", "valid integer"),
        ("ONCELERY_SHIP_REMINDER_AFTER", "3 days", "valid number"),
        ("ONCELERY_SHIP_REMINDER_AFTER", "0", "greater than 0"),
    ],
)
def test_unusable_value_names_its_variable_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    error = _config_error(monkeypatch, variable, value)

    assert error.variable == variable
    assert str(error) == f"{variable}: {error.problem}"
    assert problem in error.problem
    assert SECRET not in str(error)
    assert "\n" not in str(error)


def test_only_the_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://app:pw@db/orders")
    monkeypatch.setenv("BROKER_URL", "amqp://guest:guest@rabbit//")

    error = _config_error(monkeypatch, "ONCELERY_RETRY_BACKOFF_MAX", "soon")

    assert error.variable == "ONCELERY_RETRY_BACKOFF_MAX"


def test_broker_url_without_a_scheme_does_not_echo_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = _config_error(monkeypatch, "BROKER_URL", f"guest:{SECRET}@rabbit:5672//")

    assert error.variable == "BROKER_URL"
    assert SECRET not in str(error)


def test_database_url_with_an_unescaped_at_sign_does_not_echo_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = _config_error(monkeypatch, "DATABASE_URL", f"postgresql://app:p@ss:{SECRET}@db/orders")

    assert error.variable == "DATABASE_URL"
    assert SECRET not in str(error)


#: Characters a password may hold, '@' aside (an unescaped '@' is the known bug above).
_PASSWORD_CHARACTERS = "abcXYZ0123456789:/?#%._-~!$&'()*+,;="


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    variable=st.sampled_from(["DATABASE_URL", "PROVIDER_URL", "BROKER_URL"]),
    scheme=st.sampled_from(
        [
            "postgresql",
            "postgres",
            "postgresql+psycopg",
            "sqlite",
            "mysql",
            "amqp",
            "redis",
            "http",
            "https",
            "ftp",
            "",
            "x y",
        ]
    ),
    separator=st.sampled_from(["://", ":/", ":", ""]),
    around=st.tuples(
        st.text(alphabet=_PASSWORD_CHARACTERS, max_size=4),
        st.text(alphabet=_PASSWORD_CHARACTERS, max_size=4),
    ),
    host=st.sampled_from(["db", "db:5432", "db:port", "[::1]:5432", ""]),
    path=st.sampled_from(["/orders", "", "//", "/?sslmode=require"]),
)
def test_no_error_message_contains_the_password(
    variable: str,
    scheme: str,
    separator: str,
    around: tuple[str, str],
    host: str,
    path: str,
) -> None:
    password = f"{around[0]}{SECRET}{around[1]}"
    value = f"{scheme}{separator}app:{password}@{host}{path}"
    error = _load_error({variable: value})

    if error is not None:
        assert error.variable == variable
        assert SECRET not in str(error)
        assert "\n" not in str(error)


_ENV_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    max_size=40,
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(variable=st.sampled_from(VARIABLES), value=_ENV_TEXT)
def test_any_value_either_loads_or_raises_config_error_naming_its_variable(
    variable: str, value: str
) -> None:
    error = _load_error({variable: value})

    if error is not None:
        assert error.variable == variable
        assert str(error).startswith(f"{variable}: ")


# --- secrets stay out of repr ---------------------------------------------------------------


def test_repr_shows_no_password_or_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{SECRET}1@db/orders")
    monkeypatch.setenv("BROKER_URL", f"amqp://guest:{SECRET}2@rabbit//")
    monkeypatch.setenv("WEBHOOK_SECRET", f"{SECRET}3-webhook-secret")
    monkeypatch.setenv("API_TOKEN", f"{SECRET}4-api-token-value")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", f"admin:{SECRET}5")

    settings = load_settings()

    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    # The values are there for the code that needs them.
    assert settings.database_url == f"postgresql+psycopg://app:{SECRET}1@db/orders"
    assert settings.broker_url == f"amqp://guest:{SECRET}2@rabbit//"
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == f"{SECRET}3-webhook-secret"


def test_repr_hides_the_password_of_the_provider_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDER_URL", f"https://shop:{SECRET}@provider.example")

    settings = load_settings()

    assert SECRET not in repr(settings)


def test_settings_are_frozen() -> None:
    settings = Settings.model_validate({"ONCELERY_DATA_DIR": "/srv/oncelery"})

    assert settings.data_dir == Path("/srv/oncelery")
    with pytest.raises(ValueError, match="frozen"):
        settings.data_dir = Path("/elsewhere")


def test_a_time_limit_may_outlast_the_lease_which_is_renewed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ONCELERY_STEP_LEASE", "10")
    monkeypatch.setenv("ONCELERY_STEP_POLICIES", '{"order-placed.act": {"time_limit": 120}}')

    assert load_settings().step_lease == 10


def test_a_lease_shorter_than_a_second_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCELERY_STEP_LEASE", "0.2")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert raised.value.variable == "ONCELERY_STEP_LEASE"


def test_the_sweeper_waits_out_the_longest_countdown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCELERY_STEP_POLICIES", '{"order-placed.act": {"backoff_max": 600}}')
    monkeypatch.setenv("ONCELERY_RETRY_TIMER_AFTER", "600")
    assert load_settings().stalled_after == 600 + 30
    # A delay past the timer threshold is a timer, which the sweeper leaves alone.
    monkeypatch.setenv("ONCELERY_RETRY_TIMER_AFTER", "45")
    assert load_settings().stalled_after == 45 + 30


def test_the_sweeper_does_not_wait_out_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    # A claimed step is left alone while its lease runs and sent again once it expired: the
    # threshold covers only what no lease does (an unclaimed read-only step, a retry's wait).
    monkeypatch.setenv("ONCELERY_STEP_LEASE", "600")
    monkeypatch.setenv("ONCELERY_STEP_TIME_LIMIT", "10")
    monkeypatch.setenv("ONCELERY_RETRY_BACKOFF_MAX", "5")
    assert load_settings().stalled_after == 10 + 30
    monkeypatch.setenv("ONCELERY_STEP_POLICIES", '{"order-placed.act": {"time_limit": 45}}')
    assert load_settings().stalled_after == 45 + 30
