"""The pages' login, session cookie, CSRF tokens and escaping, in process on a SQLite ledger
(no services): a page without a valid session redirects to the login page, and a form that
changes something is refused without its token."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from jobs.web import sessions
from jobs.web.intake import create_app
from ledger import JobStore
from tests.conftest import settings_for
from tests.factories import new_job
from tests.integration.ledger.test_dead_letters import dead_letter_after_two_failures

TOKEN = "token-for-the-pages"


class Client:
    """A synchronous browser-like client of the app: keeps cookies, does not follow redirects."""

    def __init__(self, app: FastAPI, base_url: str = "http://localhost") -> None:
        self.app = app
        self.runner = asyncio.Runner()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.runner.run(self.client.get(url, **kwargs))

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.runner.run(self.client.post(url, **kwargs))

    def with_cookie(self, value: str) -> httpx.Response:
        """`GET /` with this session cookie and no other."""
        self.client.cookies.clear()
        return self.get("/", headers={"Cookie": f"{sessions.COOKIE}={value}"})

    def close(self) -> None:
        self.runner.run(self.client.aclose())
        self.runner.close()


ClientFactory = Callable[..., Client]


@pytest.fixture
def client_factory(sqlite_url: str, tmp_path: Path) -> Iterator[ClientFactory]:
    """Builds clients of the app (its relay thread is not started: no lifespan)."""
    clients: list[Client] = []

    def build(
        token: str | None = TOKEN, base_url: str = "http://localhost", **extra: str
    ) -> Client:
        if token is not None:
            extra["API_TOKEN"] = token
        settings = settings_for(
            database_url=sqlite_url, broker_url=None, data_dir=tmp_path, **extra
        )
        clients.append(Client(create_app(settings), base_url))
        return clients[-1]

    yield build
    for client in clients:
        client.close()
        client.app.state.intake.runtime.close()


@pytest.fixture
def client(client_factory: ClientFactory) -> Client:
    return client_factory()


def log_in(client: Client, token: str = TOKEN) -> str:
    """Log in; returns the session's CSRF token (read from the logout form)."""
    answer = client.post("/login", data={"token": token})
    assert answer.status_code == 303, answer.text
    home = client.get("/")
    assert home.status_code == 200
    found = re.search(r'name="csrf" value="([^"]+)"', home.text)
    assert found is not None
    return found.group(1)


@pytest.mark.parametrize(
    "path", ["/", "/ui/jobs?state=pending", "/ui/dead-letters", "/ui/jobs/x", "/ui/dead-letters/1"]
)
def test_a_page_without_a_session_redirects_to_the_login_page(client: Client, path: str) -> None:
    answer = client.get(path)

    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location.startswith("/login")
    if path != "/":
        assert "next=" in location


def test_the_right_token_sets_a_signed_http_only_cookie_and_goes_back(client: Client) -> None:
    answer = client.post("/login", data={"token": TOKEN, "next": "/ui/dead-letters"})

    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/dead-letters"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{sessions.COOKIE}=")
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie
    assert f"Max-Age={sessions.SESSION_MAX_AGE}" in cookie
    assert TOKEN not in cookie
    assert client.get("/ui/dead-letters").status_code == 200


@pytest.mark.parametrize(
    ("base_url", "setting", "secure"),
    [
        ("http://oncelery.example", None, True),  # behind a TLS proxy: the scheme says http
        ("https://oncelery.example", None, True),
        ("http://localhost:8000", None, False),
        ("http://127.0.0.1:8000", None, False),
        ("http://[::1]:8000", None, False),
        ("http://localhost:8000", "true", True),
        ("http://oncelery.example", "false", False),
    ],
)
def test_the_session_cookie_is_secure_except_on_loopback_unless_configured(
    client_factory: ClientFactory, base_url: str, setting: str | None, secure: bool
) -> None:
    extra = {} if setting is None else {"session_cookie_secure": setting}
    client = client_factory(base_url=base_url, **extra)

    answer = client.post("/login", data={"token": TOKEN})

    assert answer.status_code == 303
    assert ("; secure" in answer.headers["set-cookie"].lower()) is secure


def test_a_wrong_token_shows_the_form_again_with_401(client: Client) -> None:
    for token in ("nope", "", TOKEN + "x"):
        answer = client.post("/login", data={"token": token})
        assert answer.status_code == 401
        assert "That is not the API token." in answer.text
        assert "set-cookie" not in answer.headers
    assert client.get("/").status_code == 303


def test_without_an_api_token_nobody_can_log_in(client_factory: ClientFactory) -> None:
    client = client_factory(token=None)

    form = client.get("/login")
    assert form.status_code == 200
    assert "API_TOKEN is not configured" in form.text
    assert 'name="token"' not in form.text
    assert client.post("/login", data={"token": ""}).status_code == 401
    assert client.post("/login", data={"token": "anything"}).status_code == 401


@pytest.mark.parametrize("after", ["//evil.example/x", "https://evil.example", "/\\evil", "x"])
def test_login_only_goes_on_to_a_path_of_this_site(client: Client, after: str) -> None:
    answer = client.post("/login", data={"token": TOKEN, "next": after})
    assert answer.headers["location"] == "/"


def test_a_tampered_or_foreign_cookie_is_no_session(client: Client) -> None:
    log_in(client)
    genuine = client.client.cookies[sessions.COOKIE]
    assert client.with_cookie(genuine).status_code == 200

    assert client.with_cookie(genuine[:-2] + "xx").status_code == 303
    assert client.with_cookie("eyJzaWQiOiJ4In0.AAAAAA.forged").status_code == 303
    foreign = URLSafeTimedSerializer(b"another key", sessions.SALT).dumps({"sid": "x"})
    assert client.with_cookie(foreign).status_code == 303


def test_rotating_the_token_ends_sessions(client_factory: ClientFactory) -> None:
    old = client_factory(token="old-token-0123456789")
    log_in(old, "old-token-0123456789")
    cookie = old.client.cookies[sessions.COOKIE]

    rotated = client_factory(token="new-token-0123456789")
    assert rotated.with_cookie(cookie).status_code == 303


class SignedLongAgo(TimestampSigner):
    """Signs as if it were just past a session's lifetime ago."""

    def get_timestamp(self) -> int:
        return int(time.time()) - sessions.SESSION_MAX_AGE - 5


def test_a_session_expires(client: Client) -> None:
    key = sessions.session_key(TOKEN.encode())
    fresh = URLSafeTimedSerializer(key, sessions.SALT).dumps({"sid": "s"})
    stale = URLSafeTimedSerializer(key, sessions.SALT, signer=SignedLongAgo).dumps({"sid": "s"})

    assert client.with_cookie(fresh).status_code == 200
    assert client.with_cookie(stale).status_code == 303


def test_logout_needs_the_csrf_token_and_ends_the_session(client: Client) -> None:
    csrf = log_in(client)

    assert client.post("/logout").status_code == 403
    assert client.post("/logout", data={"csrf": "wrong"}).status_code == 403
    assert client.get("/").status_code == 200

    answer = client.post("/logout", data={"csrf": csrf})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login"
    assert client.get("/").status_code == 303


def test_replay_and_resolve_are_refused_without_the_csrf_token(client: Client) -> None:
    log_in(client)
    for action in ("replay", "resolve"):
        answer = client.post(f"/ui/dead-letters/1/{action}", data={"as": "retry"})
        assert answer.status_code == 403
        assert "text/html" in answer.headers["content-type"]


def test_another_session_s_csrf_token_is_refused(client_factory: ClientFactory) -> None:
    alice, mallory = client_factory(), client_factory()
    log_in(alice)
    stolen = log_in(mallory)

    assert alice.post("/logout", data={"csrf": stolen}).status_code == 403


def test_pages_forbid_scripts_and_frames(client: Client) -> None:
    log_in(client)
    answer = client.get("/")

    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "<script" not in answer.text
    assert answer.text.count("<svg") == 2


def test_what_a_job_carries_is_escaped(client: Client) -> None:
    evil = '<script>alert("x")</script>'
    store: JobStore = client.app.state.intake.runtime.store
    [(job_id, _)] = store.create_jobs([new_job(context={"order_id": evil})])
    log_in(client)

    found = client.get("/ui/jobs", params={"order_id": evil})
    timeline = client.get(f"/ui/jobs/{job_id}")

    for page in (found, timeline):
        assert page.status_code == 200
        assert "<script>" not in page.text
        assert "&lt;script&gt;" in page.text
    assert f"/ui/jobs/{job_id}" in found.text


def test_unknown_things_are_404_pages(client: Client) -> None:
    log_in(client)
    for path in (f"/ui/jobs/{uuid.uuid4()}", "/ui/jobs/not-a-uuid", "/ui/dead-letters/999"):
        answer = client.get(path)
        assert answer.status_code == 404
        assert "text/html" in answer.headers["content-type"]
    assert client.get("/ui/jobs", params={"state": "bogus"}).status_code == 400
    assert client.get("/ui/dead-letters", params={"state": "bogus"}).status_code == 400


def test_a_result_nested_past_the_parser_s_depth_is_a_422_page(client: Client) -> None:
    runtime = client.app.state.intake.runtime
    job_id = dead_letter_after_two_failures(runtime.store, runtime.ledger, unknown=True)
    [letter] = client.app.state.intake.letters.list(job_id=job_id)
    csrf = log_in(client)

    answer = client.post(
        f"/ui/dead-letters/{letter.id}/resolve",
        data={"csrf": csrf, "as": "succeeded", "result": "[" * 100_000},
    )

    assert answer.status_code == 422
    assert "not JSON" in answer.text
