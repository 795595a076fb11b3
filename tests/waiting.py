"""`wait_for`: the one way tests poll for a condition, with a deadline and a message naming what
they waited for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T | None],
    what: str | Callable[[], str],
    *,
    timeout: float,
    interval: float = 0.1,
) -> T:
    """Call `condition` every `interval` seconds until it returns a truthy value.

    A condition may assert on the way (that a process it depends on is alive, say): its
    `AssertionError` ends the wait at once.

    Args:
        condition: asked first at once, then after each interval.
        what: what is awaited, for the failure message; a callable is asked at the deadline, so
            the message can say how far things got.
        timeout: seconds after which the wait fails.
        interval: seconds between two calls.

    Returns:
        The condition's first truthy value.

    Raises:
        AssertionError: the condition was still falsy after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            described = what if isinstance(what, str) else what()
            raise AssertionError(f"timed out after {timeout:g}s waiting for {described}")
        time.sleep(interval)
    return value
