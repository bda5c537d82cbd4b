"""The proxy's express lane: a request relayed by callbacks alone, with no task, no coroutine and no ASGI message.

`flowgate serve` offers each request to `ExpressLane.start` once all of it has arrived (its head, and its body when
it has one). The lane takes the request when it can go at once:

- the proxy forwards it as it is (no refusal: those answers come from the app);
- it needs no token, or the store grants one on the spot with no I/O (the memory store, nothing waiting, within
  the limits: `FlowController.try_acquire`);
- the lean upstream client has an idle connection to the upstream.

It then writes the request upstream and lets the two connections' callbacks do the rest: the response head and
each body chunk go to the client as they arrive (reading the upstream pauses while the client does not keep up),
and at the end the lease is released and the connection pooled. Everything else (a body still arriving, a key that
must wait or lives in Redis, no idle connection, the aiohttp client) runs as the ASGI app, `ProxyApp`, which answers
the same way. A task and a few coroutine frames per request are most of what this saves: see
benchmarks/RESULTS.md.

The relay keeps the app's contract: the same request and response headers (`Flow-Control-Waited`, `-Hold`), the
same 502/504 JSON answers and metrics, the lease released on every path (client gone, upstream error or timeout, a
stalled body). A reused connection that fails before any response byte hands a bodiless idempotent request back to
the app, which sends it again on a fresh connection, as the lean client does.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .errors import DeliveryError, UpstreamUnreachable
from .http import error_body, error_headers
from .proxy import Exchange, ProxyApp, upstream_target
from .upstream.lean import IDEMPOTENT, LeanClient
from .upstream.lean_conn import Connection
from .upstream.lean_response import LeanResponse

if TYPE_CHECKING:
    from .cycle import RequestCycle

logger = logging.getLogger("flowgate")

_ABANDONED: Final = "request abandoned: the client left"

#: `ExpressLane.factory`'s product: (the app a connection runs, its fallback) -> the connection's lane, or None.
ExpressFactory = Callable[[object, Callable[["RequestCycle"], object]], "ExpressLane | None"]


class ExpressLane:
    """Starts relays for one `ProxyApp` whose upstream client is the lean one."""

    __slots__ = ("admits_at_once", "app", "client", "fallback")

    def __init__(self, app: ProxyApp, fallback: Callable[[RequestCycle], object]) -> None:
        assert isinstance(app.client, LeanClient)
        self.app = app
        self.client: LeanClient = app.client
        self.fallback = fallback  # runs a request as the ASGI app (the server's task path)
        self.admits_at_once = app.controller.store.admits_at_once

    @staticmethod
    def factory(app: object) -> ExpressFactory | None:
        """Makes a server connection's lane, when `app` can use one (a ProxyApp with the lean client): given the
        app the connection runs (a server may wrap it; then there is no lane) and its fallback."""
        if not (isinstance(app, ProxyApp) and isinstance(app.client, LeanClient)):
            return None
        proxy = app

        def make(running: object, fallback: Callable[[RequestCycle], object]) -> ExpressLane | None:
            return ExpressLane(proxy, fallback) if running is proxy else None

        return make

    def start(self, cycle: RequestCycle) -> bool:
        """Relay the request of `cycle` if it can go at once (see the module docstring); False leaves it untouched."""
        app = self.app
        if not app.opened or cycle.disconnected:
            return False
        scope = cycle.scope
        try:
            route = None if app.router.passthrough else app.router.route(scope)
            if route is not None and not self.admits_at_once:
                return False  # the key's token takes a store round trip: the app waits for it
            headers, length = app.request_headers(scope)
        except DeliveryError:
            return False  # the app answers it, and counts it
        if length is None:
            return False  # chunked: its size is checked as it is read
        method: str = scope["method"]
        client = self.client
        conn = client.idle_connection()
        if conn is None:
            return False
        exchange = Exchange(route)
        if route is not None:
            lease = exchange.lease = app.controller.try_acquire(route.key, route.policy)
            if lease is None:
                client.give_back(conn)
                return False
            headers.append((b"flow-control-key", route.key.encode()))
            headers.append((b"flow-control-lease", lease.token.encode()))
        body = cycle.take_body() if length else None
        try:
            if length and (body is None or len(body) != length):
                raise ValueError("the body is not all there")  # cannot happen once the message is complete
            request = client.head(method, upstream_target(scope), headers, bool(length))
        except ValueError:
            client.give_back(conn)
            if exchange.lease is not None:
                app.controller.release_now(exchange.lease)
            if body:
                cycle.add_body(body)  # as it was: the app reads it
            return False
        if body:
            request += body
        relay = Relay(self, cycle, conn, exchange, method, has_body=bool(length))
        try:
            relay.go(request)
        except BaseException:
            conn.abort()
            relay._finish()
            raise
        return True


class Relay:
    """One relayed request: `go`, then `poke()` on every move of the upstream exchange or the client's socket."""

    __slots__ = (
        "app",
        "conn",
        "cycle",
        "exchange",
        "has_body",
        "lane",
        "method",
        "response",
        "started",
        "stats",
    )

    def __init__(
        self, lane: ExpressLane, cycle: RequestCycle, conn: Connection, exchange: Exchange, method: str, has_body: bool
    ) -> None:
        self.lane = lane
        self.app = lane.app
        self.cycle = cycle
        self.conn: Connection | None = conn  # None once the relay is over
        self.exchange = exchange
        self.method = method
        self.has_body = has_body
        self.response: LeanResponse | None = None
        self.started = 0.0
        self.stats: contextlib.AbstractContextManager[None] | None = None

    def go(self, request: bytes) -> None:
        route = self.exchange.route
        lease = self.exchange.lease
        if route is not None and lease is not None:
            observer = self.app.observer
            observer.entered(route)
            observer.admitted(route, lease)
            self.stats = observer.in_flight(route)
            self.stats.__enter__()
        cycle = self.cycle
        cycle.watch(self._client_gone)
        cycle.drained = self.poke
        self.started = time.perf_counter()
        assert self.conn is not None
        self.conn.relay(request, self.app.upstream_timeout, self.method == "HEAD", self.poke)

    def poke(self) -> None:
        """Move the response on as far as it can go now."""
        try:
            self._move()
        except Exception:  # a bug: the client's response cannot go on, but the lease must not leak
            logger.exception("relaying a response failed")
            if self.conn is not None:
                self._cut()

    def _move(self) -> None:
        conn = self.conn
        if conn is None:
            return
        resp = self.response
        if resp is None:
            resp = conn.response
            if resp is None:
                error = conn.error
                if error is not None:
                    self._failed(conn, error)
                return
            self.response = resp
            self._answer(resp)
        cycle = self.cycle
        if cycle.flow.write_paused:  # the client is slow: the upstream pauses once its buffer fills
            self._unwatch_stall(resp)  # time the client takes does not count against the upstream
            return
        data = resp.take()
        try:
            if resp.ended:
                cycle.write_body(data, False)
                self._finish()
            elif resp.failure is not None:
                if data:
                    cycle.write_body(data, True)
                self._cut()
            else:
                if data:
                    cycle.write_body(data, True)
                if cycle.flow.write_paused:
                    self._unwatch_stall(resp)
                else:
                    self._watch_stall(resp)
        except RuntimeError as exc:  # the upstream's body does not match its own framing
            logger.error("relaying a response failed: %s", exc)
            self._cut()

    def _answer(self, resp: LeanResponse) -> None:
        exchange = self.exchange
        self.app.observer.answered(exchange.route, self.started)
        self.cycle.start_response(resp.status, self.app.response_headers(resp, exchange))

    def _watch_stall(self, resp: LeanResponse) -> None:
        """The next body bytes must come within the upstream timeout (`Connection.headers_timeout` fails it)."""
        live = resp.connection
        if live is not None:
            live.pool.head_deadlines.set(live, live.loop.time() + self.app.upstream_timeout)

    def _unwatch_stall(self, resp: LeanResponse) -> None:
        live = resp.connection
        if live is not None:
            live.pool.head_deadlines.drop(live)

    def _failed(self, conn: Connection, error: DeliveryError) -> None:
        """No response: answer 502/504, or hand a request that may be sent again back to the app."""
        cycle = self.cycle
        if conn.retryable and not self.has_body and self.method in IDEMPOTENT:
            self._finish()
            self.lane.fallback(cycle)  # the app sends it once more, on a fresh connection
            return
        self.app.observer.failed(self.exchange.route, error)
        body = error_body(error)
        cycle.start_response(error.status, error_headers(error, body))
        cycle.write_body(body, False)
        self._finish()

    def _client_gone(self) -> None:
        conn = self.conn
        if conn is None:
            return
        resp = self.response
        live = conn if resp is None else resp.connection
        self._finish()
        if live is not None:
            live.fail(UpstreamUnreachable(_ABANDONED))

    def _cut(self) -> None:
        """The response started and cannot be completed: closing the connection tells the client."""
        self.cycle.transport.close()
        self._finish()

    def _finish(self) -> None:
        """Release the lease (unless the upstream holds it) and stop reacting; drop the references back to this
        relay, so that reference counting frees it (no loop waits for the garbage collector)."""
        self.conn = None
        cycle = self.cycle
        cycle.watcher = cycle.drained = None
        if self.response is not None:
            self.response.sink = None
        if self.stats is not None:
            self.stats.__exit__(None, None, None)
            self.stats = None
        exchange = self.exchange
        lease = exchange.lease
        if lease is not None and not exchange.held:
            exchange.lease = None
            controller = self.app.controller
            if controller.release_now(lease) is None:
                controller.release_soon(lease)


__all__ = ["ExpressFactory", "ExpressLane", "Relay"]
