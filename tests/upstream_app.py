"""A recording upstream for proxy tests, and helpers to run ASGI apps on loopback.

`RecordingUpstream` is a pure ASGI app. Every request is recorded under its flow-control key (the
`Flow-Control-Key` header the gateway sends, else `X-Test-Key`, else "") with its start and end time
(`time.monotonic()`, same clock in every thread of the test process), so tests can check, at the upstream, how
many calls of a key ran at once and how many started in any window. Behaviour is chosen by query parameters:

    sleep=<s>        hold the request this long before answering (default 0)
    status=<n>       answer with this status (default 200)
    hold=1           add `Flow-Control-Hold: 1` (completion reporting)
    size=<n>         stream an n-byte response body (64 KiB chunks) instead of the JSON summary
    hop=1            add hop-by-hop response headers (and a header named in Connection)
    location=<url>   add `Location` (use with status=302)
    seq=<n>          stored in the record (FIFO tests)
    drip=<n>         stream n 1 KiB chunks, one every 50 ms (chunked), stopping early if the client leaves

The default answer is JSON: method, path, query, headers (lower-cased names, in order), body size, and the
monotonic time the first body byte arrived (`first_byte_at`).

`ServerThread` runs any ASGI app under uvicorn in a background thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import uvicorn

Scope = dict[str, Any]


@dataclass
class Call:
    key: str
    path: str
    start: float
    end: float = 0.0
    seq: int | None = None
    lease: str = ""
    body_size: int = 0


@dataclass
class RecordingUpstream:
    """The test upstream (see the module docstring). Thread-safe records; `calls(key)` returns a snapshot."""

    records: dict[str, list[Call]] = field(default_factory=lambda: defaultdict(list))
    active: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_active: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls(self, key: str) -> list[Call]:
        with self.lock:
            return list(self.records.get(key, []))

    def peak(self, key: str) -> int:
        with self.lock:
            return self.max_active.get(key, 0)

    def in_flight(self, key: str) -> int:
        with self.lock:
            return self.active.get(key, 0)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]]
        lookup = dict(headers)
        key = lookup.get("flow-control-key", lookup.get("x-test-key", ""))
        query = dict(parse_qsl(scope["query_string"].decode()))
        call = Call(key, scope["path"], time.monotonic(), seq=int(query["seq"]) if "seq" in query else None)
        call.lease = lookup.get("flow-control-lease", "")
        with self.lock:
            self.records[key].append(call)
            self.active[key] += 1
            self.max_active[key] = max(self.max_active[key], self.active[key])
        try:
            await self._serve(scope, receive, send, query, headers, call)
        finally:
            call.end = time.monotonic()
            with self.lock:
                self.active[key] -= 1

    async def _serve(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], headers: list[tuple[str, str]], call: Call
    ) -> None:
        size = 0
        first_byte_at = None
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk and first_byte_at is None:
                first_byte_at = time.monotonic()
            size += len(chunk)
            more = message.get("more_body", False)
        call.body_size = size
        if float(query.get("sleep", 0)) > 0:
            await asyncio.sleep(float(query["sleep"]))
        status = int(query.get("status", 200))
        out: list[tuple[bytes, bytes]] = []
        if query.get("hold") == "1":
            out.append((b"flow-control-hold", b"1"))
        if query.get("hop") == "1":
            out += [
                (b"connection", b"x-hop-secret, keep-alive"),
                (b"x-hop-secret", b"must-not-pass"),
                (b"keep-alive", b"timeout=5"),
                (b"proxy-authenticate", b"Basic"),
                (b"x-end-to-end", b"passes"),
            ]
        if "location" in query:
            out.append((b"location", query["location"].encode()))
        if "drip" in query:
            await send({"type": "http.response.start", "status": status, "headers": out})
            for _ in range(int(query["drip"])):
                await send({"type": "http.response.body", "body": b"d" * 1024, "more_body": True})
                if await _disconnected_within(receive, 0.05):
                    call.body_size = -1  # marks "the client (the gateway) went away mid-stream"
                    return
            await send({"type": "http.response.body", "body": b""})
            return
        if "size" in query:
            total = int(query["size"])
            out.append((b"content-length", str(total).encode()))
            await send({"type": "http.response.start", "status": status, "headers": out})
            chunk = b"x" * 65536
            sent = 0
            while sent < total:
                piece = chunk[: min(65536, total - sent)]
                sent += len(piece)
                await send({"type": "http.response.body", "body": piece, "more_body": sent < total})
            return
        body = json.dumps(
            {
                "method": scope["method"],
                "path": scope["path"],
                "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),
                "query": scope["query_string"].decode("latin-1"),
                "headers": headers,
                "body_size": size,
                "first_byte_at": first_byte_at,
            }
        ).encode()
        out += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})


async def _disconnected_within(receive: Any, seconds: float) -> bool:
    try:
        message = await asyncio.wait_for(receive(), seconds)
    except TimeoutError:
        return False
    return bool(message["type"] == "http.disconnect")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerThread:
    """Serve an ASGI app with uvicorn on 127.0.0.1:<free port> in a daemon thread with its own event loop."""

    def __init__(self, app: Any, **options: Any) -> None:
        self.port = free_port()
        options.setdefault("log_level", "warning")
        options.setdefault("lifespan", "on")
        options.setdefault("proxy_headers", False)  # a gateway under test sees the real peer address
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, **options)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())
        self.loop.close()

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def serve_in_thread(app: Any, **options: Any) -> Iterator[ServerThread]:
    server = ServerThread(app, **options).start()
    try:
        yield server
    finally:
        server.stop()


def max_concurrency(calls: list[Call]) -> int:
    """Most calls open at once: a sweep over (start +1, end -1), ends before starts at equal times."""
    events = sorted(
        [(call.start, 1) for call in calls] + [(call.end, -1) for call in calls], key=lambda e: (e[0], e[1])
    )
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def max_starts_in_window(calls: list[Call], period: float, slack: float = 0.03) -> int:
    """Most starts inside any window of length `period - slack` (the slack absorbs dispatch jitter)."""
    starts = sorted(call.start for call in calls)
    width = period - slack
    best = 0
    low = 0
    for high, start in enumerate(starts):
        while start - starts[low] >= width:
            low += 1
        best = max(best, high - low + 1)
    return best
