"""The `oncelery` command line. Exit codes: 0 success, 1 failure of the work (or drift found),
2 bad input or usage, always as one line on stderr, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from kombu.exceptions import OperationalError as KombuOperationalError
from rich.table import Table

from config import ConfigError, get_settings
from jobs.cli import listing
from jobs.cli import operators as operator_commands
from jobs.cli import runs as run_commands
from jobs.cli.support import (
    BadInput,
    JsonFlag,
    declared_pipeline,
    human_duration,
    job_store,
    parse_job_id,
    print_json,
    print_table,
    stderr,
    stdout,
)
from jobs.errors import InvalidEvent, JobError
from ledger import JSON, EventConflict, LedgerError, create_engine, upgrade, wait_for_end

cli = typer.Typer(
    name="oncelery",
    help="Business processes run exactly once on Celery.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
db_cli = typer.Typer(help="The ledger's database.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the ledger's tables (safe to run again)."""
    settings = get_settings()
    upgrade(create_engine(settings.database_url))
    stderr.print("ledger schema is up to date")


@cli.command()
def enqueue(
    source: Annotated[str, typer.Argument(help="A JSON event or JSON Lines file, or - for stdin.")],
    pipeline: Annotated[
        str, typer.Option("--pipeline", help="The pipeline whose jobs the events start.")
    ] = "order-placed",
) -> None:
    """Start one job per event (an object with `event_id` and the pipeline's input fields);
    prints one job id per line.

    Every event is validated before any is enqueued. The same event id again prints the same
    job id and enqueues nothing.
    """
    from jobs.engine.enqueue import start_jobs
    from jobs.events import read_events
    from jobs.worker import CeleryDispatch

    settings = get_settings()
    found = declared_pipeline(settings, pipeline)
    events = read_events(found, _read_source(source))
    try:
        enqueued = start_jobs(
            job_store(settings), CeleryDispatch(), found, [event.new_job(found) for event in events]
        )
    except EventConflict as exc:
        problem = f"event_id: {exc.event_id!r} came before with other content"
        raise InvalidEvent(
            f"{problem}; nothing was enqueued", line=events[exc.index].line
        ) from None
    for item in enqueued:
        stdout.print(item.job_id, highlight=False)
        if not item.sent:
            stderr.print(
                f"warning: job {item.job_id} is stored but not yet sent; the relay will send it"
            )


#: The command line's names of a signal's fields, for its errors.
_SIGNAL_OPTIONS = {"name": "NAME", "key": "--key", "signal_id": "--id", "data": "--data"}


@cli.command()
def signal(
    name: Annotated[str, typer.Argument(help="The signal's name (what a wait step waits for).")],
    key: Annotated[str, typer.Option("--key", help="Which waits it is for (an order id).")],
    signal_id: Annotated[
        str, typer.Option("--id", help="The signal's id: sent again, it changes nothing.")
    ],
    data: Annotated[
        str | None, typer.Option("--data", help="JSON the waiting step reads (any value).")
    ] = None,
) -> None:
    """Send a signal: the oldest job waiting for NAME with KEY moves on at once; if none
    waits, the signal is kept for the first wait to come. Prints `recorded`, or `duplicate`
    when the id was sent before (the same id with another key or data is exit 2)."""
    from jobs.engine.runtime import Runtime, load_pipelines
    from jobs.engine.signals import send_signal
    from jobs.signals import InvalidSignal, new_signal
    from jobs.worker import CeleryDispatch
    from ledger import SignalConflict

    value: JSON = None
    if data is not None:
        try:
            value = json.loads(data)
        except (json.JSONDecodeError, RecursionError) as exc:
            problem = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise BadInput(f"--data: not JSON ({problem})") from None
    try:
        found = new_signal(name, key, signal_id, value)
    except InvalidSignal as exc:
        field, _, problem = exc.problem.partition(": ")
        raise BadInput(f"{_SIGNAL_OPTIONS.get(field, field)}: {problem}") from None
    settings = get_settings()
    load_pipelines(settings)
    rt = Runtime.from_settings(settings)
    try:
        sent = send_signal(rt, CeleryDispatch(), found)
    except SignalConflict as exc:
        raise BadInput(f"--id: {exc}") from None
    finally:
        rt.close()
    stdout.print(str(sent.outcome), highlight=False)


def _read_source(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"FILE: no such file: {source}") from None
    except OSError as exc:
        raise BadInput(f"FILE: cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BadInput(f"FILE: {source} is not UTF-8 text") from None


@cli.command()
def history(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    wait: Annotated[
        float | None,
        typer.Option(
            "--wait",
            min=0.0,
            help="Wait up to this many seconds for the job to end first (exit 1 if it does not).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """A job's state and every step's state, attempts, input, output, error and duration."""
    from jobs.engine.runtime import load_pipelines
    from jobs.ops.history import history_view

    parsed = parse_job_id(job_id)
    settings = get_settings()
    load_pipelines(settings)
    store = job_store(settings)
    if wait is not None and wait_for_end(store, parsed, wait) is None:
        _fail(1, f"job {parsed} did not end within {wait:g} s")
    view = history_view(store.history(parsed))
    if as_json:
        print_json(view)
        return
    _print_history(view)


def _print_history(view: dict[str, JSON]) -> None:
    stdout.print(
        f"job {view['job_id']} ({view['pipeline']}, event {view['event_id']}): {view['state']}"
        + (f", {view['waiting']}" if view.get("waiting") else "")
    )
    table = Table("step", "state", "attempts", "took", "output / error")
    steps = view["steps"] if isinstance(view["steps"], list) else []
    for step in steps:
        if not isinstance(step, dict):
            continue
        shown = step["error"] if step["error"] is not None else step["output"]
        table.add_row(
            str(step["name"]),
            str(step["state"]) + (" (dedup)" if step["deduplicated"] else ""),
            str(step["attempts"]),
            human_duration(step["duration"]) if isinstance(step["duration"], float) else "",
            json.dumps(shown)[:100],
        )
    print_table(table)


@cli.command()
def audit(
    as_json: JsonFlag = False,
    sandbox_db: Annotated[
        Path | None,
        typer.Option(
            help="Read the sandbox's effects from its file instead of asking it over HTTP."
        ),
    ] = None,
) -> None:
    """Reconcile the ledger with the effects the sandbox provider applied; exit 1 on drift."""
    from jobs.ops.audit import run_audit

    report, source = run_audit(get_settings(), sandbox_db=sandbox_db)
    stderr.print(f"effects read from {source}")
    if as_json:
        print_json(report.as_json())
    else:
        stdout.print(
            f"effects: {dict(report.effects)}; duplicates: {dict(report.duplicates)}; "
            f"ledger entries: {report.ledger_entries}; in flight: {report.in_flight}"
        )
        for drift in report.drift[:50]:
            stdout.print(
                f"DRIFT {drift.problem}: {drift.kind} key={drift.key} "
                f"order={drift.order_id} {drift.detail}"
            )
        stdout.print("clean" if report.clean else f"{len(report.drift)} drift finding(s)")
    if not report.clean:
        raise typer.Exit(1)


@cli.command()
def api(
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    host: str = "127.0.0.1",
) -> None:
    """Run the HTTP intake: the signed webhook, the read API, /healthz and /metrics."""
    import uvicorn

    from jobs.web.intake import create_app

    app = create_app(get_settings())
    stderr.print(f"oncelery API on http://{host}:{port}")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@cli.command()
def status(
    window: Annotated[
        float, typer.Option(min=1.0, help="Seconds of history for step durations.")
    ] = 300.0,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every two seconds.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Queue depths, jobs by state, the oldest pending job, step p50/p99, dead letters."""
    import time

    from rich.live import Live

    from jobs.ops.status import status_table, status_view
    from jobs.worker import app as celery_app
    from ledger import LedgerStats

    settings = get_settings()
    stats = LedgerStats(engine=job_store(settings).engine)
    keep_for = settings.signal_keep_for
    if as_json and not watch:
        print_json(status_view(stats, celery_app, window=window, signal_keep_for=keep_for))
        return
    if not watch:
        view = status_view(stats, celery_app, window=window, signal_keep_for=keep_for)
        print_table(status_table(view))
        return
    with Live(console=stdout, auto_refresh=False) as live:
        while True:
            view = status_view(stats, celery_app, window=window, signal_keep_for=keep_for)
            if as_json:
                print_json(view)
            else:
                live.update(status_table(view), refresh=True)
            time.sleep(2.0)


operator_commands.register(cli)
run_commands.register(cli)
listing.register(cli)


def _fail(code: int, message: str) -> NoReturn:
    stderr.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
    sys.exit(code)


def _usage_error(exc: Exception) -> str | None:
    """The one-line message of a command-line parsing error, None for any other exception.

    Typer raises click's exceptions, or those of the copy of click it vendors (typer 0.29), so
    they are recognised by their interface rather than by class.
    """
    format_message = getattr(exc, "format_message", None)
    if callable(format_message) and isinstance(getattr(exc, "exit_code", None), int):
        return " ".join(str(format_message()).split())
    return None


def main() -> None:
    """The console script: run the CLI, turning every known error into one line and an exit code."""
    command = typer.main.get_command(cli)
    try:
        result = command.main(prog_name="oncelery", standalone_mode=False)
    except (ConfigError, InvalidEvent, BadInput) as exc:
        _fail(2, str(exc))
    except (LedgerError, JobError) as exc:
        _fail(1, str(exc))
    except (KeyboardInterrupt, typer.Abort):
        _fail(130, "interrupted")
    except KombuOperationalError as exc:
        _fail(1, f"the broker is unreachable: {exc}")
    except Exception as exc:
        usage = _usage_error(exc)
        if usage is None:
            raise
        _fail(2, usage)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
