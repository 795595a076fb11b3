"""The embedded broker: kombu's file-system transport, with each message written atomically.

kombu's own `_put` creates the message file and then writes into it, so a consumer polling
the folder can pick up the empty file and crash on it (celery/kombu#1551; we saw workers die
with `JSONDecodeError`). Writing under a name no queue matches, then renaming, closes that
window: a rename within one folder is atomic on POSIX.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    """A file-system channel whose messages appear whole or not at all."""

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


class Transport(filesystem.Transport):
    """kombu's file-system transport with atomic message files."""

    Channel = Channel
