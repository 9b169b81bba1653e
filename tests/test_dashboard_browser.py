"""The dashboard in a real browser: Debian's chromium, headless, driven by Selenium
through Debian's chromedriver (given by path, so Selenium Manager downloads nothing).

One browser for the module; the app runs in the test's event loop on a ManualClock and
the Selenium calls run in a thread, so the test can drive heartbeats and the clock while
the page listens to the event stream.

Without chromium the tests skip, except under CI (CI=true), where they fail: .ci/run
installs it in the background and names a file in DASHBOARD_BROWSER_READY that holds
the install's exit status once it is over; the tests wait for it.

Screenshots go to $DASHBOARD_ARTIFACTS (default tests/artifacts/, ignored by git);
with DASHBOARD_DOC_IMAGES=1 the overview and rollout ones are also written to
docs/images/ for docs/dashboard.md.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from tests.conftest import Api
from tests.test_rollouts import NEW, on_channel, start

CHROMIUM = Path(os.environ.get("DASHBOARD_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("DASHBOARD_CHROMEDRIVER", "/usr/bin/chromedriver"))
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("DASHBOARD_ARTIFACTS", ROOT / "tests" / "artifacts"))
DOC_IMAGES = ROOT / "docs" / "images"
DOC_SHOTS = ("dashboard-overview", "dashboard-rollout")  # the two docs/dashboard.md shows
ORGS = [f"org-{n:02d}" for n in range(10)]
WAIT = 30.0  # seconds for anything the page should show; a shared machine can be slow
INSTALL_WAIT = 600.0


def _browser_ready() -> str | None:
    """Why the browser cannot be used, or None when it can."""
    ready = os.environ.get("DASHBOARD_BROWSER_READY")
    if ready:
        deadline = time.monotonic() + INSTALL_WAIT
        while not Path(ready).exists() and time.monotonic() < deadline:
            time.sleep(1)
        if not Path(ready).exists():
            return f"the chromium install did not finish within {INSTALL_WAIT:.0f} s"
        status = Path(ready).read_text().strip()
        if status != "0":
            log = Path(ready).with_name("chromium-install.log")
            return f"the chromium install failed (exit status {status}; see {log})"
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    problem = _browser_ready()
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser tests cannot run in CI: {problem}")
        pytest.skip(problem)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="dashboard-chromium-")
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,1500",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(stages_stable="10%:1h,50%:1h,100%", min_session_count=20)


async def run(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


async def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll ``check`` (run in a thread) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await run(check)
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def text_of(driver: Any, selector: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return " ".join(" ".join(e.text.split()) for e in found)


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(target))
    if os.environ.get("DASHBOARD_DOC_IMAGES") == "1" and name in DOC_SHOTS:
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(target, DOC_IMAGES / f"{name}.png")
    return target


async def sign_in(driver: Any, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    await run(lambda: driver.delete_all_cookies())
    await run(lambda: driver.get(base + "/"))
    await wait_for("the sign-in page", lambda: "/dashboard/login" in driver.current_url)
    field = await run(lambda: driver.find_element(By.ID, "token"))
    await run(lambda: field.send_keys(token))
    await run(lambda: driver.find_element(By.CSS_SELECTOR, "form.login button").click())
    await wait_for("the overview", lambda: text_of(driver, "h1") == "Overview")


async def test_a_rollout_advances_and_rolls_back_live(api: Api, driver: Any):
    from selenium.webdriver.common.by import By

    base = str(api.client.make_url("")).rstrip("/")
    admin, fleet = await on_channel(api, ORGS)
    rollout_id = (await start(api, admin))["rolloutId"]
    await fleet.everyone(ORGS)
    await sign_in(driver, base, await api.token("viewer", name="watcher"))
    await wait_for("the stream", lambda: text_of(driver, "#live-status").startswith("Live"))
    # Marks this document: if the page reloaded, the mark would be gone.
    await run(lambda: driver.execute_script("window.__sameDocument = true"))
    assert "Stage 1 of 3, 10%" in await run(lambda: text_of(driver, "#rollouts"))

    # Good sessions, then the stage's hour passes: the rollout moves to 50%.
    await fleet.sessions(ORGS, 400)
    api.services.clock.advance(timedelta(hours=1, seconds=1))
    await api.services.rollouts.step_all()
    await wait_for(
        "the advance to show", lambda: "Stage 2 of 3, 50%" in text_of(driver, "#rollouts")
    )
    assert await run(lambda: driver.execute_script("return window.__sameDocument === true"))
    assert "Live: updated" in await run(lambda: text_of(driver, "#live-status"))
    times = await run(lambda: driver.find_elements(By.CSS_SELECTOR, "time[title$=' UTC']"))
    assert times and all("UTC" not in t.text for t in times[:3])  # shown in local time
    # The fleet catches up (heartbeats publish no event): read again for the picture.
    await fleet.everyone(ORGS)
    await fleet.sessions(ORGS, 300, failed=0.02)
    await run(lambda: driver.refresh())
    await wait_for("the stream", lambda: text_of(driver, "#live-status").startswith("Live"))
    screenshot(driver, "dashboard-overview")

    # To the rollout's page by its link.
    link = f"/dashboard/rollouts/{rollout_id}"
    await run(lambda: driver.find_element(By.CSS_SELECTOR, f'#rollouts a[href="{link}"]').click())
    await wait_for("the rollout page", lambda: text_of(driver, "h1").startswith("Rollout"))
    await wait_for("the stream", lambda: text_of(driver, "#live-status").startswith("Live"))
    await run(lambda: driver.execute_script("window.__sameDocument = true"))

    # The included orgs start failing: the heartbeat that shows it rolls the build back.
    await fleet.everyone(ORGS)
    failing = [org for org, build in fleet.running.items() if build == NEW]
    await fleet.sessions(failing, 200, failed=0.5)
    assert (await api.services.store.get_rollout(rollout_id)).state == "rolled_back"
    summary = await wait_for(
        "the rollback to show",
        lambda: (t := text_of(driver, "#summary")) and "Rolled back" in t and t,
    )
    assert "by auto" in summary and "failure_rate" in summary
    assert "rolled back" in summary
    assert await run(lambda: driver.execute_script("return window.__sameDocument === true"))
    assert "not reached" in await run(lambda: text_of(driver, "#timeline"))
    screenshot(driver, "dashboard-rollout")

    # And on to the build's canary page.
    await run(lambda: driver.find_element(By.CSS_SELECTOR, "#summary dd a[href*=canaries]").click())
    await wait_for("the canary page", lambda: text_of(driver, "h1") == f"Canary of {NEW}")


async def test_every_link_and_button_is_reached_with_tab_and_it_fits_a_phone(api: Api, driver: Any):
    from selenium.webdriver.common.keys import Keys

    base = str(api.client.make_url("")).rstrip("/")
    admin, _ = await on_channel(api, ORGS)
    await start(api, admin)
    await sign_in(driver, base, admin)
    await run(lambda: driver.find_element("css selector", "body").click())
    focusable = "a[href], button, input:not([type=hidden]), textarea, select, progress"
    total = await run(
        lambda: driver.execute_script(
            "return document.querySelectorAll(arguments[0]).length", focusable
        )
    )
    reached: set[int] = set()
    for _ in range(total + 5):
        await run(lambda: driver.switch_to.active_element.send_keys(Keys.TAB))
        index = await run(
            lambda: driver.execute_script(
                "return Array.from(document.querySelectorAll(arguments[0]))"
                ".indexOf(document.activeElement)",
                focusable,
            )
        )
        reached.add(index)
    links = await run(
        lambda: driver.execute_script(
            "const all = Array.from(document.querySelectorAll(arguments[0]));"
            "return all.map((e, i) => e.matches('a[href], button') ? i : -1)"
            ".filter(i => i >= 0)",
            focusable,
        )
    )
    assert links and set(links) <= reached
    # Focus is visible: the focused element has an outline.
    outline = await run(
        lambda: driver.execute_script(
            "return getComputedStyle(document.activeElement).outlineStyle"
        )
    )
    assert outline != "none"

    # At phone width nothing runs off the side.
    await run(lambda: driver.set_window_size(390, 844))
    try:
        await run(lambda: driver.refresh())
        await wait_for("the overview", lambda: text_of(driver, "h1") == "Overview")
        overflow = await run(
            lambda: driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
        )
        assert overflow <= 0
        screenshot(driver, "dashboard-phone")
    finally:
        await run(lambda: driver.set_window_size(1200, 1500))
