"""Starlette and FastAPI test apps behind FlowControlMiddleware, served by a real uvicorn on loopback.

Every app has the same endpoints, and records each call (start, end, pid) in an `AppLog`:

    GET|POST /{group}/{name}?k=KEY&id=ID     flow-controlled by the rule of `group` (key `group:KEY`), or not
        hold=S          sleep S seconds before answering
        fail=1          raise after recording the start (an app exception)
        stream=N        a server-sent-events stream of N events, `interval` seconds apart (default 0.05)
        keep=1          answer 202 with Flow-Control-Hold: 1 (completion reporting); /_release?id= ends it
        background=S    a background task of S seconds after the response (its end in `Call.background_end`)
    GET /_state?key=K   {"active", "waiting"} of a key in the middleware's store
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway import FlowControlMiddleware, Rule
from gateway.middleware import FlowGrant
from tests.uvicorn_thread import uvicorn_in_thread

RULES = [
    Rule(name="par3", path="/par3/", key="par3:{query:k}", parallelism=3),
    Rule(name="rate5", path="/rate5/", key="rate5:{query:k}", rate=5, period="1s"),
    Rule(name="one", path="/one/", key="one:{query:k}", parallelism=1),
    Rule(name="tiny", path="/tiny/", key="tiny:{query:k}", parallelism=1, max_waiting=1),
    Rule(name="short", path="/short/", key="short:{query:k}", parallelism=1, max_wait="300ms"),
    Rule(name="user", path="/user/", key="user:{header:X-User}", parallelism=1),
]


@dataclass
class Call:
    id: str
    group: str
    start: float  # time.monotonic() in the serving process
    wall_start: float  # time.time(), comparable across processes
    end: float | None = None
    wall_end: float | None = None
    body_size: int = 0
    background_end: float | None = None

    def finish(self) -> None:
        self.end, self.wall_end = time.monotonic(), time.time()


@dataclass
class AppLog:
    """What the app saw. Appended from the server's thread, read from the test's."""

    calls: list[Call] = field(default_factory=list)
    grants: dict[str, FlowGrant] = field(default_factory=dict)
    lifespan: list[str] = field(default_factory=list)

    def ids(self) -> set[str]:
        return {call.id for call in self.calls}

    def call(self, id: str) -> Call:
        return next(call for call in self.calls if call.id == id)

    def intervals(self, group: str | None = None) -> list[tuple[float, float]]:
        return [(c.start, c.end) for c in self.calls if c.end is not None and group in (None, c.group)]


def find_middleware(app: Any) -> FlowControlMiddleware:
    """The FlowControlMiddleware inside a Starlette app's middleware stack."""
    node = app.middleware_stack
    while not isinstance(node, FlowControlMiddleware):
        node = node.app
    return node


async def handle(log: AppLog, request: Request, group: str) -> Response:
    query = request.query_params
    call = Call(query.get("id", ""), group, time.monotonic(), time.time())
    log.calls.append(call)
    if request.method == "POST":
        call.body_size = len(await request.body())
    if "fail" in query:
        call.finish()
        raise RuntimeError("the app failed")
    if "stream" in query:
        count, interval = int(query["stream"]), float(query.get("interval", "0.05"))

        async def events() -> AsyncIterator[bytes]:
            try:
                for index in range(count):
                    yield f"data: {index}\n\n".encode()
                    await asyncio.sleep(interval)
            finally:
                call.finish()

        return StreamingResponse(events(), media_type="text/event-stream")
    await asyncio.sleep(float(query.get("hold", "0")))
    call.finish()
    body = {"id": call.id, "start": call.wall_start, "end": call.wall_end, "pid": os.getpid()}
    body["body_size"] = call.body_size
    if "keep" in query:
        log.grants[call.id] = request.scope["flowgate"]
        return JSONResponse(body, status_code=202, headers={"Flow-Control-Hold": "1"})
    if "background" in query:

        async def background() -> None:
            await asyncio.sleep(float(query["background"]))
            call.background_end = time.monotonic()

        return JSONResponse(body, background=BackgroundTask(background))
    return JSONResponse(body)


async def state(request: Request) -> Response:
    controller = find_middleware(request.app).controller
    assert controller is not None
    found = await controller.store.state(request.query_params["key"])
    return JSONResponse({"active": found.active if found else 0, "waiting": found.waiting if found else 0})


async def release(log: AppLog, request: Request) -> Response:
    return JSONResponse({"released": await log.grants[request.query_params["id"]].release()})


def starlette_app(log: AppLog, **options: Any) -> Starlette:
    """A Starlette app with its own lifespan, and `app.add_middleware(FlowControlMiddleware, **options)`."""

    async def work(request: Request) -> Response:
        return await handle(log, request, request.path_params["group"])

    async def release_route(request: Request) -> Response:
        return await release(log, request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.lifespan.append("startup")
        yield
        log.lifespan.append("shutdown")

    app = Starlette(
        routes=[
            Route("/_state", state),
            Route("/_release", release_route),
            Route("/{group}/{name}", work, methods=["GET", "POST"]),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(FlowControlMiddleware, **options)
    return app


def fastapi_app(log: AppLog, **options: Any) -> FastAPI:
    """The same endpoints in FastAPI style (no lifespan of its own)."""
    app = FastAPI()

    @app.get("/_state")
    async def state_route(request: FastAPIRequest) -> Response:
        return await state(request)

    @app.get("/_release")
    async def release_route(request: FastAPIRequest) -> Response:
        return await release(log, request)

    @app.api_route("/{group}/{name}", methods=["GET", "POST"])
    async def work(group: str, name: str, request: FastAPIRequest) -> Response:
        return await handle(log, request, group)

    app.add_middleware(FlowControlMiddleware, **options)
    return app


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def serve(app: Any, lifespan: str = "on") -> contextlib.AbstractContextManager[str]:
    """Serve `app` with uvicorn (httptools) in a thread on a free loopback port; yields the base URL."""
    return uvicorn_in_thread(app, lifespan)


class RawClient:
    """One HTTP/1.1 request on a plain socket, so a test can hang up whenever it likes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def send(cls, base_url: str, target: str) -> RawClient:
        host, port = base_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        return cls(reader, writer)

    async def read_until(self, marker: bytes) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(marker), 10)

    async def hang_up(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
