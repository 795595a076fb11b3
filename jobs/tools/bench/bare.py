"""The bench's baseline: a bare Celery app with three no-op tasks chained a → b → c, configured
like oncelery's workers but with no ledger. Its worker gets the broker from `celery -b URL`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from celery import Celery, chain

#: The baseline's own queue, so it never meets oncelery's messages.
BARE_QUEUE: Final = "oncelery.bench.bare"
#: The task names, in chain order.
TASK_A: Final = "oncelery.bench.a"
TASK_B: Final = "oncelery.bench.b"
TASK_C: Final = "oncelery.bench.c"


def bare_config() -> dict[str, object]:
    """The Celery settings of the baseline (lower-case names), the broker aside: as oncelery's
    workers run (prefork, acks late, JSON, prefetch 4, no result backend, no events)."""
    return {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 4,
        "task_default_queue": BARE_QUEUE,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
    }


app = Celery("oncelery-bench-bare")
app.config_from_object(bare_config())


@app.task(name=TASK_A)
def step_a(folder: str) -> str:
    """Does nothing; hands the run's folder on."""
    return folder


@app.task(name=TASK_B)
def step_b(folder: str) -> str:
    """Does nothing; hands the run's folder on."""
    return folder


@app.task(name=TASK_C)
def step_c(folder: str) -> None:
    """Counts one finished chain: one byte appended to this process's file in `folder`
    (O_APPEND), so finished chains are counted by adding up file sizes, at almost no cost to
    the workers."""
    fd = os.open(Path(folder) / str(os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)


def client(broker_url: str) -> Celery:
    """An app that only sends chains, to `broker_url`."""
    sender = Celery("oncelery-bench-bare-client", set_as_current=False)
    sender.config_from_object({**bare_config(), "broker_url": broker_url})
    return sender


def send_chain(sender: Celery, folder: Path) -> None:
    """Publish one chain a → b → c (one message; each task publishes the next)."""
    chain(
        sender.signature(TASK_A, args=(str(folder),)),
        sender.signature(TASK_B),
        sender.signature(TASK_C),
    ).apply_async()


def finished_chains(folder: Path) -> int:
    """How many chains have finished so far: the bytes in the folder's files."""
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            total += entry.stat().st_size
    return total
