"""A pipeline of your own, end to end: the README's tutorial run as written (its files, then its
shell blocks in one shell), and a job enqueued in a caller's transaction that survives the
caller SIGKILLed right after its commit (the relay, not the caller, publishes it)."""

from __future__ import annotations

import contextlib
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

from config import child_environment
from ledger import JobState
from tests.conftest import REPO_ROOT
from tests.system.conftest import System, SystemFactory

pytestmark = pytest.mark.system

#: What the tutorial's commands run: this interpreter and this checkout, as a virtual
#: environment with it installed would (the tutorial's `PYTHONPATH=$PWD` names only its own
#: folder, which the editable install of another checkout would then fill).
_COMMANDS = {
    "python": '"{python}" "$@"',
    "oncelery": '"{python}" -m jobs "$@"',
    "celery": '"{python}" -m celery "$@"',
}


def _tutorial() -> list[tuple[str, str]]:
    """The fenced code blocks of the README's "Your own pipeline" section: (language, code)."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Your own pipeline\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)


def _install_commands(folder: Path) -> None:
    folder.mkdir()
    for name, command in _COMMANDS.items():
        script = folder / name
        script.write_text(
            "#!/bin/sh\n"
            f'PYTHONPATH="${{PYTHONPATH:-}}:{REPO_ROOT}" exec '
            + command.format(python=sys.executable)
            + "\n"
        )
        script.chmod(0o755)


def test_the_readme_tutorial_runs_as_written(
    postgres_url: str, amqp_url: str, tmp_path: Path
) -> None:
    # Given the tutorial's files in an empty folder, and its shell blocks as one script
    blocks = _tutorial()
    folder = tmp_path / "tutorial"
    folder.mkdir()
    for language, code in blocks:
        if language == "python":
            (folder / code.splitlines()[0].removeprefix("# ")).write_text(code)
    assert sorted(path.name for path in folder.iterdir()) == ["hello.py", "signup.py", "words.py"]
    script = "".join(code for language, code in blocks if language == "bash")
    # (the output each `python FILE` promises is the comment beside it)
    promised = re.findall(r"^python \S+\s+# (.+)$", script, flags=re.MULTILINE)
    assert len(promised) == 2, script
    _install_commands(tmp_path / "bin")
    env = child_environment(
        {
            "DATABASE_URL": postgres_url,
            "BROKER_URL": amqp_url,
            "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        }
    )

    # When it runs in one shell, as a reader would type it (the worker and beat it starts in
    # the background are stopped by its last block)
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        shell = subprocess.Popen(
            ["bash", "-eu", "-o", "pipefail", "-c", script],
            cwd=folder,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            exit_code = shell.wait(timeout=240)
        finally:
            # Whatever a failed run left behind, in the group the shell led.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
    printed = out.read_text()
    assert exit_code == 0, f"{printed}\n{err.read_text()[-5000:]}"

    # Then each program printed what its comment says,
    lines = printed.splitlines()
    for line in promised:
        assert line in lines, printed
    # `history --wait` showed the command line's job ended, with its output,
    assert re.search(r"job [0-9a-f-]{36} \(words, event greeting-2\): succeeded", printed), printed
    assert "WORLD!!!!!" in printed
    # and `status` counted the three jobs.
    assert re.search(r"jobs: succeeded\s*│\s*3\b", printed), printed


def _relay_listening(system: System) -> bool:
    """Whether beat's relay LISTENs already (then a commit is heard, not found by a round)."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query = 'LISTEN oncelery_outbox'"
    )
    with system.store.engine.connect() as conn:
        return bool(conn.execute(query).scalar_one())


#: The caller: commits a job with a row of its own, then dies by SIGKILL before it could
#: publish anything (where `transaction.on_commit(task.delay)` would lose the task).
_CALLER = """
import os, signal, sys
import sqlalchemy as sa
import jobs

engine = sa.create_engine(os.environ["DATABASE_URL"])
with engine.connect() as conn:
    with conn.begin():
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS signups (email text PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO signups VALUES (:email)"), {"email": sys.argv[1]})
        job_id = jobs.enqueue("toy-typed", {"word": sys.argv[1]}, event_id=sys.argv[1],
                              connection=conn)
    print(job_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _commit_and_die(system: System, event_id: str) -> str:
    """Run the caller; returns the id of the job it committed before it was killed."""
    caller = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CALLER), event_id],
        env=system.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert caller.returncode == -signal.SIGKILL, caller.stderr
    return caller.stdout.strip()


def _sent(system: System, job_id: str) -> bool:
    with system.store.engine.connect() as conn:
        query = sa.text("SELECT dispatched_at IS NOT NULL FROM jobs WHERE id = :id")
        return bool(conn.execute(query, {"id": job_id}).scalar_one())


def test_a_job_committed_by_a_caller_killed_right_after_still_runs(
    postgres_url: str, amqp_url: str, system_factory: SystemFactory
) -> None:
    # Given a worker and beat, its relay listening
    system = system_factory(
        database_url=postgres_url,
        broker_url=amqp_url,
        workers=1,
        extra_env={"ONCELERY_RELAY_AFTER": "1"},
    )
    beat = system.start_beat()
    system.wait_for(lambda: _relay_listening(system), "beat's relay to listen", timeout=30)
    run = uuid.uuid4().hex[:8]

    # When a caller commits a job with its own row and is SIGKILLed at once,
    heard = f"heard-{run}"
    job_id = _commit_and_die(system, heard)
    killed = time.perf_counter()

    # then the job runs to its end all the same: the relay heard the commit.
    assert system.wait_finished(heard, 1, timeout=30)[JobState.SUCCEEDED] == 1
    took = time.perf_counter() - killed
    assert system.history(job_id)["steps"][0]["output"] == {"letters": len(heard)}

    # Given beat stopped (no relay, no sweeper), when another caller commits and is killed,
    beat.stop()
    system.started.remove(beat)
    missed = f"missed-{run}"
    job_id = _commit_and_die(system, missed)
    # then nothing sent the job (its caller died before it could, and nobody else is up),
    assert system.store.get_job(uuid.UUID(job_id)).state is JobState.PENDING
    assert not _sent(system, job_id)
    # and once beat is back its relay finds the job in the outbox and it runs to its end.
    system.start_beat()
    assert system.wait_finished(missed, 1, timeout=30)[JobState.SUCCEEDED] == 1
    with system.store.engine.connect() as conn:
        emails = conn.execute(sa.text("SELECT email FROM signups ORDER BY email")).all()
        assert [email for (email,) in emails] == [heard, missed]
    print(f"caller killed to job succeeded, relay listening: {took * 1000:.0f} ms")
