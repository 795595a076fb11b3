"""Leases kept while steps act: a thread of each worker process renews the leases of the claims
it holds, so a step keeps its key however long it runs, and a killed worker's keys come free
within one (short) lease."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from uuid import UUID

from ledger import Claim

logger = logging.getLogger(__name__)

#: Renewals per lease: a renewal delayed by up to two periods still keeps the key.
RENEWALS_PER_LEASE = 3

#: Renews claims' leases; for each, whether it is still the claimant's.
Renew = Callable[[Sequence[Claim]], list[bool]]


class LeaseKeeper:
    """Renews the leases of the claims this process holds, from a thread of its own.

    Without it a step that outlived its lease could be taken over while it acted, and the
    lease had to outlast every time limit (a killed worker's job then waited minutes). With
    it the lease only has to outlast the time between two renewals (a third of it).

    Args:
        renew: renews leases (`StepLedger.renew_leases`).
        lease: the lease, in seconds; they are renewed `RENEWALS_PER_LEASE` times per lease.
    """

    def __init__(self, renew: Renew, *, lease: float) -> None:
        self._renew = renew
        self.every = lease / RENEWALS_PER_LEASE
        self._held: dict[tuple[str, UUID], Claim] = {}
        self._lost: set[tuple[str, UUID]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, claims: Iterable[Claim]) -> None:
        """Keep these claims' leases until they are released (or recorded: a renewal that
        finds a key recorded drops it)."""
        with self._lock:
            for claim in claims:
                self._held[(claim.key, claim.owner)] = claim
            if self._thread is None and self._held:
                self._thread = threading.Thread(
                    target=self._run, name="oncelery-leases", daemon=True
                )
                self._thread.start()

    def release(self, claims: Iterable[Claim]) -> None:
        """Stop keeping these claims' leases."""
        with self._lock:
            for claim in claims:
                self._held.pop((claim.key, claim.owner), None)
                self._lost.discard((claim.key, claim.owner))

    def lost(self, claim: Claim) -> bool:
        """Whether a renewal found the claim's key no longer ours (taken over, or recorded)."""
        with self._lock:
            return (claim.key, claim.owner) in self._lost

    def renew_now(self) -> None:
        """Renew every held lease once (what the thread does every `every` seconds)."""
        with self._lock:
            held = list(self._held.values())
        if not held:
            return
        try:
            kept = self._renew(held)
        except Exception:
            logger.warning("lease renewal failed", exc_info=True, extra={"action": "renew_failed"})
            return
        with self._lock:
            for claim, ours in zip(held, kept, strict=True):
                if not ours and self._held.pop((claim.key, claim.owner), None) is not None:
                    self._lost.add((claim.key, claim.owner))

    def close(self) -> None:
        """Stop the thread (held leases then run out on their own)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.renew_now()
