"""The reverse proxy: a pure ASGI app that holds each request for a token of its key, then forwards it.

Per request: refuse what a reverse proxy must not forward (CONNECT, absolute-form targets, WebSocket upgrades,
untrustworthy framing, a declared body over `max_body`) → route (rules and flow-control headers) → acquire a
lease, waiting in FIFO order; a client that leaves meanwhile withdraws its ticket → forward with the body streamed
→ stream the response back → release the lease, on every path. An upstream answer carrying `Flow-Control-Hold: 1`
keeps the token (detached) until the admin API releases the lease or it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final
from urllib.parse import quote, urlsplit

from .engine import FlowController, Lease
from .errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    ConfigError,
    DeliveryError,
    MethodNotAllowed,
    NotImplementedUpgrade,
    StoreUnavailable,
)
from .http import (
    HOP_BY_HOP,
    Headers,
    connection_tokens,
    error_body,
    error_headers,
    send_error,
)
from .inbox import BODY_EXTENSION, DISCONNECT_EXTENSION, RequestInbox
from .metrics import DeliveryObserver, Metrics
from .routing import Route, Router
from .types import Message, Receive, Scope, Send
from .upstream import open_upstream_client
from .upstream.base import UpstreamClient, UpstreamResponse

DEFAULT_UPSTREAM_TIMEOUT = 60.0
DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 60.0  # seconds the client may keep the proxy waiting for body bytes, summed (see inbox.py)

#: Request headers never passed upstream as the client sent them (the proxy sets its own or handles them).
_DROP_REQUEST: Final = HOP_BY_HOP | {
    b"host",
    b"expect",
    b"x-forwarded-for",
    b"flow-control-key",
    b"flow-control-lease",
}
_FORWARDED_SET: Final = frozenset({b"x-forwarded-proto", b"x-forwarded-host"})
_DROP_UNTRUSTED: Final = _DROP_REQUEST | _FORWARDED_SET  # X-Forwarded-Proto/Host kept only from trusted proxies
_HOLD: Final = b"flow-control-hold"
_SKIP_RESPONSE: Final = HOP_BY_HOP | {_HOLD}
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})  # list no header besides hop-by-hop ones
_SCHEMES: Final = {"http": b"http", "https": b"https"}
_NONE: Final[dict[str, Any]] = {}
_NO_NAMES: Final[frozenset[bytes]] = frozenset()


class ProxyApp:
    """Reverse proxy to `upstream` with flow control by `router` and `controller`."""

    def __init__(
        self,
        *,
        upstream: str,
        controller: FlowController,
        router: Router,
        upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT,
        max_body: int = DEFAULT_MAX_BODY,
        body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
        client: UpstreamClient | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f'upstream "{upstream}" must be an http:// or https:// URL with a host')
        self.upstream = upstream
        self.controller = controller
        self.router = router
        self.upstream_timeout = upstream_timeout
        self.max_body = max_body
        self.body_timeout = body_timeout
        self._host = parts.netloc.rpartition("@")[2].encode("idna")
        if client is None:
            client = open_upstream_client(upstream)
        self.client = client
        self.observer = DeliveryObserver(metrics)
        self._opened = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it serves in (its client's connections too)

    @property
    def opened(self) -> bool:
        return self._opened

    def __repr__(self) -> str:
        return f"ProxyApp(upstream={self.upstream!r}, router={self.router!r})"

    async def open(self) -> None:
        """Open the upstream client (also done lazily by the first request)."""
        opener = getattr(self.client, "open", None)
        if opener is not None:
            await opener()
        self._loop = asyncio.get_running_loop()
        self._opened = True

    async def aclose(self) -> None:
        """Close the upstream client. The controller and its store belong to whoever made them."""
        self._opened = False
        await self.client.aclose()

    # -- HTTP ---------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The HTTP path is inline, not a method of its own: one coroutine frame less to resume on every await.
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        if not self._opened:
            await self.open()
        try:
            headers, content_length = self.request_headers(scope)
            route = None if self.router.passthrough else self.router.route(scope)
        except DeliveryError as exc:
            self.observer.refused(exc)
            await send_error(send, exc, close=exc.status in (405, 413) or isinstance(exc, BadRequest))
            return
        # current_task(loop) skips a getpid() system call that Python 3.11 makes to find the running loop
        task = asyncio.current_task(self._loop) or asyncio.current_task()
        whole: bytes | None = None  # the request body, when it had all arrived with the head
        extensions = scope.get("extensions", _NONE)
        watch = extensions.get(DISCONNECT_EXTENSION, _NONE).get("watch")
        if content_length and watch is not None:
            take = extensions.get(BODY_EXTENSION, _NONE).get("take")
            whole = take() if take is not None else None
            if whole is None:
                watch = None  # the body is still coming: the inbox's task reads it
        elif content_length is None:
            watch = None
        inbox = RequestInbox(receive, task, body_timeout=self.body_timeout, watch=watch)
        exchange = Exchange(route)
        try:
            if route is not None:
                exchange.lease = await self._acquire(route, send)
                if exchange.lease is not None:
                    headers.append((b"flow-control-key", route.key.encode()))
                    headers.append((b"flow-control-lease", exchange.lease.token.encode()))
            if route is None:
                await self._forward(scope, send, inbox, headers, content_length, whole, exchange)
            elif exchange.lease is not None:
                with self.observer.in_flight(route):
                    await self._forward(scope, send, inbox, headers, content_length, whole, exchange)
        except asyncio.CancelledError:
            if not inbox.disconnected or task is None:
                self._release_soon(inbox, exchange)
                raise
            task.uncancel()  # our own doing: the client left; nothing to answer
        except BaseException:
            self._release_soon(inbox, exchange)
            raise
        inbox.close()
        if task is not None and inbox.disconnected and task.cancelling():
            await _absorb_cancel(task)  # the client left just as we finished: a cancel of ours is on its way
        if exchange.lease is not None and not exchange.held:
            try:
                await self.controller.release(exchange.lease)
            except StoreUnavailable:
                self.observer.store_error("release")  # the lease expires by itself after lease_ttl
            except asyncio.CancelledError:
                self.controller.release_soon(exchange.lease)
                raise

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await self._refuse_websocket(scope, receive, send)

    def _release_soon(self, inbox: RequestInbox, exchange: Exchange) -> None:
        """Release on a path that cannot await (cancellation, an error on its way up)."""
        inbox.close()
        if exchange.lease is not None and not exchange.held:
            self.controller.release_soon(exchange.lease)
            exchange.lease = None

    async def _acquire(self, route: Route, send: Send) -> Lease | None:
        observer = self.observer
        observer.entered(route)
        try:
            lease = await self.controller.acquire(route.key, route.policy)
        except DeliveryError as exc:  # Rejected (429) or StoreUnavailable (503)
            observer.rejected(route, exc)
            await send_error(send, exc)
            return None
        except BaseException:  # the client left, or the server stops
            observer.cancelled(route)
            raise
        observer.admitted(route, lease)
        return lease

    async def _forward(
        self,
        scope: Scope,
        send: Send,
        inbox: RequestInbox,
        headers: Headers,
        content_length: int | None,
        whole: bytes | None,
        exchange: Exchange,
    ) -> None:
        """Send the request upstream and stream the answer back."""
        body: bytes | AsyncIterator[bytes] | None = whole
        if whole is None and content_length != 0:
            body = _CappedBody(inbox, self.max_body, self._too_large_message)
        started = time.perf_counter()
        try:
            response = await self.client.request(
                scope["method"], upstream_target(scope), headers, body, timeout=self.upstream_timeout
            )
        except DeliveryError as exc:
            if inbox.too_large:
                await send_error(send, BodyTooLarge(self._too_large_message()), close=True)
            elif inbox.timed_out:  # the upstream call is aborted; the rest of the body will not be read
                await send_error(
                    send, BodyTimeout(f"the request body did not arrive within {self.body_timeout:g}s"), close=True
                )
            elif not inbox.disconnected:
                self.observer.failed(exchange.route, exc)
                await send_error(send, exc)
            return
        self.observer.answered(exchange.route, started)
        try:
            await self._respond(send, inbox, response, exchange)
        finally:
            await response.aclose()

    async def _respond(self, send: Send, inbox: RequestInbox, response: UpstreamResponse, exchange: Exchange) -> None:
        out = self.response_headers(response, exchange)
        await send({"type": "http.response.start", "status": response.status, "headers": out})
        try:
            async for chunk in response.body():  # each chunk goes on at once: a stream's events are not held back
                if response.complete:  # the last one: it ends the response, with no empty message after it
                    inbox.disarm()
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except DeliveryError:
            return  # the response has started: all we can do is cut the connection (by not completing it)
        inbox.disarm()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def response_headers(self, response: UpstreamResponse, exchange: Exchange) -> Headers:
        """The upstream's response headers as the client gets them: hop-by-hop headers dropped, and with a lease,
        `Flow-Control-Waited`. An answer with `Flow-Control-Hold: 1` detaches the lease (`exchange.held`)."""
        out: Headers = []
        hold = False
        listed: frozenset[bytes] = frozenset()
        for name, value in response.headers:
            lower = name.lower()
            if lower in _SKIP_RESPONSE:
                if lower == _HOLD:
                    hold = value.strip() in (b"1", b"true")
                elif lower == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                    listed = listed | connection_tokens(((lower, value),))
                continue
            out.append((lower, value))
        if listed:
            out = [(name, value) for name, value in out if name not in listed]
        lease = exchange.lease
        if lease is not None:
            out.append((b"flow-control-waited", str(round(lease.waited * 1000)).encode()))
            if hold:
                self.controller.detach(lease)
                exchange.held = True
        return out

    def request_headers(self, scope: Scope) -> tuple[Headers, int | None]:
        """Headers for the upstream, and the request's Content-Length (None when chunked).

        Raises the 400/405/413/501 answers for requests the proxy will not forward.
        """
        method: str = scope["method"]
        raw_path: bytes | None = scope.get("raw_path")
        if method == "CONNECT" or not (raw_path or scope["path"].encode()).startswith(b"/"):
            raise MethodNotAllowed(f"{method} with this request target is not proxied: this is a reverse proxy")
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        trusted = bool(peer) and self.router.has_trusted_proxies and self.router.trusts(peer)
        drop = _DROP_REQUEST if trusted else _DROP_UNTRUSTED
        headers: Headers = []
        listed: frozenset[bytes] = frozenset()
        lengths: list[bytes] = []
        chunked = False
        host = b""
        forwarded_for: list[bytes] = []
        for name, value in scope["headers"]:
            if name not in drop:
                if name == b"content-length":
                    lengths.append(value.strip())
                headers.append((name, value))
            elif name == b"connection":
                listed = listed | connection_tokens(((name, value),))
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"upgrade" and b"websocket" in value.lower():
                raise NotImplementedUpgrade("WebSocket upgrades are not proxied by this gateway")
            elif name == b"host":
                host = value
            elif name == b"x-forwarded-for":
                forwarded_for.append(value)
        content_length = self._content_length(lengths, chunked) if lengths or chunked else 0
        if listed:
            headers = [(name, value) for name, value in headers if name not in listed]
        headers.append((b"host", self._host))
        if forwarded_for and b"x-forwarded-for" not in listed:
            chain = [*forwarded_for, peer.encode()] if peer else forwarded_for
            headers.append((b"x-forwarded-for", b", ".join(chain)))
        elif peer:
            headers.append((b"x-forwarded-for", peer.encode()))
        present = {name for name, _ in headers if name in _FORWARDED_SET} if trusted else _NO_NAMES
        if b"x-forwarded-proto" not in present:
            scheme = scope.get("scheme", "http")
            headers.append((b"x-forwarded-proto", _SCHEMES.get(scheme) or str(scheme).encode()))
        if host and b"x-forwarded-host" not in present:
            headers.append((b"x-forwarded-host", host))
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        return headers, content_length

    def _content_length(self, lengths: list[bytes], chunked: bool) -> int | None:
        if not lengths:
            return None if chunked else 0
        if chunked:
            raise BadRequest("a request must not carry both Content-Length and Transfer-Encoding")
        if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
            raise BadRequest(f"Content-Length must be one non-negative integer, got {b', '.join(lengths).decode()!r}")
        length = int(lengths[0])
        if length > self.max_body:
            raise BodyTooLarge(self._too_large_message())
        return length

    def _too_large_message(self) -> str:
        return f"the request body is larger than the gateway's limit of {self.max_body} bytes"

    # -- lifespan and WebSocket ---------------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.open()
                except Exception as exc:  # reported to the server, which refuses to start
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                with contextlib.suppress(Exception):
                    await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _refuse_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        exc = NotImplementedUpgrade("WebSocket upgrades are not proxied by this gateway")
        if "websocket.http.response" in scope.get("extensions", {}):
            body = error_body(exc)
            start: Message = {"type": "websocket.http.response.start", "status": exc.status}
            start["headers"] = error_headers(exc, body)
            await send(start)
            await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        else:
            await send({"type": "websocket.close", "code": 1003})


async def _absorb_cancel(task: asyncio.Task[object]) -> None:
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        task.uncancel()


class Exchange:
    """The route and lease of one request, and whether the upstream asked to hold it (completion reporting)."""

    __slots__ = ("held", "lease", "route")

    def __init__(self, route: Route | None) -> None:
        self.route = route
        self.lease: Lease | None = None
        self.held = False


class _CappedBody:
    """The request body for the upstream, read from `inbox` and refused (413) past `max_body` bytes. An iterator
    object rather than an async generator, which mypyc (the compiled build, hatch_build.py) cannot compile."""

    __slots__ = ("_ended", "_inbox", "_max_body", "_received", "_too_large")

    def __init__(self, inbox: RequestInbox, max_body: int, too_large: Callable[[], str]) -> None:
        self._inbox = inbox
        self._max_body = max_body
        self._too_large = too_large
        self._received = 0
        self._ended = False

    def __aiter__(self) -> _CappedBody:
        return self

    async def __anext__(self) -> bytes:
        inbox = self._inbox
        while not self._ended:
            chunk, more = await inbox.next()  # ClientDisconnected fails the upstream call
            self._received += len(chunk)
            if self._received > self._max_body:
                inbox.too_large = True
                raise BodyTooLarge(self._too_large())
            self._ended = not more
            if chunk:
                return chunk
        raise StopAsyncIteration


def upstream_target(scope: Scope) -> str:
    """The request target to send upstream: the raw path (as the client sent it) and query."""
    raw_path: bytes | None = scope.get("raw_path")
    path = _text(raw_path) if raw_path else quote(scope["path"])
    query: bytes = scope.get("query_string", b"")
    return f"{path}?{_text(query)}" if query else path


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_BODY", "DEFAULT_UPSTREAM_TIMEOUT", "ProxyApp"]
