"""The engine, Celery-free: a run of a step through claim, act, record and hand-on; starting
jobs and the outbox; the sweeper; leases and crash points beside them."""
