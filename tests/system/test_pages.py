"""The pages for people in a real headless Chromium (Debian's, driven by Playwright) against a
running system — `oncelery api`, workers and the sandbox on Postgres and Redis: log in, look
around, replay a dead letter by clicking, see the job finish, log out."""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from ledger import JobState
from tests.conftest import REPO_ROOT, unavailable
from tests.factories import order_event
from tests.system.conftest import System, SystemFactory, per_order
from tests.waiting import wait_for

pytestmark = pytest.mark.system

TOKEN = "pages-test-token"
#: Where each page is saved as a screenshot.
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
#: Four tries for the charge, quickly: the dead letter comes within seconds.
FEW_ATTEMPTS = {"ONCELERY_STEP_POLICIES": json.dumps({"order-placed.act": {"max_attempts": 4}})}
#: Debian's chromium, in a container: no sandbox, GPU, or talking to Google.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless (Playwright's own browsers cannot be downloaded here)."""
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        unavailable("Chromium", "no chromium executable; run scripts/services.sh")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def start_api(system: System) -> str:
    """Start `oncelery api` with a token for this system; returns its base URL."""
    return system.start_api(API_TOKEN=TOKEN, WEBHOOK_SECRET="pages-test-secret")


def orders_with_one_dead_letter(system: System, prefix: str) -> str:
    """Two orders that succeed (the charts have something to show), then one whose charge
    fails until its attempts run out; returns the dead-lettered job's id."""
    system.enqueue(
        [order_event(event_id=f"{prefix}ok{n}", order_id=f"{prefix}ok{n}") for n in (0, 1)]
    )
    system.wait_finished(prefix, 2)
    system.faults(service="payments", fault_rate=1.0)
    [job_id] = system.enqueue([order_event(event_id=f"{prefix}bad", order_id=f"{prefix}bad")])
    assert system.wait_finished(prefix, 3)[JobState.DEAD_LETTERED] == 1
    return job_id


class Camera:
    """Saves numbered full-page screenshots, `<story>-NN-<name>.png` (a story's older ones
    are removed first)."""

    def __init__(self, page: Page, story: str) -> None:
        self.page = page
        self.story = story
        self.saved: list[Path] = []
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for old in SCREENSHOTS.glob(f"{story}-*.png"):
            old.unlink()

    def shoot(self, name: str) -> None:
        path = SCREENSHOTS / f"{self.story}-{len(self.saved) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.saved.append(path)


@contextlib.contextmanager
def browsing(
    browser: Browser, base: str, story: str, capsys: pytest.CaptureFixture[str]
) -> Iterator[tuple[Page, Camera]]:
    """A fresh browser context on the API; afterwards the screenshots' paths are printed, and
    no page may have logged an error (a refused script or style would)."""
    context = browser.new_context(base_url=base, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    # A refused login answers 401, which Chromium reports as a resource that failed to load.
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and "Failed to load resource" not in m.text
            else None
        ),
    )
    camera = Camera(page, story)
    try:
        yield page, camera
    finally:
        context.close()
        with capsys.disabled():
            print("\nscreenshots:", *camera.saved, sep="\n  ")
    assert errors == []


def log_in(page: Page, camera: Camera, *, start: str = "/") -> None:
    """A page without a session goes to the login form; a wrong token is refused there; the
    right one leads back to the page."""
    page.goto(start)
    assert "/login" in page.url
    page.fill("input[name=token]", "not-the-token")
    page.click("button:has-text('Log in')")
    assert "That is not the API token." in page.inner_text("main")
    camera.shoot("login-refused")
    page.fill("input[name=token]", TOKEN)
    page.click("button:has-text('Log in')")
    page.wait_for_url(f"**{start}")


def look_around(page: Page, camera: Camera, prefix: str, job_id: str) -> None:
    """Home with its charts, the jobs list searched by order id, the job's timeline."""
    assert page.locator("svg.chart").count() == 2
    assert "Jobs completed per minute" in page.inner_text("main")
    assert page.inner_text("#open-dead-letters") == "1"
    camera.shoot("home")

    page.click("header >> text=Jobs")
    assert page.locator("#jobs tr").count() == 4  # a header and three jobs
    page.fill("input[name=order_id]", f"{prefix}bad")
    page.click("button:has-text('Search')")
    rows = page.locator("#jobs tr")
    assert rows.count() == 2
    assert "dead_lettered" in rows.nth(1).inner_text()
    camera.shoot("jobs-search")

    page.click(f"a[href='/ui/jobs/{job_id}']")
    assert page.inner_text("#job-state") == "dead_lettered"
    assert event_kinds(page, "act") == ["failed", "failed", "failed", "dead_lettered"]
    assert event_kinds(page, "gather") == ["succeeded"]
    camera.shoot("job-dead-lettered")


def event_kinds(page: Page, step: str) -> list[str]:
    """The kinds of a step's events, as its timeline lists them."""
    return page.locator(f"#step-{step} table.events td.kind").all_inner_texts()


def replay_by_clicking(page: Page, camera: Camera, system: System, job_id: str) -> None:
    """The dead letter, its replay plan, the replay, and the job finishing."""
    page.click("header >> text=Dead letters")
    page.click("#dead-letters a[href^='/ui/dead-letters/']")
    main = page.inner_text("main")
    assert "attempts_exhausted" in main
    assert "Traceback" in page.inner_text("pre")
    camera.shoot("dead-letter")

    page.click("text=Plan replay")
    plan = {
        row.get_attribute("data-step"): row.get_attribute("data-plan")
        for row in page.locator("#plan tr[data-step]").all()
    }
    assert plan == {"gather": "skip", "act": "rerun", "publish": "rerun"}
    camera.shoot("replay-plan")

    system.faults(service="payments", fault_rate=0.0)
    page.click("button:has-text('Replay')")
    assert page.inner_text("#outcome") == "Done: resumed at act."
    camera.shoot("replayed")

    page.click("text=Follow the job")

    def succeeded() -> bool:
        if page.inner_text("#job-state") == "succeeded":
            return True
        page.reload()
        return False

    wait_for(succeeded, f"the job to finish; logs in {system.log_dir}", timeout=30, interval=0.3)
    assert f"/ui/jobs/{job_id}" in page.url
    assert event_kinds(page, "act")[-2:] == ["replayed", "succeeded"]
    assert event_kinds(page, "publish") == ["succeeded"]
    camera.shoot("job-succeeded")


def test_a_person_logs_in_looks_around_and_replays_a_dead_letter(
    postgres_url: str,
    redis_url: str,
    browser: Browser,
    capsys: pytest.CaptureFixture[str],
    system_factory: SystemFactory,
) -> None:
    # Given a running system with its API, and a dead letter among finished orders
    system = system_factory(database_url=postgres_url, broker_url=redis_url, extra_env=FEW_ATTEMPTS)
    base = start_api(system)
    prefix = f"pages-{uuid.uuid4().hex[:6]}-"
    job_id = orders_with_one_dead_letter(system, prefix)

    with browsing(browser, base, "pages-replay", capsys) as (page, camera):
        # When a person logs in, looks around and replays the dead letter by clicking
        log_in(page, camera)
        look_around(page, camera, prefix, job_id)
        replay_by_clicking(page, camera, system, job_id)

        # Then logging out ends the session
        page.click("button:has-text('Log out')")
        page.wait_for_url("**/login")
        page.goto("/ui/jobs")
        assert "/login?next=" in page.url

    # And the order was charged once, by the replay
    charges = per_order(system.effects(), "charge")
    assert charges == {f"{prefix}{n}": 1 for n in ("ok0", "ok1", "bad")}


def test_a_person_resolves_an_unknown_outcome(
    postgres_url: str,
    redis_url: str,
    browser: Browser,
    capsys: pytest.CaptureFixture[str],
    system_factory: SystemFactory,
) -> None:
    # Given a notification that went out but whose reply was lost, from a provider that
    # ignores keys (a replay could notify twice)
    system = system_factory(
        database_url=postgres_url,
        broker_url=redis_url,
        sandbox_options=["--no-idempotency"],
        extra_env={"ONCELERY_PROVIDER_TIMEOUT": "1"},
    )
    system.faults(service="notifications", lost_reply_rate=1.0)
    word = f"ui{uuid.uuid4().hex[:6]}"
    job_id = start_toy_once(system, postgres_url, redis_url, word)
    system.wait_finished("once-", 1)
    base = start_api(system)

    with browsing(browser, base, "pages-resolve", capsys) as (page, camera):
        # When a person opens the dead letter, a plain replay is refused
        log_in(page, camera, start="/ui/dead-letters")
        page.click("#dead-letters a[href^='/ui/dead-letters/']")
        assert "outcome_unknown" in page.inner_text("main")
        page.click("text=Plan replay")
        assert "ignores keys" in page.inner_text("#refused")
        assert page.locator("button:has-text('Replay')").count() == 0
        camera.shoot("plan-refused")

        # And when they record that the notification did go out
        page.go_back()
        page.check("input[name=as][value=succeeded]")
        page.fill("textarea[name=result]", '{"notification_id": "checked-by-phone"}')
        page.fill("input[name=by]", "alice")
        camera.shoot("resolve-form")
        page.click("button:has-text('Resolve')")
        assert page.inner_text("#outcome") == "Done: job succeeded."

        # Then the job is done, with the person's decision in its timeline
        page.click("text=Follow the job")
        assert page.url.endswith(f"/ui/jobs/{job_id}")
        assert page.inner_text("#job-state") == "succeeded"
        assert event_kinds(page, "announce")[-1] == "resolved"
        assert "ui:alice" in page.inner_text("#step-announce")
        assert "checked-by-phone" in page.inner_text("#step-announce")
        camera.shoot("job-resolved")

    # And nothing was sent again
    assert per_order(system.effects(), "notification") == {f"toy-{word}": 1}


def start_toy_once(system: System, postgres_url: str, redis_url: str, word: str) -> str:
    """Start one `toy-once` job (its notification step is at-most-once); returns its id."""
    from jobs.engine.enqueue import start_jobs
    from jobs.pipelines import registry
    from jobs.worker import CeleryDispatch, client_app
    from tests.conftest import settings_for
    from tests.toy_pipeline import toy_once  # noqa: F401 - declares the pipeline

    settings = settings_for(
        database_url=postgres_url, broker_url=redis_url, data_dir=system.data_dir
    )
    pipeline = registry.get("toy-once")
    plan = pipeline.new_job(f"once-{word}", {"word": word})
    dispatch = CeleryDispatch(sender=client_app(settings))
    [job] = start_jobs(system.store, dispatch, pipeline, [plan])
    return str(job.job_id)
