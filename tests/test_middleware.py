"""FlowControlMiddleware in front of Starlette and FastAPI apps served by a real uvicorn, on memory and Redis.

Limits are measured inside the app (start/end of each call): never exceeded, and reached under backlog. Leases are
released on success, app exception, client disconnect while waiting (the app never sees that request) and while
streaming, and cancellation. Timing assertions are generous upper bounds only.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import ConfigError, FlowControlMiddleware, Policy, Rule
from gateway.errors import MissingKeyPart
from gateway.http import error_body
from gateway.routing import Router
from gateway.stores import MemoryStore
from gateway.types import Message, Scope
from tests.helpers import max_concurrency, max_starts_in_window, wait_until
from tests.middleware_harness import RULES, AppLog, RawClient, fastapi_app, find_middleware, free_socket, serve
from tests.middleware_harness import starlette_app as make_starlette_app

ROOT = Path(__file__).resolve().parent.parent
SLACK = 0.05  # jitter between an admission and the app's record of its start
APPS = {"starlette": make_starlette_app, "fastapi": fastapi_app}


@dataclass
class Served:
    url: str
    log: AppLog
    app: Any


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("starlette", "memory"), id="starlette-memory"),
        pytest.param(("fastapi", "memory"), id="fastapi-memory"),
        pytest.param(("starlette", "redis"), id="starlette-redis", marks=pytest.mark.redis),
        pytest.param(("fastapi", "redis"), id="fastapi-redis", marks=pytest.mark.redis),
    ],
)
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """One app per kind and store for the module; tests keep apart by using their own keys."""
    kind, store = request.param
    uri = "memory://" if store == "memory" else request.getfixturevalue("redis_node").url
    log = AppLog()
    app = APPS[kind](log, store=uri, rules=RULES)
    with serve(app) as url:
        yield Served(url, log, app)


@pytest.fixture
def k() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as session:
        yield session


async def key_state(client: httpx.AsyncClient, served: Served, key: str) -> dict[str, int]:
    response = await client.get(f"{served.url}/_state", params={"key": key})
    result: dict[str, int] = response.json()
    return result


async def waiting(client: httpx.AsyncClient, served: Served, key: str, count: int) -> bool:
    return (await key_state(client, served, key))["waiting"] == count


async def idle(client: httpx.AsyncClient, served: Served, key: str) -> None:
    async def check() -> bool:
        return await key_state(client, served, key) == {"active": 0, "waiting": 0}

    await wait_until(check, timeout=10)


def mine(log: AppLog, k: str) -> list[tuple[float, float]]:
    return [(call.start, call.end) for call in log.calls if call.id.startswith(k) and call.end is not None]


# -- limits -----------------------------------------------------------------------------------------------------


async def test_parallelism_never_exceeded_and_reached(served: Served, client: httpx.AsyncClient, k: str) -> None:
    urls = [f"{served.url}/par3/x?k={k}&hold=0.15&id={k}-{i}" for i in range(12)]
    responses = await asyncio.gather(*(client.get(url) for url in urls))
    assert [r.status_code for r in responses] == [200] * 12
    intervals = mine(served.log, k)
    assert len(intervals) == 12
    assert max_concurrency(intervals) == 3
    waited = [int(r.headers["flow-control-waited"]) for r in responses]
    assert max(waited) >= 100  # the backlog waited (at least 3 rounds of 150 ms for the last ones)
    await idle(client, served, f"par3:{k}")


async def test_rate_never_exceeded_and_reached(served: Served, client: httpx.AsyncClient, k: str) -> None:
    urls = [f"{served.url}/rate5/x?k={k}&id={k}-{i}" for i in range(10)]
    responses = await asyncio.gather(*(client.get(url) for url in urls))
    assert [r.status_code for r in responses] == [200] * 10
    starts = [start for start, _ in mine(served.log, k)]
    assert max_starts_in_window(starts, 1.0 - SLACK) <= 5
    assert max_starts_in_window(starts, 1.0) >= 5  # reached: the backlog went at the full rate
    assert max(starts) - min(starts) >= 1.0 - SLACK  # 10 starts at 5/s need a second window


async def test_headers_and_passthrough(served: Served, client: httpx.AsyncClient, k: str) -> None:
    free = await client.get(f"{served.url}/free/x?id={k}-free")
    assert free.status_code == 200
    assert "flow-control-waited" not in free.headers
    controlled = await client.get(f"{served.url}/one/x?k={k}&id={k}-one")
    assert controlled.headers["flow-control-waited"].isdigit()
    by_header = await client.get(
        f"{served.url}/free/y?id={k}-h", headers={"Flow-Control-Key": f"h-{k}", "Flow-Control-Value": "parallelism=1"}
    )
    assert by_header.status_code == 200
    assert "flow-control-waited" in by_header.headers


async def hold_token(client: httpx.AsyncClient, served: Served, target: str) -> str:
    """Take the token of `target`'s key and keep it (Flow-Control-Hold) until `give_back`; returns its id."""
    id = f"blocker-{uuid.uuid4().hex[:8]}"
    held = await client.get(f"{served.url}{target}&keep=1&id={id}")
    assert held.status_code == 202
    return id


async def give_back(client: httpx.AsyncClient, served: Served, id: str) -> None:
    assert (await client.get(f"{served.url}/_release", params={"id": id})).json() == {"released": True}


async def test_request_body_reaches_the_app_afterwaiting(served: Served, client: httpx.AsyncClient, k: str) -> None:
    blocker = await hold_token(client, served, f"/one/a?k={k}")
    body = os.urandom(300_000)  # several times what the middleware reads ahead while waiting
    second = asyncio.create_task(client.post(f"{served.url}/one/b?k={k}&id={k}-b", content=body))
    await wait_until(lambda: waiting(client, served, f"one:{k}", 1))
    await give_back(client, served, blocker)
    response = await second
    assert response.status_code == 200
    assert response.json()["body_size"] == len(body)
    assert int(response.headers["flow-control-waited"]) > 0


# -- errors: the sidecar's JSON bodies ----------------------------------------------------------------------------


async def test_errors_are_the_sidecars(served: Served, client: httpx.AsyncClient, k: str) -> None:
    missing = await client.get(f"{served.url}/one/x")
    assert missing.status_code == 400
    with pytest.raises(MissingKeyPart) as sidecar:
        Router(RULES).route({"type": "http", "method": "GET", "path": "/one/x", "headers": [], "query_string": b""})
    assert missing.content == error_body(sidecar.value)

    invalid = await client.get(
        f"{served.url}/free/x", headers={"Flow-Control-Key": k, "Flow-Control-Value": "parallelism=0"}
    )
    assert invalid.status_code == 400
    assert invalid.json()["error"] == "invalid_flow_control"

    blocker = await hold_token(client, served, f"/tiny/a?k={k}")
    waiter = asyncio.create_task(client.get(f"{served.url}/tiny/b?k={k}&id={k}-b"))
    await wait_until(lambda: waiting(client, served, f"tiny:{k}", 1))
    full = await client.get(f"{served.url}/tiny/c?k={k}&id={k}-c")
    assert full.status_code == 429
    assert full.json()["error"] == "waitlist_full"
    assert int(full.headers["retry-after"]) >= 0
    await give_back(client, served, blocker)
    assert (await waiter).status_code == 200
    assert f"{k}-c" not in served.log.ids()

    blocker = await hold_token(client, served, f"/short/a?k={k}")
    timed_out = await client.get(f"{served.url}/short/b?k={k}&id={k}-t")  # max_wait = 300ms
    assert timed_out.status_code == 429
    assert timed_out.json()["error"] == "wait_timeout"
    assert int(timed_out.headers["retry-after"]) >= 1
    await give_back(client, served, blocker)
    assert f"{k}-t" not in served.log.ids()
    await idle(client, served, f"short:{k}")


# -- the lease is released on every path --------------------------------------------------------------------------


async def test_release_after_success_and_app_exception(served: Served, client: httpx.AsyncClient, k: str) -> None:
    assert (await client.get(f"{served.url}/one/a?k={k}&id={k}-a")).status_code == 200
    await idle(client, served, f"one:{k}")
    # uvicorn closes the connection after an app exception even though Starlette's 500 said nothing of it; a
    # pooled connection reused before that close arrives would fail the next request (ReadError): use this one once
    failed = await client.get(f"{served.url}/one/b?k={k}&fail=1&id={k}-b", headers={"connection": "close"})
    assert failed.status_code == 500
    await idle(client, served, f"one:{k}")
    started = time.monotonic()
    after = await client.get(f"{served.url}/one/c?k={k}&id={k}-c")
    assert after.status_code == 200
    assert time.monotonic() - started < 5  # a leaked token would make it wait max_wait (30 s) and fail


async def test_release_when_the_last_chunk_is_sent(served: Served, client: httpx.AsyncClient, k: str) -> None:
    first = await client.get(f"{served.url}/one/a?k={k}&background=2&id={k}-a")  # work after the response
    assert first.status_code == 200
    second = await client.get(f"{served.url}/one/b?k={k}&id={k}-b")
    assert second.status_code == 200
    background_end = served.log.call(f"{k}-a").background_end
    assert background_end is None or served.log.call(f"{k}-b").start < background_end


async def test_client_gone_while_waiting_never_reaches_the_app(
    served: Served, client: httpx.AsyncClient, k: str
) -> None:
    blocker = await hold_token(client, served, f"/one/a?k={k}")
    gone = await RawClient.send(served.url, f"/one/b?k={k}&id={k}-gone")
    await wait_until(lambda: waiting(client, served, f"one:{k}", 1))
    await gone.hang_up()
    await wait_until(lambda: waiting(client, served, f"one:{k}", 0))  # the ticket was withdrawn
    await give_back(client, served, blocker)
    after = await client.get(f"{served.url}/one/c?k={k}&id={k}-c")
    assert after.status_code == 200
    await idle(client, served, f"one:{k}")
    assert f"{k}-gone" not in served.log.ids()


async def test_streaming_keeps_the_token_until_it_ends(served: Served, client: httpx.AsyncClient, k: str) -> None:
    stream = asyncio.create_task(client.get(f"{served.url}/one/s?k={k}&stream=12&interval=0.05&id={k}-s"))
    await wait_until(lambda: f"{k}-s" in served.log.ids())
    after = await client.get(f"{served.url}/one/c?k={k}&id={k}-c")
    streamed = await stream
    assert streamed.text.count("data: ") == 12
    assert streamed.headers["content-type"].startswith("text/event-stream")
    stream_end = served.log.call(f"{k}-s").end
    assert stream_end is not None
    assert served.log.call(f"{k}-c").start >= stream_end
    assert after.headers["flow-control-waited"].isdigit()
    await idle(client, served, f"one:{k}")


async def test_client_gone_while_streaming_releases(served: Served, client: httpx.AsyncClient, k: str) -> None:
    streaming = await RawClient.send(served.url, f"/one/s?k={k}&stream=200&interval=0.05&id={k}-s")  # 10 s
    await streaming.read_until(b"data: 0")
    started = time.monotonic()
    await streaming.hang_up()
    after = await client.get(f"{served.url}/one/c?k={k}&id={k}-c")
    assert after.status_code == 200
    assert time.monotonic() - started < 5  # well before the stream's own end
    assert served.log.call(f"{k}-s").end is not None  # the stream was stopped, not left running
    await idle(client, served, f"one:{k}")


async def test_completion_reporting_holds_the_token(served: Served, client: httpx.AsyncClient, k: str) -> None:
    accepted = await client.get(f"{served.url}/one/h?k={k}&keep=1&id={k}-h")
    assert accepted.status_code == 202
    assert "flow-control-hold" not in accepted.headers
    assert "flow-control-waited" in accepted.headers
    waiter = asyncio.create_task(client.get(f"{served.url}/one/w?k={k}&id={k}-w"))
    await wait_until(lambda: waiting(client, served, f"one:{k}", 1))
    assert (await key_state(client, served, f"one:{k}"))["active"] == 1
    assert not waiter.done()
    released = await client.get(f"{served.url}/_release", params={"id": f"{k}-h"})
    assert released.json() == {"released": True}
    assert (await waiter).status_code == 200
    await idle(client, served, f"one:{k}")


# -- processes, config, key function, lifespan ----------------------------------------------------------------------


@contextlib.contextmanager
def uvicorn_processes(count: int, store: str) -> Iterator[list[str]]:
    """`count` separate uvicorn processes serving tests.middleware_worker:app; yields their base URLs."""
    env = {**os.environ, "FLOWGATE_TEST_STORE": store}
    processes: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for _ in range(count):
            sock = free_socket()
            port = sock.getsockname()[1]
            sock.close()
            command = [sys.executable, "-m", "uvicorn", "tests.middleware_worker:app", "--host", "127.0.0.1"]
            command += ["--port", str(port), "--log-level", "warning", "--lifespan", "on"]
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            _wait_http(url)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/free/x", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not start within {timeout}s")


@pytest.mark.redis
async def test_two_uvicorn_processes_share_one_limit(redis_url: str, client: httpx.AsyncClient, k: str) -> None:
    with uvicorn_processes(2, redis_url) as urls:
        targets = [f"{urls[i % 2]}/par3/x?k={k}&hold=0.2&id={k}-{i}" for i in range(12)]
        responses = await asyncio.gather(*(client.get(url) for url in targets))
    assert [r.status_code for r in responses] == [200] * 12
    bodies = [r.json() for r in responses]
    assert len({body["pid"] for body in bodies}) == 2
    assert max_concurrency([(body["start"], body["end"]) for body in bodies]) == 3


@pytest.mark.redis
async def test_config_file_is_the_sidecars(tmp_path: Path, redis_url: str, client: httpx.AsyncClient) -> None:
    config = tmp_path / "flowgate.toml"
    config.write_text(
        f'store = "{redis_url}"\nupstream = "http://127.0.0.1:9"\nlease_ttl = "20s"\n'
        '[defaults]\nmax_wait = "10s"\n'
        '[[rules]]\nname = "reports"\npath = "/reports/"\nkey = "user:{header:X-User}"\nparallelism = 2\n'
    )
    log = AppLog()
    app = make_starlette_app(log, config=config)
    with serve(app) as url:
        responses = await asyncio.gather(
            *(client.get(f"{url}/reports/x?hold=0.15&id=r{i}", headers={"X-User": "ann"}) for i in range(6))
        )
        middleware = find_middleware(app)
        assert middleware.settings.lease_ttl == 20.0
        assert middleware.settings.defaults.max_wait == 10.0
        assert "redis" in repr(middleware)
    assert [r.status_code for r in responses] == [200] * 6
    assert max_concurrency(log.intervals("reports")) == 2
    assert middleware.controller is None  # closed at shutdown

    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\npath = "/x/"\nkey = "k"\nparallelism = 0\n')
    with pytest.raises(ConfigError, match=r"bad\.toml:4"):
        FlowControlMiddleware(app, config=bad)


async def test_key_function(client: httpx.AsyncClient) -> None:
    log = AppLog()

    def tenant(scope: Scope) -> str | None:
        for name, value in scope["headers"]:
            if name == b"x-tenant":
                return f"tenant:{value.decode()}"
        return None

    app = make_starlette_app(log, key=tenant, policy="parallelism=1", trust_policy_headers=False)
    with serve(app) as url:

        async def get(i: int, tenant: str | None) -> httpx.Response:
            headers = {"X-Tenant": tenant} if tenant else {}
            return await client.get(f"{url}/any/x?hold=0.2&id={tenant}-{i}", headers=headers)

        responses = await asyncio.gather(*(get(i, t) for i in range(4) for t in ("a", "b", None)))
    assert all(r.status_code == 200 for r in responses)
    for tenant in ("a", "b"):
        ours = [(c.start, c.end) for c in log.calls if c.id.startswith(f"{tenant}-") and c.end is not None]
        assert max_concurrency(ours) == 1
    assert max_concurrency([(c.start, c.end) for c in log.calls if c.id.startswith("None-") and c.end]) >= 2
    assert sum("flow-control-waited" in r.headers for r in responses) == 8


async def test_lifespan_opens_and_closes_the_store(client: httpx.AsyncClient) -> None:
    log = AppLog()
    app = fastapi_app(log, store="memory://", rules=RULES)
    with serve(app) as url:
        assert (await client.get(f"{url}/one/x?k=a")).status_code == 200
        middleware = find_middleware(app)
        assert middleware.controller is not None
    assert middleware.controller is None

    log = AppLog()
    app = make_starlette_app(log, rules=RULES)
    with serve(app) as url:
        assert (await client.get(f"{url}/one/x?k=a")).status_code == 200
    assert log.lifespan == ["startup", "shutdown"]  # the app's own lifespan still runs
    assert find_middleware(app).controller is None


async def bare_app(scope: Scope, receive: Any, send: Any) -> None:
    """An ASGI app that knows nothing of lifespan."""
    assert scope["type"] == "http", "lifespan is not supported"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("lifespan", ["on", "off"])
async def test_app_without_lifespan(lifespan: str, client: httpx.AsyncClient) -> None:
    middleware = FlowControlMiddleware(bare_app, rules=[Rule(key="bare", parallelism=1)])
    with serve(middleware, lifespan=lifespan) as url:
        responses = await asyncio.gather(*(client.get(f"{url}/x") for _ in range(5)))
        assert [r.text for r in responses] == ["ok"] * 5
        assert all("flow-control-waited" in r.headers for r in responses)
        assert middleware.controller is not None  # opened at startup, or lazily by the first request
    assert (middleware.controller is None) == (lifespan == "on")  # closed at shutdown when there is one


# -- in-process: cancellation, other scopes, arguments -------------------------------------------------------------


class Harness:
    """Drives the middleware directly: requests as tasks, with receive/send the test controls."""

    def __init__(self, middleware: FlowControlMiddleware) -> None:
        self.middleware = middleware
        self.started: list[str] = []
        self.release = asyncio.Event()
        self.sent: dict[str, list[Message]] = {}

    async def app(self, scope: Scope, receive: Any, send: Any) -> None:
        self.started.append(scope["path"])
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    def request(self, path: str) -> asyncio.Task[None]:
        scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
        messages = self.sent.setdefault(path, [])
        body_sent = False

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the client stays
            raise AssertionError

        async def send(message: Message) -> None:
            messages.append(message)

        return asyncio.create_task(self.middleware(scope, receive, send))


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    holder: list[Harness] = []
    middleware = FlowControlMiddleware(lambda s, r, t: holder[0].app(s, r, t), rules=[Rule(key="c", parallelism=1)])
    holder.append(Harness(middleware))
    yield holder[0]
    await middleware.aclose()


async def test_cancellation_releases_and_withdraws(harness: Harness) -> None:
    running = harness.request("/a")
    await wait_until(lambda: harness.started == ["/a"])
    waiting = harness.request("/b")
    controller = harness.middleware.controller
    assert controller is not None
    await wait_until(lambda: controller.waiting == 1)
    waiting.cancel()  # cancelled while waiting: ticket withdrawn, the app never runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert controller.waiting == 0
    running.cancel()  # cancelled while the app runs: the lease is released
    with pytest.raises(asyncio.CancelledError):
        await running
    assert controller.held == 0

    async def idle() -> bool:
        state = await controller.store.state("c")
        return state is None or (state.active, state.waiting) == (0, 0)

    await wait_until(idle)
    harness.release.set()
    await asyncio.wait_for(harness.request("/c"), 5)
    assert harness.started == ["/a", "/c"]
    assert harness.sent["/c"][0]["headers"][-1][0] == b"flow-control-waited"


async def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = FlowControlMiddleware(app, rules=[Rule(key="all", parallelism=1)])
    await middleware({"type": "websocket", "path": "/ws", "headers": []}, _never, _ignore)
    assert seen == ["websocket"]
    assert middleware.controller is None


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError


async def _ignore(message: Message) -> None:
    return None


def test_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="policy="):
        FlowControlMiddleware(bare_app, key=lambda scope: "k")
    with pytest.raises(ConfigError, match="key="):
        FlowControlMiddleware(bare_app, policy=Policy(parallelism=1))
    with pytest.raises(ConfigError, match="policy: "):
        FlowControlMiddleware(bare_app, key=lambda scope: "k", policy="parallelism=zero")
    with pytest.raises(ConfigError, match="store URI"):
        FlowControlMiddleware(bare_app, store="postgres://x")
    with pytest.raises(ConfigError, match="Rule"):
        FlowControlMiddleware(bare_app, rules=[{"key": "k"}])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="lease_ttl"):
        FlowControlMiddleware(bare_app, lease_ttl="soon")
    store = MemoryStore()
    middleware = FlowControlMiddleware(bare_app, store=store, key=lambda scope: "k", policy=Policy(rate=3))
    assert "MemoryStore" in repr(middleware)


def _load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"flowgate_example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


async def test_examples_serve(client: httpx.AsyncClient) -> None:
    with serve(_load_example("middleware_app")) as url:
        report = await client.get(f"{url}/reports/q1", headers={"X-User": "ann"})
        assert report.status_code == 200
        assert "flow-control-waited" in report.headers
        assert "flow-control-waited" not in (await client.get(f"{url}/")).headers
    with serve(_load_example("fastapi_app")) as url:
        jobs = await asyncio.gather(*(client.post(f"{url}/jobs?seconds=0.3") for _ in range(3)))
        assert [job.status_code for job in jobs] == [202] * 3
        assert max(int(job.headers["flow-control-waited"]) for job in jobs) > 0  # 2 jobs at a time: one waited
        hook = await client.post(f"{url}/hooks/a", headers={"X-Tenant-Id": "t1"})
        assert hook.status_code == 200
