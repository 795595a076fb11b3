"""The shop (`jobs.tools.shop`, a user's own Celery app) as the tests use it: pointed at the
test's broker, its queue purged before and after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery
from kombu import Connection, Queue

from jobs.tools import shop
from jobs.tools.processes import free_port


@contextmanager
def shop_on(broker_url: str) -> Iterator[Celery]:
    """The shop's app, sending to `broker_url` while the block runs."""
    app = shop.app
    saved = app.conf.broker_url
    app.conf.update(broker_url=broker_url)
    _forget_connections(app)
    _purge(broker_url)
    try:
        yield app
    finally:
        _purge(broker_url)
        _forget_connections(app)
        app.conf.update(broker_url=saved)


def _forget_connections(app: Celery) -> None:
    # Celery keeps its connection and producer pools once made, whatever the broker URL says
    # later; `app.close()` would also drop the app from the process's apps, which the
    # publish hook of `exactly_once` looks through. (Not closed: kombu shares a producer pool
    # per broker across the process.)
    app._pool = None  # type: ignore[attr-defined]
    app.amqp._producer_pool = None  # type: ignore[attr-defined]


def _purge(broker_url: str) -> None:
    with Connection(broker_url) as conn:
        try:
            Queue(shop.QUEUE, channel=conn.channel()).purge()
        except conn.channel_errors:
            return  # RabbitMQ refuses to purge a queue nobody declared yet: nothing to purge


@contextmanager
def broker_down(app: Celery) -> Iterator[None]:
    """`app` sending to a broker nobody answers at (a port nothing listens on)."""
    saved = app.conf.broker_url, app.conf.broker_transport_options
    down = f"redis://127.0.0.1:{free_port()}/0"
    # One connection attempt, not kombu's retries over seconds.
    app.conf.update(broker_url=down, broker_transport_options={**saved[1], "max_retries": 0})
    _forget_connections(app)
    try:
        yield
    finally:
        _forget_connections(app)
        app.conf.update(broker_url=saved[0], broker_transport_options=saved[1])
