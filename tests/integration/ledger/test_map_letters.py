"""A map's item letters on the real ledger: a replay that races the last item's record, and
what `resolve` and `purge` do to an item's letter (its job goes on, or has moved on)."""

from __future__ import annotations

import threading
import uuid

import sqlalchemy as sa

from ledger import (
    DeadLetterReason,
    DeadLetterStore,
    Failure,
    ItemClaim,
    ItemState,
    JobStore,
    MapLedger,
    NewItem,
    NewJob,
    Refused,
    Reopened,
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
