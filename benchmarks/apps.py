"""ASGI apps the proxy benchmark runs as separate processes (`python -m uvicorn benchmarks.apps:NAME --factory`).

- `naive_aiohttp`: Starlette route + one pooled aiohttp session, body read whole, Response built (the common way).
- `naive_aiohttp_redis`: the same plus the usual two Redis calls per request (acquire a slot, release it).
- `naive_httpx`: Starlette + one `httpx.AsyncClient`.
- `recorder`: an upstream that records every call's start and end and answers `/__stats` (max concurrency and the
  most starts in any `period - slack` window) and `/__reset`.

Settings from the environment: BENCH_UPSTREAM, BENCH_REDIS (URL), BENCH_PARALLELISM.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any
from urllib.parse import parse_qsl

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "host"}


def _forward_headers(items: Any) -> dict[str, str]:
    return {name: value for name, value in items if name.lower() not in HOP}


def naive_aiohttp() -> Any:
    import aiohttp
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    upstream = os.environ["BENCH_UPSTREAM"]
    state: dict[str, Any] = {}

    async def proxy(request: Request) -> Response:
        session = state.get("session")
        if session is None:
            session = state["session"] = aiohttp.ClientSession(auto_decompress=False)
        async with session.request(
            request.method,
            upstream + request.url.path,
            headers=_forward_headers(request.headers.items()),
            data=await request.body(),
            allow_redirects=False,
        ) as response:
            body = await response.read()
            return Response(body, response.status, headers=_forward_headers(response.headers.items()))

    return Starlette(routes=[Route("/{path:path}", proxy, methods=["GET", "POST"])])


_ACQUIRE = (
    "local n = redis.call('INCR', KEYS[1]) "
    "if n > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) return 0 end return 1"
)


def naive_aiohttp_redis() -> Any:
    import redis.asyncio as redis_asyncio

    inner = naive_aiohttp()
    pool = redis_asyncio.BlockingConnectionPool.from_url(os.environ["BENCH_REDIS"], max_connections=128)
    client = redis_asyncio.Redis(connection_pool=pool)
    limit = os.environ.get("BENCH_PARALLELISM", "64")
    acquire = client.register_script(_ACQUIRE)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        while not await acquire(keys=["naive:slots"], args=[limit]):  # the naive way: poll  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        try:
            await inner(scope, receive, send)
        finally:
            await client.decr("naive:slots")

    return app


def naive_httpx() -> Any:
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    upstream = os.environ["BENCH_UPSTREAM"]
    client = httpx.AsyncClient(base_url=upstream, limits=httpx.Limits(max_connections=256))

    async def proxy(request: Request) -> Response:
        response = await client.request(
            request.method,
            request.url.path,
            headers=_forward_headers(request.headers.items()),
            content=await request.body(),
        )
        return Response(response.content, response.status_code, headers=_forward_headers(response.headers.items()))

    return Starlette(routes=[Route("/{path:path}", proxy, methods=["GET", "POST"])])


def recorder() -> Any:
    starts: list[float] = []
    ends: list[float] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        query = dict(parse_qsl(scope["query_string"].decode()))
        if scope["path"] == "/__stats":
            body = json.dumps(_stats(starts, ends, float(query.get("period", 1)), float(query.get("slack", 0.03))))
            await _answer(send, body.encode())
            return
        if scope["path"] == "/__reset":
            starts.clear()
            ends.clear()
            await _answer(send, b"{}")
            return
        starts.append(time.monotonic())
        if "sleep" in query:
            await asyncio.sleep(float(query["sleep"]))
        ends.append(time.monotonic())
        await _answer(send, b"ok\n")

    return app


async def _answer(send: Any, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _stats(starts: list[float], ends: list[float], period: float, slack: float) -> dict[str, Any]:
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends], key=lambda e: (e[0], e[1]))
    live = peak = 0
    for _, step in events:
        live += step
        peak = max(peak, live)
    ordered = sorted(starts)
    best = low = 0
    for high, start in enumerate(ordered):
        while start - ordered[low] >= period - slack:
            low += 1
        best = max(best, high - low + 1)
    span = (ordered[-1] - ordered[0]) if len(ordered) > 1 else 0.0
    return {"count": len(starts), "span": span, "max_concurrency": peak, "max_in_window": best}
