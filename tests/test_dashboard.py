"""/dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python package): during a
backlog the page shows what the API says, and its pause button pauses the key.

Locally the test is skipped when Chromium or Playwright is missing; in CI (`CI` set) it fails instead. The
screenshot goes to the test's temporary directory, and to docs/dashboard.png (the README's picture) when
`FLOWGATE_SCREENSHOT=1` is set or that file does not exist yet.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import proxy_fixtures
from tests.gateway_process import CONFIG, TOKEN, Gateway, gateway_running, wait_for
from tests.proxy_fixtures import Upstream

upstream = proxy_fixtures.upstream
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "dashboard.png"
CHROMIUM = os.environ.get("FLOWGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IN_CI = bool(os.environ.get("CI"))
FIELDS = ("parallelismCount", "parallelismMax", "waitListSize", "rateCount", "rateMax", "ratePeriod", "isPaused")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"the browser test needs {reason} in CI (scripts/test installs it)")
    pytest.skip(f"{reason} is not available")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("the playwright package")
    if not Path(CHROMIUM).exists():  # noqa: ASYNC240 - a one-off check before the browser starts
        _unavailable(f"Chromium at {CHROMIUM}")
    async with async_playwright() as playwright:
        try:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        except Exception as exc:
            _unavailable(f"a Chromium that starts ({type(exc).__name__}: {str(exc)[:300]})")
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def gateway(upstream: Upstream, tmp_path: Path) -> Iterator[Gateway]:
    config = CONFIG.replace('upstream_timeout = "3s"', 'upstream_timeout = "60s"')  # the backlog holds still
    with gateway_running(upstream.url, tmp_path, log_format="text", config=config) as running:
        yield running


def shown(info: dict[str, Any]) -> dict[str, str]:
    """What the page must show for an info object."""

    def limit(value: int) -> str:
        return str(value) if value > 0 else "∞"

    period = info["ratePeriod"]
    return {
        "parallelismCount": str(info["parallelismCount"]),
        "parallelismMax": limit(info["parallelismMax"]),
        "waitListSize": str(info["waitListSize"]),
        "rateCount": str(info["rateCount"]),
        "rateMax": limit(info["rateMax"]),
        "ratePeriod": f"{period // 60}m" if period >= 60 and period % 60 == 0 else f"{period}s",
        "isPaused": "paused" if info["isPaused"] else "running",
    }


async def row_values(page: Any, key: str) -> dict[str, str]:
    values: dict[str, str] = await page.evaluate(
        """([key, fields]) => {
            const row = [...document.querySelectorAll("#keys tr")].find((tr) => tr.dataset.key === key);
            if (!row) return {};
            return Object.fromEntries(fields.map((f) => [f, row.querySelector(`[data-field="${f}"]`).textContent]));
        }""",
        [key, list(FIELDS)],
    )
    return values


async def test_dashboard_shows_the_api_and_pauses(browser: Any, gateway: Gateway, tmp_path: Path) -> None:
    backlog = {
        "orders": ("parallelism=4", 9),
        "emails": ("parallelism=1, rate=30, period=1m", 3),
        "reports": ("parallelism=2, rate=100, period=1m", 2),
    }
    limits = httpx.Limits(max_connections=100)
    async with (
        httpx.AsyncClient(base_url=gateway.proxy, timeout=60, limits=limits) as proxy,
        gateway.admin_client() as admin,
    ):
        held = [
            asyncio.create_task(
                proxy.get(
                    "/work",
                    params={"sleep": "12"},
                    headers={"Flow-Control-Key": f"tenant:{name}", "Flow-Control-Value": value},
                )
            )
            for name, (value, count) in backlog.items()
            for _ in range(count)
        ]

        async def trickle() -> None:  # steady throughput for the chart
            while True:
                await proxy.get("/work", headers={"Flow-Control-Key": "tenant:pings", "Flow-Control-Value": "rate=5"})

        pings = asyncio.create_task(trickle())
        try:
            await wait_for(lambda: _waiting(admin, "tenant:orders", 5))
            await admin.post("/v2/flowControl/tenant:reports/pin", params={"rate": "50", "period": "60"})
            await admin.post("/v2/flowControl/tenant:reports/pause")
            await _run_page(browser, gateway, admin, tmp_path)
        finally:
            pings.cancel()
            for task in held:
                task.cancel()
            await asyncio.gather(pings, *held, return_exceptions=True)


async def _waiting(admin: httpx.AsyncClient, key: str, count: int) -> bool:
    response = await admin.get(f"/v2/flowControl/{key}")
    return response.status_code == 200 and response.json()["waitListSize"] == count


async def _run_page(browser: Any, gateway: Gateway, admin: httpx.AsyncClient, tmp_path: Path) -> None:
    # The page's Content-Security-Policy forbids eval, which Playwright's wait_for_function uses.
    context = await browser.new_context(viewport={"width": 1280, "height": 860}, bypass_csp=True)
    page = await context.new_page()
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"{gateway.admin}/dashboard")

    # Without the token the page says so and shows no data.
    await page.wait_for_function("document.querySelector('#status').dataset.state === 'error'")
    assert "needs a token" in await page.inner_text("#status")
    assert await page.locator("#keys tr").count() == 0

    await page.fill("#token", TOKEN)
    await page.click("#token-save")
    await page.wait_for_selector('#keys tr[data-key="tenant:orders"]')
    assert await page.evaluate("sessionStorage.getItem('flowgate-admin-token')") == TOKEN

    for key in ("tenant:orders", "tenant:emails", "tenant:reports"):
        expected = shown((await admin.get(f"/v2/flowControl/{key}")).json())
        await _eventually(lambda key=key: row_values(page, key), expected)
    listing = (await admin.get("/v2/flowControl")).json()
    assert await page.inner_text('[data-field="keyCount"]') == str(len(listing))
    orders = (await admin.get("/v2/flowControl/tenant:orders")).json()
    assert (orders["parallelismCount"], orders["waitListSize"]) == (4, 5)
    emails = (await admin.get("/v2/flowControl/tenant:emails")).json()
    assert (emails["parallelismCount"], emails["waitListSize"], emails["rateCount"]) == (1, 2, 1)
    assert await page.locator('tr[data-key="tenant:reports"] .badge.pinned').inner_text() == "pinned rate"

    # Pause from the page; the API agrees, and the row turns into "paused" with a Resume button.
    await page.click('tr[data-key="tenant:orders"] button[data-action="pause"]')
    await wait_for(lambda: _paused(admin, "tenant:orders", True))
    await page.wait_for_selector('tr[data-key="tenant:orders"] button[data-action="resume"]')
    assert (await row_values(page, "tenant:orders"))["isPaused"] == "paused"

    # Let the chart collect a few seconds of history, then take the picture.
    polls = int(await page.evaluate("document.body.dataset.polls"))
    await page.wait_for_function(f"Number(document.body.dataset.polls) >= {polls + 8}", timeout=20_000)
    picture = tmp_path / "dashboard.png"
    await page.screenshot(path=str(picture), full_page=True)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FLOWGATE_SCREENSHOT") == "1" or not SCREENSHOT.exists():
        shutil.copyfile(picture, SCREENSHOT)

    await page.click('tr[data-key="tenant:orders"] button[data-action="resume"]')
    await wait_for(lambda: _paused(admin, "tenant:orders", False))

    assert errors == []
    origin = gateway.admin
    assert requests and all(url.startswith(origin + "/") for url in requests), requests  # works offline
    await context.close()


async def _paused(admin: httpx.AsyncClient, key: str, paused: bool) -> bool:
    return bool((await admin.get(f"/v2/flowControl/{key}")).json()["isPaused"] == paused)


async def _eventually(read: Any, expected: dict[str, str], timeout: float = 5.0) -> None:
    """The page polls every second: give it a moment to show the API's (static) numbers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (actual := await read()) != expected:
        assert loop.time() < deadline, (actual, expected)
        await asyncio.sleep(0.2)
