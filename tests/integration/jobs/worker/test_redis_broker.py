"""A kombu Redis channel lending one client to the commands that bring none
(`jobs.worker.redis_broker`), on the real Redis."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kombu import Connection, Queue

from jobs.worker import app
from jobs.worker.redis_broker import LendRedisClient, lend_one_client


def test_a_lending_channel_gives_its_commands_one_client(redis_url: str) -> None:
    with Connection(redis_url, connect_timeout=5) as conn:
        channel: Any = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is not second  # kombu's own: a new client each time

        lend_one_client(channel)
        lend_one_client(channel)  # lending twice changes nothing
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.connection_pool is channel.pool
        with channel.conn_or_acquire(client=first) as given:
            assert given is first

        # After a reconnect the channel builds a new pool: the lent client follows it.
        channel._disconnect_pools()
        with channel.conn_or_acquire() as after:
            assert after is not first
            assert after.connection_pool is channel.pool


def test_messages_go_through_a_lending_channel_and_its_acks(redis_url: str) -> None:
    """Publishing, taking a message (kombu stores its unacked copy) and acking it all borrow
    the lent client: the queue ends empty, nothing left unacked."""
    queue = Queue("oncelery.lending-test")
    with Connection(redis_url, connect_timeout=5) as conn:
        channel: Any = conn.default_channel
        lend_one_client(channel)
        bound = queue(channel)
        bound.declare()
        try:
            producer = conn.Producer(channel)
            for n in range(3):
                producer.publish({"n": n}, routing_key=queue.name)
            taken: list[Any] = [bound.get(no_ack=False) for _ in range(3)]
            assert [message.payload["n"] for message in taken] == [0, 1, 2]
            tags = [message.delivery_tag for message in taken]
            # The unacked hash is the Redis database's, shared with other tests' workers.
            with channel.conn_or_acquire() as client:
                assert [client.hexists(channel.unacked_key, tag) for tag in tags] == [True] * 3
            for message in taken:
                message.ack()
            with channel.conn_or_acquire() as client:
                assert [client.hexists(channel.unacked_key, tag) for tag in tags] == [False] * 3
            assert bound.get() is None
        finally:
            bound.delete()


def test_a_worker_consumer_lends_on_its_task_channel(redis_url: str) -> None:
    assert LendRedisClient in app.steps["consumer"]
    with Connection(redis_url, connect_timeout=5) as conn:
        channel: Any = conn.default_channel
        consumer = SimpleNamespace(task_consumer=SimpleNamespace(channel=channel))
        LendRedisClient(consumer).start(consumer)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
