"""One request's ASGI cycle on `flowgate serve`'s connections: the app's `receive` and `send`.

It does what uvicorn's RequestResponseCycle does (same framing, errors and log lines), with less per request:
no asyncio.Event (a future only when `receive()` must wait), no copy of the response headers, and, on the proxy
port, no regular-expression check of each response header (`check_headers` False): the proxy's headers come from
the upstream client's parser or from the gateway itself. The protocol (server.py) feeds it the body
(`add_body`, `end_body`), tells it when the client left (`lose`) and counts on `response_complete` and
`more_body`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from .inbox import BODY_EXTENSION, DISCONNECT_EXTENSION
from .types import ASGIApp, Message

if TYPE_CHECKING:
    from uvicorn.protocols.http.flow_control import FlowControl

_BAD_NAME: Final = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_BAD_VALUE: Final = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE: Final = b"connection: close"
_CHUNKED: Final = b"transfer-encoding: chunked"
_STATUS: Final = {status: line.removesuffix(b"\r\n") for status, line in STATUS_LINE.items()}
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_LAST_CHUNK: Final = b"0\r\n\r\n"
_ERROR_500: Final = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", b"21"),
    (b"connection", b"close"),
]

logger = logging.getLogger("uvicorn.error")
access_logger = logging.getLogger("uvicorn.access")


class RequestCycle:
    """The request's body as `receive()` messages and the response as `send()` messages, for one app call."""

    __slots__ = (
        "_body",
        "_done",
        "_loop",
        "_news",
        "_on_response",
        "_queued",
        "_remaining",
        "_task",
        "_tasks",
        "_waiter",
        "access_log",
        "check_headers",
        "chunked",
        "default_headers",
        "disconnected",
        "drained",
        "flow",
        "keep_alive",
        "more_body",
        "response_complete",
        "response_started",
        "scope",
        "transport",
        "waiting_for_100_continue",
        "watcher",
    )

    def __init__(
        self,
        scope: dict[str, Any],
        transport: asyncio.Transport,
        flow: FlowControl,
        *,
        keep_alive: bool,
        expect_100_continue: bool,
        on_response: Callable[[], object],
        default_headers: list[tuple[bytes, bytes]] | None = None,
        access_log: bool = False,
        check_headers: bool = True,
    ) -> None:
        self.scope = scope
        self.transport = transport
        self.flow = flow
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        self.access_log = access_log
        self.check_headers = check_headers
        self._on_response = on_response
        self.default_headers = default_headers
        self.disconnected = False
        self.more_body = True
        self._body: list[bytes] = []
        self._queued = 0  # bytes in _body
        self._news = False  # something for receive(): body bytes, the body's end, or the end of the cycle
        self._waiter: asyncio.Future[None] | None = None
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self._remaining = 0  # Content-Length bytes still to send
        self._done = False  # the app returned
        self.watcher: Callable[[], object] | None = None
        self.drained: Callable[[], object] | None = None  # called when the client's socket takes writes again
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] | None = None

    # -- fed by the protocol ----------------------------------------------------------------------------------------

    def add_body(self, chunk: bytes) -> int:
        """Queue request body bytes; returns how many are queued (the protocol pauses reading above a mark)."""
        self._body.append(chunk)
        self._queued += len(chunk)
        self._signal()
        return self._queued

    def end_body(self) -> None:
        self.more_body = False
        self._signal()

    def lose(self) -> None:
        """The connection is gone."""
        if not self.response_complete:
            self.disconnected = True
            watcher, self.watcher = self.watcher, None
            if watcher is not None:
                watcher()
        self._signal()

    def watch(self, callback: Callable[[], object]) -> None:
        """The `flowgate.disconnect` extension (see inbox.py): `callback()` once if the client leaves before the
        response is complete."""
        self.watcher = callback

    def take_body(self) -> bytes | None:
        """The `flowgate.body` extension (see inbox.py): the whole request body if all of it has arrived and none
        of it was read, else None (then `receive()` gives it)."""
        body = self._body
        if self.more_body or self.disconnected or not body:
            return None
        whole = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._queued = 0
        self._news = False  # taken: receive() now waits for the end of the cycle
        return whole

    def _signal(self) -> None:
        self._news = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the app ------------------------------------------------------------------------------------------------------

    def start_task(self, app: ASGIApp, tasks: set[asyncio.Task[None]], loop: asyncio.AbstractEventLoop) -> None:
        """Run `app` for this request in a task of its own, kept in `tasks` while it runs (the server waits for
        them when it stops). The task leaves `tasks` itself: no done-callback (one loop callback per request)."""
        self._loop = loop  # receive() waits on it (asyncio.get_running_loop() makes a getpid() call on 3.11)
        # made here, not with the scope: a relayed request (relay.py) never runs as the app and needs none
        extensions = {DISCONNECT_EXTENSION: {"watch": self.watch}, BODY_EXTENSION: {"take": self.take_body}}
        self.scope["extensions"] = extensions
        task = self._task = loop.create_task(self.run(app))
        self._tasks = tasks
        tasks.add(task)

    async def run(self, app: ASGIApp) -> None:
        try:
            result: object = await app(self.scope, self.receive, self.send)  # type: ignore[func-returns-value]
        except BaseException as exc:
            logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self.transport.close()
        else:
            if result is not None:
                logger.error("ASGI callable should return None, but returned '%s'.", result)
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                logger.error("ASGI callable returned without starting response.")
                await self._send_500()
            elif not self.response_complete and not self.disconnected:
                logger.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self._done = True
            # The request's objects point back at this cycle (the inbox's `receive`, the scope's `watch`): break
            # those loops so reference counting frees them now, not the garbage collector (~10% of the CPU)
            self.watcher = None
            self.scope.pop("extensions", None)
            if self._tasks is not None:
                self._tasks.discard(self._task)

    async def _send_500(self) -> None:
        await self.send({"type": "http.response.start", "status": 500, "headers": _ERROR_500})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error", "more_body": False})

    async def receive(self) -> Message:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(_CONTINUE)
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            if not self._news:
                waiter = self._waiter = self._loop.create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
            self._news = False
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        body = self._body
        chunk = (body[0] if len(body) == 1 else b"".join(body)) if body else b""
        body.clear()
        self._queued = 0
        return {"type": "http.request", "body": chunk, "more_body": self.more_body}

    async def send(self, message: Message) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            self.start_response(message["status"], message.get("headers", ()))
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
            self.write_body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")

    def start_response(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.response_started = True
        self.waiting_for_100_continue = False
        scope = self.scope
        if self.access_log:
            client = scope["client"]
            query = scope["query_string"]
            access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                f"{client[0]}:{client[1]}" if client else "",
                scope["method"],
                scope["path"] + ("?" + query.decode("ascii") if query else ""),
                scope["http_version"],
                status,
            )
        if self.default_headers:
            headers = [*self.default_headers, *headers]
        lines = [_STATUS[status]]  # the lines of the head, joined by CRLF at the end
        framed: bool | None = None  # Content-Length (False) or chunked (True) given by the app
        close = False
        check = self.check_headers
        for name, value in headers:
            if check:
                if _BAD_NAME.search(name):
                    raise RuntimeError("Invalid HTTP header name.")
                if _BAD_VALUE.search(value):
                    raise RuntimeError("Invalid HTTP header value.")
            name = name.lower()
            if name in _FRAMING:  # one set lookup for the common header, not three comparisons
                if name == b"content-length":
                    if framed is None:
                        self._remaining = int(value)
                        framed = False
                elif name == b"transfer-encoding":
                    if value.lower() == b"chunked":
                        self._remaining = 0
                        framed = True
                elif b"close" in [token.strip() for token in value.lower().split(b",")]:
                    self.keep_alive = False
                    close = True
            lines.append(name + b": " + value)
        if not self.keep_alive and not close:
            lines.append(_CLOSE)
        if framed is None and scope["method"] != "HEAD" and status != 204 and status != 304:
            framed = True  # neither Content-Length nor Transfer-Encoding
            lines.append(_CHUNKED)
        self.chunked = bool(framed)
        lines.append(b"\r\n")
        self.transport.write(b"\r\n".join(lines))

    def write_body(self, body: bytes, more_body: bool) -> None:
        transport = self.transport
        if self.scope["method"] == "HEAD":
            self._remaining = 0
        elif self.chunked:
            if body:
                transport.write(b"%x\r\n%s\r\n%s" % (len(body), body, b"" if more_body else _LAST_CHUNK))
            elif not more_body:
                transport.write(_LAST_CHUNK)
        else:
            size = len(body)
            if size > self._remaining:
                raise RuntimeError("Response content longer than Content-Length")
            self._remaining -= size
            if size:
                transport.write(body)
        if not more_body:
            if self._remaining != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self._signal()
            if not self.keep_alive:
                transport.close()
            if not self._done:
                self._on_response()


__all__ = ["RequestCycle"]
