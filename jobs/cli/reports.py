"""What the commands that run oncelery's processes share: a progress bar of finished orders,
a chaos run's verdict, and a run's figures as a table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from jobs.cli.support import print_json, stderr, stdout

Report = TypeVar("Report")


def counting_orders(
    total: int,
    *,
    quiet: bool,
    run: Callable[[Callable[[int, int], None]], Report],
    what: str = "orders finished",
) -> Report:
    """Run `run` with a progress bar of finished orders on stderr (gone afterwards when
    `quiet`, so stdout carries only the JSON)."""
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=quiet) as bar:
        task = bar.add_task(what, total=total)
        return run(lambda done, expected: bar.update(task, completed=done, total=expected))


class Verdict(Protocol):
    """What a chaos run reports (`ChaosReport`, `TaskChaosReport`)."""

    @property
    def violations(self) -> list[str]: ...

    @property
    def ok(self) -> bool: ...

    def summary(self) -> str: ...

    def as_json(self) -> dict[str, object]: ...


def verdict(report: Verdict, *, as_json: bool) -> None:
    """Print a chaos run's summary and first violations, then its figures; exit 1 unless ok."""
    stderr.print(report.summary(), highlight=False)
    for violation in report.violations[:20]:
        stderr.print(f"  {violation}", highlight=False)
    if as_json:
        print_json(report.as_json())
    else:
        print_figures(report.as_json())
    if not report.ok:
        raise typer.Exit(1)


def print_figures(figures: dict[str, object]) -> None:
    table = Table("figure", "value", title="oncelery demo (counted at the provider)")
    for name, value in figures.items():
        if name not in ("drift", "violations"):
            table.add_row(name, str(value))
    stdout.print(table)
