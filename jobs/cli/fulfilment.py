"""`demo` and `chaos` with `--pipeline order-fulfilment`: orders that wait to be shipped (imported
when one of them runs)."""

from __future__ import annotations

import typer

from config import get_settings
from jobs.cli.reports import counting_orders, print_figures, verdict
from jobs.cli.support import print_json
from jobs.tools.chaos import ChaosOptions
from jobs.tools.chaos_fulfilment import run_fulfilment_chaos
from jobs.tools.fulfilment_demo import FulfilmentDemoOptions, run_fulfilment_demo


def fulfilment_demo(options: FulfilmentDemoOptions, *, as_json: bool) -> None:
    """Run the fulfilment demo; exit 1 if an order is left unfinished or the audit drifts."""
    settings = get_settings()
    report = counting_orders(
        options.orders,
        quiet=as_json,
        run=lambda progress: run_fulfilment_demo(settings, options, progress),
    )
    if as_json:
        print_json(report.as_json())
    else:
        print_figures(report.as_json())
    if report.stuck or not report.audit_clean:
        raise typer.Exit(1)


def fulfilment_chaos(options: ChaosOptions, reminder_after: float, *, as_json: bool) -> None:
    """Run fulfilment orders under fire; exit 1 on any broken invariant."""
    settings = get_settings()
    report = counting_orders(
        options.orders,
        quiet=as_json,
        run=lambda progress: run_fulfilment_chaos(settings, options, reminder_after, progress),
    )
    verdict(report, as_json=as_json)
