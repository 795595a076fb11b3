"""The embedded broker's binding table, read while workers bind their queues."""

from __future__ import annotations

import threading
from pathlib import Path

from kombu import Connection

from config.celery import EMBEDDED_TRANSPORT
from jobs.worker.embedded_broker import Channel

BINDERS = 8
ROUNDS = 25


def _channel(connection: Connection) -> Channel:
    channel = connection.default_channel
    assert isinstance(channel, Channel)
    return channel


def _connection(folder: Path) -> Connection:
    return Connection(
        transport=EMBEDDED_TRANSPORT,
        transport_options={
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
        },
    )


def test_a_publisher_never_reads_a_half_written_binding_table(tmp_path: Path) -> None:
    # Given workers binding queues to fresh exchanges while a producer routes through them
    (tmp_path / "queue").mkdir()
    failures: list[BaseException] = []
    start = threading.Barrier(BINDERS + 1)

    def bind(number: int) -> None:
        with _connection(tmp_path) as connection:
            channel = _channel(connection)
            start.wait()
            for round_ in range(ROUNDS):
                channel._queue_bind(f"ex{round_}", f"key{number}", "", f"q{number}")

    def read() -> None:
        with _connection(tmp_path) as connection:
            channel = _channel(connection)
            start.wait()
            for _ in range(ROUNDS * 20):
                for round_ in range(ROUNDS):
                    try:
                        channel.get_table(f"ex{round_}")
                    except Exception as exc:  # noqa: BLE001 - collected for the assertion
                        failures.append(exc)

    threads = [threading.Thread(target=bind, args=(n,)) for n in range(BINDERS)]
    threads.append(threading.Thread(target=read))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then every read saw a whole table, and no binder lost another's entry
    assert failures == []
    with _connection(tmp_path) as connection:
        for round_ in range(ROUNDS):
            table = _channel(connection).get_table(f"ex{round_}")
            assert sorted(entry.queue for entry in table) == [f"q{n}" for n in range(BINDERS)]
