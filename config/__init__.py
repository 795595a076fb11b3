"""oncelery's configuration: one `Settings` from the environment, and Celery's config from it."""

from __future__ import annotations

from config.celery import (
    BATCH_SIZE_SETTING,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    DEAD_QUEUE_MAX_LENGTH,
    DEAD_QUEUE_TTL_MS,
    EMBEDDED_TRANSPORT,
    MAIN_QUEUE,
    RETRY_QUEUE,
    SWEEP_TASK,
    celery_config,
    dead_letter_queue,
    prepare_broker,
)
from config.settings import (
    DEFAULT_PROVIDER_URL,
    MIN_SECRET_LENGTH,
    SHIPPED_PIPELINES,
    ConfigError,
    CookieSecurity,
    Settings,
    child_environment,
    get_settings,
    load_settings,
)

__all__ = [
    "BATCH_SIZE_SETTING",
    "DEAD_EXCHANGE",
    "DEAD_QUEUE",
    "DEAD_QUEUE_MAX_LENGTH",
    "DEAD_QUEUE_TTL_MS",
    "DEFAULT_PROVIDER_URL",
    "EMBEDDED_TRANSPORT",
    "MAIN_QUEUE",
    "MIN_SECRET_LENGTH",
    "RETRY_QUEUE",
    "SHIPPED_PIPELINES",
    "SWEEP_TASK",
    "ConfigError",
    "CookieSecurity",
    "Settings",
    "celery_config",
    "child_environment",
    "dead_letter_queue",
    "get_settings",
    "load_settings",
    "prepare_broker",
]
