"""The map bench's baseline: stock Celery's `chord(group)` of N no-op tasks and a join, with
a Redis result backend (a chord needs one), configured like the bare chain's app. Its worker
gets the broker from `celery -b URL` and the backend from `CELERY_RESULT_BACKEND`."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Final

from celery import Celery, chord

from jobs.tools.bench import bare

#: The baseline's own queue, so it never meets oncelery's messages.
CHORD_QUEUE: Final = "oncelery.bench.chord"
#: The task names.
TASK_ITEM: Final = "oncelery.bench.chord.item"
TASK_JOIN: Final = "oncelery.bench.chord.join"
#: The file the join writes its time into.
JOINED: Final = "joined"


def chord_config() -> dict[str, object]:
    """The bare chain's settings, with results kept (a chord's header results are what its
    counter counts) and the backend from the environment."""
    return {
        **bare.bare_config(),
        "task_default_queue": CHORD_QUEUE,
        "task_ignore_result": False,
        "result_backend": os.environ.get("CELERY_RESULT_BACKEND"),
        "result_expires": 600,
    }


app = Celery("oncelery-bench-chord")
app.config_from_object(chord_config())


def stamp(folder: Path) -> None:
    """Append this moment (8 bytes, a double) to this process's file in `folder` (O_APPEND):
    counting the items done and finding the last one's time, at almost no cost."""
    fd = os.open(folder / str(os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, struct.pack("d", time.time()))
    finally:
        os.close(fd)


def stamps(folder: Path) -> list[float]:
    """Every moment stamped in `folder` (in the files named by a pid)."""
    found: list[float] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.isdigit():
                data = Path(entry.path).read_bytes()
                found.extend(value for (value,) in struct.iter_unpack("d", data))
    return found


def joined_at(folder: Path) -> float | None:
    """When the join ran (its wall-clock time), if it has."""
    try:
        return float((folder / JOINED).read_text().split()[0])
    except FileNotFoundError:
        return None


def write_joined(folder: Path, items: int, began: float) -> None:
    """The join's mark: when it began and how many items it saw, written whole (a rename)."""
    partial = folder / f".{JOINED}.{os.getpid()}"
    partial.write_text(f"{began:.6f} {items}")
    partial.rename(folder / JOINED)


@app.task(name=TASK_ITEM)
def item(folder: str, number: int) -> int:
    """Does nothing but stamp its end; returns its number (the chord gathers them)."""
    stamp(Path(folder))
    return number


@app.task(name=TASK_JOIN)
def join(results: list[int], folder: str) -> None:
    """Marks the chord joined, with how many results it got."""
    write_joined(Path(folder), len(results), time.time())


def client(broker_url: str, backend_url: str) -> Celery:
    """An app that only sends chords, to `broker_url`, its results in `backend_url`."""
    sender = Celery("oncelery-bench-chord-client", set_as_current=False)
    sender.config_from_object(
        {**chord_config(), "broker_url": broker_url, "result_backend": backend_url}
    )
    return sender


def send_chord(sender: Celery, folder: Path, items: int) -> None:
    """Publish one chord of `items` item tasks and its join."""
    header = [sender.signature(TASK_ITEM, args=(str(folder), n)) for n in range(items)]
    chord(header, sender.signature(TASK_JOIN, args=(str(folder),))).apply_async()
