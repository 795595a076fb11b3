"""`oncelery` (`jobs.cli.commands`) on bad input, run as a real process: exit 2, one line on stderr,
nothing on stdout, never a traceback, and nothing created."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from ledger import create_engine, upgrade
from tests.factories import order_event

REPO_ROOT = Path(__file__).resolve().parents[4]


@dataclass(frozen=True)
class Case:
    """One `oncelery` run. `{file}` in `args` stands for a file holding `file_text`."""

    args: tuple[str, ...]
    file_text: str | None = None
    stdin: str = ""
    env: tuple[tuple[str, str], ...] = ()
    #: Create the SQLite ledger in the data folder first, to check nothing was written to it.
    migrated: bool = False


@dataclass(frozen=True)
class Ran:
    """What one `oncelery` process did, and where."""

    code: int
    stdout: str
    stderr: str
    data_dir: Path
    file: Path

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


_GOOD = json.dumps(order_event())
_TWICE = order_event()
_CHANGED = json.dumps({**_TWICE, "currency": "USD"})
_BAD_QUANTITY = json.dumps(order_event(items=[{"sku": "SKU-1", "quantity": "2"}]))

_TOYS = (("ONCELERY_PIPELINES", "tests.toy_pipeline"),)

#: Every run, by name; `Runs` starts each one once.
CASES = {
    "bad-line-3": Case(
        ("enqueue", "{file}"),
        file_text=f"{_GOOD}\n{json.dumps(order_event())}\n{_BAD_QUANTITY}\n",
        migrated=True,
    ),
    "conflict-line-3": Case(
        ("enqueue", "{file}"),
        file_text=f"{json.dumps(_TWICE)}\n{_GOOD}\n{_CHANGED}\n",
        migrated=True,
    ),
    "bad-currency": Case(
        ("enqueue", "{file}"), file_text=json.dumps(order_event(currency="eur")) + "\n"
    ),
    "missing-file": Case(("enqueue", "{file}")),
    "empty-stdin": Case(("enqueue", "-"), stdin="\n"),
    "not-a-job-id": Case(("history", "not-a-uuid")),
    "mysql-url": Case(
        ("history", str(uuid.uuid4())), env=(("DATABASE_URL", "mysql://u:secret@h/db"),)
    ),
    "unknown-option": Case(("--no-such-option",)),
    "unknown-command-option": Case(("history", "--no-such-option", "x")),
    "missing-argument": Case(("history",)),
    "unknown-command": Case(("no-such-command",)),
    "demo-zero-orders": Case(("demo", "--orders", "0")),
    "chaos-tasks-db-restart": Case(("chaos", "--tasks", "--db-restart")),
    "chaos-tasks-embedded": Case(("chaos", "--tasks", "--orders", "1")),
    "deep-json": Case(("enqueue", "{file}"), file_text="[" * 100_000),
    "demo-unknown-pipeline": Case(("demo", "--pipeline", "nope")),
    "demo-crawl-declined": Case(("demo", "--pipeline", "places-crawl", "--declined-rate", "0.1")),
    "demo-reminder-elsewhere": Case(("demo", "--reminder-after", "5")),
    "crawl-bad-radius": Case(
        ("enqueue", "--pipeline", "places-crawl", "{file}"),
        file_text='{"event_id": "c1", "crawl_id": "c1", "lat": 48.5, "lng": 2.1, '
        '"radius_m": 1000, "categories": ["museum"]}\n'
        '{"event_id": "c2", "crawl_id": "c2", "lat": 48.5, "lng": 2.1, '
        '"radius_m": -5, "categories": ["museum"]}\n',
        migrated=True,
    ),
    "unknown-pipeline": Case(("enqueue", "--pipeline", "nope", "-"), stdin=_GOOD),
    "typed-bad-field": Case(
        ("enqueue", "--pipeline", "toy-typed", "{file}"),
        file_text='{"event_id": "w1", "word": "hi"}\n'
        '{"event_id": "w2", "word": "x", "colour": 1}\n',
        env=_TOYS,
        migrated=True,
    ),
    "signal-bad-data": Case(("signal", "shipped", "--key", "o-1", "--id", "s-1", "--data", "{{")),
    "signal-bad-name": Case(("signal", "ship ped", "--key", "o-1", "--id", "s-1")),
    "typed-conflict": Case(
        ("enqueue", "--pipeline", "toy-typed", "-"),
        stdin='{"event_id": "w1", "word": "hi"}\n{"event_id": "w1", "word": "ho"}\n',
        env=_TOYS,
        migrated=True,
    ),
}


def _environment(data_dir: Path, extra: tuple[tuple[str, str], ...]) -> dict[str, str]:
    # Every command here fails before it reaches a database or a broker; the environment has
    # no `DATABASE_URL` or `BROKER_URL`, and the data folder is the test's own.
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ONCELERY_") and name not in ("DATABASE_URL", "BROKER_URL")
    }
    environment.update(
        ONCELERY_DATA_DIR=str(data_dir),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    environment.update(extra)
    return environment


def prepare(case: Case, folder: Path) -> None:
    """The case's folder, input file and (if asked) migrated ledger; not thread-safe (Alembic
    keeps its migration context in a global)."""
    folder.mkdir(parents=True)
    if case.file_text is not None:
        (folder / "input.jsonl").write_text(case.file_text)
    if case.migrated:
        engine = create_engine(f"sqlite:///{folder / 'data' / 'ledger.sqlite3'}")
        upgrade(engine)
        engine.dispose()


def oncelery(case: Case, folder: Path) -> Ran:
    """Run `python -m jobs ARGS` in `folder` (see `prepare`), its data folder `folder/data`."""
    data_dir, file = folder / "data", folder / "input.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "jobs", *(arg.format(file=file) for arg in case.args)],
        cwd=folder,
        env=_environment(data_dir, case.env),
        input=case.stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Ran(done.returncode, done.stdout, done.stderr, data_dir, file)


class Runs:
    """`CASES`, each run on first use and kept: a test process runs only the cases of the
    tests it was given (under pytest-xdist the module's tests are shared out)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.done: dict[str, Ran] = {}

    def __getitem__(self, name: str) -> Ran:
        if name not in self.done:
            prepare(CASES[name], self.base / name)
            self.done[name] = oncelery(CASES[name], self.base / name)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("cli"))


def assert_bad_input(ran: Ran, *fragments: str) -> str:
    """Exit 2, nothing on stdout, one `error: …` line naming every fragment; returns it."""
    assert "Traceback" not in ran.stderr, ran.stderr
    assert ran.code == 2, ran.stderr
    assert ran.stdout == ""
    [line] = ran.stderr_lines
    assert line.startswith("error: ")
    for fragment in fragments:
        assert fragment in line
    return line


def _jobs_in(ledger_file: Path) -> int:
    with sqlite3.connect(ledger_file) as conn:
        (count,) = conn.execute("SELECT count(*) FROM jobs").fetchone()
    return int(count)


def test_enqueue_refuses_the_whole_file_for_one_bad_line(runs: Runs) -> None:
    # Given a migrated ledger and a file whose third line has a quantity as a string,
    # when it is enqueued,
    ran = runs["bad-line-3"]

    # then the line and the field are named, and not even the two good lines are enqueued.
    line = assert_bad_input(ran)
    assert line == "error: line 3: items[0].quantity: Input should be a valid integer"
    assert _jobs_in(ran.data_dir / "ledger.sqlite3") == 0
    assert not (ran.data_dir / "broker").exists()


def test_enqueue_of_a_bad_file_creates_nothing(runs: Runs) -> None:
    ran = runs["bad-currency"]

    assert_bad_input(ran, "currency")
    assert not ran.data_dir.exists()


def test_enqueue_refuses_an_event_id_given_twice_with_two_contents(
    runs: Runs,
) -> None:
    ran = runs["conflict-line-3"]
    line = assert_bad_input(ran, "line 3", "event_id", str(_TWICE["event_id"]), "nothing")
    assert "other content" in line
    assert _jobs_in(ran.data_dir / "ledger.sqlite3") == 0


def test_enqueue_of_a_missing_file(runs: Runs) -> None:
    ran = runs["missing-file"]

    line = assert_bad_input(ran)
    assert line == f"error: FILE: no such file: {ran.file}"


def test_enqueue_of_empty_stdin(runs: Runs) -> None:
    line = assert_bad_input(runs["empty-stdin"])

    assert line == "error: no event given (empty input)"


def test_history_of_something_that_is_not_a_job_id(runs: Runs) -> None:
    ran = runs["not-a-job-id"]

    line = assert_bad_input(ran)
    assert line == "error: JOB_ID: not a job id: 'not-a-uuid'"
    assert not ran.data_dir.exists()


def test_a_bad_database_url_is_named_without_its_password(runs: Runs) -> None:
    ran = runs["mysql-url"]

    assert_bad_input(ran, "DATABASE_URL", "mysql")
    assert "secret" not in ran.stderr


@pytest.mark.parametrize(
    "name", ["unknown-option", "unknown-command-option", "missing-argument", "unknown-command"]
)
def test_usage_errors_are_one_line(runs: Runs, name: str) -> None:
    assert_bad_input(runs[name])


def test_demo_of_zero_orders_is_refused(runs: Runs) -> None:
    assert_bad_input(runs["demo-zero-orders"], "--orders")


def test_demo_names_a_pipeline_it_cannot_run_and_a_crawl_option_that_makes_no_sense(
    runs: Runs,
) -> None:
    assert_bad_input(runs["demo-unknown-pipeline"], "--pipeline", "'nope'", "places-crawl")
    assert_bad_input(runs["demo-crawl-declined"], "--declined-rate")
    assert_bad_input(runs["demo-reminder-elsewhere"], "--reminder-after", "order-fulfilment")


def test_enqueue_of_a_bad_crawl_names_the_line_and_field_and_enqueues_nothing(
    runs: Runs,
) -> None:
    ran = runs["crawl-bad-radius"]

    line = assert_bad_input(ran)
    assert line == "error: line 2: radius_m: Input should be greater than 0"
    assert _jobs_in(ran.data_dir / "ledger.sqlite3") == 0


def test_chaos_of_tasks_refuses_what_it_cannot_do(runs: Runs) -> None:
    assert_bad_input(runs["chaos-tasks-db-restart"], "--db-restart")
    assert_bad_input(runs["chaos-tasks-embedded"], "DATABASE_URL", "BROKER_URL")


def test_enqueue_of_deeply_nested_json_is_bad_input(runs: Runs) -> None:
    assert_bad_input(runs["deep-json"])


def test_enqueue_names_a_pipeline_that_does_not_exist(runs: Runs) -> None:
    line = assert_bad_input(runs["unknown-pipeline"], "--pipeline", "'nope'", "order-placed")

    assert "ONCELERY_PIPELINES" in line


def test_enqueue_validates_any_pipeline_by_its_input_model(runs: Runs) -> None:
    ran = runs["typed-bad-field"]

    line = assert_bad_input(ran)
    assert line == "error: line 2: colour: unknown field"
    assert _jobs_in(ran.data_dir / "ledger.sqlite3") == 0


def test_enqueue_refuses_a_conflict_in_any_pipeline(runs: Runs) -> None:
    ran = runs["typed-conflict"]

    assert_bad_input(ran, "line 2", "event_id", "'w1'", "other content", "nothing")
    assert _jobs_in(ran.data_dir / "ledger.sqlite3") == 0


def test_signal_names_the_option_that_is_wrong_and_writes_nothing(runs: Runs) -> None:
    assert_bad_input(runs["signal-bad-data"], "--data", "not JSON")
    assert_bad_input(runs["signal-bad-name"], "NAME", "'ship ped'")
    for name in ("signal-bad-data", "signal-bad-name"):
        assert not runs[name].data_dir.exists()


def test_signal_prints_recorded_then_duplicate_and_refuses_the_id_with_other_data(
    tmp_path: Path,
) -> None:
    """On the embedded ledger (no job waits, so no broker is needed)."""
    case = Case(("signal", "shipped", "--key", "o-1", "--id", "s-1", "--data", '{{"n": 1}}'))
    prepare(Case(("db", "upgrade"), migrated=True), tmp_path / "run")

    first, again = oncelery(case, tmp_path / "run"), oncelery(case, tmp_path / "run")
    changed = Case(("signal", "shipped", "--key", "o-1", "--id", "s-1", "--data", '{{"n": 2}}'))
    conflict = oncelery(changed, tmp_path / "run")

    assert (first.code, first.stdout, first.stderr) == (0, "recorded\n", "")
    assert (again.code, again.stdout) == (0, "duplicate\n")
    line = assert_bad_input(conflict, "--id", "'s-1'", "nothing was written")
    assert "other data" in line
    with sqlite3.connect(conflict.data_dir / "ledger.sqlite3") as conn:
        assert conn.execute("SELECT signal_id, data FROM signals").fetchall() == [
            ("s-1", '{"n": 1}')
        ]
