"""The admin port over a real server: health, readiness, lease release/extend, bearer auth, JSON errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.admin import build_admin_app, is_loopback, warn_if_exposed
from gateway.config import Settings
from gateway.engine import FlowController, Lease
from gateway.policy import Policy
from gateway.stores import MemoryStore, open_store
from tests.live import serving
from tests.redis_servers import free_port

TOKEN = "admin-token-123"
ONE = Policy(parallelism=1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def controller(clock: Clock) -> AsyncIterator[FlowController]:
    controller = FlowController(MemoryStore(clock=clock), lease_ttl=60.0)
    yield controller
    await controller.close()


@pytest.fixture
async def admin(controller: FlowController) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_admin_app(controller)) as url, httpx.AsyncClient(base_url=url) as client:
        yield client


@pytest.fixture
async def guarded(controller: FlowController) -> AsyncIterator[httpx.AsyncClient]:
    app = build_admin_app(controller, Settings(admin_token=TOKEN))
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, str] = response.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == code
    assert body["message"]
    return body


# -- health and readiness -------------------------------------------------------------------------------------------


async def test_healthz(admin: httpx.AsyncClient) -> None:
    response = await admin.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_with_memory_store(admin: httpx.AsyncClient) -> None:
    response = await admin.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_readyz_when_redis_is_unreachable() -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    controller = FlowController(store)
    try:
        async with serving(build_admin_app(controller)) as url, httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/readyz", timeout=10)
            body = assert_error(response, 503, "store_unavailable")
            assert response.headers["retry-after"] == "1"
            assert "cannot be reached" in body["message"]
            assert (await client.get("/healthz")).status_code == 200  # alive, just not ready

            lease = Lease("k", "abc123")
            response = await client.post(f"/v2/leases/{lease.token}/release", timeout=10)
            assert_error(response, 503, "store_unavailable")
            assert response.headers["retry-after"] == "1"
    finally:
        await controller.close()
        await store.close()


async def test_readyz_while_draining(controller: FlowController) -> None:
    app = build_admin_app(controller)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        app.state.draining = True
        assert_error(await client.get("/readyz"), 503, "draining")
        assert (await client.get("/healthz")).status_code == 200


# -- completion reporting -------------------------------------------------------------------------------------------


async def test_release_frees_the_token_for_the_next_waiter(
    admin: httpx.AsyncClient, controller: FlowController
) -> None:
    lease = await controller.acquire("jobs", ONE)
    controller.detach(lease)  # as the proxy does for a `Flow-Control-Hold: 1` answer
    waiter = asyncio.create_task(controller.acquire("jobs", ONE))
    await asyncio.sleep(0.05)
    assert not waiter.done()

    response = await admin.post(f"/v2/leases/{lease.token}/release")
    assert response.status_code == 200
    assert response.json() == {"released": True}
    second = await asyncio.wait_for(waiter, 5)
    await controller.release(second)

    again = await admin.post(f"/v2/leases/{lease.token}/release")  # idempotent: 404, never 500
    body = assert_error(again, 404, "lease_not_found")
    assert lease.token in body["message"]


async def test_release_unknown_and_malformed_leases(admin: httpx.AsyncClient) -> None:
    assert_error(await admin.post(f"/v2/leases/{Lease('nokey', 'deadbeef').token}/release"), 404, "lease_not_found")
    for token in ("abc", "abc.!!!", ".a2V5", "ab-c.a2V5"):
        body = assert_error(await admin.post(f"/v2/leases/{token}/release"), 400, "invalid_lease")
        assert "is not a Flowgate lease" in body["message"]
    body = assert_error(await admin.post("/v2/leases/x." + "A" * 400 + "/release"), 400, "invalid_lease")
    assert "flow-control key is 300 characters long" in body["message"]


async def test_extend_renews_the_lease(admin: httpx.AsyncClient, controller: FlowController, clock: Clock) -> None:
    lease = await controller.acquire("jobs", ONE)
    controller.detach(lease)

    response = await admin.post(f"/v2/leases/{lease.token}/extend", params={"ttl": "300"})
    assert response.status_code == 200
    assert response.json() == {"extended": True, "ttl": 300.0}
    clock.now += 200  # past lease_ttl (60 s), inside the extension
    state = await controller.store.state("jobs")
    assert state is not None and state.active == 1

    response = await admin.post(f"/v2/leases/{lease.token}/extend")  # default: lease_ttl
    assert response.json() == {"extended": True, "ttl": 60.0}
    clock.now += 101  # past both expiries (MemoryStore reaps a shortened lease only after its earlier expiry)
    assert_error(await admin.post(f"/v2/leases/{lease.token}/extend"), 404, "lease_not_found")  # expired
    assert_error(await admin.post(f"/v2/leases/{lease.token}/release"), 404, "lease_not_found")


async def test_extend_refuses_bad_ttl(admin: httpx.AsyncClient, controller: FlowController) -> None:
    lease = await controller.acquire("jobs", ONE)
    for ttl in ("abc", "0", "-5", "2d", "10x", ""):
        body = assert_error(
            await admin.post(f"/v2/leases/{lease.token}/extend", params={"ttl": ttl}), 400, "invalid_ttl"
        )
        assert "ttl" in body["message"]
    ok = await admin.post(f"/v2/leases/{lease.token}/extend", params={"ttl": "1m30s"})
    assert ok.json() == {"extended": True, "ttl": 90.0}
    assert_error(await admin.post("/v2/leases/abc/extend", params={"ttl": "5"}), 400, "invalid_lease")
    assert_error(await admin.post(f"/v2/leases/{Lease('k', 'ffff').token}/extend"), 404, "lease_not_found")
    await controller.release(lease)


# -- JSON errors for unknown routes and methods ---------------------------------------------------------------------


async def test_unknown_route_and_wrong_method(admin: httpx.AsyncClient) -> None:
    body = assert_error(await admin.get("/nope"), 404, "not_found")
    assert "/nope" in body["message"]
    response = await admin.delete("/healthz")
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]
    assert_error(await admin.get("/v2/leases/abc/release"), 405, "method_not_allowed")


# -- bearer token ---------------------------------------------------------------------------------------------------


async def test_token_required_everywhere_but_healthz(guarded: httpx.AsyncClient, controller: FlowController) -> None:
    assert (await guarded.get("/healthz")).status_code == 200

    missing = await guarded.get("/readyz")
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer")

    for header in (f"Bearer {TOKEN}x", "Bearer wrong", f"Basic {TOKEN}", TOKEN, "Bearer", ""):
        wrong = await guarded.get("/readyz", headers={"Authorization": header})
        assert_error(wrong, 401, "unauthorized")
        assert wrong.headers["www-authenticate"].startswith("Bearer")

    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await guarded.get("/readyz", headers=auth)).status_code == 200
    assert (await guarded.get("/readyz", headers={"Authorization": f"bearer  {TOKEN}"})).status_code == 200

    lease = await controller.acquire("jobs", ONE)
    assert_error(await guarded.post(f"/v2/leases/{lease.token}/release"), 401, "unauthorized")
    assert (await guarded.post(f"/v2/leases/{lease.token}/release", headers=auth)).status_code == 200

    assert_error(await guarded.get("/nope"), 401, "unauthorized")  # no route discovery without the token
    assert_error(await guarded.get("/nope", headers=auth), 404, "not_found")


# -- extension point and exposure warning ---------------------------------------------------------------------------


async def test_extra_routes_share_state_auth_and_error_handling(controller: FlowController) -> None:
    async def held(request: Request) -> JSONResponse:
        return JSONResponse({"held": request.app.state.controller.held, "port": request.app.state.settings.port})

    async def fails(request: Request) -> JSONResponse:
        raise RuntimeError("boom")

    routes = [Route("/v2/held", held), Route("/v2/fails", fails)]
    app = build_admin_app(controller, Settings(admin_token=TOKEN, port=9999), extra_routes=routes)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        assert_error(await client.get("/v2/held"), 401, "unauthorized")
        response = await client.get("/v2/held", headers=auth)
        assert response.json() == {"held": 0, "port": 9999}
        assert_error(await client.get("/v2/fails", headers=auth), 500, "internal_error")


def test_exposed_admin_port_without_token_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flowgate.admin"):
        assert warn_if_exposed(Settings(admin_host="0.0.0.0"))
    assert "WITHOUT a token" in caplog.text
    caplog.clear()
    assert not warn_if_exposed(Settings(admin_host="0.0.0.0", admin_token=TOKEN))
    assert not warn_if_exposed(Settings(admin_host="127.0.0.1"))
    assert not warn_if_exposed(Settings(admin_host="::1"))
    assert caplog.text == ""
    assert is_loopback("localhost") and is_loopback("127.0.0.5") and not is_loopback("10.0.0.1")
