"""A model-based test of the step protocol (issue 13): hypothesis drives the real runner,
ledger, sweeper and dead-letter desk, on Postgres and on SQLite, through random
interleavings of enqueues (duplicate and conflicting events, in one input and across
inputs), deliveries alone and in batches (chained mode and fast path), redeliveries,
forged reading headers, lost messages, provider answers (ok, 4xx, 5xx before and after
applying, timeouts, lost replies, failures after the call), crashes at every crash point,
commits whose answer is lost, lease expiry, sweeps, replays, resolves, cancels and prunes.
After every rule it checks the invariants of `protocol_invariants`; at the end it drains
everything (first with no time passing, then with every lease run out) and checks those of
progress and quiescence.

The model runs in one thread, one rule at a time: a crash is a `Killed` raised at a crash
point (nothing after it runs; the messages go back to the broker as redelivered); time
passes only in `time_passes`, which moves every started key's lease into the past in the
database; a lost commit answer runs a ledger call twice (`LostAnswers`); a person cancels a
job while its call is out through the provider's "cancelled-meanwhile" answer.

CI runs a fixed seed per database with bounded examples (profile `protocol-ci`);
`pytest tests/integration/jobs/engine/test_protocol_model.py --hypothesis-profile protocol-long`
runs it for minutes, with fresh seeds (both profiles are in tests/conftest.py).
"""

from __future__ import annotations

import functools
import json
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from uuid import UUID

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from config import Settings
from config.settings import CrashPoint
from jobs.engine.dispatch import message_reading
from jobs.engine.enqueue import relay, start_jobs
from jobs.engine.run import Outcome, run_step, run_steps
from jobs.engine.runtime import Runtime
from jobs.engine.sweeper import sweep
from jobs.errors import JobError
from jobs.ops.dead_letters import DeadLetterDesk
from jobs.retry import RetryPolicy
from ledger import (
    DeadLetter,
    DeadLetterStore,
    JobState,
    JobStore,
    LedgerError,
    StepLedger,
    create_engine,
)
from tests.conftest import settings_for
from tests.factories import RetryRequested
from tests.integration.jobs.engine.protocol_invariants import (
    Database,
    Memory,
    check_always,
    check_progress,
    check_quiescent,
)
from tests.integration.jobs.engine.protocol_world import (
    ANSWERS,
    PIPELINES,
    STEPS,
    UNKEYED,
    Killed,
    LostAnswers,
    Message,
    ModelBroker,
    ModelCrasher,
    ModelDispatch,
    ModelProvider,
    model_pipelines,
    order_context,
)

#: (event number, order number, content variant): a few of each, so that events repeat,
#: conflict (same event, other content) and have twins (other event, same content).
_VARIANT = st.integers(0, 3).map(lambda n: n // 3)  # other content, one time in four
_EVENTS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 2), _VARIANT), min_size=1, max_size=3
)
#: The provider's answers to a run's calls that may apply an effect, in order (then
#: ok): half of them ok.
_ANSWERS = st.lists(st.just("ok") | st.sampled_from(ANSWERS[1:]), max_size=4)
#: Its answers to reads: mostly ok, so that deliveries reach the calls that act.
_READS = st.lists(st.sampled_from(("ok", "ok", "ok", "503", "timeout")), max_size=2)
_CRASH = st.none() | st.tuples(st.sampled_from(list(CrashPoint)), st.sampled_from(STEPS))
#: Which ledger call of a run loses its answer after committing.
_LOST = st.none() | st.integers(1, 4)
_PICK = st.integers(0, 30)
#: Deliveries of one job per drain round: its steps, and a few polls of a key held elsewhere.
_DRAIN_TRIES = 6


def _rule_step(run: Callable[..., None]) -> Callable[..., None]:
    """Marks the machine unhealthy while a rule runs (see `ProtocolModel.healthy`)."""

    @functools.wraps(run)
    def step(machine: ProtocolModel, **arguments: object) -> None:
        machine.healthy = False
        run(machine, **arguments)

    return step


class World:
    """What one test function builds once: the database, its engine, the two settings."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.engine = create_engine(url)
        self.database = Database(self.engine)
        chained = settings_for(
            database_url=url, broker_url=None, data_dir=data_dir, relay_after=0.001
        )
        self.chained: Settings = chained
        self.fast: Settings = chained.model_copy(update={"fast_path": True})


class ProtocolModel(RuleBasedStateMachine):
    """One example: an empty ledger, a fresh provider and broker, random rules."""

    world: World

    def __init__(self) -> None:
        super().__init__()
        world = self.world
        world.database.reset()
        self.provider = ModelProvider(ignores_keys={(UNKEYED, "notifications")})
        self.pipelines = model_pipelines(self.provider)
        self.broker = ModelBroker()
        self.crasher = ModelCrasher()
        ledger = StepLedger(engine=world.engine, lease_seconds=60)
        self.lost = LostAnswers(ledger)
        self.rt = Runtime(
            settings=world.chained,
            engine=world.engine,
            ledger=ledger,
            store=JobStore(engine=world.engine),
            retry_policy=RetryPolicy(max_attempts=3, backoff_base=0.1, backoff_max=1.0),
            crash=self.crasher,
        )
        self.desk = DeadLetterDesk(
            store=self.rt.store,
            letters=DeadLetterStore(engine=world.engine),
            dispatch=ModelDispatch(self.broker),
        )
        self.provider.on_cancel = self._cancel
        self.memory = Memory()
        self.snapshot = world.database.snapshot()
        #: False from the start of a rule until the invariants held after it: teardown
        #: drains only an example that has not failed (a second error would hide the first).
        self.healthy = True

    # --- intake -------------------------------------------------------------------------

    @rule(pipeline=st.sampled_from(PIPELINES), events=_EVENTS, broker_down=st.booleans())
    @_rule_step
    def enqueue(self, pipeline: str, events: list[tuple[int, int, int]], broker_down: bool) -> None:
        """One input of events (a webhook batch, a file); the broker may be down (outbox)."""
        declared = self.pipelines[pipeline]
        # An order pruned whole is not enqueued again: retention forgets its keys, so it
        # would act again, as documented (`JobStore.prune`).
        kept = [(e, o, v) for e, o, v in events if (pipeline, f"o{o}") not in self.memory.retired]
        new_jobs = [declared.new_job(f"e{e}", order_context(o, v)) for e, o, v in kept]
        self.broker.down = broker_down
        try:
            start_jobs(self.rt.store, ModelDispatch(self.broker), declared, new_jobs)
        except (JobError, LedgerError):
            pass  # a conflict refused (issue 13, class 2): nothing of the input is enqueued
        finally:
            self.broker.down = False

    # --- deliveries ---------------------------------------------------------------------

    @precondition(lambda self: self.broker.queue)
    @rule(pick=_PICK, fast=st.booleans(), answers=_ANSWERS, reads=_READS, crash=_CRASH, lost=_LOST)
    @_rule_step
    def deliver(
        self,
        pick: int,
        fast: bool,
        answers: list[str],
        reads: list[str],
        crash: tuple[CrashPoint, str] | None,
        lost: int | None,
    ) -> None:
        self.provider.read_answers = deque(reads)
        self._deliver([self.broker.take(pick)], fast, answers, crash, lost)

    @precondition(lambda self: self.broker.queue)
    @rule(pick=_PICK, answers=_ANSWERS, lost=_LOST)
    @_rule_step
    def deliver_on_the_fast_path(self, pick: int, answers: list[str], lost: int | None) -> None:
        """A message on the fast path with no crash and every read answered: the deliveries
        that get furthest, where most of a job's records are (and their lost answers)."""
        self._deliver([self.broker.take(pick)], True, answers, None, lost)

    @precondition(lambda self: len(self.broker.queue) > 1)
    @rule(
        pick=_PICK,
        size=st.integers(2, 4),
        fast=st.booleans(),
        answers=_ANSWERS,
        reads=_READS,
        crash=_CRASH,
        lost=_LOST,
    )
    @_rule_step
    def deliver_batch(
        self,
        pick: int,
        size: int,
        fast: bool,
        answers: list[str],
        reads: list[str],
        crash: tuple[CrashPoint, str] | None,
        lost: int | None,
    ) -> None:
        """Queued messages of one step that a worker takes together (`jobs.worker.batching`)."""
        self.provider.read_answers = deque(reads)
        self._deliver(self.broker.take_batch(pick, size), fast, answers, crash, lost)

    @precondition(lambda self: self.broker.queue)
    @rule(fault=st.sampled_from(("deliver-twice", "lose")), pick=_PICK)
    @_rule_step
    def broker_fault(self, fault: str, pick: int) -> None:
        """The broker delivers a message again (Redis' visibility timeout, say), or loses one
        (a restart without persistence: the sweeper's to find)."""
        queue = self.broker.queue
        message = queue[pick % len(queue)]
        if fault == "deliver-twice":
            self.broker.requeue(message)
        else:
            queue.remove(message)

    @precondition(lambda self: any(m.header is not None for m in self.broker.queue))
    @rule(pick=_PICK)
    @_rule_step
    def forge_a_reading(self, pick: int) -> None:
        """A job's first message carries a reading of other content for its key: stale, or
        forged by whoever can publish to the broker (issue 13, class 1: a header is no
        business truth)."""
        queue = self.broker.queue
        brought = [m for m in queue if m.header is not None]
        message = brought[pick % len(brought)]
        reading = json.loads(message.header or "{}")
        reading["context"]["items"][0]["quantity"] += 5
        forged = json.dumps(reading, separators=(",", ":"))
        queue[queue.index(message)] = replace(message, header=forged)

    @rule(sweep=st.booleans(), sees_queue=st.booleans())
    @_rule_step
    def time_passes(self, sweep: bool, sees_queue: bool) -> None:
        """Every started key's lease runs out; or a sweep re-drives every unfinished job,
        seeing the queued messages or a broker that says none are queued."""
        if sweep:
            self._sweep(len(self.broker.queue) if sees_queue else 0)
        else:
            self.world.database.expire_leases()

    @rule(act=st.sampled_from(("replay", "replay-force", "resolve", "cancel", "prune")), pick=_PICK)
    @_rule_step
    def person(self, act: str, pick: int) -> None:
        """What people do: replay a dead letter (`--force` only after checking that the
        provider shows no effect under its key); resolve one by what the provider shows
        (succeeded, with the effect's result, if it applied one under the key, else retry);
        cancel a job; prune every finished job."""
        if act == "cancel" and self.snapshot.jobs:
            job_ids = list(self.snapshot.jobs)
            self._cancel(job_ids[pick % len(job_ids)])
        if act == "prune":
            # -1 s: every finished job, whatever the resolution of the database's clock.
            self.rt.store.prune(older_than=-1.0)
            self.memory.retire(self.world.database.snapshot())
        letters = self._letters()
        if not act.startswith(("replay", "resolve")) or not letters:
            return
        letter = letters[pick % len(letters)]
        effect = self.provider.effect_for(letter.key)
        if act.startswith("replay"):
            self.desk.replay(letter, by="model", force=act == "replay-force" and effect is None)
        elif effect is None:
            self.desk.retry(letter, by="model")
        else:
            self.desk.resolve(letter, by="model", result=effect.as_result())
            self.memory.settled_keys.add(effect.key or "")

    # --- checks -------------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        self.snapshot = snapshot = self.world.database.snapshot()
        self.memory.remember(snapshot)
        check_always(snapshot, self.provider.effects, self.memory)
        self.healthy = True

    def teardown(self) -> None:
        try:
            self._finish()
        finally:
            self.rt.leases.close()

    def _finish(self) -> None:
        if not self.healthy:
            return  # the example failed already: keep its error
        database = self.world.database
        self._drain()
        check_progress(database.snapshot(), self.memory)
        for _ in range(2):
            if not self._all_finished():
                database.expire_leases()
                self._drain()
        snapshot = database.snapshot()
        check_always(snapshot, self.provider.effects, self.memory)
        check_quiescent(snapshot, self.provider.effects)

    # --- how ----------------------------------------------------------------------------

    def _deliver(
        self,
        messages: list[Message],
        fast: bool,
        answers: Sequence[str],
        crash: tuple[CrashPoint, str] | None,
        lost: int | None,
    ) -> None:
        """Run messages as a worker does; a crash sends them back to the broker."""
        self.rt.settings = self.world.fast if fast else self.world.chained
        self.provider.answers = deque(answers)
        self.crasher.armed = crash
        self.lost.arm(lost)
        try:
            outcomes = self._run(messages)
        except Killed:
            for message in messages:
                self.broker.requeue(message)
                self.memory.absorbed[message.job_id] += 1
                self.memory.killed_keys.update(self.memory.job_keys.get(message.job_id, ()))
            return
        finally:
            self.provider.answers.clear()
            self.provider.read_answers.clear()
            self.crasher.armed = None
            self.lost.arm(None)
        for message, outcome in zip(messages, outcomes, strict=True):
            if outcome is Outcome.INTERRUPTED:
                # Its batch stopped with it: the keys it held wait for their leases to end.
                self.broker.requeue(message)
                self.memory.killed_keys.update(self.memory.job_keys.get(message.job_id, ()))
            if outcome in (Outcome.INTERRUPTED, Outcome.DUPLICATE):
                self.memory.absorbed[message.job_id] += 1

    def _run(self, messages: list[Message]) -> list[Outcome]:
        first = messages[0]
        pipeline = self.pipelines[first.pipeline]
        step = pipeline.step(first.step)
        readings = [message_reading(m.header, m.job_id, m.step) for m in messages]
        if len(messages) > 1:
            dispatch = ModelDispatch(self.broker)
            job_ids = [m.job_id for m in messages]
            repeats = [m.repeat for m in messages]
            return run_steps(
                self.rt, dispatch, pipeline, step, job_ids, repeats=repeats, readings=readings
            )
        dispatch = ModelDispatch(self.broker, first)
        try:
            repeat, reading = first.repeat, readings[0]
            outcome = run_step(
                self.rt, dispatch, pipeline, step, first.job_id, repeat=repeat, reading=reading
            )
        except RetryRequested:
            outcome = Outcome.RETRYING
        return [outcome]

    def _drain(self) -> None:
        """Relay and re-drive every unfinished job, then deliver every message with no fault,
        a few rounds; a job delivered `_DRAIN_TRIES` times in a round (it polls a key held
        elsewhere) waits for the next round's re-drive."""
        for _ in range(3):
            self._sweep(0)
            delivered: Counter[str] = Counter()
            while self.broker.queue:
                message = self.broker.take(0)
                if delivered[message.job_id] < _DRAIN_TRIES:
                    delivered[message.job_id] += 1
                    fast = delivered.total() % 2 == 0
                    self._deliver([message], fast, (), None, None)
            if self._all_finished():
                return

    def _all_finished(self) -> bool:
        active = self.rt.store.count_by_state()
        return active[JobState.PENDING] + active[JobState.RUNNING] == 0

    def _sweep(self, queued: int) -> None:
        """Relay the outbox, then re-drive every unfinished job. (-1 s rather than 0: SQLite's
        clock has milliseconds, and what a sweep finds must not depend on the clock.)"""
        dispatch, queue = ModelDispatch(self.broker), self.broker.queue
        sent_before = len(queue)
        relay(self.rt, dispatch, older_than=-1.0)
        sweep(self.rt, dispatch, stalled_after=-1.0, queued=lambda: queued)
        # Jobs stamped in one statement tie on their timestamps, which order the sweep's
        # sends: put its messages in an order of their own, so an example replays the same.
        queue[sent_before:] = sorted(queue[sent_before:], key=self.memory.identity)

    def _letters(self) -> list[DeadLetter]:
        return sorted(self.desk.letters.list(), key=lambda letter: letter.id)

    def _cancel(self, job_id: str) -> None:
        self.rt.store.cancel(UUID(job_id), by="model")


def _profile() -> settings:
    """The run's profile if one of ours was chosen (`--hypothesis-profile`), else CI's."""
    chosen = settings.get_current_profile_name()
    return settings.get_profile(chosen if chosen.startswith("protocol-") else "protocol-ci")


def _run_model(url: str, tmp_path: Path) -> None:
    world = World(url, tmp_path)
    ProtocolModel.world = world
    try:
        run_state_machine_as_test(ProtocolModel, settings=_profile())  # type: ignore[no-untyped-call]
    finally:
        world.engine.dispose()


def test_the_protocol_keeps_its_invariants(database_url: str, tmp_path: Path) -> None:
    """On Postgres and on SQLite (the `database_url` fixture's two parameters)."""
    _run_model(database_url, tmp_path)
