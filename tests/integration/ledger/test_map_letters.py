"""A map's item letters on the real ledger: a replay that races the last item's record, and
what `resolve` and `purge` do to an item's letter (its job goes on, or has moved on)."""

from __future__ import annotations

import threading
import uuid

import pytest
import sqlalchemy as sa

from ledger import (
    JSON,
    DeadLetterReason,
    DeadLetterStore,
    Failure,
    ItemClaim,
    ItemState,
    JobState,
    JobStore,
    MapLedger,
    NewItem,
    NewJob,
    Refused,
    Reopened,
    Settled,
    StepLedger,
    StepState,
    fan_in,
    queries,
)
from ledger.schema import map_items
from tests.waiting import wait_for


class Map:
    """One job whose map step `map` fanned out into `roots` items, followed by `join`."""

    def __init__(self, engine: sa.Engine, roots: int, policy: str) -> None:
        self.engine = engine
        self.maps = MapLedger(engine=engine, lease_seconds=30)
        self.letters = DeadLetterStore(engine=engine)
        self.prefix = f"letters-{uuid.uuid4().hex[:8]}"
        new = NewJob(
            pipeline="map-letters",
            event_id=self.prefix,
            context={},
            fingerprint="f" * 64,
            step_keys={"map": f"{self.prefix}:map", "join": f"{self.prefix}:join"},
            first_step="map",
        )
        [(self.job, _)] = JobStore(engine=engine).create_jobs([new])
        [claim] = StepLedger(engine=engine, lease_seconds=30).claim_steps([self.job], "map")
        assert not isinstance(claim, Exception)
        items = [self.item(f"r{n}") for n in range(roots)]
        self.maps.fan_out(claim, items, policy=policy, next_step="join", duration_ms=1)  # type: ignore[arg-type]

    def item(self, item_id: str, fingerprint: str = "i" * 64) -> NewItem:
        return NewItem(item_id, {"id": item_id}, f"{self.prefix}:map/{item_id}", fingerprint)

    def claim(self, item_id: str) -> ItemClaim:
        [found] = self.maps.claim_items(self.job, "map", [item_id])
        assert isinstance(found, ItemClaim), found
        return found

    def fail(self, item_id: str, max_failed: int | None) -> None:
        failure = Failure({"message": "no"}, None, reason=DeadLetterReason.PERMANENT)
        claim = self.claim(item_id)
        self.maps.record_item_failure(claim, failure, max_failed=max_failed, next_step="join")

    def succeed(self, item_id: str) -> None:
        [recorded] = self.maps.record_items(
            [(self.claim(item_id), {"ok": 1}, [])], next_step="join"
        )
        assert not isinstance(recorded, Exception), recorded

    def pending_in_joined_map(self) -> list[str]:
        [counters] = self.maps.counters(self.job)
        if not counters.joined:
            return []
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(map_items.c.item_id).where(
                    map_items.c.job_id == self.job, map_items.c.state == str(ItemState.PENDING)
                )
            )
            return list(found.scalars())


def test_a_replay_racing_the_last_items_record_is_refused_after_the_join(
    postgres_url: str,
) -> None:
    # Given an all_settled map whose r0 failed (settled, its letter open) and whose last
    # item r1 is being recorded: its transaction moved the counters to 0 and joined, not
    # committed yet
    engine = sa.create_engine(postgres_url)
    try:
        world = Map(engine, roots=2, policy="all_settled")
        world.fail("r0", max_failed=None)
        [letter] = world.letters.list(job_id=world.job)
        last = world.claim("r1")
        recording = engine.connect()
        transaction = recording.begin()
        values = queries.finish_params(last.key, last.owner, result={"ok": 1})
        assert recording.execute(queries.finish_entry(StepState.SUCCEEDED), values).one()
        settled = fan_in.settle(recording, [(last, ())], ItemState.DONE, "join")
        assert settled["r1"].joined is not None

        # When a person replays r0's letter meanwhile (it waits on the map's row)
        answer: list[Reopened | Refused] = []
        replay = threading.Thread(
            target=lambda: answer.append(
                world.letters.replay(letter.id, by="test", allow_unknown=False)
            )
        )
        replay.start()

        def blocked() -> bool:
            with engine.connect() as conn:
                waiting: int = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                ).scalar_one()
            return bool(waiting)

        wait_for(blocked, "the replay to wait on the map's row lock", timeout=10)
        transaction.commit()
        recording.close()
        replay.join(timeout=10)

        # Then the replay is refused (the join saw r0 failed), and no item of the joined map
        # is pending
        [outcome] = answer
        assert isinstance(outcome, Refused), outcome
        assert "joined" in outcome.reason
        assert world.pending_in_joined_map() == []
        [counters] = world.maps.counters(world.job)
        assert (counters.remaining, counters.failed, counters.done) == (0, 1, 1)
        assert world.letters.get(letter.id).state == "open"
    finally:
        engine.dispose()


@pytest.fixture
def waiting_map(engine: sa.Engine) -> Map:
    """An all_succeed map of r0, r1: r0 failed (waiting for a person, its letter open), r1
    done; the job waits at `map`."""
    world = Map(engine, roots=2, policy="all_succeed")
    world.fail("r0", max_failed=0)
    world.succeed("r1")
    return world


@pytest.fixture
def joined_map(engine: sa.Engine) -> Map:
    """An all_settled map of r0, r1: r0 failed (settled, its letter open), r1 done; joined,
    and the job since dead-lettered at `join`."""
    world = Map(engine, roots=2, policy="all_settled")
    world.fail("r0", max_failed=None)
    world.succeed("r1")
    error: JSON = {"type": "PermanentError", "message": "the join failed"}
    StepLedger(engine=engine, lease_seconds=30).dead_letter(
        world.job, "join", error, reason=DeadLetterReason.PERMANENT
    )
    return world


def test_resolving_a_waiting_items_letter_as_succeeded_settles_it_and_joins(
    waiting_map: Map,
) -> None:
    world = waiting_map
    [letter] = world.letters.list(job_id=world.job)

    outcome = world.letters.settle(letter.id, by="ops", result={"by": "hand"}, next_step="join")

    # The item is done with the person's result, counted once; the map joined, the job
    # moved on to the join (the caller sends it) with the counters as the map's result
    assert isinstance(outcome, Settled), outcome
    assert (outcome.job_state, outcome.next_step) == (JobState.RUNNING, "join")
    [counters] = world.maps.counters(world.job)
    assert (counters.done, counters.failed, counters.waiting, counters.remaining) == (2, 0, 0, 0)
    assert counters.joined
    items = {each.item_id: each for each in world.maps.item_results(world.job, "map")}
    assert (items["r0"].state, items["r0"].result) == (ItemState.DONE, {"by": "hand"})
    job = JobStore(engine=world.engine).get_job(world.job)
    assert (job.state, job.current_step) == (JobState.RUNNING, "join")
    assert job.results["map"] == counters.summary()
    # Once: the letter is closed, a second resolve is refused
    again = world.letters.settle(letter.id, by="ops", result=None, next_step="join")
    assert isinstance(again, Refused)


def test_an_item_letter_never_rewrites_or_gives_up_a_job_that_moved_on(joined_map: Map) -> None:
    world = joined_map
    store = JobStore(engine=world.engine)
    before = store.get_job(world.job)
    [item_letter] = [each for each in world.letters.list(job_id=world.job) if each.step == "map"]

    # Resolving the item's letter after the join is refused: the join read it failed
    outcome = world.letters.settle(item_letter.id, by="ops", result={"x": 1}, next_step="join")
    assert isinstance(outcome, Refused), outcome
    assert "joined" in outcome.reason
    after = store.get_job(world.job)
    assert (after.state, after.current_step) == (JobState.DEAD_LETTERED, "join")
    assert after.results == before.results

    # Purging it deletes the letter alone: the job stays dead-lettered at its join
    purged = world.letters.purge([item_letter.id], by="ops")
    assert (purged.deleted, purged.refused) == (1, [])
    assert store.get_job(world.job).state is JobState.DEAD_LETTERED
    assert [each.step for each in world.letters.list(job_id=world.job)] == ["join"]


def test_purging_a_waiting_items_letter_is_refused(waiting_map: Map) -> None:
    world = waiting_map
    [letter] = world.letters.list(job_id=world.job)

    purged = world.letters.purge([letter.id], by="ops")

    # The letter stays open (the map cannot join without its item), the job goes on
    assert [each.id for each in world.letters.list(job_id=world.job)] == [letter.id]
    assert purged.deleted == 0
    [refused] = purged.refused
    assert refused.letter_id == letter.id
    assert "waits" in refused.reason
    job = JobStore(engine=world.engine).get_job(world.job)
    assert (job.state, job.current_step) == (JobState.RUNNING, "map")
