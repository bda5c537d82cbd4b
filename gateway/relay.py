"""The proxy's express lane: a request relayed by callbacks alone, with no task, coroutine or ASGI message.

`flowgate serve` offers each request to `ExpressLane.start` once all of it has arrived (its head, and its body when
it has one). The lane takes the request when the proxy forwards it as it is (no refusal: those answers come from
the app), the request's body is framed by Content-Length (not chunked), and the lean upstream client has an idle
connection. Then, by the token its key needs:

- none (no rule matched): it goes at once;
- the memory store: `FlowController.try_acquire` grants it on the spot when nothing waits and the limits allow;
- Redis: `FlowController.try_acquire_soon` asks in the tick's batched round trip, with a flag that admits at once
  or not at all (`enter.lua`: never queued), and the reply goes on from a callback.

It then writes the request upstream and lets the connections' callbacks do the rest: the response head and each
body chunk go to the client as they arrive (reading the upstream pauses while the client does not keep up), and
at the end the lease is released (on Redis, in the next batch, again without a task) and the connection pooled.
A request that may not go at once (its key's token is taken, the waitlist, a refusal, a store error; a key with
requests of this gateway waiting goes there without asking) is handed to the ASGI app, `ProxyApp`, which waits
and answers as for any other request; so is everything else the lane does not take (a body still arriving, a
chunked upload, no idle connection, the aiohttp client). A task and a few coroutine frames per request are most
of what this saves: see benchmarks/RESULTS.md.

The relay keeps the app's contract: the same request and response headers (`Flow-Control-Key`/`-Lease` upstream,
`Flow-Control-Waited`/`-Hold`), the same 502/504 JSON answers, metrics and log lines, the lease released on every
path (client gone, even before Redis answered; upstream error or timeout; a stalled body). A reused connection
that fails before any response byte hands a bodiless idempotent request back to the app, which sends it again on
a fresh connection, as the lean client does.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .engine import Lease
from .errors import DeliveryError, UpstreamUnreachable
from .http import Headers, error_body, error_headers
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
        controller = app.controller
        try:
            route = None if app.router.passthrough else app.router.route(scope)
            if route is not None and controller.has_waiters(route.key):
                return False  # it cannot go before them: no need to ask the store
            headers, length = app.request_headers(scope)
        except DeliveryError:
            return False  # the app answers it, and counts it
        if length is None:
            return False  # chunked: its size is checked as it is read
        conn = self.client.idle_connection()
        if conn is None:
            return False
        relay = Relay(self, cycle, conn, Exchange(route), headers, length)
        if route is None:
            return relay.launch()
        if self.admits_at_once:
            relay.exchange.lease = controller.try_acquire(route.key, route.policy)
            if relay.exchange.lease is None:
                relay.give_back()
                return False
            return relay.launch()
        if controller.try_acquire_soon(route.key, route.policy, relay.admitted):
            cycle.watch(relay.client_gone)
            return True  # the relay goes on, or hands the request to the app, when the store answers
        relay.give_back()
        return False


class Relay:
    """One relayed request: `launch`, then `poke()` on every move of the upstream exchange or the client's socket."""

    __slots__ = (
        "app",
        "conn",
        "cycle",
        "exchange",
        "headers",
        "lane",
        "launched",
        "length",
        "response",
        "started",
        "stats",
    )

    def __init__(
        self,
        lane: ExpressLane,
        cycle: RequestCycle,
        conn: Connection,
        exchange: Exchange,
        headers: Headers,
        length: int,
    ) -> None:
        self.lane = lane
        self.app = lane.app
        self.cycle = cycle
        self.conn: Connection | None = conn  # None once the relay is over
        self.exchange = exchange
        self.headers = headers
        self.length = length
        self.launched = False
        self.response: LeanResponse | None = None
        self.started = 0.0
        self.stats: contextlib.AbstractContextManager[None] | None = None

    def admitted(self, lease: Lease | None) -> None:
        """The store's answer to `try_acquire_soon`: go on, or hand the request to the app (it then waits)."""
        if self.conn is None:  # the client left meanwhile
            if lease is not None:
                self.app.controller.release_nowait(lease)
            return
        cycle = self.cycle
        cycle.watcher = None
        self.exchange.lease = lease
        try:
            if lease is None:
                self.give_back()
            elif self.launch():
                return
            self.lane.fallback(cycle)
        except Exception:  # a bug: the request cannot go on, but nothing may leak
            logger.exception("relaying a request failed")
            self.give_back()
            cycle.transport.close()

    def give_back(self) -> None:
        """Undo a relay that did not launch: the connection goes back to the pool, the lease is released."""
        conn, self.conn = self.conn, None
        if conn is not None:
            self.lane.client.give_back(conn)
        lease, self.exchange.lease = self.exchange.lease, None
        if lease is not None:
            self.app.controller.release_nowait(lease)

    def launch(self) -> bool:
        """Write the request upstream; False (after `give_back`) when it cannot go as it is."""
        conn = self.conn
        if conn is None or conn.closing:  # the upstream closed it while the store answered: the app opens one
            self.give_back()
            return False
        cycle = self.cycle
        scope = cycle.scope
        headers = self.headers
        route, lease = self.exchange.route, self.exchange.lease
        if route is not None and lease is not None:
            headers.append((b"flow-control-key", route.key.encode()))
            headers.append((b"flow-control-lease", lease.token.encode()))
        length = self.length
        body = cycle.take_body() if length else None
        try:
            if length and (body is None or len(body) != length):
                raise ValueError("the body is not all there")  # cannot happen once the message is complete
            request = self.lane.client.head(scope["method"], upstream_target(scope), headers, bool(length))
        except ValueError:
            if body:
                cycle.add_body(body)  # as it was: the app reads it
            self.give_back()
            return False
        if body:
            request += body
        try:
            self._go(request)
        except BaseException:
            if self.conn is not None:
                self.conn.abort()
            self._finish()
            raise
        return True

    def _go(self, request: bytes) -> None:
        self.launched = True
        route = self.exchange.route
        lease = self.exchange.lease
        if route is not None and lease is not None:
            observer = self.app.observer
            observer.entered(route)
            observer.admitted(route, lease)
            self.stats = observer.in_flight(route)
            self.stats.__enter__()
        cycle = self.cycle
        cycle.watch(self.client_gone)
        cycle.drained = self.poke
        self.started = time.perf_counter()
        assert self.conn is not None
        self.conn.relay(request, self.app.upstream_timeout, cycle.scope["method"] == "HEAD", self.poke)

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
        if conn.retryable and not self.length and cycle.scope["method"] in IDEMPOTENT:
            self._finish()
            self.lane.fallback(cycle)  # the app sends it once more, on a fresh connection
            return
        self.app.observer.failed(self.exchange.route, error)
        body = error_body(error)
        cycle.start_response(error.status, error_headers(error, body))
        cycle.write_body(body, False)
        self._finish()

    def client_gone(self) -> None:
        conn = self.conn
        if conn is None:
            return
        if not self.launched:  # the store has not answered yet: its answer finds the relay over
            self.give_back()
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
            self.app.controller.release_nowait(lease)


__all__ = ["ExpressFactory", "ExpressLane", "Relay"]
