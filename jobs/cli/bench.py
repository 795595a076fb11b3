"""`oncelery bench`: bare Celery against oncelery in fresh workers (`--intake`: the webhook
under load; `--map N`: a map step against a chord)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from config import get_settings
from jobs.cli.support import BadInput, JsonFlag, print_json, stderr, stdout


def bench(
    broker: Annotated[str, typer.Option(help="amqp, redis or all.")] = "all",
    orders: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="Orders measured per row and run.")
    ] = 2000,
    runs: Annotated[
        int, typer.Option(min=0, max=100, help="Rounds; 0 only seeds and times the queries.")
    ] = 3,
    latency_orders: Annotated[
        int, typer.Option(min=1, max=100_000, help="Sequential orders for idle latency.")
    ] = 100,
    seed_jobs: Annotated[
        int,
        typer.Option(
            min=0, max=100_000_000, help="Seed this many finished jobs, then time the queries."
        ),
    ] = 0,
    amqp_url: Annotated[
        str, typer.Option(help="RabbitMQ for the bench.")
    ] = "amqp://guest:guest@127.0.0.1:5672//",
    redis_url: Annotated[str, typer.Option(help="Redis for the bench.")] = (
        "redis://127.0.0.1:6379/3"
    ),
    intake: Annotated[
        bool, typer.Option("--intake", help="Load the webhook of a real `oncelery api` instead.")
    ] = False,
    concurrency: Annotated[
        int, typer.Option(min=1, max=1_000, help="--intake: clients posting at once.")
    ] = 50,
    map_items: Annotated[
        int,
        typer.Option(
            "--map",
            min=0,
            max=1_000_000,
            help="A map step of this many no-op items against a Celery chord of as many.",
        ),
    ] = 0,
    timers: Annotated[
        int,
        typer.Option(
            "--timers",
            min=0,
            max=10_000_000,
            help="The timer loop with this many timers pending, against none.",
        ),
    ] = 0,
    timer_rate: Annotated[
        float, typer.Option(min=1.0, max=10_000.0, help="--timers: timers due per second.")
    ] = 1000.0,
    timer_seconds: Annotated[
        float, typer.Option(min=1.0, max=600.0, help="--timers: seconds of the due stream.")
    ] = 30.0,
    as_json: JsonFlag = False,
) -> None:
    """Measure bare Celery against oncelery (chained, fast path, fast path + sandbox) in fresh
    workers, in a database of its own (<DATABASE_URL's name>_bench); needs Postgres. With
    --intake: --orders signed events posted to `oncelery api` at --concurrency, --runs times.
    With --map N: a map step of N items against `chord(group)` (results in --redis-url).
    With --timers N: the timer loop and a worker firing a stream due at --timer-rate for
    --timer-seconds, with N timers pending far ahead against none."""
    from jobs.tools.bench.command import (
        BenchOptions,
        brokers_for,
        print_intake,
        run_bench,
        run_intake,
        run_map_bench,
    )
    from jobs.tools.bench.intake import IntakeOptions

    settings = get_settings()
    if settings.embedded_database:
        raise BadInput("DATABASE_URL: the bench needs Postgres (postgresql+psycopg://…)")
    try:
        brokers = brokers_for(broker, amqp_url=amqp_url, redis_url=redis_url)
    except ValueError as exc:
        raise BadInput(str(exc)) from None

    def log(line: str) -> None:
        stderr.print(line, highlight=False, markup=False)

    if intake:
        runs_done = run_intake(
            settings,
            IntakeOptions(brokers, events=orders, concurrency=concurrency, runs=max(runs, 1)),
            log,
        )
        if as_json:
            print_json({"intake": [run.as_json() for run in runs_done]})
        else:
            print_intake(runs_done, stdout)
        return
    if timers:
        from jobs.tools.bench.command import run_timers
        from jobs.tools.bench.timers import TimerOptions

        timer_options = TimerOptions(pending=timers, rate=timer_rate, seconds=timer_seconds)
        timer_report = run_timers(settings, brokers, timer_options, log)
        _show(as_json, timer_report.as_json, lambda: timer_report.print(stdout))
        return
    if map_items:
        map_options = BenchOptions(brokers=brokers, orders=map_items, runs=runs)
        map_report = run_map_bench(settings, map_options, redis_url, log)
        if as_json:
            print_json(map_report.as_json())
        else:
            stdout.print(map_report.table())
            for note in map_report.notes:
                stdout.print(f"note: {note}", markup=False, highlight=False)
        return
    options = BenchOptions(
        brokers=brokers,
        orders=orders,
        runs=runs,
        latency_orders=latency_orders,
        seed_jobs=seed_jobs,
    )
    report = run_bench(settings, options, log)
    _show(as_json, report.as_json, lambda: report.print(stdout))


def _show(
    as_json: bool, as_object: Callable[[], dict[str, object]], for_people: Callable[[], None]
) -> None:
    if as_json:
        print_json(as_object())
    else:
        for_people()
