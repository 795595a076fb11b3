"""What one attempt of a step sent to the outside world: whether a request that may apply an
effect went out, so that a failure after it is never mistaken for "nothing happened"."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class Watch:
    """One attempt's outgoing requests."""

    #: How many requests that may apply an effect went out.
    sent: int = 0


# A context variable, so threads and greenlets running attempts side by side each see their own.
_current: ContextVar[Watch | None] = ContextVar("oncelery_attempt_watch", default=None)


def request_sent() -> None:
    """Report that a request that may apply an effect (a POST, say) is going out, from a
    client a step uses (`jobs.provider.ProviderClient` does). Call it before sending: a request
    whose answer never comes may have been applied. Outside an attempt it does nothing."""
    watch = _current.get()
    if watch is not None:
        watch.sent += 1


@contextmanager
def watching() -> Iterator[Watch]:
    """Watch one attempt (a run watches each): what `request_sent` reports while it runs."""
    watch = Watch()
    token = _current.set(watch)
    try:
        yield watch
    finally:
        _current.reset(token)
