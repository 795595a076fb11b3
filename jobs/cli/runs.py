"""The commands that run oncelery's processes for you: `demo`, `chaos`, `sandbox` (and `bench`,
from `jobs.cli.bench`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from config import get_settings
from jobs.cli.bench import bench
from jobs.cli.reports import counting_orders, print_figures, verdict
from jobs.cli.support import BadInput, JsonFlag, print_json, stderr

if TYPE_CHECKING:
    from jobs.tools.chaos import ChaosOptions
    from jobs.tools.crawl_demo import CrawlDemoOptions

#: Options the commands share (same meaning, same bounds; defaults stay per command).
Orders = Annotated[int, typer.Option(min=1, max=1_000_000, help="How many orders.")]
FaultRate = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Share of provider calls answered 5xx.")
]
TimeoutRate = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Share that hang past the timeout.")
]
LostReplyRate = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Share applied whose reply is lost.")
]
LatencyMs = Annotated[int, typer.Option(min=0, help="Added provider latency.")]
Workers = Annotated[int, typer.Option(min=1, max=16, help="Worker processes.")]
Concurrency = Annotated[int, typer.Option(min=1, max=64, help="Pool size per worker.")]

Report = TypeVar("Report")


def register(cli: typer.Typer) -> None:
    """Add the commands to the `oncelery` command line."""
    for command in (demo, chaos, bench, sandbox):
        cli.command()(command)


#: The pipelines `oncelery demo --pipeline` runs.
DEMO_PIPELINES = ("order-placed", "places-crawl", "order-fulfilment")
#: Seconds an order-fulfilment order waits for its `shipped` signal in a demo or chaos run.
ReminderAfter = Annotated[
    float | None,
    typer.Option(
        min=0.1, help="order-fulfilment: seconds an order waits to be shipped (then a reminder)."
    ),
]


def demo(
    pipeline: Annotated[
        str, typer.Option(help=f"The pipeline to run: {' or '.join(DEMO_PIPELINES)}.")
    ] = "order-placed",
    orders: Orders = 200,
    crawls: Annotated[
        int, typer.Option(min=1, max=10_000, help="How many crawls (places-crawl).")
    ] = 3,
    places_rate: Annotated[
        int | None,
        typer.Option(min=1, help="places-crawl: the sandbox's searches per second (then 429)."),
    ] = None,
    fault_rate: FaultRate = 0.0,
    timeout_rate: TimeoutRate = 0.0,
    lost_reply_rate: LostReplyRate = 0.0,
    latency_ms: LatencyMs = 0,
    declined_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of customers whose card is declined.")
    ] = 0.0,
    workers: Workers = 2,
    concurrency: Concurrency = 2,
    timeout: Annotated[
        float, typer.Option(min=1.0, help="Give up waiting after this many seconds.")
    ] = 600.0,
    reminder_after: ReminderAfter = None,
    as_json: JsonFlag = False,
) -> None:
    """Start the sandbox and workers, run N generated orders (or crawls), and report what the
    provider saw. order-fulfilment: half the orders are signalled shipped (some before their
    job waits, some twice), the others get a reminder after --reminder-after seconds."""
    from jobs.tools.demo import DemoOptions, run_demo

    if pipeline not in DEMO_PIPELINES:
        raise BadInput(f"--pipeline: {pipeline!r} has no demo; try {', '.join(DEMO_PIPELINES)}")
    if fault_rate + timeout_rate + lost_reply_rate > 1:
        raise BadInput("--fault-rate, --timeout-rate and --lost-reply-rate add up to more than 1")
    if pipeline != "places-crawl" and places_rate is not None:
        raise BadInput("--places-rate: for --pipeline places-crawl only")
    if pipeline != "order-fulfilment" and reminder_after is not None:
        raise BadInput("--reminder-after: for --pipeline order-fulfilment only")
    if pipeline == "order-fulfilment":
        if declined_rate:
            raise BadInput("--declined-rate: not with --pipeline order-fulfilment")
        from jobs.cli.fulfilment import fulfilment_demo
        from jobs.tools.fulfilment_demo import FulfilmentDemoOptions

        chosen_orders = FulfilmentDemoOptions(
            orders=orders,
            reminder_after=reminder_after or FulfilmentDemoOptions.reminder_after,
            sandbox=_faults(fault_rate, timeout_rate, lost_reply_rate, latency_ms),
            workers=workers,
            concurrency=concurrency,
            timeout=timeout,
        )
        fulfilment_demo(chosen_orders, as_json=as_json)
        return
    if pipeline == "places-crawl":
        if declined_rate:
            raise BadInput("--declined-rate: crawls have no cards to decline")
        from jobs.tools.crawl_demo import CrawlDemoOptions

        chosen = CrawlDemoOptions(
            crawls=crawls,
            fault_rate=fault_rate,
            timeout_rate=timeout_rate,
            lost_reply_rate=lost_reply_rate,
            latency_ms=latency_ms,
            workers=workers,
            concurrency=concurrency,
            timeout=timeout,
            places_rate=places_rate,
        )
        _crawl_demo(chosen, as_json=as_json)
        return
    options = DemoOptions(
        orders=orders,
        fault_rate=fault_rate,
        timeout_rate=timeout_rate,
        lost_reply_rate=lost_reply_rate,
        latency_ms=latency_ms,
        declined_rate=declined_rate,
        workers=workers,
        concurrency=concurrency,
        timeout=timeout,
    )
    settings = get_settings()
    report = counting_orders(
        orders, quiet=as_json, run=lambda progress: run_demo(settings, options, progress)
    )
    if as_json:
        print_json(report.as_json())
    else:
        print_figures(report.as_json())
    if report.stuck or not report.audit_clean:
        raise typer.Exit(1)


def _faults(fault_rate: float, timeout_rate: float, lost: float, latency_ms: int) -> list[str]:
    """The sandbox's options for these faults."""
    return [
        *("--fault-rate", str(fault_rate), "--timeout-rate", str(timeout_rate)),
        *("--lost-reply-rate", str(lost), "--latency-ms", str(latency_ms)),
    ]


def _crawl_demo(chosen: CrawlDemoOptions, *, as_json: bool) -> None:
    """`demo --pipeline places-crawl`: exit 1 if a crawl is left unfinished or the audit drifts."""
    from jobs.tools.crawl_demo import run_crawl_demo

    settings = get_settings()
    report = counting_orders(
        chosen.crawls,
        quiet=as_json,
        run=lambda progress: run_crawl_demo(settings, chosen, progress),
        what="crawls finished",
    )
    if as_json:
        print_json(report.as_json())
    else:
        print_figures(report.as_json())
    if report.stuck or not report.audit_clean:
        raise typer.Exit(1)


def chaos(
    orders: Orders = 500,
    kill_every: Annotated[
        float, typer.Option(min=0.1, help="Seconds between two kills (±50 %).")
    ] = 3.0,
    broker_restart: Annotated[
        bool,
        typer.Option("--broker-restart", help="Restart the broker once, a quarter of the way."),
    ] = False,
    db_restart: Annotated[
        bool, typer.Option("--db-restart", help="Restart Postgres once, half way.")
    ] = False,
    workers: Workers = 2,
    concurrency: Concurrency = 2,
    fault_rate: FaultRate = 0.10,
    timeout_rate: TimeoutRate = 0.05,
    timeout: Annotated[
        float | None, typer.Option(min=1.0, help="Give up waiting after this many seconds.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the kills and the orders.")] = None,
    tasks: Annotated[
        bool,
        typer.Option(
            "--tasks",
            help="Chains of a Celery app's decorated tasks (jobs.tools.shop) instead of orders.",
        ),
    ] = False,
    map_roots: Annotated[
        int,
        typer.Option(
            "--map",
            min=0,
            max=1_000_000,
            help="One map step of this many items (and what they split into) instead of orders.",
        ),
    ] = 0,
    limits: Annotated[
        int,
        typer.Option(
            "--limits",
            min=0,
            max=10_000,
            help="Crawls against a provider admitting this many searches a second, under a rate "
            "limit of as many, and the orders ten a customer, one charge at a time.",
        ),
    ] = 0,
    crawls: Annotated[
        int, typer.Option(min=1, max=1_000, help="With --limits: crawls to run.")
    ] = 3,
    pipeline: Annotated[
        str, typer.Option(help="The orders' pipeline: order-placed or order-fulfilment.")
    ] = "order-placed",
    reminder_after: ReminderAfter = None,
    as_json: JsonFlag = False,
) -> None:
    """Run orders while killing workers and restarting the broker and Postgres; exit 1 if any
    order was lost, doubled or left stuck. With --tasks: chains of decorated Celery tasks;
    with --map N: one map of N items, each notified exactly once, the join once; with
    --limits N: crawls and orders under limits, none exceeded at the provider; with
    --pipeline order-fulfilment: half the orders signalled shipped, each notified once."""
    from jobs.tools.chaos import ChaosOptions, run_chaos

    if fault_rate + timeout_rate > 1:
        raise BadInput("--fault-rate and --timeout-rate add up to more than 1")
    if tasks and db_restart:
        raise BadInput("--db-restart: not with --tasks (the orders' chaos restarts Postgres)")
    if tasks and map_roots:
        raise BadInput("--map: not with --tasks")
    if pipeline not in ("order-placed", "order-fulfilment"):
        raise BadInput(f"--pipeline: {pipeline!r}; chaos runs order-placed or order-fulfilment")
    if reminder_after is not None and pipeline != "order-fulfilment":
        raise BadInput("--reminder-after: for --pipeline order-fulfilment only")
    if pipeline == "order-fulfilment" and (tasks or map_roots):
        raise BadInput("--pipeline order-fulfilment: not with --tasks or --map")
    if limits and (tasks or map_roots or broker_restart or db_restart):
        raise BadInput("--limits: not with --tasks, --map or restarts")
    if limits and pipeline != "order-placed":
        raise BadInput("--limits: runs its own crawls and orders, not with --pipeline")
    options = ChaosOptions(
        orders=orders,
        kill_every=kill_every,
        broker_restart=broker_restart,
        db_restart=db_restart,
        workers=workers,
        concurrency=concurrency,
        fault_rate=fault_rate,
        timeout_rate=timeout_rate,
        timeout=timeout,
        seed=seed,
    )
    settings = get_settings()
    if tasks:
        _chaos_tasks(options, as_json=as_json)
        return
    if map_roots:
        _chaos_map(dataclasses.replace(options, orders=map_roots), as_json=as_json)
        return
    if limits:
        _chaos_limits(options, limits, crawls, as_json=as_json)
        return
    if pipeline == "order-fulfilment":
        from jobs.cli.fulfilment import fulfilment_chaos

        fulfilment_chaos(options, reminder_after or 30.0, as_json=as_json)
        return
    report = counting_orders(
        orders, quiet=as_json, run=lambda progress: run_chaos(settings, options, progress)
    )
    verdict(report, as_json=as_json)


def _chaos_map(options: ChaosOptions, *, as_json: bool) -> None:
    """`chaos --map N`: one map's items under the same fire, counted at the provider."""
    from jobs.tools.chaos_map import run_map_chaos

    settings = get_settings()
    report = counting_orders(
        options.orders,
        quiet=as_json,
        run=lambda progress: run_map_chaos(settings, options, progress),
    )
    verdict(report, as_json=as_json)


def _chaos_limits(options: ChaosOptions, rate: int, crawls: int, *, as_json: bool) -> None:
    """`chaos --limits N`: crawls and orders under limits, counted at the provider."""
    from jobs.tools.chaos_limits import run_limit_chaos

    settings = get_settings()
    report = counting_orders(
        options.orders + crawls + 1,
        quiet=as_json,
        run=lambda progress: run_limit_chaos(settings, options, rate, crawls, progress),
        what="jobs finished",
    )
    verdict(report, as_json=as_json)


def _chaos_tasks(options: ChaosOptions, *, as_json: bool) -> None:
    """`chaos --tasks`: the shop's chains under the same fire, reported the same way."""
    from jobs.tools.chaos_tasks import run_task_chaos

    settings = get_settings()
    if settings.embedded_database or settings.broker_kind not in ("amqp", "redis"):
        raise BadInput("--tasks: needs DATABASE_URL (Postgres) and BROKER_URL (amqp or redis)")
    report = counting_orders(
        options.orders,
        quiet=as_json,
        run=lambda progress: run_task_chaos(settings, options, progress),
    )
    verdict(report, as_json=as_json)


def sandbox(
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8765,
    host: str = "127.0.0.1",
    db: Annotated[
        Path | None, typer.Option(help="Its SQLite file (default: in the data folder).")
    ] = None,
    fault_rate: FaultRate = 0.0,
    timeout_rate: TimeoutRate = 0.0,
    lost_reply_rate: LostReplyRate = 0.0,
    latency_ms: LatencyMs = 0,
    hang_seconds: Annotated[
        float, typer.Option(min=0.0, help="How long a timeout or lost reply hangs.")
    ] = 30.0,
    no_idempotency: Annotated[
        bool, typer.Option("--no-idempotency", help="Ignore Idempotency-Key.")
    ] = False,
    places_seed: Annotated[
        int | None,
        typer.Option(help="Seed of the places world (the same seed, the same world; default 1)."),
    ] = None,
    places_rate: Annotated[
        int | None,
        typer.Option(
            min=1, help="Most places searches per second; above it, 429 (default: no cap)."
        ),
    ] = None,
) -> None:
    """Run the sandbox provider: customers, prices, payments, notifications, places search and
    datasets over HTTP."""
    from pydantic import ValidationError

    from jobs.sandbox import Faults, serve
    from jobs.sandbox.world import DEFAULT_SEED

    try:
        faults = Faults(
            fault_rate=fault_rate,
            timeout_rate=timeout_rate,
            lost_reply_rate=lost_reply_rate,
            latency_ms=latency_ms,
        )
    except ValidationError as exc:
        raise BadInput(f"faults: {exc.errors()[0]['msg']}") from None
    path = db if db is not None else get_settings().data_dir / "sandbox.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    stderr.print(f"sandbox provider on http://{host}:{port} (effects in {path})")
    serve(
        host=host,
        port=port,
        db_path=path,
        faults=faults,
        honour_keys=not no_idempotency,
        hang_seconds=hang_seconds,
        places_seed=DEFAULT_SEED if places_seed is None else places_seed,
        places_rate=places_rate,
    )
