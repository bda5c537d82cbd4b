"""Running `flowgate serve`: the proxy and the admin app in one uvloop event loop per process.

- Server library: uvicorn with its httptools protocol, subclassed to enforce request-head limits (see
  `LimitedHttpToolsProtocol`). `make_server` is the one place that picks the library; another one (granian's
  embedded server, say) only needs `start(sock)` / `stop()` / `force()`.
- Sockets are bound by the parent before anything else runs, so a busy port fails at once with one line.
- `--workers N` pre-forks N processes. Each worker has its own proxy socket on the same port (SO_REUSEPORT: the
  kernel spreads connections evenly) and all share one admin socket (any worker answers admin calls; every
  admin route is backed by the shared store, which `--workers` > 1 requires to be Redis). A worker that dies is
  restarted; SIGTERM/SIGINT on the parent are forwarded to every worker.
- SIGTERM drains: /readyz turns 503, the proxy stops accepting, idle keep-alive connections close, in-flight
  requests get `drain_timeout` to finish (then they are cancelled, which releases their leases), the controller
  releases what it still holds, the admin port closes last (so an upstream can still report completions), exit 0.
  A second SIGTERM/SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Final, Protocol, cast
from urllib.parse import unquote

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from . import BUILD, logs
from .admin import build_admin_app, warn_if_exposed
from .config import DEFAULT_HEADER_TIMEOUT, Settings
from .cycle import RequestCycle
from .deadlines import Deadlines
from .engine import FlowController
from .errors import StoreUnavailable
from .metrics import Metrics, mark_dead, multiprocess_dir
from .proxy import ProxyApp
from .relay import ExpressFactory, ExpressLane
from .stores import open_store
from .types import ASGIApp
from .upstream import open_upstream_client

logger = logging.getLogger("flowgate")

#: Request-head limits (BAD_INPUTS 5-8): answered by the server before Flowgate's app sees the request.
MAX_TARGET = 8 * 1024  # 414
MAX_HEADER_BYTES = 16 * 1024  # 431, counting each field as `name: value\r\n`
MAX_HEADER_FIELDS = 100  # 431
#: Longest a client may take to send a request head (slow-loris guard); 408 then. `header_timeout` sets it.
HEAD_TIMEOUT = DEFAULT_HEADER_TIMEOUT
#: Idle keep-alive connections close after this long. Longer than common load balancers' idle timeout (60s), so
#: the balancer, not the gateway, closes idle connections (otherwise it may send a request on a closing one).
PROXY_KEEP_ALIVE = 75
ADMIN_KEEP_ALIVE = 5
ADMIN_DRAIN_TIMEOUT = 5
STARTUP_TIMEOUT = 30.0
#: After refusing a request head, keep reading (and dropping) for this long before closing.
LINGER = 2.0
#: A worker that dies within this many seconds of its start counts as a crash loop.
CRASH_WINDOW = 5.0
MAX_QUICK_CRASHES = 5

_TRACE = 5
_ALLOW = b"allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n"
_ASGI: Final = {"version": "3.0", "spec_version": "2.3"}
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, extra: bytes = b"") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on the request head.

    414 for a request target over `MAX_TARGET`; 431 for a header block over `MAX_HEADER_BYTES` or with more than
    `MAX_HEADER_FIELDS` fields; 400 for an HTTP/1.1 request without Host; 405 for CONNECT; 408 when the head takes
    longer than `HEAD_TIMEOUT`; 400 `bad_request` for what the parser (llhttp) refuses: header values with CR, LF
    or NUL, Content-Length together with Transfer-Encoding, repeated or malformed Content-Length, bad chunk
    framing. Each answer is JSON `{"error", "message"}` and closes the connection.
    """

    max_target = MAX_TARGET
    max_header_bytes = MAX_HEADER_BYTES
    max_header_fields = MAX_HEADER_FIELDS
    head_timeout = HEAD_TIMEOUT
    #: Check each response header's name and value (uvicorn's regular expressions). The proxy port skips it:
    #: its headers come from the upstream client's parser or from the gateway itself.
    check_headers = True
    #: Makes the connection's express lane (relay.py) for the app, or None: every request runs as the ASGI app.
    express: ExpressFactory | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        express = self.express
        self._lane = express(self.app, self._run_app) if express is not None else None
        self._deferred: RequestCycle | None = None  # complete request head; the lane may take it once its body is in
        self._head_bytes = 0
        self._head_fields = 0
        self._has_host = False
        self._reading_head = False
        self._pending = 0  # bytes received for a head that is still incomplete
        self._deadline: int = _NONE  # which deadline of this connection is set in `self._deadlines`
        self._deadlines = _deadlines(self.loop)
        self._discarding = False  # refused: what the client still sends is dropped until the connection closes
        self._upgrading = False
        self.cycle: RequestCycle | None = None  # type: ignore[assignment]
        self.pipeline: deque[tuple[RequestCycle, ASGIApp]] = deque()  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, _LingeringTransport(transport, self)))
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._drop_deadline(self._deadline)
        if self.logger.level <= _TRACE and self.client:
            self.logger.log(_TRACE, "%s:%d - HTTP connection lost", *self.client)
        if self.cycle is not None:
            self.cycle.lose()
        if self.flow is not None:
            self.flow.resume_writing()
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._unset_keepalive_if_required()
        continuing = self._reading_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._deferred = None
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            self._deferred = None  # its body was malformed: it never runs
            refusal = exc.__context__
            if not isinstance(refusal, _Refusal):
                self.logger.debug("invalid HTTP request: %s", exc)
                refusal = _Refusal(400, "bad_request", "the request is not valid HTTP/1.1")
            self._refuse(refusal)
            return
        deferred = self._deferred
        if deferred is not None:  # its body is still on its way: the app reads it
            self._deferred = None
            self._run_app(deferred)
        if self._reading_head and continuing:
            # The parser buffers a header until it ends: bound what an unfinished head may pile up.
            self._pending += len(data)
            if self._pending > self.max_target + self.max_header_bytes + 1024:
                self._refuse(_Refusal(431, "headers_too_large", "the request head is too large"))

    # Parser callbacks: uvicorn's, with the head limits, and a RequestCycle (cycle.py) for each request.

    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._head_bytes = self._head_fields = self._pending = 0
        self._has_host = False
        self._reading_head = True
        self._upgrading = False
        if self._deadline != _HEAD:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.max_target:
            raise _Refusal(414, "uri_too_long", f"the request target is longer than {self.max_target} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        self._head_bytes += len(name) + len(value) + 4
        if self._head_fields > self.max_header_fields:
            raise _Refusal(431, "headers_too_large", f"the request has more than {self.max_header_fields} headers")
        if self._head_bytes > self.max_header_bytes:
            raise _Refusal(431, "headers_too_large", f"the request headers exceed {self.max_header_bytes} bytes")
        name = name.lower()
        if name == b"host":
            self._has_host = True
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._disarm_head_timer()
        parser = self.parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise _Refusal(405, "method_not_allowed", "CONNECT is not supported by this reverse proxy", _ALLOW)
        http_version = parser.get_http_version()
        if not self._has_host and http_version == "1.1":
            raise _Refusal(400, "missing_host", "an HTTP/1.1 request needs a Host header")
        url = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        root_path = self.root_path
        if root_path:
            path = root_path + path
            raw_path = root_path.encode("ascii") + raw_path
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": http_version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
            "method": _METHODS.get(method) or method.decode("ascii"),
            "path": path,
            "raw_path": raw_path,
            "query_string": url.query or b"",
        }
        self.scope = scope  # type: ignore[assignment]
        if parser.should_upgrade() and self._should_upgrade():
            self._upgrading = True  # handed to the WebSocket protocol by data_received (uvicorn's)
            return
        previous = self.cycle
        cycle = self.cycle = RequestCycle(
            scope,
            self.transport,
            self.flow,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            expect_100_continue=self.expect_100_continue,
            on_response=self.on_response_complete,
            default_headers=self.server_state.default_headers,
            access_log=self.access_log,
            check_headers=self.check_headers,
        )
        if previous is not None and not previous.response_complete:  # pipelined: it waits for the response before it
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))
        elif self._lane is not None and not self.expect_100_continue:
            self._deferred = cycle  # offered to the lane once the whole request is in (on_message_complete)
        else:
            self._run_app(cycle)

    def _run_app(self, cycle: RequestCycle) -> None:
        self._start_asgi_task(cycle, self.app)

    def _start_asgi_task(self, cycle: RequestCycle, app: ASGIApp) -> None:  # type: ignore[override]
        cycle.start_task(app, self.tasks, self.loop)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if self._upgrading or cycle is None or cycle.response_complete:
            return
        if cycle.add_body(body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if not self._upgrading and cycle is not None and not cycle.response_complete:
            cycle.end_body()
            if self._deferred is cycle:
                self._deferred = None
                assert self._lane is not None
                if not self._lane.start(cycle):
                    self._run_app(cycle)

    def resume_writing(self) -> None:
        super().resume_writing()
        cycle = self.cycle
        if cycle is not None and cycle.drained is not None:
            cycle.drained()  # a relayed response waits for the client to take more

    # Deadlines: one timer for every connection of the loop (see deadlines.py), not two timers per request.

    def _arm_head_timer(self) -> None:
        self._deadline = _HEAD
        self._deadlines.set(self, self.loop.time() + self.head_timeout)

    def _disarm_head_timer(self) -> None:
        self._drop_deadline(_HEAD)

    def _drop_deadline(self, kind: int) -> None:
        if kind != _NONE and self._deadline == kind:
            self._deadline = _NONE
            self._deadlines.drop(self)

    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive deadline in the shared `Deadlines` instead of a timer per response."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._deadline == _NONE:
            self._deadline = _IDLE
            self._deadlines.set(self, self.loop.time() + self.timeout_keep_alive)

    def _unset_keepalive_if_required(self) -> None:
        self._drop_deadline(_IDLE)

    def _on_deadline(self) -> None:
        kind, self._deadline = self._deadline, _NONE
        if kind == _IDLE:
            self.timeout_keep_alive_handler()
        elif kind == _HEAD:
            self._on_head_timeout()

    def _on_head_timeout(self) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and not self._reading_head:
            self._arm_head_timer()  # a response is still being sent; the next head has not begun
            return
        self._refuse(_Refusal(408, "request_timeout", f"the request head did not arrive within {self.head_timeout:g}s"))

    def _refuse(self, refusal: _Refusal) -> None:
        self._disarm_head_timer()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a response is on its way: an answer now would corrupt it
            return
        body = json.dumps({"error": refusal.code, "message": refusal.message}).encode()
        head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n" % (
            len(body),
            refusal.extra,
        )
        self.transport.write(STATUS_LINE[refusal.status] + head + body)
        self._linger()

    def _linger(self) -> None:
        """Lingering close: closing while the client still sends would reset the connection, and a reset can
        destroy the answer in the client's buffer. Half-close, discard what still comes, close a bit later."""
        transport = self.transport
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._discarding = True
        transport.resume_reading()  # read (and drop) what the client still sends, so the kernel never resets
        self.loop.call_later(LINGER, _close, transport)


class _LingeringTransport:
    """The connection's transport as uvicorn sees it.

    Writes made in one event-loop tick go out as one (a response's head and a body that is already there:
    one send instead of two). Its `close()` lingers (see `_linger`) when a response ended before the request
    body was read: a 413, or a 408 body_timeout, answered with `Connection: close` while the client may still
    be sending. Every other call goes to the real transport.
    """

    def __init__(self, transport: asyncio.Transport, protocol: LimitedHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._pending: list[bytes] | None = None
        # the calls of every request, bound once (not looked up through __getattr__ each time)
        self.is_closing = transport.is_closing
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._protocol.loop.call_soon(self._flush)
        else:
            pending.append(data)

    def writelines(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            if len(pending) == 1:
                self._transport.write(pending[0])
            else:
                self._transport.writelines(pending)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def close(self) -> None:
        self._flush()
        cycle = self._protocol.cycle
        transport = self._transport
        if (
            self._protocol._discarding
            or cycle is None
            or not cycle.response_complete
            or not cycle.more_body
            or transport.is_closing()
        ):
            transport.close()
        else:
            self._protocol._linger()


def _close(transport: asyncio.Transport) -> None:
    transport.close()


_NONE, _HEAD, _IDLE = 0, 1, 2  # LimitedHttpToolsProtocol._deadline: none set, the request head's, keep-alive's
_loop_deadlines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines[LimitedHttpToolsProtocol]] = (
    weakref.WeakKeyDictionary()
)


def _deadlines(loop: asyncio.AbstractEventLoop) -> Deadlines[LimitedHttpToolsProtocol]:
    deadlines = _loop_deadlines.get(loop)
    if deadlines is None:
        deadlines = _loop_deadlines[loop] = Deadlines(loop, LimitedHttpToolsProtocol._on_deadline)
    return deadlines


# -- server handles -------------------------------------------------------------------------------------------------


class ServerHandle(Protocol):
    """What `run_worker` needs of a server library."""

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock` (bound and listening); return once it accepts connections."""

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), run the app's shutdown."""

    def force(self) -> None:
        """Make a running `stop` give up waiting."""


class _UvicornServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # flowgate handles signals itself (uvicorn would re-raise SIGTERM after shutdown: exit -15)


class UvicornHandle:
    def __init__(self, config: uvicorn.Config) -> None:
        self.server = _UvicornServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self, sock: socket.socket) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(sock))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the server did not start")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {STARTUP_TIMEOUT:g}s")
            await asyncio.sleep(0.01)

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self.server.serve(sockets=[sock])
        except SystemExit as exc:  # uvicorn's answer to a failed app startup; it would escape the event loop
            raise RuntimeError(f"the server did not start (the app's startup failed, code {exc.code})") from None

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task

    def force(self) -> None:
        self.server.force_exit = True


def make_server(app: ASGIApp, settings: Settings, role: str) -> ServerHandle:
    """The server for `app` (`role` "proxy" or "admin"). The one place that picks the server library."""
    proxy = role == "proxy"
    config = uvicorn.Config(
        app,
        loop="none",  # the loop is ours (uvloop, see run)
        http=protocol_for(app, role, settings.header_timeout, express_lane=settings.express_lane),
        ws="none",  # no WebSockets: an Upgrade request reaches the proxy as plain HTTP, which answers 501
        lifespan="on" if proxy else "off",
        interface="asgi3",
        log_config=None,
        log_level=_log_level(settings.log_level),
        access_log=settings.access_log,
        proxy_headers=False,  # X-Forwarded-For is the router's business (trusted_proxies), not uvicorn's
        server_header=False,  # the upstream's Server and Date headers pass through unchanged
        date_header=not proxy,
        timeout_keep_alive=PROXY_KEEP_ALIVE if proxy else ADMIN_KEEP_ALIVE,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout) if proxy else ADMIN_DRAIN_TIMEOUT,
        h11_max_incomplete_event_size=MAX_TARGET + MAX_HEADER_BYTES,  # should h11 ever be picked
    )
    return UvicornHandle(config)


def protocol_for(
    app: ASGIApp, role: str, head_timeout: float = DEFAULT_HEADER_TIMEOUT, *, express_lane: bool = True
) -> type[LimitedHttpToolsProtocol]:
    """The LimitedHttpToolsProtocol class `flowgate serve` runs `app` with on its `role` port ("proxy" or "admin").

    On the proxy port: no check of response headers (they come from the upstream client's parser or from the
    gateway), and the express lane (relay.py) when `app` can use one and `express_lane` is on. uvicorn builds
    protocol objects from a class.
    """
    proxy = role == "proxy"
    express = ExpressLane.factory(app) if proxy and express_lane else None
    settings: dict[str, object] = {"check_headers": not proxy, "express": staticmethod(express) if express else None}
    if head_timeout != DEFAULT_HEADER_TIMEOUT:
        settings["head_timeout"] = head_timeout
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), settings)


def _log_level(name: str) -> int:
    return _TRACE if name == "trace" else logging.getLevelNamesMapping()[name.upper()]


def configure_logging(settings: Settings) -> None:
    logging.addLevelName(_TRACE, "TRACE")
    logs.configure(_log_level(settings.log_level), settings.log_format)


# -- one worker -----------------------------------------------------------------------------------------------------


async def run_worker(settings: Settings, proxy_sock: socket.socket, admin_sock: socket.socket) -> int:
    """Serve until SIGTERM/SIGINT, then drain; return the exit code."""
    assert settings.upstream is not None
    loop = asyncio.get_running_loop()
    store = open_store(settings.store, max_keys=settings.max_keys)
    controller = FlowController(store, lease_ttl=settings.lease_ttl)
    metrics = Metrics(rule.name for rule in settings.rules)
    proxy_app = ProxyApp(
        upstream=settings.upstream,
        controller=controller,
        router=settings.router(),
        upstream_timeout=settings.upstream_timeout,
        max_body=settings.max_body,
        body_timeout=settings.body_timeout,
        metrics=metrics,
        client=open_upstream_client(settings.upstream, settings.upstream_client),
    )
    admin_app = build_admin_app(controller, settings, metrics=metrics)
    proxy = make_server(proxy_app, settings, "proxy")
    admin = make_server(admin_app, settings, "admin")

    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            logger.warning("second %s: stopping without waiting", signal.Signals(signum).name)
            proxy.force()
            admin.force()
        else:
            logger.info("%s: draining (up to %gs)", signal.Signals(signum).name, settings.drain_timeout)
            stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            await store.ping()
        except StoreUnavailable as exc:
            logger.warning("the store %s is unreachable (%s); /readyz answers 503 until it is", settings.store_uri, exc)
        try:
            await admin.start(admin_sock)
        except RuntimeError as exc:
            logger.error("admin port: %s", exc)
            return 1
        try:
            await proxy.start(proxy_sock)
        except RuntimeError as exc:
            logger.error("proxy: %s", exc)
            await admin.stop()
            return 1
        # Everything made so far (modules, the apps, the store) lives as long as the process: move it out of the
        # collector's sight, so a full collection no longer scans it while requests wait (p99 at 1,000 req/s on
        # redis://: ~6 ms -> ~3.5 ms, see benchmarks/RESULTS.md).
        gc.collect()
        gc.freeze()
        # A request's objects are freed by reference counting (no loops of references, see cycle.py): collecting
        # every 700 new objects would only walk the requests in flight (~4% of the CPU). Loops still get collected.
        gc.set_threshold(10_000, 10, 10)
        logger.info(
            "flowgate serving http://%s:%d -> %s (store %s, admin %s:%d, %s build)",
            settings.host,
            settings.port,
            settings.upstream,
            settings.store_uri,
            settings.admin_host,
            settings.admin_port,
            BUILD,
        )
        await stopping.wait()
        admin_app.state.draining = True
        await proxy.stop()
        with contextlib.suppress(StoreUnavailable):
            await controller.close()
        await admin.stop()
        return 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        metrics.flush()  # with --workers: this worker's last numbers stay in the totals
        await store.close()


def _run_loop(settings: Settings, proxy_sock: socket.socket, admin_sock: socket.socket) -> int:
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_worker(settings, proxy_sock, admin_sock))


# -- sockets and processes ------------------------------------------------------------------------------------------


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; OSError when the address is taken or unknown."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(settings: Settings) -> int:
    """Bind, run one worker here or fork `settings.workers`, and return the exit code."""
    configure_logging(settings)
    warn_if_exposed(settings)
    workers = settings.workers
    try:
        admin_sock = bind_socket(settings.admin_host, settings.admin_port)
        proxy_socks = [bind_socket(settings.host, settings.port, reuse_port=workers > 1) for _ in range(workers)]
    except OSError as exc:
        print(f"flowgate: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if workers == 1:
        return _run_loop(settings, proxy_socks[0], admin_sock)
    with multiprocess_dir():  # the workers' metrics meet there (see gateway.metrics)
        return _supervise(settings, proxy_socks, admin_sock)


def _supervise(settings: Settings, proxy_socks: list[socket.socket], admin_sock: socket.socket) -> int:
    children: dict[int, int] = {}  # pid -> worker index
    started: dict[int, float] = {}
    stopping = False
    failed = False
    quick_crashes = 0

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                for other, sock in enumerate(proxy_socks):
                    if other != index:
                        sock.close()
                code = _run_loop(settings, proxy_socks[index], admin_sock)
            except BaseException:
                logger.exception("worker %d failed", index + 1)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
        started[pid] = time.monotonic()

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(len(proxy_socks)):
        spawn(index)
    logger.info("started %d workers", len(proxy_socks))
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid)
        mark_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            failed = failed or code != 0
            continue
        lived = time.monotonic() - started.pop(pid)
        quick_crashes = quick_crashes + 1 if lived < CRASH_WINDOW else 0
        if quick_crashes >= MAX_QUICK_CRASHES:
            logger.error("workers keep dying at start (last exit code %d); stopping", code)
            failed = True
            forward(signal.SIGTERM, None)
            continue
        logger.error("worker %d exited with code %d; restarting it", index + 1, code)
        time.sleep(min(1.0, 0.1 * 2**quick_crashes))
        if not stopping:
            spawn(index)
    return 1 if failed else 0
