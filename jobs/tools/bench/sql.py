"""Every statement the bench runs itself (the ledger's stay in `ledger/queries`): its database,
pg_stat_statements' counts, the seeded history. Plain SQL on purpose: bench only, Postgres only,
and some (CREATE DATABASE, TRUNCATE, VACUUM, set-based seeding) have no Core form."""

from __future__ import annotations

import sqlalchemy as sa

#: Transaction control, which pg_stat_statements counts as statements of their own.
# A Postgres regular expression: `\y` is its word boundary (`\b` would be a backspace).
_TRANSACTION_CONTROL = r"^\s*(BEGIN|COMMIT|ROLLBACK|START TRANSACTION|SAVEPOINT|RELEASE|END)\y"


def database_exists(name: str) -> sa.TextClause:
    """One row if a database called `name` exists."""
    return sa.text("SELECT 1 FROM pg_database WHERE datname = :name").bindparams(name=name)


def create_database(quoted_name: str) -> sa.TextClause:
    """Create a database (its name already quoted as an identifier)."""
    return sa.text(f"CREATE DATABASE {quoted_name}")


def drop_database(quoted_name: str) -> sa.TextClause:
    """Drop a database and end its sessions (its name already quoted as an identifier)."""
    return sa.text(f"DROP DATABASE IF EXISTS {quoted_name} WITH (FORCE)")


def empty_ledger() -> sa.TextClause:
    """Empty every ledger table (the bench database only)."""
    return sa.text(
        "TRUNCATE jobs, ledger_entries, step_events, dead_letters RESTART IDENTITY CASCADE"
    )


def vacuum_analyze() -> sa.TextClause:
    """Vacuum and analyze the ledger tables (autocommit only), as autovacuum would have."""
    return sa.text("VACUUM (ANALYZE) jobs, ledger_entries, step_events, dead_letters")


def statement_calls(database: str) -> sa.TextClause:
    """Statements run so far in a database, transaction control (BEGIN, COMMIT…) left out."""
    return sa.text(
        "SELECT coalesce(sum(calls) FILTER (WHERE query !~* :control), 0) AS statements "
        "FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = :name)"
    ).bindparams(name=database, control=_TRANSACTION_CONTROL)


#: The channel on which the bench database announces a latency probe's job as it ends.
PROBE_CHANNEL = "oncelery_bench_probe"


def announce_probes() -> list[sa.TextClause]:
    """A trigger announcing each latency probe's job (its event id holds `-probe`) on
    `PROBE_CHANNEL` when it ends, with `<job id> <state>` as payload: the probe waits for it
    instead of polling, which would take a core and a Postgres backend from the workers
    (the bench database only; other jobs' updates only evaluate the condition)."""
    return [
        sa.text(
            "CREATE OR REPLACE FUNCTION oncelery_bench_announce_probe() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN "
            f"PERFORM pg_notify('{PROBE_CHANNEL}', NEW.id::text || ' ' || NEW.state); "
            "RETURN NULL; END $$"
        ),
        sa.text("DROP TRIGGER IF EXISTS oncelery_bench_probe_ended ON jobs"),
        sa.text(
            "CREATE TRIGGER oncelery_bench_probe_ended AFTER UPDATE OF state ON jobs "
            "FOR EACH ROW WHEN (NEW.state IN ('succeeded', 'dead_lettered', 'cancelled') "
            "AND position('-probe' in NEW.event_id) > 0) "
            "EXECUTE FUNCTION oncelery_bench_announce_probe()"
        ),
    ]


def server_version() -> sa.TextClause:
    """The server's version, e.g. `15.18`."""
    return sa.text("SHOW server_version")


#: Seeded finished jobs: succeeded, created over the past four weeks, each with three succeeded
#: ledger entries and three `succeeded` history events; one in a thousand also left a dead
#: letter on the way (one in ten of those still open). A colon before a name is escaped, or
#: `text()` would read a parameter there.
_SEED_FINISHED = """
WITH seeded AS (
    INSERT INTO jobs (id, pipeline, event_id, state, context, fingerprint, step_keys, results,
                      current_step, created_at, updated_at, finished_at, started_at, dispatched_at)
    SELECT gen_random_uuid(), 'order-placed', 'seed-' || g, 'succeeded',
           jsonb_build_object('order_id', 'seed-' || g, 'customer_id', 'cust-' || g % 5000,
                              'currency', 'EUR',
                              'items', jsonb_build_array(jsonb_build_object(
                                  'sku', 'SKU-' || g % 40, 'quantity', 1 + g % 3))),
           md5(g::text) || md5((-g)::text),
           jsonb_build_object('gather', 'order:seed-' || g || '\\:gather',
                              'act', 'order:seed-' || g || '\\:charge',
                              'publish', 'order:seed-' || g || '\\:notify'),
           jsonb_build_object('gather', jsonb_build_object('amount', 100 + g % 9900,
                                                           'currency', 'EUR'),
                              'act', jsonb_build_object('charge_id', 'ch_' || md5(g::text)),
                              'publish', jsonb_build_object('notification_id',
                                                            'nt_' || md5(g::text))),
           NULL, t.created, t.created + interval '40 ms', t.created + interval '40 ms',
           t.created + interval '2 ms', t.created
    FROM (SELECT g, now() - random() * interval '28 days' AS created
          FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g) AS t
    RETURNING id, event_id, fingerprint, created_at
), steps AS (
    SELECT s.id, s.fingerprint, s.created_at, step.name, step.n,
           'order:' || s.event_id || ':' || step.suffix AS key
    FROM seeded AS s
    CROSS JOIN (VALUES ('gather', 0, 'gather'), ('act', 1, 'charge'), ('publish', 2, 'notify'))
        AS step(name, n, suffix)
), entries AS (
    INSERT INTO ledger_entries (key, job_id, step, state, fingerprint, owner, locked_until,
                                attempts, result, error, started_at, finished_at, created_at,
                                updated_at, first_failed_at)
    SELECT key, id, name, 'succeeded', fingerprint, gen_random_uuid(), NULL, 1,
           jsonb_build_object('ok', true, 'n', n), NULL,
           created_at + n * interval '12 ms', created_at + (n + 1) * interval '12 ms',
           created_at + n * interval '12 ms', created_at + (n + 1) * interval '12 ms', NULL
    FROM steps
), letters AS (
    INSERT INTO dead_letters (job_id, pipeline, step, key, state, reason, error_type, message,
                              traceback, input, attempts, first_failed_at, last_failed_at,
                              closed_at, closed_by)
    SELECT id, 'order-placed', name, key,
           CASE WHEN ('x' || substr(md5(key), 1, 4))::bit(16)::int % 10 = 0
                THEN 'open' ELSE 'replayed' END,
           'attempts_exhausted', 'TransientError', 'seeded: provider answered 503', NULL,
           '{}'::jsonb, 8, created_at, created_at + interval '1 minute',
           created_at + interval '1 hour', 'bench'
    FROM steps
    WHERE name = 'act' AND ('x' || substr(md5(key), 5, 4))::bit(16)::int % 1000 = 0
)
INSERT INTO step_events (job_id, step, key, attempt, kind, at, duration_ms, detail)
SELECT id, name, key, 1, 'succeeded', created_at + (n + 1) * interval '12 ms',
       2 + random() * 20, NULL
FROM steps
"""


def seed_finished_jobs(first: int, last: int) -> sa.TextClause:
    """Insert the finished jobs numbered `first`..`last`, their entries, events and the odd
    dead letter, in one set-based statement."""
    return sa.text(_SEED_FINISHED).bindparams(first=first, last=last)


def seed_unfinished_jobs(count: int) -> sa.TextClause:
    """Insert `count` running jobs stalled at act for two hours, and `count` pending jobs
    never handed to the broker (the outbox), for the sweeper's queries to find."""
    return sa.text(
        "INSERT INTO jobs (id, pipeline, event_id, state, context, fingerprint, step_keys, "
        "results, current_step, created_at, updated_at, finished_at, started_at, dispatched_at) "
        "SELECT gen_random_uuid(), 'order-placed', kind || '-' || g, kind, "
        "jsonb_build_object('order_id', kind || '-' || g), md5(g::text) || md5(kind), "
        "'{}'::jsonb, '{}'::jsonb, CASE kind WHEN 'running' THEN 'act' ELSE 'gather' END, "
        "now() - interval '2 hours', now() - interval '2 hours', NULL, NULL, "
        "CASE kind WHEN 'running' THEN now() - interval '2 hours' END "
        "FROM generate_series(1, CAST(:count AS int)) AS g "
        "CROSS JOIN (VALUES ('running'), ('pending')) AS k(kind)"
    ).bindparams(count=count)


def stall_again() -> sa.TextClause:
    """Make the seeded unfinished jobs stalled again (the sweeper marked them touched)."""
    return sa.text(
        "UPDATE jobs SET updated_at = now() - interval '2 hours' "
        "WHERE state IN ('running', 'pending') "
        "AND (event_id LIKE 'running-%' OR event_id LIKE 'pending-%')"
    )


def undispatch_again() -> sa.TextClause:
    """Put the seeded pending jobs back in the outbox (the relay marked them dispatched)."""
    return sa.text(
        "UPDATE jobs SET dispatched_at = NULL WHERE state = 'pending' AND event_id LIKE 'pending-%'"
    )


def explain(statement: str) -> str:
    """`statement` (as the driver receives it) under EXPLAIN (ANALYZE, BUFFERS)."""
    return f"EXPLAIN (ANALYZE, BUFFERS) {statement}"


def count_undispatched() -> sa.TextClause:
    """How many jobs wait in the outbox (their first step not yet handed to the broker)."""
    return sa.text("SELECT count(*) FROM jobs WHERE dispatched_at IS NULL")
