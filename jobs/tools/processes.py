"""Starting and stopping the processes the demo (and the tests) run: Celery workers and the
sandbox provider, each in its own session so it is stopped by its process group id."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from config import MAIN_QUEUE, RETRY_QUEUE
from jobs.errors import ProcessFailed


@dataclass
class ManagedProcess:
    """A process we started, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes]

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Send a signal to the whole process group (a prefork worker's children included)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def terminate(self) -> None:
        """Ask the leader to stop (a Celery worker then finishes its tasks and stops its pool)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the leader, SIGKILL the group after `timeout` seconds; reaps the process."""
        self.terminate()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(timeout=timeout)
        # Orphaned children of a killed leader keep the group id: make sure none survive.
        self.signal(signal.SIGKILL)
        self._log.close()


def stop_all(started: list[ManagedProcess], timeout: float = 15.0) -> None:
    """Stop processes together: all are asked first, so their shutdowns overlap."""
    for process in started:
        process.terminate()
    for process in reversed(started):
        process.stop(timeout)


def start(name: str, argv: list[str], *, env: dict[str, str], log_dir: Path) -> ManagedProcess:
    """Start `argv` in a new session, its output appended to `<log_dir>/<name>.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    popen = subprocess.Popen(  # noqa: S603 - argv is built by us, never by a shell
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return ManagedProcess(name, popen, log_path, log)


def worker_argv(
    name: str,
    *,
    concurrency: int,
    pool: str = "prefork",
    loglevel: str = "INFO",
    app: str = "jobs",
    queues: str = f"{MAIN_QUEUE},{RETRY_QUEUE}",
) -> list[str]:
    """A `celery -A jobs worker` command line consuming the main and the retry queue (or a
    user's `app`, consuming its `queues`)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--hostname",
        f"{name}@%h",
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--queues",
        queues,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


def beat_argv(schedule: Path, *, loglevel: str = "INFO") -> list[str]:
    """A `celery -A jobs beat` command line keeping its schedule in `schedule`."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "jobs",
        "beat",
        "--schedule",
        str(schedule),
        "--loglevel",
        loglevel,
    ]


def sandbox_argv(port: int, *, db_path: Path, options: list[str]) -> list[str]:
    """An `oncelery sandbox` command line."""
    return [
        sys.executable,
        "-m",
        "jobs",
        "sandbox",
        "--port",
        str(port),
        "--db",
        str(db_path),
        *options,
    ]


def wait_until_answers(url: str, *, process: ManagedProcess, timeout: float = 30.0) -> None:
    """Wait until `url` answers 200, failing early if the process died.

    Raises:
        ProcessFailed: the process exited, or nothing answered in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise ProcessFailed(f"{process.name} exited early; see {process.log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise ProcessFailed(f"{process.name} did not answer at {url} within {timeout:.0f}s")


def process_table() -> dict[int, tuple[int, int]]:
    """Every process on the machine: pid → (parent pid, process group id), from /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # The command name may hold spaces and parentheses: split after the last ')'.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on `host:port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex((host, port)) != 0


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
