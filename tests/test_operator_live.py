"""The operator surface of a real `flowgate serve`: the flow-control API under live load, metrics (one process and
`--workers 2` on Redis), the delivery log, and `flowgate status`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import proxy_fixtures
from tests.gateway_process import (
    TOKEN,
    Gateway,
    clean_env,
    flowgate_command,
    gateway_running,
    metric,
    start_gateway,
    wait_for,
)
from tests.proxy_fixtures import Upstream
from tests.redis_servers import free_port

upstream = proxy_fixtures.upstream
_ids = itertools.count()


@pytest.fixture(scope="module")
def memory_gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway (memory store, JSON logs, admin token) for the module; tests use their own keys."""
    with gateway_running(upstream.url, tmp_path_factory.mktemp("gateway")) as gateway:
        yield gateway


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def gateway(request: pytest.FixtureRequest, upstream: Upstream, tmp_path: Path) -> Iterator[Gateway]:
    if request.param == "memory":
        yield request.getfixturevalue("memory_gateway")
        return
    with gateway_running(upstream.url, tmp_path, store=request.getfixturevalue("redis_url")) as own:
        yield own


@contextlib.asynccontextmanager
async def connect(gateway: Gateway) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """(proxy client, admin client with the token)."""
    limits = httpx.Limits(max_connections=100)
    async with (
        httpx.AsyncClient(base_url=gateway.proxy, timeout=30, limits=limits) as proxy,
        gateway.admin_client() as admin,
    ):
        yield proxy, admin


@pytest.fixture
async def clients(gateway: Gateway) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    async with connect(gateway) as both:
        yield both


def fresh_key(name: str) -> str:
    return f"{name}-{next(_ids)}-{os.getpid()}"


def flow(key: str, value: str) -> dict[str, str]:
    return {"Upstash-Flow-Control-Key": key, "Upstash-Flow-Control-Value": value}


async def key_info(admin: httpx.AsyncClient, key: str) -> dict[str, Any] | None:
    response = await admin.get(f"/v2/flowControl/{key}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- the API under load ---------------------------------------------------------------------------------------------


async def test_api_follows_a_live_backlog(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], upstream: Upstream
) -> None:
    proxy, admin = clients
    key = fresh_key("backlog")
    sends = [
        asyncio.create_task(proxy.get("/work", params={"sleep": "0.6"}, headers=flow(key, "parallelism=2")))
        for _ in range(8)
    ]
    seen: list[tuple[int, int]] = []
    listed: dict[str, Any] | None = None
    while not all(task.done() for task in sends):
        info = await key_info(admin, key)
        if info is not None:
            seen.append((info["waitListSize"], info["parallelismCount"]))
            assert info["parallelismMax"] == 2
            if listed is None and info["waitListSize"] == 6:
                listing = (await admin.get("/v2/flowControl", params={"search": key})).json()
                listed = listing[0]
                assert [item["flowControlKey"] for item in listing] == [key]
        await asyncio.sleep(0.05)
    responses = await asyncio.gather(*sends)
    assert [response.status_code for response in responses] == [200] * 8
    waits = [waiting for waiting, _ in seen]
    assert max(waits) == 6, seen  # the whole backlog was visible…
    peak = waits.index(6)
    assert all(later <= earlier for earlier, later in itertools.pairwise(waits[peak:])), seen  # …and drained
    assert len(set(waits[peak:])) >= 3, seen  # in steps, as tokens freed up
    assert max(active for _, active in seen) == 2 and all(active <= 2 for _, active in seen), seen
    assert listed is not None and listed["parallelismMax"] == 2
    assert upstream.app.peak(key) == 2
    after = await key_info(admin, key)
    assert after is None or (after["waitListSize"], after["parallelismCount"]) == (0, 0)


async def test_pause_stops_admissions_and_resume_drains_in_order(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], upstream: Upstream
) -> None:
    proxy, admin = clients
    key = fresh_key("paused")
    headers = flow(key, "parallelism=1")
    first = asyncio.create_task(proxy.get("/work", params={"sleep": "0.8", "seq": "0"}, headers=headers))
    await wait_for(lambda: _has(admin, key, parallelismCount=1))
    paused = await admin.post(f"/v2/flowControl/{key}/pause")
    assert paused.json()["isPaused"] is True
    rest = []
    for seq in range(1, 5):  # one at a time, so the waitlist order is known
        rest.append(asyncio.create_task(proxy.get("/work", params={"seq": str(seq)}, headers=headers)))
        await wait_for(lambda seq=seq: _has(admin, key, waitListSize=seq))
    assert (await first).status_code == 200
    await asyncio.sleep(0.5)  # a running key would have admitted the head by now
    info = await key_info(admin, key)
    assert info is not None
    assert (info["isPaused"], info["waitListSize"], info["parallelismCount"]) == (True, 4, 0)
    assert [call.seq for call in upstream.app.calls(key)] == [0]
    assert not any(task.done() for task in rest)

    resumed = await admin.post(f"/v2/flowControl/{key}/resume")
    assert resumed.status_code in (200, 204)
    responses = await asyncio.wait_for(asyncio.gather(*rest), 20)
    assert [response.status_code for response in responses] == [200] * 4
    assert [call.seq for call in upstream.app.calls(key)] == [0, 1, 2, 3, 4]


async def _has(admin: httpx.AsyncClient, key: str, **expected: Any) -> bool:
    info = await key_info(admin, key)
    return info is not None and all(info[name] == value for name, value in expected.items())


async def test_pin_overrides_header_policies_until_unpin(memory_gateway: Gateway, upstream: Upstream) -> None:
    key = fresh_key("pinned")
    headers = flow(key, "parallelism=1")
    async with (
        httpx.AsyncClient(base_url=memory_gateway.proxy, timeout=30) as proxy,
        memory_gateway.admin_client() as admin,
    ):
        sends = [asyncio.create_task(proxy.get("/work", params={"sleep": "1.2"}, headers=headers)) for _ in range(5)]
        await wait_for(lambda: _has(admin, key, parallelismCount=1, waitListSize=4))
        pinned = (await admin.post(f"/v2/flowControl/{key}/pin", params={"parallelism": "3"})).json()
        assert (pinned["parallelismMax"], pinned["isPinnedParallelism"]) == (3, True)
        await wait_for(lambda: _has(admin, key, parallelismCount=3, waitListSize=2))

        # A new request still asks for parallelism 1 in its header: the pin wins until unpin.
        sends.append(asyncio.create_task(proxy.get("/work", headers=headers)))
        await wait_for(lambda: _has(admin, key, waitListSize=3))
        info = await key_info(admin, key)
        assert info is not None and (info["parallelismMax"], info["isPinnedParallelism"]) == (3, True)

        unpinned = (await admin.post(f"/v2/flowControl/{key}/unpin", params={"parallelism": "true"})).json()
        assert (unpinned["parallelismMax"], unpinned["isPinnedParallelism"]) == (1, False)
        responses = await asyncio.gather(*sends)
    assert [response.status_code for response in responses] == [200] * 6
    assert upstream.app.peak(key) == 3


async def test_reset_rate_opens_a_fresh_window(memory_gateway: Gateway) -> None:
    key = fresh_key("rate")
    headers = flow(key, "rate=2, period=1m")
    async with (
        httpx.AsyncClient(base_url=memory_gateway.proxy, timeout=30) as proxy,
        memory_gateway.admin_client() as admin,
    ):
        done = await asyncio.gather(*(proxy.get("/work", headers=headers) for _ in range(2)))
        assert [response.status_code for response in done] == [200, 200]
        third = asyncio.create_task(proxy.get("/work", headers=headers))
        await wait_for(lambda: _has(admin, key, waitListSize=1, rateCount=2, rateMax=2, ratePeriod=60))
        before = int(time.time())
        await admin.post(f"/v2/flowControl/{key}/resetRate")
        response = await asyncio.wait_for(third, 10)  # far sooner than the minute the window had left
        assert response.status_code == 200
        info = await key_info(admin, key)
        assert info is not None and info["rateCount"] == 1 and info["ratePeriodStart"] >= before - 1


# -- metrics and the delivery log -----------------------------------------------------------------------------------


async def test_metrics_and_log_after_a_known_sequence(memory_gateway: Gateway) -> None:
    gateway = memory_gateway
    async with connect(gateway) as (proxy, admin):
        before = (await admin.get("/metrics")).text
        invalid_before = metric(before, "flowgate_deliveries_rejected_total", rule="-", reason="invalid_flow_control")

        # "metered": parallelism 1, at most 1 waiting. One runs, one waits, the third is refused.
        running = asyncio.create_task(proxy.get("/metered", params={"sleep": "1"}))
        await wait_for(lambda: _has(admin, "metered", parallelismCount=1))
        waiting = asyncio.create_task(proxy.get("/metered"))
        await wait_for(lambda: _has(admin, "metered", waitListSize=1))
        refused = await proxy.get("/metered")
        assert refused.status_code == 429 and refused.json()["error"] == "waitlist_full"

        during = (await admin.get("/metrics")).text
        assert metric(during, "flowgate_deliveries_waiting", rule="metered") == 1
        assert metric(during, "flowgate_deliveries_in_flight", rule="metered") == 1
        assert metric(during, "flowgate_deliveries_admitted_total", rule="metered") == 1

        assert [(await task).status_code for task in (running, waiting)] == [200, 200]
        timed_out = await proxy.get("/timing", params={"sleep": "4"})  # upstream_timeout is 3s
        assert timed_out.status_code == 504
        bad = await proxy.get("/work", headers=flow("k", "parallelism=0"))
        assert bad.status_code == 400

        response = await admin.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = response.text
    expected = {
        ("flowgate_deliveries_admitted_total", "metered"): 2,
        ("flowgate_deliveries_waiting", "metered"): 0,
        ("flowgate_deliveries_in_flight", "metered"): 0,
        ("flowgate_wait_seconds_count", "metered"): 2,
        ("flowgate_upstream_latency_seconds_count", "metered"): 2,
        ("flowgate_deliveries_admitted_total", "timing"): 1,
        ("flowgate_upstream_latency_seconds_count", "timing"): 0,
    }
    for (name, rule), value in expected.items():
        assert metric(text, name, rule=rule) == value, (name, rule)
    assert metric(text, "flowgate_deliveries_rejected_total", rule="metered", reason="waitlist_full") == 1
    assert metric(text, "flowgate_deliveries_failed_total", rule="timing", reason="upstream_timeout") == 1
    invalid = metric(text, "flowgate_deliveries_rejected_total", rule="-", reason="invalid_flow_control")
    assert invalid == invalid_before + 1
    # The one that waited waited at least about as long as the first one ran (1s); the first did not wait.
    assert metric(text, "flowgate_wait_seconds_bucket", rule="metered", le="0.5") == 1
    assert metric(text, "flowgate_wait_seconds_sum", rule="metered") >= 0.5
    assert metric(text, "flowgate_upstream_latency_seconds_sum", rule="metered") >= 1.0

    records = gateway.log_records()  # every line of the log is one JSON object
    deliveries = [r for r in records if r["logger"] == "flowgate.delivery"]
    assert {
        "event": "rejected",
        "key": "metered",
        "rule": "metered",
        "reason": "waitlist_full",
        "status": 429,
    }.items() <= next(r for r in deliveries if r.get("reason") == "waitlist_full").items()
    failed = next(r for r in deliveries if r.get("reason") == "upstream_timeout")
    assert (failed["event"], failed["key"], failed["rule"], failed["status"], failed["level"]) == (
        "failed",
        "timing",
        "timing",
        504,
        "warning",
    )
    assert any(r.get("reason") == "invalid_flow_control" and r["status"] == 400 for r in deliveries)
    assert all({"time", "level", "logger", "pid", "message"} <= r.keys() for r in records)
    assert TOKEN not in gateway.log_text()


@pytest.mark.redis
async def test_metrics_add_up_over_two_workers_on_redis(upstream: Upstream, redis_url: str, tmp_path: Path) -> None:
    key = fresh_key("workers")
    with gateway_running(upstream.url, tmp_path, store=redis_url, workers=2) as gateway:
        async with gateway.admin_client() as admin:
            # Fresh connections, so the kernel spreads the requests over both workers' sockets.
            async def one(path: str, **options: Any) -> httpx.Response:
                async with httpx.AsyncClient(base_url=gateway.proxy, timeout=30) as client:
                    return await client.get(path, **options)

            done = await asyncio.gather(*(one("/timing") for _ in range(20)))
            assert [response.status_code for response in done] == [200] * 20
            held = [
                asyncio.create_task(one("/work", params={"sleep": "2"}, headers=flow(key, "parallelism=1")))
                for _ in range(4)
            ]
            await wait_for(lambda: _has(admin, key, parallelismCount=1, waitListSize=3))
            expected = {
                ("flowgate_deliveries_admitted_total", "timing"): 20,
                ("flowgate_upstream_latency_seconds_count", "timing"): 20,
                ("flowgate_deliveries_waiting", "-"): 3,
                ("flowgate_deliveries_in_flight", "-"): 1,
            }

            async def scraped() -> dict[tuple[str, str], float]:
                text = (await admin.get("/metrics", headers={"Connection": "close"})).text
                return {(name, rule): metric(text, name, rule=rule) for name, rule in expected}

            # Each worker's snapshot is at most a second old; then whichever worker answers reports the sum.
            await wait_for(lambda: _matches(scraped(), expected), timeout=10)
            for _ in range(4):
                assert await scraped() == expected
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
    assert gateway.process.returncode == 0, gateway.log_text()


async def _matches(values: Any, expected: dict[tuple[str, str], float]) -> bool:
    return bool(await values == expected)


# -- flowgate status ------------------------------------------------------------------------------------------------


def status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*flowgate_command(), "status", *args], capture_output=True, text=True, timeout=30, env=env or clean_env()
    )


async def test_status_table_and_errors(memory_gateway: Gateway) -> None:
    key = fresh_key("status")
    async with (
        httpx.AsyncClient(base_url=memory_gateway.proxy, timeout=30) as proxy,
        memory_gateway.admin_client() as admin,
    ):
        sends = [
            asyncio.create_task(
                proxy.get("/work", params={"sleep": "3"}, headers=flow(key, "parallelism=2, rate=50, period=1m"))
            )
            for _ in range(5)
        ]
        await wait_for(lambda: _has(admin, key, parallelismCount=2, waitListSize=3))
        await admin.post(f"/v2/flowControl/{key}/pin", params={"rate": "40", "period": "60"})
        result = await asyncio.to_thread(
            status, "--admin", memory_gateway.admin, "--search", key, env=clean_env(FLOWGATE_ADMIN_TOKEN=TOKEN)
        )
        for task in sends:
            task.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("1 key · 3 waiting · ")
    assert lines[1].split() == ["KEY", "WAITING", "IN", "FLIGHT", "RATE", "USED", "STATE"]
    assert lines[2].split() == [key, "3", "2/2", "2/40", "per", "1m", "running", "pinned", "rate"]

    refused = await asyncio.to_thread(status, "--admin", memory_gateway.admin)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"flowgate: the admin port at {memory_gateway.admin} answered 401: it needs a token "
        "(--token or FLOWGATE_ADMIN_TOKEN)"
    ]
    wrong = await asyncio.to_thread(status, "--admin", memory_gateway.admin, "--token", "nope")
    assert wrong.returncode == 1 and "the token was refused" in wrong.stderr
    gone = f"http://127.0.0.1:{free_port()}"
    unreachable = await asyncio.to_thread(status, "--admin", gone)
    assert unreachable.returncode == 1
    lines = unreachable.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flowgate: cannot reach the admin port at {gone}: ")
    assert "Traceback" not in unreachable.stderr


def test_status_watch_redraws_until_ctrl_c(memory_gateway: Gateway) -> None:
    controller, terminal = pty.openpty()  # a terminal, so rich redraws in place as it would for a person
    env = clean_env(FLOWGATE_ADMIN_TOKEN=TOKEN, FLOWGATE_ADMIN_URL=memory_gateway.admin, COLUMNS="100", LINES="30")
    process = subprocess.Popen(
        [*flowgate_command(), "status", "--watch", "--interval", "0.5"],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(terminal)
    try:
        output = b""
        deadline = time.monotonic() + 20
        while output.count(b"in flight") < 3:  # the first table and two redraws
            assert time.monotonic() < deadline, output
            if select.select([controller], [], [], 0.5)[0]:
                output += os.read(controller, 65536)
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert process.stderr is not None and b"Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stderr is not None:
            process.stderr.close()
        os.close(controller)


def test_status_watch_without_a_terminal_prints_each_table(memory_gateway: Gateway) -> None:
    env = clean_env(FLOWGATE_ADMIN_TOKEN=TOKEN)
    args = [*flowgate_command(), "status", "--admin", memory_gateway.admin, "--watch", "--interval", "0.5"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert process.stdout is not None
        summaries = 0
        deadline = time.monotonic() + 20
        while summaries < 2:
            assert time.monotonic() < deadline
            if " in flight · " in process.stdout.readline().decode():
                summaries += 1
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_start_gateway_refuses_a_bad_log_format(upstream: Upstream, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match='log_format must be one of text, json, got "xml"'):
        start_gateway(upstream.url, tmp_path, log_format="xml")
