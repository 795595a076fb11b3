"""Servers of a test's own — a Postgres cluster, a Redis, a RabbitMQ node — for the tests that
stop or restart them mid-run: the shared ones stay up under every other test, so those tests
need not run alone. Each is the same server the shared one is, started from its own folder and
port, and stopped by its own pid."""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jobs.tools import processes
from tests.waiting import wait_for

#: Debian's RabbitMQ programs, not the wrappers on PATH (those switch to the rabbitmq user,
#: who cannot read a test's folder).
_RABBITMQ_BIN = "/usr/lib/rabbitmq/bin"
#: Seconds a server may take to start on a loaded machine (a RabbitMQ node takes about 7).
_START_TIMEOUT = 90.0


def _as_postgres(argv: list[str]) -> list[str]:
    # Postgres refuses to run as root; scripts/services.sh starts the shared one as postgres.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {done.stderr.strip() or done.stdout}")


def _kill(pid_file: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


@dataclass(frozen=True)
class OwnPostgres:
    """A cluster of its own in `folder`, user and database `oncelery`, trusted on 127.0.0.1.
    `folder` must be one the `postgres` user can reach (`OwnPostgres.new` makes one)."""

    folder: Path
    port: int

    @classmethod
    def new(cls) -> OwnPostgres:
        """In a new folder under the system's temporary folder (pytest's is root's alone)."""
        return cls(Path(tempfile.mkdtemp(prefix="oncelery-pg-")), processes.free_port())

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://oncelery@127.0.0.1:{self.port}/oncelery"

    @property
    def restart_command(self) -> str:
        log = ["-l", str(self.folder / "log")]  # not the caller's output, which it would hold open
        return shlex.join(_as_postgres([*self._pg_ctl(), *log, "-m", "fast", "restart"]))

    def _pg_ctl(self) -> list[str]:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        return [_binary("pg_ctl"), "-D", str(self.folder / "data"), "-w", "-o", options]

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(self.folder, *_postgres_ids())
        initdb = [_binary("initdb"), "-D", str(self.folder / "data"), "-U", "oncelery"]
        _run(_as_postgres([*initdb, "--auth=trust", "--no-sync"]))
        _run(_as_postgres([*self._pg_ctl(), "-l", str(self.folder / "log"), "start"]))
        create = [_binary("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "oncelery"]
        _run([*create, "oncelery"])

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            _run(_as_postgres([*self._pg_ctl(), "-m", "immediate", "stop"]))
        _kill(self.folder / "data" / "postmaster.pid")
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class OwnRedis:
    """A Redis of its own on `port`, without persistence (like the shared one)."""

    folder: Path
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def restart_command(self) -> str:
        # As `oncelery chaos` restarts the shared one: a restarted Redis has forgotten its queues.
        return f"redis-cli -p {self.port} shutdown nosave; sleep 0.5; {shlex.join(self._server())}"

    def _server(self) -> list[str]:
        return [
            *("redis-server", "--daemonize", "yes", "--bind", "127.0.0.1"),
            *("--port", str(self.port), "--save", "", "--appendonly", "no"),
            *("--dir", str(self.folder), "--pidfile", str(self.folder / "redis.pid")),
        ]

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _run(self._server())
        wait_for(lambda: not processes.port_is_free(self.port), "redis", timeout=_START_TIMEOUT)

    def stop(self) -> None:
        _kill(self.folder / "redis.pid")
        wait_for(lambda: processes.port_is_free(self.port), "redis to stop", timeout=30)


@dataclass(frozen=True)
class OwnRabbitMQ:
    """A RabbitMQ node of its own (`name@localhost`), with no plugins, `guest` on vhost `/`."""

    folder: Path
    port: int

    @property
    def node(self) -> str:
        return f"oncelery-test-{self.port}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *action: str) -> list[str]:
        """`rabbitmqctl` for this node (its own Erlang cookie)."""
        cookie = (self.folder / ".erlang.cookie").read_text().strip()
        ctl = _binary("rabbitmqctl", _RABBITMQ_BIN)
        return [ctl, "-q", "-n", self.node, "--erlang-cookie", cookie, *action]

    @property
    def restart_command(self) -> str:
        return f"{shlex.join(self.ctl('stop_app'))} && {shlex.join(self.ctl('start_app'))}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "enabled_plugins").write_text("[].\n")
        env = {
            **os.environ,
            "HOME": str(self.folder),  # where the node keeps its Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(processes.free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.folder / "rabbitmq.pid"),
        }
        _run([_binary("rabbitmq-server", _RABBITMQ_BIN), "-detached"], env=env)
        wait_for(lambda: not processes.port_is_free(self.port), "rabbitmq", timeout=_START_TIMEOUT)

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, FileNotFoundError):
            _run(self.ctl("stop"))
        _kill(self.folder / "rabbitmq.pid")


@contextlib.contextmanager
def running(server: OwnPostgres | OwnRedis | OwnRabbitMQ) -> Iterator[str]:
    """The server started, its URL; stopped afterwards, whatever happened."""
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


def _binary(name: str, *folders: str) -> str:
    """A server's program: in `folders`, then Debian's newest Postgres, then on PATH."""
    found = [f"{folder}/{name}" for folder in folders if os.path.exists(f"{folder}/{name}")]
    found += sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version, reverse=True)
    return found[0] if found else name


def _version(path: str) -> int:
    return int(Path(path).parts[4]) if Path(path).parts[4].isdigit() else 0


def _postgres_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid
