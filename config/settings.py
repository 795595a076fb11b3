"""The one `Settings` object, read from the environment: the only reader of `os.environ`.

Unset `DATABASE_URL` / `BROKER_URL` mean the embedded default: SQLite and kombu's file-based
transport under `ONCELERY_DATA_DIR`, so a newcomer needs no server at all.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

#: Where `oncelery sandbox` listens unless told otherwise, and where steps look for it.
DEFAULT_PROVIDER_URL: Final = "http://127.0.0.1:8765"

_DATABASE_SCHEMES: Final = ("postgresql+psycopg", "sqlite")
_BROKER_SCHEMES: Final = ("amqp", "pyamqp", "redis", "rediss", "filesystem")
#: What a URL scheme looks like; anything else is not echoed in errors.
_SCHEME: Final = re.compile(r"[a-z][a-z0-9+.-]{0,30}")
#: The fewest characters `WEBHOOK_SECRET` and `API_TOKEN` may have: anything shorter can be
#: guessed or was typed as a placeholder (`secrets.token_urlsafe(32)` makes a good one).
MIN_SECRET_LENGTH: Final = 16


class StepPolicy(BaseModel):
    """One step's overrides of the retry policy and time limit (all optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int | None = Field(default=None, ge=1, le=100)
    backoff_base: float | None = Field(default=None, gt=0, le=3_600)
    backoff_max: float | None = Field(default=None, gt=0, le=86_400)
    #: Soft time limit of one attempt, in seconds (the hard limit is 5 s later).
    time_limit: float | None = Field(default=None, gt=0, le=3_600)


class RateSetting(BaseModel):
    """A rate limit in `ONCELERY_LIMITS`: its key template, runs a second, burst."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1, max_length=200)
    per_second: float = Field(gt=0, le=1_000_000, allow_inf_nan=False)
    burst: int = Field(default=1, ge=1, le=1_000_000)


class ConcurrencySetting(BaseModel):
    """A concurrency limit in `ONCELERY_LIMITS`: its key template, runs at a time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1, max_length=200)
    limit: int = Field(ge=1, le=1_000_000)


class StepLimitsSetting(BaseModel):
    """One step's limits in `ONCELERY_LIMITS` (each replaces the step's own of its kind).
    Whether the step exists and its key's fields are the pipeline's is checked once the
    pipelines are loaded (`jobs.engine.runtime.load_pipelines`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: RateSetting | None = None
    concurrency: ConcurrencySetting | None = None


class CookieSecurity(enum.StrEnum):
    """When the pages' session cookie is marked `Secure`."""

    #: Secure unless the request's host is localhost or a loopback address (a browser on
    #: the same machine over plain http); behind a TLS proxy the public host name counts.
    AUTO = "auto"
    #: Always: the pages are served (or proxied) over https only.
    TRUE = "true"
    #: Never: plain http on a trusted network.
    FALSE = "false"


class CrashPoint(enum.StrEnum):
    """Where in the step runner (or the timer loop) a test may have a worker kill itself."""

    BEFORE_CLAIM = "before_claim"
    AFTER_CLAIM = "after_claim"
    AFTER_ACT = "after_act"
    AFTER_RECORD = "after_record"
    AFTER_PUBLISH = "after_publish"
    #: The timer loop committed a firing (the step is the sleep step) and has not published
    #: the next step yet.
    AFTER_FIRE = "after_fire"


@dataclass(frozen=True)
class CrashRule:
    """Kill the worker at `point` of `step`, for jobs whose id contains `job` (any job when
    empty): once per job (the next delivery passes), or every time (`always`)."""

    step: str
    point: CrashPoint
    always: bool = False
    job: str = ""

    @classmethod
    def parse(cls, text: str) -> CrashRule:
        """From `step:point[:once|always[:job id]]`."""
        parts = text.strip().split(":")
        if len(parts) < 2 or len(parts) > 4 or not parts[0]:
            raise ValueError(f"{text!r}: expected step:point[:once|always[:job id]]")
        points = ", ".join(str(p) for p in CrashPoint)
        if parts[1] not in CrashPoint.__members__.values():
            raise ValueError(f"{text!r}: unknown crash point {parts[1]!r} (one of {points})")
        mode = parts[2] if len(parts) > 2 else "once"
        if mode not in ("once", "always"):
            raise ValueError(f"{text!r}: expected once or always, got {mode!r}")
        return cls(
            parts[0], CrashPoint(parts[1]), mode == "always", parts[3] if len(parts) > 3 else ""
        )


class ConfigError(Exception):
    """Raised when an environment variable holds a value oncelery cannot use."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


#: The pipelines shipped with oncelery, by module: every process that runs or reads jobs
#: imports them, then the user's (`ONCELERY_PIPELINES`).
SHIPPED_PIPELINES: Final = ("jobs.orders", "jobs.places")


class Settings(BaseSettings):
    """Everything oncelery can be told, each field named after its environment variable."""

    model_config = SettingsConfigDict(
        env_prefix="ONCELERY_", extra="ignore", frozen=True, populate_by_name=True
    )

    database_url_raw: str | None = Field(
        default=None, validation_alias=_env("DATABASE_URL"), repr=False
    )
    broker_url_raw: str | None = Field(
        default=None, validation_alias=_env("BROKER_URL"), repr=False
    )
    data_dir: Path = Field(default=Path(".oncelery"), validation_alias=_env("ONCELERY_DATA_DIR"))
    provider_url: str = Field(
        default=DEFAULT_PROVIDER_URL, validation_alias=_env("PROVIDER_URL"), repr=False
    )
    webhook_secret: SecretStr | None = Field(default=None, validation_alias=_env("WEBHOOK_SECRET"))
    api_token: SecretStr | None = Field(default=None, validation_alias=_env("API_TOKEN"))
    flower_basic_auth: SecretStr | None = Field(
        default=None, validation_alias=_env("FLOWER_BASIC_AUTH")
    )

    #: Seconds a step may wait for one provider answer before it counts as a timeout.
    provider_timeout: float = Field(default=5.0, gt=0, le=300)
    #: Seconds a claimed step stays leased to its owner. A worker renews the leases of the
    #: steps it runs three times a lease (`jobs.engine.leases`), so a step keeps its key however
    #: long it acts, while a killed worker's keys come free within one lease.
    step_lease: float = Field(default=15.0, ge=1, le=86_400)
    #: Soft time limit of one step attempt; the hard limit is a few seconds later.
    step_time_limit: float = Field(default=30.0, gt=0, le=3_600)
    #: Attempts per step before the job is dead-lettered (counted by the ledger, crashes included).
    retry_max_attempts: int = Field(default=8, ge=1, le=100)
    #: First retry delay in seconds; each further attempt doubles it (full jitter applies).
    retry_backoff_base: float = Field(default=0.5, gt=0, le=3_600)
    #: The longest delay between two attempts, in seconds.
    retry_backoff_max: float = Field(default=30.0, gt=0, le=86_400)
    #: A retry whose delay is longer than this (or than its step's `backoff_max`: only a
    #: provider's `Retry-After` asks for more) waits as a timer row, not as a Celery
    #: countdown, which a worker holds unacknowledged until due (see
    #: `jobs.engine.records.waits_as_timer`). Well below Redis's visibility timeout and
    #: RabbitMQ's `consumer_timeout`.
    retry_timer_after: float = Field(default=30.0, ge=1, le=600)
    #: The longest wait a provider's `Retry-After` may ask for, in seconds: honoured in full
    #: up to this (a longer one waits this long).
    retry_after_max: float = Field(default=86_400.0, gt=0, le=30 * 86_400)
    #: Modules declaring extra pipelines, imported by workers and the CLI (comma-separated),
    #: after the shipped ones (`SHIPPED_PIPELINES`).
    pipelines: Annotated[tuple[str, ...], NoDecode] = ()
    #: Whether workers send task events (Flower needs them; they cost a little CPU per task).
    task_events: bool = True
    #: The fast path: a worker that finishes a step goes straight on to the next (recording one
    #: and claiming the other in one statement) instead of publishing it; one broker message
    #: per job instead of one per step. Off: each step is its own Celery task (Flower shows
    #: each), the chained mode.
    fast_path: bool = False
    #: The most queued messages of one step a prefork worker hands to one pool child at once
    #: (`jobs.worker.batching`); 1 hands each message alone.
    batch_size: int = Field(default=16, ge=1, le=1_000)
    #: Per-step overrides, JSON: {"<pipeline>.<step>": {"max_attempts": 3, "time_limit": 10}}.
    step_policies: Annotated[dict[str, StepPolicy], NoDecode] = Field(default_factory=dict)
    #: Limits every worker obeys, JSON: {"<pipeline>.<step>": {"rate": {"key":
    #: "provider:places", "per_second": 50}, "concurrency": {"key": "customer:{customer_id}",
    #: "limit": 1}}}.
    limits: Annotated[dict[str, StepLimitsSetting], NoDecode] = Field(default_factory=dict)
    #: Seconds between two sweeps run by beat.
    sweep_interval: float = Field(default=30.0, gt=0, le=86_400)
    #: Seconds an unfinished job may go without progress before the sweeper sends its step
    #: again; by default the longest step time limit or retry delay, plus 30 s (see
    #: `stalled_after`). A job whose step's owner died is sent again once its lease expires.
    sweep_stalled_after: float | None = Field(default=None, gt=0, le=30 * 86_400)
    #: Re-sends of a decorated task's call that no worker claims (its task registered
    #: nowhere, its key template changed) before it is dead-lettered, `never_claimed`.
    call_max_resends: int = Field(default=10, ge=1, le=1_000)
    #: Seconds after which a job whose first step never reached the broker is sent by the
    #: relay (the API process and every sweep run it).
    relay_after: float = Field(default=5.0, gt=0, le=86_400)
    #: `order-fulfilment`: seconds an order waits for its `shipped` signal before the
    #: customer is sent a reminder instead (read when the order reaches its wait).
    ship_reminder_after: float = Field(default=3 * 86_400.0, gt=0, le=365 * 86_400)
    #: Seconds a signal no wait has taken stays takeable (`ledger.signals`): a later wait of
    #: its name and key no longer takes it, and `oncelery prune` deletes it. A signal sent
    #: late, after its wait timed out, would otherwise end the next such wait, however late.
    signal_keep_for: float = Field(default=7 * 86_400.0, gt=0, le=365 * 86_400)
    #: The HTTP intake's Postgres connections: seconds to connect, seconds a statement may
    #: run, seconds of silence before TCP keepalive probes (a hung or vanished server then
    #: fails requests with 503 instead of holding them).
    intake_connect_timeout: float = Field(default=5.0, ge=2, le=300)
    intake_statement_timeout: float = Field(default=10.0, gt=0, le=3_600)
    intake_keepalive: float = Field(default=30.0, ge=1, le=3_600)
    #: Threads (and Postgres connections) the intake's webhook writes jobs from.
    intake_database_threads: int = Field(default=8, ge=1, le=256)
    #: Whether the pages' session cookie is `Secure` (sent over https only): `auto` (secure
    #: unless the page was asked for as localhost or a loopback address), `true` or `false`.
    session_cookie_secure: CookieSecurity = CookieSecurity.AUTO
    #: `oncelery chaos`: shell commands that restart the broker and the database mid-run
    #: (default: the local servers' own commands, see `jobs/tools/chaos.py`).
    chaos_broker_restart: str | None = None
    chaos_database_restart: str | None = None
    #: Tests only: crash points to arm, comma-separated `step:point[:once|always[:job id]]`.
    crash_points: Annotated[tuple[CrashRule, ...], NoDecode] = ()

    @field_validator("database_url_raw")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            url = make_url(value.strip())
        except (ArgumentError, ValueError):
            # Never echo the value: it may hold a password (a stray '@' splits it anywhere).
            raise ValueError(
                "is not a URL; expected postgresql+psycopg://… or sqlite:///…"
            ) from None
        drivername = url.drivername
        if drivername in ("postgresql", "postgres"):
            # A bare postgresql:// would make SQLAlchemy look for psycopg2, which we do not ship.
            return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        if drivername not in _DATABASE_SCHEMES:
            shown = f"scheme {drivername!r}" if _SCHEME.fullmatch(drivername) else "that scheme"
            raise ValueError(
                f"{shown} is not supported; expected postgresql+psycopg://… or sqlite:///…"
            )
        return url.render_as_string(hide_password=False)

    @field_validator("broker_url_raw")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        scheme, sep, _ = value.strip().partition("://")
        if not sep or scheme not in _BROKER_SCHEMES:
            # Name the scheme only when it looks like one: the text before "://" of a
            # malformed URL could be a password.
            shown = (
                f"scheme {scheme!r}" if sep and _SCHEME.fullmatch(scheme) else "no usable scheme"
            )
            raise ValueError(f"expected amqp://… or redis://…, got a URL with {shown}")
        return value.strip()

    @field_validator("provider_url")
    @classmethod
    def _check_provider_url(cls, value: str) -> str:
        scheme, sep, rest = value.strip().partition("://")
        if scheme not in ("http", "https") or not sep or not rest:
            raise ValueError("expected an http:// or https:// URL")
        return value.strip().rstrip("/")

    @field_validator("webhook_secret", "api_token", "flower_basic_auth", mode="before")
    @classmethod
    def _blank_secret_is_unset(cls, value: object) -> object:
        # docker-compose passes `${API_TOKEN:-}` as "": unset, so the endpoints it guards stay
        # closed; never a key that an empty bearer token or an empty HMAC key matches.
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("webhook_secret", "api_token")
    @classmethod
    def _check_secret_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"must be at least {MIN_SECRET_LENGTH} characters (or unset, which closes the "
                "endpoints it guards)"
            )
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _check_basic_auth(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        user, colon, password = value.get_secret_value().partition(":")
        if not colon or not user or not password:
            raise ValueError("expected user:password")
        return value

    @field_validator("session_cookie_secure", mode="before")
    @classmethod
    def _lower_cookie_security(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("step_policies", "limits", mode="before")
    @classmethod
    def _parse_step_policies(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
        return value

    @field_validator("crash_points", mode="before")
    @classmethod
    def _parse_crash_points(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(CrashRule.parse(rule) for rule in value.split(",") if rule.strip())
        return value

    @field_validator("pipelines", mode="before")
    @classmethod
    def _split_pipelines(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("data_dir")
    @classmethod
    def _check_data_dir(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError(f"{str(value)!r} exists and is not a folder")
        return value

    @property
    def stalled_after(self) -> float:
        """Seconds without progress after which the sweeper re-drives a job: by default the
        longest step time limit or retry delay, whichever is longer, plus 30 s.

        It used to start with the lease, to wait out a step still acting. The sweeper now
        leaves a job alone while its step's lease runs (its owner is alive), and sends it at
        once when the lease has expired (its owner is dead), so a claimed step needs no
        wait. What remains are the gaps no lease covers, and a job is in one at a time: a
        read-only step runs unclaimed (up to its time limit), a failed attempt waits for
        its retry's countdown (up to the longest backoff, at most `retry_timer_after`: a
        longer wait is a timer), and a message travels and waits in a worker's prefetch
        (the 30 s; queued messages add their drain time in the sweeper)."""
        if self.sweep_stalled_after is not None:
            return self.sweep_stalled_after
        policies = self.step_policies.values()
        # Delays longer than `retry_timer_after` are timers, which the sweeper leaves alone.
        longest_backoff = min(
            self.retry_timer_after,
            max([self.retry_backoff_max] + [p.backoff_max for p in policies if p.backoff_max]),
        )
        longest_limit = max(
            [self.step_time_limit] + [p.time_limit for p in policies if p.time_limit]
        )
        return max(longest_limit, longest_backoff) + 30.0

    @property
    def embedded_database(self) -> bool:
        """True when the ledger lives in the embedded SQLite file."""
        return self.database_url_raw is None

    @property
    def database_url(self) -> str:
        """The ledger's SQLAlchemy URL: `DATABASE_URL`, or a SQLite file in the data folder."""
        if self.database_url_raw is not None:
            return self.database_url_raw
        return f"sqlite:///{(self.data_dir / 'ledger.sqlite3').resolve()}"

    @property
    def broker_url(self) -> str:
        """The broker URL: `BROKER_URL`, or kombu's file-based transport."""
        return self.broker_url_raw or "filesystem://"

    @property
    def broker_kind(self) -> str:
        """`amqp`, `redis` or `filesystem`: the family of the configured broker."""
        scheme = self.broker_url.partition("://")[0]
        return {"pyamqp": "amqp", "rediss": "redis"}.get(scheme, scheme)

    @property
    def broker_dir(self) -> Path:
        """Where the embedded broker keeps its message files."""
        return (self.data_dir / "broker").resolve()


#: Which environment variable each field is read from, for error messages.
_VARIABLES: Final = {
    "database_url_raw": "DATABASE_URL",
    "broker_url_raw": "BROKER_URL",
    "data_dir": "ONCELERY_DATA_DIR",
    "provider_url": "PROVIDER_URL",
    "webhook_secret": "WEBHOOK_SECRET",
    "api_token": "API_TOKEN",
    "flower_basic_auth": "FLOWER_BASIC_AUTH",
}


def _variable_for(location: str) -> str:
    if location in _VARIABLES:
        return _VARIABLES[location]
    if location in _VARIABLES.values():
        return location
    return f"ONCELERY_{location.upper()}"


def load_settings() -> Settings:
    """Read the settings from the environment.

    Raises:
        ConfigError: naming the first variable whose value is unusable (never echoing it,
            since URLs carry passwords).
    """
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:
            variable, _, problem = message.partition(": ")
            raise ConfigError(variable, problem) from None
        location = str(first["loc"][0])
        inner = ".".join(str(part) for part in first["loc"][1:])
        raise ConfigError(
            _variable_for(location), f"{inner}: {message}" if inner else message
        ) from None
    except SettingsError as exc:
        field = str(exc).partition('field "')[2].partition('"')[0]
        raise ConfigError(_variable_for(field or "environment"), "cannot be parsed") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once (tests call `get_settings.cache_clear()`)."""
    return load_settings()


def child_environment(overrides: dict[str, str]) -> dict[str, str]:
    """This process's environment with `overrides`, for the processes oncelery starts (the
    demo's workers and sandbox): they read their settings from it like any other."""
    return {**os.environ, **overrides}
