"""A map step with real workers: a map of 160 items that split, workers killed after
an item's record (before its ack: the redelivered item counts once) and after an expanding
item's record (before its children's publish: the outbox keeps them), the join once; a failed
item dead-lettered on its own, replayed alone, the join then once. Counted at the provider."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from config.settings import CrashPoint
from ledger import JobState
from tests.map_pipeline import expected_items, failing
from tests.system.conftest import System, SystemFactory

pytestmark = pytest.mark.system

MAP_SETTINGS = {
    "ONCELERY_PIPELINES": "tests.toy_pipeline,tests.map_pipeline",
    "ONCELERY_STEP_LEASE": "3",
    "ONCELERY_SWEEP_INTERVAL": "1",
    "ONCELERY_SWEEP_STALLED_AFTER": "5",
    "ONCELERY_RELAY_AFTER": "1",
    # Killed once each, after the record of item 23 (redelivered with its message) and of
    # item 50 (which splits: its children were recorded with it, never published).
    "ONCELERY_CRASH_POINTS": ",".join(
        f"split:{CrashPoint.AFTER_RECORD}:once:/{item}/" for item in ("23", "50")
    ),
}


def enqueue(system: System, word: str, roots: int) -> str:
    line = json.dumps({"event_id": f"map-{word}", "word": word, "roots": roots})
    done = system.cli("enqueue", "--pipeline", "toy-map", "-", stdin=line + "\n")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def notifications(system: System, word: str) -> tuple[Counter[str], int]:
    """How many notifications the provider applied for each item of a map's job (by item
    id), and for its join."""
    keys = Counter(
        str(effect["idempotency_key"])
        for effect in system.effects()
        if effect["kind"] == "notification" and str(effect["order_id"]).startswith(f"map-{word}/")
    )
    prefix = f"toy-map:{word}:split/"
    items = Counter(
        {key.removeprefix(prefix): n for key, n in keys.items() if key.startswith(prefix)}
    )
    return items, keys[f"toy-map:{word}:join"]


def test_a_map_under_crashes_counts_each_item_once_and_joins_once(
    postgres_url: str, amqp_url: str, system_factory: SystemFactory
) -> None:
    # Given workers that die after recording items 23 and 50, a sweeper, and a second map
    # whose item 7 fails for good until a person fixes it
    system = system_factory(database_url=postgres_url, broker_url=amqp_url, extra_env=MAP_SETTINGS)
    system.start_beat()
    failing(system.data_dir, "beta", "7").touch()
    failing(system.data_dir, "beta", "13").touch()

    # When a map of 100 roots (160 items with its splits) and one of 20 run
    alpha = enqueue(system, "alpha", 100)
    beta = enqueue(system, "beta", 20)
    system.wait_finished("map-alpha", 1, timeout=120)

    # Then every item of alpha acted once, the join once, after the crashes
    items = expected_items(100)
    assert len(items) == 160
    visited, joined = notifications(system, "alpha")
    assert visited == dict.fromkeys(items, 1)
    assert joined == 1
    view = system.history(alpha)
    assert view["state"] == "succeeded"
    split = view["steps"][0]
    assert split["items"] == {
        "total": 160, "done": 160, "failed": 0, "waiting": 0, "pending": 0, "expanded": 20,
        "joined": True,
    }  # fmt: skip
    assert [e["kind"] for e in split["events"]].count("joined") == 1
    assert view["results"]["join"]["items"] == 160
    # The crash markers show the workers did die there, once each
    assert len(list((system.data_dir / "crash-markers").iterdir())) == 2

    # And beta waits for a person at its two failed items, its other items done
    def beta_waits(failed: int) -> Callable[[], bool]:
        def waits() -> bool:
            items = system.history(beta)["steps"][0].get("items", {})
            done = len(expected_items(20)) - failed
            return bool(items.get("failed") == failed and items.get("done") == done)

        return waits

    system.wait_for(beta_waits(2), "beta's items 7 and 13 dead-lettered, the rest done")
    assert system.history(beta)["state"] == "running"
    letters = system.cli_json("dlq", "list", "--job", beta)["dead_letters"]
    assert sorted(each["item_id"] for each in letters) == ["13", "7"]
    assert {each["job_id"] for each in letters} == {beta}
    assert notifications(system, "beta")[1] == 0

    # When a person fixes them, replays item 7 alone, then every failed item of the job
    failing(system.data_dir, "beta", "7").unlink()
    failing(system.data_dir, "beta", "13").unlink()
    [seven] = [each for each in letters if each["item_id"] == "7"]
    replayed = system.cli_json("dlq", "replay", str(seven["id"]))
    assert replayed["results"][0]["done"], replayed
    system.wait_for(beta_waits(1), "beta's item 7 done after its replay, 13 still waiting")
    assert system.history(beta)["state"] == "running"
    assert notifications(system, "beta")[1] == 0
    rest = system.cli_json("dlq", "replay", "--all", "--job", beta)["results"]
    assert [each["done"] for each in rest] == [True], rest
    system.wait_for(
        lambda: system.store.get_job(uuid.UUID(beta)).state is JobState.SUCCEEDED,
        "beta to finish after its items' replays",
    )
    # Then its join ran once, with every item
    visited, joined = notifications(system, "beta")
    assert visited == dict.fromkeys(expected_items(20), 1)
    assert joined == 1
    audit = system.cli_json("audit")
    assert audit["clean"], audit["drift"]
