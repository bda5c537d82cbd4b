"""The QStash-compatible flow-control API on a real admin server, over the memory and Redis stores; QStash's own
Python SDK against it; bearer auth on every route."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.admin import build_admin_app
from gateway.config import Settings
from gateway.engine import FlowController, Lease
from gateway.flow_api import info
from gateway.metrics import Metrics
from gateway.policy import Policy
from gateway.stores import open_store
from tests.helpers import wait_until
from tests.live import serving

TOKEN = "flow-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INFO_FIELDS = {
    "flowControlKey",
    "waitListSize",
    "parallelismMax",
    "parallelismCount",
    "rateMax",
    "rateCount",
    "ratePeriod",
    "ratePeriodStart",
    "isPaused",
    "isPinnedParallelism",
    "isPinnedRate",
}
STORES = [pytest.param("memory", id="memory"), pytest.param("redis", id="redis", marks=pytest.mark.redis)]


@pytest.fixture(params=STORES)
async def controller(request: pytest.FixtureRequest) -> AsyncIterator[FlowController]:
    uri = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    store = open_store(uri)
    controller = FlowController(store, lease_ttl=60.0)
    try:
        yield controller
    finally:
        await controller.close()
        await store.close()


@pytest.fixture
async def api(controller: FlowController) -> AsyncIterator[httpx.AsyncClient]:
    app = build_admin_app(controller, Settings(admin_token=TOKEN), metrics=Metrics())
    async with serving(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str, *needles: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == code
    for needle in needles:
        assert needle in body["message"]


async def backlog(controller: FlowController, key: str, policy: Policy, waiting: int) -> list[asyncio.Task[Lease]]:
    """Fill `key` to its parallelism and queue `waiting` more acquisitions behind it."""
    leases = [await controller.acquire(key, policy) for _ in range(policy.parallelism or 0)]
    tasks = [asyncio.create_task(controller.acquire(key, policy)) for _ in range(waiting)]
    deadline = time.monotonic() + 5
    while (state := await controller.store.state(key)) is None or state.waiting < waiting:
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.01)
    for lease in leases:
        controller.detach(lease)
    return tasks


async def _waiting(api: httpx.AsyncClient, key: str, count: int) -> bool:
    response = await api.get(f"/v2/flowControl/{key}")
    return response.status_code == 200 and response.json()["waitListSize"] == count


async def cancel(tasks: list[asyncio.Task[Lease]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- reading --------------------------------------------------------------------------------------------------------


async def test_get_key_shows_the_live_state(api: httpx.AsyncClient, controller: FlowController) -> None:
    policy = Policy(parallelism=2, rate=50, period=60)
    tasks = await backlog(controller, "tenant:7", policy, 3)
    try:
        before = time.time()
        response = await api.get("/v2/flowControl/tenant:7")
        assert response.status_code == 200
        body = response.json()
        assert set(body) == INFO_FIELDS
        assert body == {
            "flowControlKey": "tenant:7",
            "waitListSize": 3,
            "parallelismMax": 2,
            "parallelismCount": 2,
            "rateMax": 50,
            "rateCount": 2,
            "ratePeriod": 60,
            "ratePeriodStart": body["ratePeriodStart"],
            "isPaused": False,
            "isPinnedParallelism": False,
            "isPinnedRate": False,
        }
        assert before - 61 <= body["ratePeriodStart"] <= before + 1  # a sliding window: now - period
    finally:
        await cancel(tasks)


async def test_unlimited_values_read_zero(api: httpx.AsyncClient, controller: FlowController) -> None:
    lease = await controller.acquire("free", Policy(period=0.5))
    body = (await api.get("/v2/flowControl/free")).json()
    assert (body["parallelismMax"], body["rateMax"], body["parallelismCount"], body["ratePeriod"]) == (0, 0, 1, 0.5)
    assert (await api.get("/v2/globalParallelism")).json() == {"parallelismMax": 0, "parallelismCount": 1}
    await controller.release(lease)
    assert (await api.get("/v2/globalParallelism")).json() == {"parallelismMax": 0, "parallelismCount": 0}


async def test_list_search_and_trailing_slash(api: httpx.AsyncClient, controller: FlowController) -> None:
    assert (await api.get("/v2/flowControl")).json() == []
    leases = [await controller.acquire(key, Policy(parallelism=5)) for key in ("b:2", "a:1", "b:1", "c[1]*")]
    listing = (await api.get("/v2/flowControl")).json()
    assert [item["flowControlKey"] for item in listing] == ["a:1", "b:1", "b:2", "c[1]*"]
    assert all(set(item) == INFO_FIELDS and item["parallelismCount"] == 1 for item in listing)
    assert (await api.get("/v2/flowControl/")).json() == listing
    searched = (await api.get("/v2/flowControl", params={"search": "b:"})).json()
    assert [item["flowControlKey"] for item in searched] == ["b:1", "b:2"]
    glob = (await api.get("/v2/flowControl", params={"search": "c[1]"})).json()  # a prefix, not a pattern
    assert [item["flowControlKey"] for item in glob] == ["c[1]*"]
    assert (await api.get("/v2/flowControl", params={"search": "zzz"})).json() == []
    assert_error(await api.get("/v2/flowControl", params={"search": "x" * 300}), 400, "invalid_parameter", "search")
    for lease in leases:
        await controller.release(lease)


async def test_keys_with_slashes_and_encoded_characters(api: httpx.AsyncClient, controller: FlowController) -> None:
    key = "tenant/42 ü?#%"
    lease = await controller.acquire(key, Policy(parallelism=1))
    encoded = "tenant%2F42%20%C3%BC%3F%23%25"
    assert (await api.get(f"/v2/flowControl/{encoded}")).json()["flowControlKey"] == key
    assert (await api.post(f"/v2/flowControl/{encoded}/pause")).json()["isPaused"] is True
    raw = (await api.get("/v2/flowControl/tenant/42%20%C3%BC%3F%23%25")).json()  # a raw "/" works too
    assert raw["flowControlKey"] == key and raw["isPaused"] is True
    assert (await api.post(f"/v2/flowControl/{encoded}/resume")).json()["isPaused"] is False
    await controller.release(lease)


async def test_unknown_and_invalid_keys(api: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/v2/flowControl/unknown-key"),
        ("POST", "/v2/flowControl/unknown-key/resume"),
        ("POST", "/v2/flowControl/unknown-key/unpin"),
        ("POST", "/v2/flowControl/unknown-key/resetRate"),
    ]:
        assert_error(await api.request(method, path), 404, "flow_control_key_not_found", "'unknown-key'")
    assert_error(await api.get("/v2/flowControl/" + "k" * 300), 400, "invalid_flow_control", "300 characters")
    assert_error(await api.get("/v2/flowControl/a%01b"), 400, "invalid_flow_control", "control characters")
    assert_error(await api.post("/v2/flowControl/k"), 405, "method_not_allowed")
    assert_error(await api.delete("/v2/flowControl/k/pause"), 405, "method_not_allowed")


# -- steering -------------------------------------------------------------------------------------------------------


async def test_pause_keeps_the_waitlist_and_resume_drains_it_in_order(
    api: httpx.AsyncClient, controller: FlowController
) -> None:
    policy = Policy(parallelism=1)
    first = await controller.acquire("q", policy)
    paused = (await api.post("/v2/flowControl/q/pause")).json()
    assert paused["isPaused"] is True and paused["parallelismCount"] == 1
    order: list[int] = []

    async def deliver(number: int) -> None:
        lease = await controller.acquire("q", policy)
        order.append(number)
        await controller.release(lease)

    tasks = []
    for number in range(4):
        tasks.append(asyncio.create_task(deliver(number)))
        await wait_until(lambda number=number: _waiting(api, "q", number + 1))
    await controller.release(first)  # a free token: a running key would admit the head now
    await asyncio.sleep(0.3)
    body = (await api.get("/v2/flowControl/q")).json()
    assert (body["isPaused"], body["waitListSize"], body["parallelismCount"], order) == (True, 4, 0, [])

    resumed = await api.post("/v2/flowControl/q/resume")
    assert resumed.status_code in (200, 204)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order == [0, 1, 2, 3]


async def test_pause_and_pin_prepare_an_unseen_key(api: httpx.AsyncClient, controller: FlowController) -> None:
    body = (await api.post("/v2/flowControl/new-key/pause")).json()
    assert body["flowControlKey"] == "new-key" and body["isPaused"] is True and body["waitListSize"] == 0
    waiter = asyncio.create_task(controller.acquire("new-key", Policy(parallelism=3)))
    await asyncio.sleep(0.2)
    assert not waiter.done()  # paused before its first delivery
    await api.post("/v2/flowControl/new-key/resume")
    await controller.release(await asyncio.wait_for(waiter, 5))

    pinned = (await api.post("/v2/flowControl/other/pin", params={"parallelism": "2"})).json()
    assert (pinned["parallelismMax"], pinned["isPinnedParallelism"]) == (2, True)
    lease = await controller.acquire("other", Policy(parallelism=9))  # the pin wins over the request's policy
    assert (await api.get("/v2/flowControl/other")).json()["parallelismMax"] == 2
    await controller.release(lease)
    await api.post("/v2/flowControl/other/unpin")


async def test_pin_overrides_requested_policies_until_unpin(api: httpx.AsyncClient, controller: FlowController) -> None:
    policy = Policy(parallelism=1, rate=100, period=1)
    tasks = await backlog(controller, "p", policy, 3)
    try:
        response = await api.post("/v2/flowControl/p/pin", params={"parallelism": "3", "rate": "20", "period": "120"})
        body = response.json()
        assert (body["parallelismMax"], body["rateMax"], body["ratePeriod"]) == (3, 20, 120)
        assert (body["isPinnedParallelism"], body["isPinnedRate"]) == (True, True)
        leases = await asyncio.wait_for(asyncio.gather(*tasks[:2]), 5)  # the pin let two more in at once
        body = (await api.get("/v2/flowControl/p")).json()
        assert (body["parallelismCount"], body["waitListSize"]) == (3, 1)

        # A new delivery asks for parallelism 1 again: the pinned values stay.
        extra = asyncio.create_task(controller.acquire("p", policy))
        await asyncio.sleep(0.1)
        body = (await api.get("/v2/flowControl/p")).json()
        assert (body["parallelismMax"], body["rateMax"], body["waitListSize"]) == (3, 20, 2)

        body = (await api.post("/v2/flowControl/p/unpin", params={"parallelism": "true"})).json()
        assert (body["parallelismMax"], body["isPinnedParallelism"]) == (1, False)  # the latest request's value
        assert (body["rateMax"], body["ratePeriod"], body["isPinnedRate"]) == (20, 120, True)
        body = (await api.post("/v2/flowControl/p/unpin", params={"rate": "true", "parallelism": "false"})).json()
        assert (body["rateMax"], body["ratePeriod"], body["isPinnedRate"]) == (100, 1, False)
        tasks.append(extra)
        for lease in leases:
            await controller.release(lease)
    finally:
        await cancel(tasks)


async def test_reset_rate_opens_a_fresh_window(api: httpx.AsyncClient, controller: FlowController) -> None:
    policy = Policy(rate=2, period=60)
    for _ in range(2):
        await controller.release(await controller.acquire("r", policy))
    waiter = asyncio.create_task(controller.acquire("r", policy))
    await asyncio.sleep(0.1)
    body = (await api.get("/v2/flowControl/r")).json()
    assert (body["rateCount"], body["rateMax"], body["waitListSize"]) == (2, 2, 1)
    before = int(time.time())
    body = (await api.post("/v2/flowControl/r/resetRate")).json()
    lease = await asyncio.wait_for(waiter, 5)  # admitted in the fresh window
    assert body["ratePeriodStart"] >= before - 1
    body = (await api.get("/v2/flowControl/r")).json()
    assert (body["rateCount"], body["waitListSize"]) == (1, 0)
    assert body["ratePeriodStart"] >= before - 1
    await controller.release(lease)


@pytest.mark.parametrize(
    ("params", "needles"),
    [
        ({"parallelism": "abc"}, ['parallelism must be an integer from 1 to 1000000000, got "abc"']),
        ({"parallelism": "0"}, ["parallelism", '"0"']),
        ({"parallelism": "-2"}, ["parallelism", '"-2"']),
        ({"parallelism": ""}, ["parallelism", 'got ""']),
        ({"rate": "1.5"}, ['rate must be an integer from 1 to 1000000000, got "1.5"']),
        ({"rate": "99999999999"}, ["rate"]),
        ({"rate": "5", "period": "10x"}, ['period must be seconds or a duration such as 60 or 1m, got "10x"']),
        ({"rate": "5", "period": "8d"}, ["period must be above 0s and at most 7d"]),
        ({"rate": "5", "period": "0"}, ["period must be above 0s"]),
        ({"period": "60"}, ["period goes with rate"]),
        ({}, ["pin needs parallelism or rate"]),
        ({"paralelism": "3"}, ['unknown parameter "paralelism"']),
    ],
)
async def test_pin_refuses_bad_parameters(api: httpx.AsyncClient, params: dict[str, str], needles: list[str]) -> None:
    assert_error(await api.post("/v2/flowControl/k/pin", params=params), 400, "invalid_parameter", *needles)
    assert (await api.get("/v2/flowControl/k")).status_code == 404  # nothing was created


async def test_unpin_refuses_bad_parameters(api: httpx.AsyncClient) -> None:
    await api.post("/v2/flowControl/k/pin", params={"parallelism": "2"})
    bad = await api.post("/v2/flowControl/k/unpin", params={"parallelism": "yes"})
    assert_error(bad, 400, "invalid_parameter", 'parallelism must be true or false, got "yes"')
    twice = await api.post("/v2/flowControl/k/unpin?rate=true&rate=false")
    assert_error(twice, 400, "invalid_parameter", "rate is given twice")
    assert_error(await api.post("/v2/flowControl/k/unpin", params={"period": "1"}), 400, "invalid_parameter", "period")
    assert (await api.get("/v2/flowControl/k")).json()["isPinnedParallelism"] is True
    assert (await api.post("/v2/flowControl/k/unpin")).status_code == 204  # unpinned and idle: the key is gone
    assert (await api.get("/v2/flowControl/k")).status_code == 404


# -- auth -----------------------------------------------------------------------------------------------------------

GUARDED = [
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v2/flowControl"),
    ("GET", "/v2/flowControl/k"),
    ("GET", "/v2/globalParallelism"),
    ("POST", "/v2/flowControl/k/pause"),
    ("POST", "/v2/flowControl/k/resume"),
    ("POST", "/v2/flowControl/k/pin?parallelism=1"),
    ("POST", "/v2/flowControl/k/unpin"),
    ("POST", "/v2/flowControl/k/resetRate"),
    ("POST", "/v2/leases/abc.aw/release"),
    ("GET", "/nope"),
]


@pytest.mark.parametrize("store", ["memory"])
async def test_every_route_but_healthz_and_dashboard_needs_the_token(store: str) -> None:
    controller = FlowController(open_store("memory://"))
    app = build_admin_app(controller, Settings(admin_token=TOKEN), metrics=Metrics())
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        for method, path in GUARDED:
            missing = await client.request(method, path)
            assert_error(missing, 401, "unauthorized", "Authorization: Bearer")
            assert missing.headers["www-authenticate"].startswith("Bearer")
            for header in (f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}0", "Bearer", f"Basic {TOKEN}"):
                wrong = await client.request(method, path, headers={"Authorization": header})
                assert_error(wrong, 401, "unauthorized")
                assert wrong.headers["www-authenticate"].startswith("Bearer")
            right = await client.request(method, path, headers=AUTH)
            assert right.status_code != 401, (method, path)
        assert (await client.get("/healthz")).status_code == 200
        page = await client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert TOKEN not in page.text
    await controller.close()


async def test_without_a_token_every_route_is_open() -> None:
    controller = FlowController(open_store("memory://"))
    async with serving(build_admin_app(controller)) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/v2/flowControl")).json() == []
        assert_error(await client.get("/metrics"), 404, "not_found", "without metrics")
    await controller.close()


# -- QStash's own SDK -----------------------------------------------------------------------------------------------


def _sdk_round_trip(url: str) -> dict[str, Any]:
    from qstash import QStash

    client = QStash(TOKEN, base_url=url, retry=False)
    fc = client.flow_control
    seen: dict[str, Any] = {"before": fc.get("sdk-key")}
    fc.pause("sdk-key")
    seen["paused"] = fc.get("sdk-key")
    fc.resume("sdk-key")
    fc.pin("sdk-key", {"parallelism": 3, "rate": 20, "period": 120})
    seen["pinned"] = fc.get("sdk-key")
    fc.unpin("sdk-key", {"parallelism": True})
    seen["half"] = fc.get("sdk-key")
    fc.unpin("sdk-key", {"parallelism": True, "rate": True})
    fc.reset_rate("sdk-key")
    seen["after"] = fc.get("sdk-key")
    seen["global"] = fc.get_global_parallelism()
    try:
        fc.get("no-such-key")
    except Exception as exc:
        seen["missing"] = exc
    return seen


async def test_qstash_python_sdk_reads_and_steers(api: httpx.AsyncClient, controller: FlowController) -> None:
    pytest.importorskip("qstash")
    lease = await controller.acquire("sdk-key", Policy(parallelism=1, rate=10, period=60))
    try:
        seen = await asyncio.to_thread(_sdk_round_trip, str(api.base_url))
    finally:
        await controller.release(lease)
    before = seen["before"]
    assert (before.key, before.parallelism_max, before.parallelism_count, before.rate_max) == ("sdk-key", 1, 1, 10)
    assert (before.rate_count, before.rate_period, before.wait_list_size, before.is_paused) == (1, 60, 0, False)
    assert seen["paused"].is_paused is True
    pinned = seen["pinned"]
    assert (pinned.parallelism_max, pinned.rate_max, pinned.rate_period) == (3, 20, 120)
    assert (pinned.is_pinned_parallelism, pinned.is_pinned_rate, pinned.is_paused) == (True, True, False)
    assert (seen["half"].is_pinned_parallelism, seen["half"].is_pinned_rate) == (False, True)
    after = seen["after"]
    assert (after.parallelism_max, after.rate_max, after.rate_count, after.is_pinned_rate) == (1, 10, 0, False)
    assert (seen["global"].parallelism_max, seen["global"].parallelism_count) == (0, 1)
    assert "404" in str(seen["missing"])


def test_info_object_matches_qstash_field_names() -> None:
    from gateway.stores.base import KeyState

    state = KeyState("k", Policy(parallelism=2, rate=3, period=1.5), 1, 4, 2, 1700000000.9, True, False, True)
    assert info(state) == {
        "flowControlKey": "k",
        "waitListSize": 4,
        "parallelismMax": 2,
        "parallelismCount": 1,
        "rateMax": 3,
        "rateCount": 2,
        "ratePeriod": 1.5,
        "ratePeriodStart": 1700000000,
        "isPaused": True,
        "isPinnedParallelism": False,
        "isPinnedRate": True,
    }


@pytest.mark.redis
async def test_listing_many_keys_on_redis_never_uses_keys(redis_url: str) -> None:
    import redis.asyncio as aioredis

    store = open_store(redis_url)
    controller = FlowController(store)
    raw = aioredis.from_url(redis_url)
    try:
        leases = await asyncio.gather(*(controller.acquire(f"bulk:{i:04d}", Policy(parallelism=2)) for i in range(300)))
        await raw.config_resetstat()
        async with serving(build_admin_app(controller)) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            listing = (await client.get("/v2/flowControl", params={"search": "bulk:"})).json()
            assert [item["flowControlKey"] for item in listing] == [f"bulk:{i:04d}" for i in range(300)]
            assert all(item["parallelismCount"] == 1 for item in listing)
            assert (await client.get("/v2/globalParallelism")).json()["parallelismCount"] == 300
        stats = await raw.info("commandstats")
        assert "cmdstat_keys" not in stats and "cmdstat_scan" not in stats, sorted(stats)
        assert "cmdstat_sscan" in stats  # the index set of live keys
        for lease in leases:
            await controller.release(lease)
    finally:
        await raw.aclose()
        await controller.close()
        await store.close()
