"""On Redis, one client per channel for the commands that bring none, instead of a new one each,
on the channels oncelery owns: its publishing connection (`jobs.worker.publishing`) and its
workers' consumer (`LendRedisClient`); other processes keep kombu as it is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import bootsteps
from kombu.transport import redis


def lend_one_client(channel: object) -> None:
    """Make a kombu Redis channel lend one client to the commands that bring none (any other
    channel is left alone).

    kombu's Redis channel builds a new redis-py client for every such command
    (`Channel.conn_or_acquire`): each publish, and on a worker each message taken (its unacked
    copy is stored before the task starts) and each ack. Building one costs ~50 µs of CPU, as
    much as the command itself: redis-py fills its table of ~170 response callbacks anew. The
    connections come from the channel's pool either way; only the client object is kept here.
    Processes other than oncelery's, such as a bench's bare Celery workers, keep kombu as it
    is. A redis-py client is thread-safe (each command borrows a pooled connection, each
    pipeline is an object of its own), and its pool notices a fork by itself.
    """
    if not isinstance(channel, redis.Channel) or getattr(channel, "_oncelery_lends", False):
        return
    lent: list[Any] = []
    # kombu-stubs do not declare the channel's pool nor how it builds clients.
    create_client: Any = channel._create_client  # type: ignore[attr-defined]

    @contextmanager
    def conn_or_acquire(client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        # After a reconnect the channel has a new pool: the client follows it.
        if not lent or lent[0].connection_pool is not channel.pool:
            lent[:] = [create_client()]
        yield lent[0]

    channel.conn_or_acquire = conn_or_acquire  # type: ignore[method-assign]
    channel._oncelery_lends = True  # type: ignore[attr-defined]


class LendRedisClient(bootsteps.StartStopStep):
    """A worker consumer's step: its task channel lends one client (started again with the
    consumer after a reconnect, on the new channel)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        lend_one_client(parent.task_consumer.channel)
