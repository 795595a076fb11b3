"""A map step's items over HTTP, on Postgres and SQLite, in process: the job page's progress
bar and link, the items page (session) and `GET /jobs/{id}/steps/{step}/items` (bearer token)
in item order a page at a time, filtered by state, with the failed items' dead letters; and
bad input answered 404/422 naming what is wrong."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.engine.runtime import Runtime
from jobs.web.intake import create_app
from tests.conftest import settings_for
from tests.integration.jobs.engine.test_map_step import (
    QueueDispatch,
    World,
    build,
    drain,
    start,
    tree_ids,
)
from tests.unit.jobs.web.test_pages_auth import Client, log_in

TOKEN = "token-for-the-items"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
#: 120 roots and what they expand into: 192 items, two pages of 100 and one more.
ROOTS = 120


@pytest.fixture
def client(runtime: Runtime, database_url: str, tmp_path: Path) -> Iterator[Client]:
    settings = settings_for(
        database_url=database_url, broker_url=None, data_dir=tmp_path, API_TOKEN=TOKEN
    )
    client = Client(create_app(settings))
    yield client
    client.close()
    client.app.state.intake.runtime.close()


@pytest.fixture
def waiting_map(runtime: Runtime) -> str:
    """A map of `ROOTS` roots whose items r3 and r57 failed and wait for a person: its job."""
    world, dispatch = World(failing={"r3", "r57"}), QueueDispatch()
    pipeline = build(world)
    job_id = start(runtime, pipeline, roots=ROOTS)
    dispatch.send(pipeline.name, "search", job_id)
    drain(runtime, dispatch, pipeline, twice=False)
    return job_id


def api_pages(client: Client, job_id: str, **query: Any) -> list[dict[str, Any]]:
    """Every page of the read API's items, following `next_after`."""
    pages: list[dict[str, Any]] = []
    after = ""
    while True:
        params = {**query, "after": after} if after else query
        answer = client.get(f"/jobs/{job_id}/steps/search/items", params=params, headers=BEARER)
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        after = pages[-1]["next_after"]
        if after is None:
            return pages


def test_the_read_api_pages_through_the_items_in_item_order(
    client: Client, waiting_map: str
) -> None:
    pages = api_pages(client, waiting_map, limit=50)

    listed = [item["item_id"] for page in pages for item in page["items"]]
    assert listed == tree_ids(ROOTS)
    assert [len(page["items"]) for page in pages] == [50, 50, 50, 42]
    summary = pages[0]["items_summary"]
    assert (summary["total"], summary["failed"], summary["waiting"]) == (192, 2, 2)
    [waiting] = api_pages(client, waiting_map, state="waiting")
    assert [item["item_id"] for item in waiting["items"]] == ["r3", "r57"]
    for item in waiting["items"]:
        assert item["dead_letter_id"] is not None
        assert item["error"]["type"] == "PermanentError"
        assert (item["key_state"], item["result"]) == ("failed", None)
    done = [item for page in api_pages(client, waiting_map, state="done") for item in page["items"]]
    assert len(done) == 190
    assert {item["key_state"] for item in done} == {"succeeded"}
    assert all(item["dead_letter_id"] is None and item["error"] is None for item in done)
    assert api_pages(client, waiting_map, state="pending")[0]["items"] == []


def test_home_and_the_job_page_show_the_bar_and_the_items_page_follows_next_links(
    client: Client, waiting_map: str
) -> None:
    log_in(client, TOKEN)
    home = client.get("/")
    assert 'id="maps"' in home.text
    assert re.search(r"search: 1 running", home.text)
    assert '<td class="num">192</td>' in home.text
    job = client.get(f"/ui/jobs/{waiting_map}")
    assert job.status_code == 200
    assert 'class="progress"' in job.text
    items_link = f"/ui/jobs/{waiting_map}/steps/search/items"
    assert f'href="{items_link}"' in job.text

    seen: list[str] = []
    link: str | None = items_link
    while link is not None:
        page = client.get(link.replace("&amp;", "&"))
        assert page.status_code == 200, page.text
        seen += re.findall(r'<tr id="item-([^"]+)">', page.text)
        found = re.search(r'href="([^"]+)" id="next"', page.text)
        link = found.group(1) if found else None
    assert seen == tree_ids(ROOTS)

    waiting = client.get(items_link, params={"state": "waiting"})
    assert re.findall(r'<tr id="item-([^"]+)">', waiting.text) == ["r3", "r57"]
    assert waiting.text.count('href="/ui/dead-letters/') == 2
    assert 'id="next"' not in waiting.text


def test_bad_input_is_a_404_or_422_naming_it(client: Client, waiting_map: str) -> None:
    log_in(client, TOKEN)
    nobody = str(uuid.uuid4())
    cases = [
        (f"/jobs/{nobody}/steps/search/items", {}, 404, f"no job {nobody}"),
        ("/jobs/not-a-uuid/steps/search/items", {}, 404, "no job not-a-uuid"),
        (f"/jobs/{waiting_map}/steps/nope/items", {}, 404, "no step 'nope'"),
        (f"/jobs/{waiting_map}/steps/publish/items", {}, 404, "no map at step 'publish'"),
        (f"/jobs/{waiting_map}/steps/search/items", {"state": "lost"}, 422, "no item state"),
        (f"/jobs/{waiting_map}/steps/search/items", {"after": "x" * 1001}, 422, "after"),
    ]
    for path, params, status, message in cases:
        answer = client.get(path, params=params, headers=BEARER)
        assert (answer.status_code, answer.headers["content-type"]) == (
            status,
            "application/json",
        ), path
        assert message in answer.json()["error"]["message"]
        page = client.get(f"/ui{path}", params=params)
        assert page.status_code == status, path
        assert "text/html" in page.headers["content-type"]
        assert message.replace("'", "&#39;") in page.text
    assert (
        client.get(
            f"/jobs/{waiting_map}/steps/search/items", params={"limit": 0}, headers=BEARER
        ).status_code
        == 422
    )


def test_the_items_need_a_session_or_the_token(client: Client, waiting_map: str) -> None:
    path = f"/jobs/{waiting_map}/steps/search/items"
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
    page = client.get(f"/ui{path}")
    assert page.status_code == 303
    assert page.headers["location"].startswith("/login?next=")
