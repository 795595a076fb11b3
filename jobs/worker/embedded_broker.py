"""The embedded broker: kombu's file-system transport, with each message (and each binding
table) written atomically."""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

from config import EMBEDDED_TRANSPORT


class Channel(filesystem.Channel):
    """A file-system channel whose messages appear whole or not at all."""

    # kombu's own `_put` creates the message file and then writes into it, so a consumer
    # polling the folder can pick up the empty file and crash on it (celery/kombu#1551; we saw
    # workers die with `JSONDecodeError`). Writing under a name no queue matches, then
    # renaming, closes that window: a rename within one folder is atomic on POSIX.
    # kombu-stubs omit the keyword options kombu's exchanges pass to `_put`.
    def _put(self, queue: str, message: Any, **_options: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # A leading dot: `_get` compares the text after the first dot with "<queue>.msg".
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as file:
                file.write(str_to_bytes(dumps(message)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"cannot add {final!r} to the queue folder") from exc

    def _queue_bind(
        self, exchange: str, routing_key: str | None, pattern: str | None, queue: str | None
    ) -> None:
        # The exchange's binding table has the same window as `_put`: kombu's `_queue_bind`
        # creates the table file and then writes it, so a producer publishing while a worker
        # starts read it empty, failed with `JSONDecodeError`, and left its job to the outbox
        # (seen once in CI). Bindings are written the same way here, under a lock file of
        # their own so two binders do not lose each other's entry.
        # The file kombu's `get_table` reads, name checked by kombu (kombu-stubs omit it).
        table_file = Path(self._exchange_file(exchange))  # type: ignore[attr-defined]
        self.control_folder.mkdir(exist_ok=True)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            with open(f"{table_file}.lock", "wb") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                try:
                    bindings = self._read_table(table_file)
                    if binding in bindings:
                        return
                    bindings.insert(0, binding)
                    partial = table_file.with_name(f".{table_file.name}.{uuid.uuid4()}.partial")
                    partial.write_bytes(str_to_bytes(dumps(bindings)))
                    os.replace(partial, table_file)
                finally:
                    fcntl.flock(guard, fcntl.LOCK_UN)
        except OSError as exc:
            raise ChannelError(f"cannot bind {queue!r} in {table_file}") from exc

    @staticmethod
    def _read_table(table_file: Path) -> list[Any]:
        try:
            text = bytes_to_str(table_file.read_bytes())
        except FileNotFoundError:
            return []
        return [filesystem.exchange_queue_t(*entry) for entry in loads(text)]


class Transport(filesystem.Transport):
    """kombu's file-system transport with atomic message files."""

    Channel = Channel


# kombu resolves a transport's name through its aliases: the config names this one, and every
# process that builds a Celery app imports `jobs.worker` (hence this module) first.
TRANSPORT_ALIASES[EMBEDDED_TRANSPORT] = f"{__name__}:Transport"
