"""A model-based test of a map step's fan-in (on Postgres and SQLite): hypothesis claims items
(again and again, as redeliveries and re-drives do), lets leases run out so that owners are
taken over, records successes (expanding into new items, or into ones the map has), failures
for good and replays, in any order; after every rule the counters must be what the items'
states say, each item counted once per settling, and the join handed on once, when the
last item settles."""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import sqlalchemy as sa
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger import (
    DeadLetterReason,
    DeadLetterStore,
    Failure,
    ItemClaim,
    ItemRecorded,
    JobState,
    JobStore,
    LeaseLost,
    MapLedger,
    NewItem,
    NewJob,
    Reopened,
    Settled,
    StepLedger,
    create_engine,
)
from ledger.errors import ItemConflict
from ledger.map_views import MapViews
from ledger.schema import ledger_entries, map_items

_runs = itertools.count()
_SETTINGS = settings(
    max_examples=25, stateful_step_count=25, deadline=None, derandomize=True, database=None
)


class FanInModel(RuleBasedStateMachine):
    """One map, its items' states as the model knows them, and the claims handed out."""

    engine: sa.Engine

    def __init__(self) -> None:
        super().__init__()
        self.maps = MapLedger(engine=self.engine, lease_seconds=30)
        self.letters = DeadLetterStore(engine=self.engine)
        self.states: dict[str, str] = {}
        self.claims: list[ItemClaim] = []
        self.joins = 0
        #: Open dead letters of the map's items (the person's rules need one).
        self.open_letters = 0
        self.max_failed: int | None = 0
        self.names = itertools.count()

    @initialize(max_failed=st.sampled_from([0, 1, None]), roots=st.integers(1, 3))
    def fan_out(self, max_failed: int | None, roots: int) -> None:
        """A map whose failed items all wait for a person (0), one settles (1), or all do."""
        run = next(_runs)
        self.max_failed = max_failed
        self.prefix = f"fan-in-{uuid.uuid4().hex[:8]}-{run}"
        job = self._job()
        [claim] = StepLedger(engine=self.engine, lease_seconds=30).claim_steps([job], "map")
        assert not isinstance(claim, Exception)
        policy = {0: "all_succeed", 1: "threshold", None: "all_settled"}[max_failed]
        items = [self._item(f"r{n}") for n in range(roots)]
        done = self.maps.fan_out(claim, items, policy=policy, next_step="join", duration_ms=1)  # type: ignore[arg-type]
        self.job = job
        assert done.added == roots
        self.states = dict.fromkeys((item.item_id for item in items), "pending")

    def _job(self) -> uuid.UUID:
        new = NewJob(
            pipeline="fan-in-model",
            event_id=self.prefix,
            context={},
            fingerprint="f" * 64,
            step_keys={"map": f"{self.prefix}:map", "join": f"{self.prefix}:join"},
            first_step="map",
        )
        [(job_id, _)] = JobStore(engine=self.engine).create_jobs([new])
        return job_id

    def _item(self, item_id: str, fingerprint: str = "i" * 64) -> NewItem:
        return NewItem(item_id, {"id": item_id}, f"{self.prefix}:map/{item_id}", fingerprint)

    @rule(pick=st.integers(0, 50))
    def claim(self, pick: int) -> None:
        """An item's message arrives (again): its key is claimed, or found busy or done."""
        ids = sorted(self.states)
        [found] = self.maps.claim_items(self.job, "map", [ids[pick % len(ids)]])
        if isinstance(found, ItemClaim):
            self.claims.append(found)

    @rule()
    def leases_run_out(self) -> None:
        """Every claim's lease ends: their keys may be taken over; their owners are fenced."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(ledger_entries)
                .where(ledger_entries.c.key.like(f"{self.prefix}:map/%"))
                .values(locked_until=ledger_entries.c.created_at)
            )

    @precondition(lambda self: self.claims)
    @rule(
        pick=st.integers(0, 50),
        children=st.integers(0, 3),
        again=st.sampled_from([None, "i" * 64, "j" * 64]),
    )
    def succeed(self, pick: int, children: int, again: str | None) -> None:
        """A claim's item succeeds, expanding into new items (and one the map has: the same
        item, or another content under its id, which refuses the record)."""
        claim = self.claims[pick % len(self.claims)]
        kids = [self._item(f"c{next(self.names)}") for _ in range(children)]
        if again is not None:
            kids.append(self._item(sorted(self.states)[0], again))
        [answer] = self.maps.record_items([(claim, {"ok": claim.item_id}, kids)], next_step="join")
        if isinstance(answer, LeaseLost):
            return
        if isinstance(answer, ItemConflict):
            # Refused whole: nothing counted, the claim's key still started, its item pending.
            assert again == "j" * 64
            assert self.states[claim.item_id] == "pending"
            return
        assert isinstance(answer, ItemRecorded)
        if answer.counted:
            assert again != "j" * 64, "an expansion's other content under a taken id dropped"
            assert self.states[claim.item_id] == "pending", "counted twice"
            self.states[claim.item_id] = "done"
            assert len(answer.children) == children
            self.states.update(dict.fromkeys(answer.children, "pending"))
        self._joined(answer)

    @precondition(lambda self: self.claims)
    @rule(pick=st.integers(0, 50))
    def fail(self, pick: int) -> None:
        """A claim's item fails for good: dead-lettered on its own."""
        claim = self.claims[pick % len(self.claims)]
        failure = Failure({"message": "no"}, None, reason=DeadLetterReason.PERMANENT)
        try:
            answer = self.maps.record_item_failure(
                claim, failure, max_failed=self.max_failed, next_step="join"
            )
        except LeaseLost:
            return
        if answer.counted:
            assert self.states[claim.item_id] == "pending", "counted twice"
            settled = list(self.states.values()).count("failed")
            limit = self.max_failed
            self.states[claim.item_id] = "failed" if limit is None or settled < limit else "waiting"
            self.open_letters += 1
        self._joined(answer)

    @rule(pick=st.integers(0, 50))
    def replay(self, pick: int) -> None:
        """A person replays an open dead letter of the map's items."""
        letters = self.letters.list(job_id=self.job)
        if not letters:
            return
        letter = letters[pick % len(letters)]
        reopened = self.letters.replay(letter.id, by="model", allow_unknown=True)
        if isinstance(reopened, Reopened):
            assert reopened.item_id is not None
            assert self.states[reopened.item_id] in ("failed", "waiting")
            assert self.joins == 0, "replayed after the join"
            self.states[reopened.item_id] = "pending"
            self.open_letters -= 1

    @precondition(lambda self: self.open_letters)
    @rule(pick=st.integers(0, 50))
    def resolve(self, pick: int) -> None:
        """A person says an open dead letter's item did take effect (`resolve --as
        succeeded`): it is done, under the map's lock, and may join the map."""
        letters = self.letters.list(job_id=self.job)
        if not letters:
            return
        letter = letters[pick % len(letters)]
        settled = self.letters.settle(
            letter.id, by="model", result={"by": "hand"}, next_step="join"
        )
        if not isinstance(settled, Settled):
            return
        assert settled.item_id is not None
        assert self.states[settled.item_id] in ("failed", "waiting")
        assert self.joins == 0, "resolved after the join"
        self.states[settled.item_id] = "done"
        self.open_letters -= 1
        if settled.next_step is not None:
            self.joins += 1

    @precondition(lambda self: self.open_letters)
    @rule(pick=st.integers(0, 50))
    def purge(self, pick: int) -> None:
        """A person purges a dead letter of the map's items: refused while its item waits."""
        letters = self.letters.list(job_id=self.job)
        if not letters:
            return
        letter = letters[pick % len(letters)]
        item_id = letter.input["item_id"]  # type: ignore[index,call-overload]
        purged = self.letters.purge([letter.id], by="model")
        waiting = self.states[str(item_id)] == "waiting"
        assert (purged.deleted, len(purged.refused)) == ((0, 1) if waiting else (1, 0))
        self.open_letters -= purged.deleted

    def _joined(self, answer: ItemRecorded) -> None:
        if answer.joined is not None:
            self.joins += 1
            assert answer.joined is JobState.RUNNING

    @invariant()
    def counters_follow_the_items(self) -> None:
        if not self.states:
            return
        [counters] = self.maps.counters(self.job)
        states = list(self.states.values())
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(map_items.c.item_id, map_items.c.state).where(
                    map_items.c.job_id == self.job
                )
            ).all()
        assert dict(rows) == self.states
        unsettled = states.count("pending") + states.count("waiting")
        failed = states.count("failed") + states.count("waiting")
        assert (counters.total, counters.done, counters.failed, counters.remaining) == (
            len(states),
            states.count("done"),
            failed,
            unsettled,
        )
        assert counters.waiting == states.count("waiting")
        # The join is handed on once, by the record that settled the last item.
        assert self.joins == (1 if unsettled == 0 else 0)
        assert counters.joined == (unsettled == 0)
        # And the audit's check of maps agrees
        mismatched = MapViews(engine=self.engine).mismatched()
        assert [found for found in mismatched if found.job_id == self.job] == []


def test_the_fan_in_counts_each_item_once_and_joins_once(database_url: str, tmp_path: Path) -> None:
    """On Postgres and on SQLite (the `database_url` fixture's two parameters)."""
    engine = create_engine(database_url)
    FanInModel.engine = engine
    try:
        run_state_machine_as_test(FanInModel, settings=_SETTINGS)  # type: ignore[no-untyped-call]
    finally:
        engine.dispose()
