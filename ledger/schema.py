"""Every table of the ledger, declared once on one `MetaData` with named constraints.

Alembic migrations are generated from this module and reviewed by hand.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from ledger.types import DeadLetterState, ItemState, JobState, StepState, TimerKind, TimerState

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: JSON on SQLite, JSONB on Postgres (compact, and `||` merges objects).
JSONDocument = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: 64-bit ids on Postgres; SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def _one_of(
    column: str,
    values: type[JobState]
    | type[StepState]
    | type[DeadLetterState]
    | type[ItemState]
    | type[TimerKind]
    | type[TimerState],
) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column("pipeline", sa.String(100), nullable=False),
    sa.Column("event_id", sa.String(200), nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("context", JSONDocument, nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("step_keys", JSONDocument, nullable=False),
    sa.Column("results", JSONDocument, nullable=False),
    sa.Column("current_step", sa.String(100), nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp, nullable=True),
    #: When a worker first claimed a step (schedule-to-start latency starts at `created_at`).
    sa.Column("started_at", Timestamp, nullable=True),
    #: When the first step was handed to the broker: NULL is the outbox, which the relay
    #: sends (a job accepted while the broker was down).
    sa.Column("dispatched_at", Timestamp, nullable=True),
    #: Someone waits for the job's end (`jobs.wait`): on Postgres a trigger announces it on
    #: `ledger.notices.JOB_ENDED_CHANNEL` (migration 0005).
    sa.Column("awaited", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.UniqueConstraint("pipeline", "event_id"),
    sa.CheckConstraint(_one_of("state", JobState), name="state"),
)
# The sweeper and `status` look for unfinished jobs by age; finished ones are the bulk.
sa.Index("ix_jobs_state_updated_at", jobs.c.state, jobs.c.updated_at)
# The relay looks for the few jobs never handed to the broker.
sa.Index(
    "ix_jobs_undispatched",
    jobs.c.created_at,
    postgresql_where=jobs.c.dispatched_at.is_(None),
    sqlite_where=jobs.c.dispatched_at.is_(None),
)
# The home page's chart and `status` read the last hour of finished jobs.
sa.Index("ix_jobs_finished_at", jobs.c.finished_at)
# `ix_jobs_parent`, on the `parent` member of a job's context (a decorated task's call names the
# call that handed on to it), is an expression each dialect writes its own way: it is declared
# in migration 0006 only, beside the query it serves (`queries.take_unfollowed_jobs`).

ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("step", sa.String(100), nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("owner", sa.Uuid(), nullable=True),
    sa.Column("locked_until", Timestamp, nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("result", JSONDocument, nullable=True),
    sa.Column("error", JSONDocument, nullable=True),
    sa.Column("started_at", Timestamp, nullable=True),
    sa.Column("finished_at", Timestamp, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    #: When the current run of failures began; copied onto the dead letter.
    sa.Column("first_failed_at", Timestamp, nullable=True),
    sa.CheckConstraint(_one_of("state", StepState), name="state"),
)
sa.Index("ix_ledger_entries_job_id", ledger_entries.c.job_id)
# The sweeper finds keys started under a lease that ran out among the started ones alone.
_STARTED = sa.text("state = 'started'")
sa.Index(
    "ix_ledger_entries_started",
    ledger_entries.c.locked_until,
    postgresql_where=_STARTED,
    sqlite_where=_STARTED,
)

step_events = sa.Table(
    "step_events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("step", sa.String(100), nullable=False),
    sa.Column("key", sa.String(300), nullable=True),
    sa.Column("attempt", sa.Integer(), nullable=True),
    sa.Column("kind", sa.String(30), nullable=False),
    sa.Column("at", Timestamp, nullable=False),
    sa.Column("duration_ms", sa.Float(), nullable=True),
    sa.Column("detail", JSONDocument, nullable=True),
)
sa.Index("ix_step_events_job_id_id", step_events.c.job_id, step_events.c.id)
# Metrics and `status` read recent events by kind.
sa.Index("ix_step_events_kind_at", step_events.c.kind, step_events.c.at)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("pipeline", sa.String(100), nullable=False),
    sa.Column("step", sa.String(100), nullable=False),
    sa.Column("key", sa.String(300), nullable=True),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("reason", sa.String(40), nullable=False),
    sa.Column("error_type", sa.String(200), nullable=False),
    sa.Column("message", sa.Text(), nullable=False),
    sa.Column("traceback", sa.Text(), nullable=True),
    sa.Column("input", JSONDocument, nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("first_failed_at", Timestamp, nullable=False),
    sa.Column("last_failed_at", Timestamp, nullable=False),
    sa.Column("closed_at", Timestamp, nullable=True),
    sa.Column("closed_by", sa.String(200), nullable=True),
    sa.CheckConstraint(_one_of("state", DeadLetterState), name="state"),
)
sa.Index(
    "ix_dead_letters_state_last_failed_at", dead_letters.c.state, dead_letters.c.last_failed_at
)
sa.Index("ix_dead_letters_job_id", dead_letters.c.job_id)

#: Step messages that could not be a delivery (arguments that are not one job id, a job id
#: that is not a UUID, a UUID of no job), counted per task and reason: one row each, so a
#: flood of them cannot grow the table.
malformed_messages = sa.Table(
    "malformed_messages",
    metadata,
    sa.Column("task", sa.String(200), primary_key=True),
    sa.Column("reason", sa.String(40), primary_key=True),
    sa.Column("count", sa.BigInteger(), nullable=False),
    sa.Column("last_at", Timestamp, nullable=False),
    sa.Column("last_detail", sa.Text(), nullable=False),
)

#: A map step's fan-in, one row per job and map step: the counters its items' first
#: transitions move (`ledger.maps`). `remaining` counts the items not settled yet; the
#: transaction that brings it to 0 sets `joined_at` and hands the job on to the join.
maps = sa.Table(
    "maps",
    metadata,
    sa.Column(
        "job_id",
        sa.Uuid(),
        sa.ForeignKey("jobs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("step", sa.String(100), primary_key=True),
    #: The step's `MapPolicy` when it fanned out (what settles a failed item is passed with
    #: each record; this is for people).
    sa.Column("policy", sa.String(20), nullable=False),
    sa.Column("total", sa.BigInteger(), nullable=False),
    sa.Column("done", sa.BigInteger(), nullable=False),
    #: Items that failed for good, settled or `waiting` for a person (of which `waiting`).
    sa.Column("failed", sa.BigInteger(), nullable=False),
    sa.Column("waiting", sa.BigInteger(), nullable=False),
    sa.Column("expanded", sa.BigInteger(), nullable=False),
    sa.Column("remaining", sa.BigInteger(), nullable=False),
    sa.Column("joined_at", Timestamp, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
)

#: Byte order on Postgres, whatever the database's collation: item paths sort as a tree.
_Path = sa.String(1000).with_variant(sa.String(1000, collation="C"), "postgresql")

#: A map step's items: each a unit of work whose key (in `ledger_entries`) is claimed and
#: recorded like a step's. The rows are also the items' outbox (`dispatched_at` NULL).
map_items = sa.Table(
    "map_items",
    metadata,
    sa.Column(
        "job_id",
        sa.Uuid(),
        sa.ForeignKey("jobs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("step", sa.String(100), primary_key=True),
    #: The item's identity within its map, given by the step's `item_id` function.
    sa.Column("item_id", sa.String(300), primary_key=True),
    #: Its place in item order: its root's index, then its index in each expansion.
    sa.Column("path", _Path, nullable=False),
    sa.Column("key", sa.String(300), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("item", JSONDocument, nullable=False),
    sa.Column("parent", sa.String(300), nullable=True),
    sa.Column("state", sa.String(20), nullable=False),
    #: How many items its act expanded into (that were new to the map).
    sa.Column("children", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("dispatched_at", Timestamp, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.CheckConstraint(_one_of("state", ItemState), name="state"),
)
# The join reads a map's items in item order, page after page.
sa.Index("ix_map_items_job_id_step_path", map_items.c.job_id, map_items.c.step, map_items.c.path)
# A dead letter names its item by key; history leaves items' entries out by key.
sa.Index("ix_map_items_key", map_items.c.key)
# The sweeper looks for pending items by age.
sa.Index("ix_map_items_state_updated_at", map_items.c.state, map_items.c.updated_at)
# ... and for those left in the outbox by age, reading no other (migration 0008).
_OUTBOX = sa.text("state = 'pending' AND dispatched_at IS NULL")
sa.Index(
    "ix_map_items_outbox",
    map_items.c.updated_at,
    postgresql_where=_OUTBOX,
    sqlite_where=_OUTBOX,
)

#: Durable timers (`ledger.timers`): a job's wait is a row with a due time, never a broker
#: message. Written in the transaction that moves the job to its waiting step; fired once by
#: the timer loop, whose compare-and-set `pending` → `fired` moves the job on in the same
#: transaction. A fired row with `dispatched_at` NULL is the outbox of the next step's publish.
timers = sa.Table(
    "timers",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    #: The step that waits.
    sa.Column("step", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    #: The map item that waits ("" for the step itself): a limit's wait is an item's.
    sa.Column("item_id", sa.String(300), nullable=False, server_default=""),
    #: The limit's key a `limit` timer waits for (`customer:42`).
    sa.Column("limit_key", sa.String(300), nullable=True),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("due_at", Timestamp, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("fired_at", Timestamp, nullable=True),
    sa.Column("dispatched_at", Timestamp, nullable=True),
    #: A wait for a signal (`signal_timeout`): the signal's name and key it takes
    #: (`ledger.signals`); NULL for other kinds.
    sa.Column("signal", sa.String(100), nullable=True),
    sa.Column("signal_key", sa.String(300), nullable=True),
    #: One wait of a kind per job and step (and map item): a record repeated after an
    #: ambiguous commit cannot set a second timer.
    sa.UniqueConstraint("job_id", "step", "kind", "item_id"),
    sa.CheckConstraint(_one_of("kind", TimerKind), name="kind"),
    sa.CheckConstraint(_one_of("state", TimerState), name="state"),
)
# The timer loop takes the earliest due pending timers: a partial index, so a million
# pending timers cost what the due ones do, and fired ones none.
sa.Index(
    "ix_timers_due_at_pending",
    timers.c.due_at,
    postgresql_where=timers.c.state == str(TimerState.PENDING),
    sqlite_where=timers.c.state == str(TimerState.PENDING),
)
# `status` reads the lateness of the timers fired lately.
sa.Index(
    "ix_timers_fired_at",
    timers.c.fired_at,
    postgresql_where=timers.c.fired_at.is_not(None),
    sqlite_where=timers.c.fired_at.is_not(None),
)
# The sweeper resends the few fired timers whose publish was lost.
sa.Index(
    "ix_timers_fired_at_unsent",
    timers.c.fired_at,
    postgresql_where=sa.and_(
        timers.c.state == str(TimerState.FIRED), timers.c.dispatched_at.is_(None)
    ),
    sqlite_where=sa.and_(timers.c.state == str(TimerState.FIRED), timers.c.dispatched_at.is_(None)),
)
# `status` counts a limit key's waits, pending and set lately, each read no further than a
# cap (migration 0011).
_LIMIT = timers.c.kind == str(TimerKind.LIMIT)
_LIMIT_PENDING = sa.and_(_LIMIT, timers.c.state == str(TimerState.PENDING))
sa.Index(
    "ix_timers_limit_key_pending",
    timers.c.limit_key,
    postgresql_where=_LIMIT_PENDING,
    sqlite_where=_LIMIT_PENDING,
)
sa.Index(
    "ix_timers_limit_key_created_at",
    timers.c.limit_key,
    timers.c.created_at,
    postgresql_where=_LIMIT,
    sqlite_where=_LIMIT,
)
# A signal finds the jobs waiting for its name and key, oldest wait first (migration 0010).
_WAITING = sa.and_(timers.c.state == str(TimerState.PENDING), timers.c.signal.is_not(None))
sa.Index(
    "ix_timers_signal_wait",
    timers.c.signal,
    timers.c.signal_key,
    timers.c.id,
    postgresql_where=_WAITING,
    sqlite_where=_WAITING,
)

#: Signals (`ledger.signals`): named messages for the jobs that wait for them by key, one row
#: per signal id (a duplicate id changes nothing). A signal no wait has taken yet is kept
#: (`consumed_at` NULL) for the first wait of its name and key; the one that took it names its
#: job and step, and until the job's next step is published the row is that publish's outbox
#: (`dispatched_at` NULL).
signals = sa.Table(
    "signals",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("key", sa.String(300), nullable=False),
    sa.Column("signal_id", sa.String(200), nullable=False),
    sa.Column("data", JSONDocument, nullable=True),
    #: Of the key and data: the same id with other content is a conflict, not a duplicate.
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("received_at", Timestamp, nullable=False),
    #: The wait that took it (a pruned job leaves the signal taken, its job NULL).
    sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
    sa.Column("step", sa.String(100), nullable=True),
    sa.Column("consumed_at", Timestamp, nullable=True),
    sa.Column("dispatched_at", Timestamp, nullable=True),
    sa.UniqueConstraint("name", "signal_id"),
)
# A wait takes the oldest kept signal of its name and key.
sa.Index(
    "ix_signals_kept",
    signals.c.name,
    signals.c.key,
    signals.c.id,
    postgresql_where=signals.c.consumed_at.is_(None),
    sqlite_where=signals.c.consumed_at.is_(None),
)
sa.Index("ix_signals_job_id", signals.c.job_id)
# The sweeper resends the few next steps whose publish after a signal was lost.
_UNSENT_SIGNALS = sa.and_(signals.c.consumed_at.is_not(None), signals.c.dispatched_at.is_(None))
sa.Index(
    "ix_signals_unsent",
    signals.c.consumed_at,
    postgresql_where=_UNSENT_SIGNALS,
    sqlite_where=_UNSENT_SIGNALS,
)

#: A limit's key (`ledger.limits`): a rate limit's theoretical arrival time (GCRA, in seconds
#: since the epoch on the database's clock) and the time its last waiter wakes; how many
#: tokens it granted (in all, and in the last second) and how many runs waited, for people.
limit_keys = sa.Table(
    "limit_keys",
    metadata,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("tat", sa.Float(), nullable=True),
    sa.Column("wake_at", sa.Float(), nullable=True),
    sa.Column("granted", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("throttled", sa.BigInteger(), nullable=False, server_default="0"),
    #: Tokens granted in the second from `window_at` (epoch seconds): in use, for people.
    sa.Column("window_at", sa.Float(), nullable=True),
    sa.Column("window_granted", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("updated_at", Timestamp, nullable=False),
)

#: A concurrency limit's slots, `limit` per key: each held by a claim's owner (`holder`)
#: while that owner holds `entry_key` started under a live lease — so the record frees it,
#: and the lease (renewed with the key's) bounds it — or until `locked_until`, the lease the
#: claim began with.
limit_slots = sa.Table(
    "limit_slots",
    metadata,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("slot", sa.Integer(), primary_key=True),
    sa.Column("holder", sa.Uuid(), nullable=False),
    sa.Column("entry_key", sa.String(300), nullable=False),
    sa.Column("locked_until", Timestamp, nullable=False),
    sa.Column("taken_at", Timestamp, nullable=False),
)
# `status` reads the slots leased lately (the rest are long free).
sa.Index("ix_limit_slots_locked_until", limit_slots.c.locked_until)
