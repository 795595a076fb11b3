"""The dead-letter desk's commands: `dlq list|show|replay|resolve|purge` (a map's failed items
with `--job`)."""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime, timedelta
from typing import Annotated
from uuid import UUID

import typer
from rich.table import Table

from config import Settings, get_settings
from jobs.cli.support import (
    BadInput,
    ByOption,
    JsonFlag,
    job_store,
    parse_duration,
    print_json,
    print_table,
    stderr,
    stdout,
    who,
)
from jobs.engine.runtime import load_pipelines
from jobs.ops.dead_letters import DeadLetterDesk, ReplayResult, letter_view
from jobs.worker import CeleryDispatch, app
from jobs.worker.queues import remove_dead_copies
from ledger import (
    JSON,
    DeadLetter,
    DeadLetterNotFound,
    DeadLetterState,
    DeadLetterStore,
)

dlq = typer.Typer(help="Dead letters: list, show, replay, resolve, purge.", no_args_is_help=True)

StepFilter = Annotated[str | None, typer.Option("--step", help="Only dead letters of this step.")]
ErrorFilter = Annotated[
    str | None, typer.Option("--error-type", help="Only dead letters of this error type.")
]
OlderFilter = Annotated[
    str | None, typer.Option("--older-than", help="Only those failed longer ago than this (30d).")
]
JobFilter = Annotated[
    str | None,
    typer.Option("--job", help="Only dead letters of this job (its id): a map's failed items."),
]
Ids = Annotated[list[int] | None, typer.Argument(help="Dead letter ids.", show_default=False)]


class Decision(enum.StrEnum):
    """What a person decided about a dead letter's step."""

    SUCCEEDED = "succeeded"
    RETRY = "retry"


class StateFilter(enum.StrEnum):
    """Which dead letters `dlq list` shows."""

    OPEN = "open"
    REPLAYED = "replayed"
    RESOLVED = "resolved"
    ALL = "all"


def register(cli: typer.Typer) -> None:
    """Add `dlq` to the `oncelery` command line."""
    cli.add_typer(dlq, name="dlq")


def _letters(settings: Settings) -> DeadLetterStore:
    return DeadLetterStore(engine=job_store(settings).engine)


def _desk(settings: Settings) -> DeadLetterDesk:
    load_pipelines(settings)
    store = job_store(settings)
    return DeadLetterDesk(
        store=store, letters=DeadLetterStore(engine=store.engine), dispatch=CeleryDispatch()
    )


def _ago(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    return datetime.now(UTC) - timedelta(seconds=parse_duration(value, name=name))


def _select(
    settings: Settings,
    ids: list[int] | None,
    *,
    every: bool,
    state: DeadLetterState | None,
    filters: tuple[str | None, str | None, str | None, str | None],
) -> list[DeadLetter]:
    step, error_type, older_than, job = filters
    if not ids and not every:
        raise BadInput(
            "name dead letter IDS, or --all (with --step, --error-type, --older-than, --job)"
        )
    if ids and every:
        raise BadInput("give dead letter IDS or --all, not both")
    letters = _letters(settings)
    if ids:
        found = {letter.id: letter for letter in letters.list(state=None, ids=ids)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise DeadLetterNotFound(missing[0])
        return [found[i] for i in ids]
    return letters.list(
        state=state,
        step=step,
        error_type=error_type,
        failed_before=_ago(older_than, "--older-than"),
        job_id=_job_id(job),
    )


def _job_id(value: str | None) -> UUID | None:
    if value is None:
        return None
    try:
        return UUID(value)
    except ValueError:
        raise BadInput(f"--job: {value!r} is not a job id") from None


@dlq.command("list")
def dlq_list(
    step: StepFilter = None,
    error_type: ErrorFilter = None,
    older_than: OlderFilter = None,
    newer_than: Annotated[
        str | None, typer.Option("--newer-than", help="Only those failed within this (2h).")
    ] = None,
    state: Annotated[StateFilter, typer.Option(help="Which dead letters.")] = StateFilter.OPEN,
    job: JobFilter = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100,
    as_json: JsonFlag = False,
) -> None:
    """Dead letters, oldest failure first."""
    letters = _letters(get_settings()).list(
        state=None if state is StateFilter.ALL else DeadLetterState(state),
        step=step,
        error_type=error_type,
        failed_before=_ago(older_than, "--older-than"),
        failed_after=_ago(newer_than, "--newer-than"),
        job_id=_job_id(job),
        limit=limit,
    )
    if as_json:
        print_json({"dead_letters": [letter_view(letter) for letter in letters]})
        return
    columns = ("id", "job", "pipeline.step", "reason", "error", "attempts", "last failed", "state")
    table = Table(*columns)
    for letter in letters:
        table.add_row(
            str(letter.id),
            str(letter.job_id),
            f"{letter.pipeline}.{letter.step}",
            str(letter.reason),
            f"{letter.error_type}: {letter.message[:60]}",
            str(letter.attempts),
            letter.last_failed_at.strftime("%Y-%m-%d %H:%M:%S"),
            str(letter.state),
        )
    print_table(table)
    stderr.print(f"{len(letters)} dead letter(s)")


@dlq.command("show")
def dlq_show(
    letter_id: Annotated[int, typer.Argument(help="The dead letter's id.")],
    as_json: JsonFlag = False,
) -> None:
    """One dead letter: the job, step, input, error, traceback and attempts."""
    view = letter_view(_letters(get_settings()).get(letter_id))
    if as_json:
        print_json(view)
        return
    for name, value in view.items():
        shown = json.dumps(value, indent=2) if isinstance(value, dict | list) else str(value)
        stdout.print(f"[bold]{name}[/bold]: {shown}", highlight=False)


@dlq.command("replay")
def dlq_replay(
    ids: Ids = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every open dead letter (with the filters).")
    ] = False,
    step: StepFilter = None,
    error_type: ErrorFilter = None,
    older_than: OlderFilter = None,
    job: JobFilter = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Also re-run steps whose outcome is unknown and whose provider ignores keys.",
        ),
    ] = False,
    by: ByOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Resume dead-lettered jobs at their failed step; succeeded steps are not run again."""
    settings = get_settings()
    letters = _select(
        settings,
        ids,
        every=every,
        state=DeadLetterState.OPEN,
        filters=(step, error_type, older_than, job),
    )
    desk = _desk(settings)
    if dry_run:
        plans = [desk.plan(letter, force=force) for letter in letters]
        if as_json:
            print_json({"dry_run": True, "plans": [plan.as_json() for plan in plans]})
            return
        table = Table("dead letter", "job", "skip (reuse results)", "re-run", "refused")
        for plan in plans:
            table.add_row(
                str(plan.letter_id),
                plan.job_id,
                ", ".join(plan.skip) or "-",
                ", ".join(plan.rerun) or "-",
                plan.refused or "",
            )
        print_table(table)
        return
    results = [desk.replay(letter, by=who(by), force=force) for letter in letters]
    _report(results, as_json)


def _report(results: list[ReplayResult], as_json: bool) -> None:
    if as_json:
        print_json({"results": [result.as_json() for result in results]})
    else:
        for result in results:
            mark = "replayed" if result.done else "refused"
            stdout.print(f"{result.letter_id} (job {result.job_id}): {mark}: {result.detail}")
        stderr.print(f"{sum(r.done for r in results)} of {len(results)} done")
    if not all(result.done for result in results):
        raise typer.Exit(1)


@dlq.command("resolve")
def dlq_resolve(
    letter_id: Annotated[int, typer.Argument(help="The dead letter's id.")],
    decision: Annotated[Decision, typer.Option("--as", help="What happened at the provider.")],
    result: Annotated[
        str | None, typer.Option(help="With --as succeeded: the step's result, as JSON.")
    ] = None,
    by: ByOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Record a person's decision about a step whose outcome is unknown (or that failed):
    `--as succeeded` (it did take effect: the job moves on) or `--as retry` (run it again)."""
    settings = get_settings()
    letter = _letters(settings).get(letter_id)
    desk, person = _desk(settings), who(by)
    if decision is Decision.RETRY:
        if result is not None:
            raise BadInput("--result goes with --as succeeded")
        outcome = desk.retry(letter, by=person)
    else:
        outcome = desk.resolve(letter, by=person, result=_result(result, person))
    _report([outcome], as_json)


def _result(text: str | None, person: str) -> JSON:
    if text is None:
        return {"resolved_by": person}
    try:
        value: JSON = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"--result: not JSON ({exc.msg})") from None
    return value


@dlq.command("purge")
def dlq_purge(
    ids: Ids = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every dead letter matching the filters.")
    ] = False,
    state: Annotated[
        StateFilter, typer.Option(help="With --all: which dead letters.")
    ] = StateFilter.OPEN,
    step: StepFilter = None,
    error_type: ErrorFilter = None,
    older_than: OlderFilter = None,
    job: JobFilter = None,
    by: ByOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Delete dead letters (an open one's job is given up: cancelled) and, on RabbitMQ, their
    copies in the dead-letter queue (with --all --state all and no filter: every copy)."""
    settings = get_settings()
    chosen = None if state is StateFilter.ALL else DeadLetterState(state)
    letters = _select(
        settings, ids, every=every, state=chosen, filters=(step, error_type, older_than, job)
    )
    purged = _letters(settings).purge([letter.id for letter in letters], by=who(by))
    kept = {each.letter_id for each in purged.refused}
    filtered = any((step, error_type, older_than, job))
    everything = every and state is StateFilter.ALL and not filtered
    everything = everything and not kept
    gone = [letter for letter in letters if letter.id not in kept]
    copies = remove_dead_copies(app, None if everything else gone)
    if as_json:
        answer: dict[str, JSON] = {"purged": purged.deleted, "broker_copies": copies}
        if purged.refused:
            answer["refused"] = [
                {"dead_letter": each.letter_id, "reason": each.reason} for each in purged.refused
            ]
        print_json(answer)
    else:
        removed = "unknown (the broker did not answer)" if copies is None else copies
        stdout.print(f"purged {purged.deleted} dead letter(s); broker copies removed: {removed}")
        for each in purged.refused:
            stdout.print(f"{each.letter_id}: refused: {each.reason}")
    if purged.refused:
        raise typer.Exit(1)
