"""Run the proxy for tests: in the test's event loop (direct access to its controller and store) or as a process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn

from gateway.engine import FlowController
from gateway.policy import Policy
from gateway.proxy import ProxyApp
from gateway.routing import Router
from gateway.rules import Rule
from gateway.server import protocol_for
from gateway.stores import Store, open_store
from gateway.upstream import open_upstream_client
from tests.upstream_app import free_port

CLIENT_ENV = "FLOWGATE_TEST_UPSTREAM_CLIENT"  # the proxy suites run once per upstream client (proxy_fixtures)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Gateway:
    url: str
    port: int
    app: ProxyApp
    controller: FlowController
    store: Store


@contextlib.asynccontextmanager
async def running_gateway(
    upstream: str,
    store_uri: str = "memory://",
    rules: Sequence[Rule] = (),
    *,
    defaults: Policy | None = None,
    trust_policy_headers: bool = True,
    trusted_proxies: Sequence[str] = (),
    lease_ttl: float = 60.0,
    http: str = "flowgate",
    express_lane: bool = True,
    **app_options: Any,
) -> AsyncIterator[Gateway]:
    """uvicorn serving a ProxyApp on a free port, in this event loop, with `flowgate serve`'s protocol (`http`
    "flowgate": with the lean client, requests that can go at once take its express lane, see gateway/relay.py)
    or uvicorn's own ("httptools": a plain ASGI server, without Flowgate's extensions)."""
    store = open_store(store_uri)
    controller = FlowController(store, lease_ttl=lease_ttl)
    router = Router(
        rules,
        defaults=defaults or Policy(),
        trust_policy_headers=trust_policy_headers,
        trusted_proxies=trusted_proxies,
    )
    app_options.setdefault("client", open_upstream_client(upstream, os.environ.get(CLIENT_ENV, "auto")))
    app = ProxyApp(upstream=upstream, controller=controller, router=router, **app_options)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=protocol_for(app, "proxy", express_lane=express_lane) if http == "flowgate" else http,
        log_level="warning",
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            await asyncio.sleep(0.01)
        yield Gateway(f"http://127.0.0.1:{port}", port, app, controller, store)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        await controller.close()
        await store.close()


class GatewayProcess:
    """`python -m uvicorn tests.gateway_app:create_app --factory` on a free port (see tests/gateway_app.py)."""

    def __init__(self, upstream: str, store_uri: str = "memory://", rules: Sequence[dict[str, Any]] = (), **env: str):
        self.port = free_port()
        environment = dict(os.environ)
        environment.update(
            FLOWGATE_TEST_UPSTREAM=upstream,
            FLOWGATE_TEST_STORE=store_uri,
            FLOWGATE_TEST_RULES=json.dumps(list(rules)),
            PYTHONPATH=ROOT,
        )
        environment.update(env)
        args = [sys.executable, "-m", "uvicorn", "tests.gateway_app:create_app", "--factory"]
        args += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        args += ["--no-proxy-headers", "--no-server-header", "--no-date-header", "--no-access-log"]
        self.process = subprocess.Popen(args, env=environment, cwd=ROOT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway process exited with {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("gateway process did not start")

    def rss_kib(self, field: str = "VmRSS") -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not found")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextlib.contextmanager
def gateway_processes(
    count: int, upstream: str, store_uri: str, rules: Sequence[dict[str, Any]] = (), **env: str
) -> Iterator[list[GatewayProcess]]:
    processes = [GatewayProcess(upstream, store_uri, rules, **env) for _ in range(count)]
    try:
        for process in processes:
            process.wait_ready()
        yield processes
    finally:
        for process in processes:
            process.stop()


async def eventually(check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `check` until it is true; fail after `timeout` seconds (a generous bound, not a speed assert)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes or `timeout`; the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
                    if response_complete(b"".join(chunks)):
                        break
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def response_complete(data: bytes) -> bool:
    """A whole response with a Content-Length body has arrived."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def key_idle(store: Store, key: str) -> bool:
    """True when the store holds no live lease and no waiting ticket for `key`."""
    state = await store.state(key)
    return state is None or (state.active == 0 and state.waiting == 0)
