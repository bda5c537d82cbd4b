"""The lean client's connection pool: one per upstream, bounded, FIFO waiters, idle expiry.

Slots, not connections, are the bounded resource: a slot is taken before connecting and held until the connection
is lost (`lost`), so the count of open-or-opening connections never exceeds `max_connections`. A slot freed while
callers wait passes straight to the first waiter (who then connects); a connection finishing a clean exchange goes
straight to the first waiter, or onto the idle stack (LIFO: warm connections are reused first, the oldest expire).
"""

from __future__ import annotations

import asyncio
import collections

from gateway.deadlines import Deadlines
from gateway.errors import UpstreamTimeout, UpstreamUnreachable
from gateway.upstream.lean_conn import Connection


class Pool:
    def __init__(
        self, host: str, port: int, authority: str, max_connections: int, idle_timeout: float, connect_timeout: float
    ) -> None:
        self.host = host
        self.port = port
        self.authority = authority
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.total = 0  # slots taken: connections open or opening
        self.closed = False
        self.conns: set[Connection] = set()
        self._idle: collections.deque[Connection] = collections.deque()  # oldest at the left
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._head_deadlines: Deadlines[Connection] | None = None

    @property
    def head_deadlines(self) -> Deadlines[Connection]:
        """Connections waiting for a response head, by deadline (one timer for all, not one per request)."""
        deadlines = self._head_deadlines
        if deadlines is None:
            loop = self._loop or asyncio.get_running_loop()
            deadlines = self._head_deadlines = Deadlines(loop, Connection.headers_timeout, resolution=0.01)
        return deadlines

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def idle_connection(self) -> Connection | None:
        """A live idle connection, taken from the pool, if there is one (no await: the common case)."""
        idle = self._idle
        while idle and not self.closed:
            conn = idle.pop()
            conn.idle = False
            if not conn.closing:  # a closing one leaves the stack here; lost() frees its slot
                return conn
        return None

    async def acquire(self, fresh: bool) -> Connection:
        """A live connection (idle first unless `fresh`), a new one if a slot is free, else wait FIFO."""
        while True:
            if self.closed:
                raise UpstreamUnreachable("the upstream client is closed")
            if not fresh:
                conn = self.idle_connection()
                if conn is not None:
                    return conn
            if self.total < self.max_connections:
                self.total += 1
                return await self._open()
            if self._idle:  # fresh wanted, pool full: close the oldest idle connection and take its slot
                victim = self._idle.popleft()
                victim.idle = False
                victim.counted = False
                victim.close()
                return await self._open()
            loop = self._loop or asyncio.get_running_loop()
            waiter: asyncio.Future[Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                got = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    given = waiter.result()
                    if given is None:
                        self._free_slot()
                    else:
                        self.release(given)
                raise
            if got is None:  # a slot passed to us
                return await self._open()
            if not got.closing:
                return got
            # it is closing, on its way to us: lost() frees its slot

    async def _open(self) -> Connection:
        """Connect in a slot already taken; the slot is freed again if connecting fails."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        conn = Connection(self, loop)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: conn, self.host, self.port)
        except TimeoutError:
            self._free_slot()
            raise UpstreamTimeout(
                f"could not connect to upstream {self.authority} within {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            self._free_slot()
            raise UpstreamUnreachable(f"could not connect to upstream {self.authority}: {exc}") from exc
        except BaseException:
            self._free_slot()
            raise
        if conn.closed:  # lost before we got it
            self._free_slot()
            raise UpstreamUnreachable(f"upstream {self.authority} closed the connection at once")
        conn.counted = True
        self.conns.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        """A connection whose exchange ended cleanly: to the first waiter, else onto the idle stack."""
        if self.closed:
            conn.close()
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        loop = conn.loop
        conn.idle_since = now = loop.time()
        conn.idle = True
        self._idle.append(conn)
        if self._timer is None:
            self._timer = loop.call_at(now + self.idle_timeout, self._expire)

    def lost(self, conn: Connection) -> None:
        """Called once by every connection when its transport is gone."""
        self.conns.discard(conn)
        if conn.idle:
            conn.idle = False
            self._idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self._free_slot()
        lost_waiter = conn.lost_waiter
        if lost_waiter is not None and not lost_waiter.done():
            lost_waiter.set_result(None)

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to this waiter
                return
        self.total -= 1

    def _expire(self) -> None:
        self._timer = None
        idle = self._idle
        if not idle:
            return
        loop = idle[0].loop
        cutoff = loop.time() - self.idle_timeout
        while idle and idle[0].idle_since <= cutoff:
            conn = idle.popleft()
            conn.idle = False
            conn.close()  # its slot is freed by lost()
        if idle:
            self._timer = loop.call_at(idle[0].idle_since + self.idle_timeout, self._expire)

    async def aclose(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._head_deadlines is not None:
            self._head_deadlines.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamUnreachable("the upstream client is closed"))
        conns = list(self.conns)
        waits = [conn.closing_waiter() for conn in conns]
        for conn in conns:
            conn.abort()
        if waits:
            await asyncio.gather(*waits)
