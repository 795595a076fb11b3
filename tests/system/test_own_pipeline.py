"""A pipeline of your own, end to end with a real worker and beat: the README's tutorial run
exactly as written, and a job enqueued in a caller's transaction that survives the caller
SIGKILLed right after its commit (the relay, not the caller, publishes it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from ledger import JobState
from tests.conftest import REPO_ROOT
from tests.system.conftest import System, SystemFactory

pytestmark = pytest.mark.system


def _tutorial() -> list[tuple[str, str]]:
    """The fenced code blocks of the README's "Your own pipeline" section: (language, code)."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Your own pipeline\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)


def _relay_listening(system: System) -> bool:
    """Whether beat's relay LISTENs already (then a commit is heard, not found by a round)."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query = 'LISTEN oncelery_outbox'"
    )
    with system.store.engine.connect() as conn:
        return bool(conn.execute(query).scalar_one())


def _start(system_factory: SystemFactory, postgres_url: str, amqp_url: str, **env: str) -> System:
    system = system_factory(
        database_url=postgres_url, broker_url=amqp_url, workers=1, extra_env=env or None
    )
    system.start_beat()
    system.wait_for(lambda: _relay_listening(system), "beat's relay to listen", timeout=30)
    return system


def test_the_readme_tutorial_runs_as_written(
    postgres_url: str, amqp_url: str, system_factory: SystemFactory, tmp_path: Path
) -> None:
    # Given the tutorial's files in a folder of their own, loaded as it says
    blocks = _tutorial()
    files = {
        code.splitlines()[0].removeprefix("# "): code for lang, code in blocks if lang == "python"
    }
    assert set(files) == {"words.py", "hello.py", "signup.py"}
    folder = tmp_path / "tutorial"
    folder.mkdir()
    for name, code in files.items():
        (folder / name).write_text(code)
    [setup, cli] = [code for lang, code in blocks if lang == "bash"]
    assert "export ONCELERY_PIPELINES=words PYTHONPATH=$PWD" in setup
    assert "celery -A jobs worker" in setup
    assert "celery -A jobs beat" in setup
    # (its worker and beat are the system's own, started with the same environment)
    path = f"{folder}{os.pathsep}{REPO_ROOT}"
    system = _start(
        system_factory, postgres_url, amqp_url, ONCELERY_PIPELINES="words", PYTHONPATH=path
    )

    def run(argv: list[str]) -> str:
        done = subprocess.run(
            argv,
            cwd=folder,
            env=system.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    # When its Python runs, then it prints what its comments say
    assert run([sys.executable, "hello.py"]) == "succeeded {'shout': 'HELLO!!!!!'}\n"
    assert run([sys.executable, "signup.py"]) == "succeeded\n"
    # and its command lines show the job in `history`
    oncelery = f'oncelery() {{ "{sys.executable}" -m jobs "$@"; }}\n'
    shown = run(["bash", "-euo", "pipefail", "-c", oncelery + cli])
    assert re.search(r"job [0-9a-f-]{36} \(words, event greeting-2\): succeeded", shown), shown
    assert "WORLD!!!!!" in shown


#: The caller: commits a job in its own transaction, then dies by SIGKILL before it could
#: publish anything (where `transaction.on_commit(task.delay)` would lose the task).
_CALLER = """
import os, signal, sys
import sqlalchemy as sa
import jobs

engine = sa.create_engine(os.environ["DATABASE_URL"])
with engine.connect() as conn:
    with conn.begin():
        conn.execute(sa.text("CREATE TABLE signups (email text PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO signups VALUES ('ada@example.com')"))
        job_id = jobs.enqueue("toy-typed", {"word": "survivor"}, event_id=sys.argv[1],
                              connection=conn)
    print(job_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_job_committed_by_a_caller_killed_right_after_still_runs(
    postgres_url: str, amqp_url: str, system_factory: SystemFactory
) -> None:
    # Given a worker and beat (its relay listening)
    system = _start(system_factory, postgres_url, amqp_url)
    event_id = f"killed-{uuid.uuid4().hex[:8]}"

    # When a caller commits a job with its own rows and is SIGKILLed at once
    caller = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CALLER), event_id],
        env=system.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    killed = time.perf_counter()
    assert caller.returncode == -signal.SIGKILL, caller.stderr
    job_id = caller.stdout.strip()

    # Then the job runs to the end all the same, its row committed with the caller's
    counts = system.wait_finished(event_id, 1, timeout=30)
    took = time.perf_counter() - killed
    assert counts[JobState.SUCCEEDED] == 1, counts
    view = system.history(job_id)
    assert view["steps"][0]["output"] == {"letters": 8}
    with system.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM signups")).scalar_one() == 1
    print(f"caller killed to job succeeded: {took * 1000:.0f} ms")
