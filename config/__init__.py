"""oncelery's configuration: one `Settings` from the environment, and Celery's config from it."""

from __future__ import annotations

from config.celery import MAIN_QUEUE, RETRY_QUEUE, celery_config, prepare_broker
from config.settings import (
    DEFAULT_PROVIDER_URL,
    ConfigError,
    Settings,
    child_environment,
    get_settings,
    load_settings,
)

__all__ = [
    "DEFAULT_PROVIDER_URL",
    "MAIN_QUEUE",
    "RETRY_QUEUE",
    "ConfigError",
    "Settings",
    "celery_config",
    "child_environment",
    "get_settings",
    "load_settings",
    "prepare_broker",
]
