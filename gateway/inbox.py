"""Read an HTTP request's ASGI messages in the background, so a client that goes away is noticed at once.

ASGI tells an app that its client left only through `receive()`. A request waiting for a token, or waiting for
the upstream's answer, is not reading its body, so a background task reads for it: body chunks are queued for
the forwarder (bounded, so a waiting upload is held back by TCP, not buffered), and `http.disconnect` cancels the
watched task at once. Servers answer a `receive()` made after the body with `http.disconnect` when the client
leaves (or once the response is complete: `disarm()` before the last `send` so that is not taken for one).

Body deadline: `body_timeout` bounds the time `next()` spends waiting for the client's bytes, summed over the
whole body (a client trickling a byte at a time cannot hold a connection and a token for long); time spent
before the forwarder asks for the body (waiting for a token) does not count. Past it, `next()` raises
BodyTimeout (408) and `timed_out` is set.

A server can spare a request without a body that background task: `flowgate serve`'s server puts a callable
at `scope["extensions"][DISCONNECT_EXTENSION]["watch"]` that takes a callback and calls it once if the client
leaves before the response is complete (the `watch` argument). It also puts one at
`scope["extensions"][BODY_EXTENSION]["take"]`: called before anything read the body, it returns the whole body
when all of it has already arrived (a small webhook's usually has, with its head), else None. A request whose body
was taken that way needs no reading task either.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .errors import BodyTimeout
from .types import Receive

HIGH_WATER = 64 * 1024  # bytes of request body read ahead of the forwarder
DISCONNECT_EXTENSION = "flowgate.disconnect"
BODY_EXTENSION = "flowgate.body"


class ClientDisconnected(Exception):
    """The client went away before its request body was fully read."""


class RequestInbox:
    """The request's body as `next()` chunks, plus disconnect detection that cancels `target` while armed."""

    __slots__ = (
        "_allowance",
        "_chunks",
        "_consumer",
        "_high_water",
        "_loop",
        "_producer",
        "_queued",
        "_receive",
        "_target",
        "_task",
        "armed",
        "body_complete",
        "body_timeout",
        "disconnected",
        "timed_out",
        "too_large",
    )

    def __init__(
        self,
        receive: Receive,
        target: asyncio.Task[object] | None,
        high_water: int = HIGH_WATER,
        body_timeout: float | None = None,
        watch: Callable[[Callable[[], object]], object] | None = None,
    ) -> None:
        """`watch`: the server's DISCONNECT_EXTENSION, for a request without a body to read (then no task reads)."""
        self._receive = receive
        self.body_timeout = body_timeout
        self._allowance = body_timeout  # seconds of waiting for the client left
        self._target = target
        self._high_water = high_water
        self._chunks: deque[tuple[bytes, bool]] = deque()
        self._queued = 0
        self._consumer: asyncio.Future[None] | None = None
        self._producer: asyncio.Future[None] | None = None
        self.armed = target is not None
        self.disconnected = False
        self.body_complete = False
        self.too_large = False
        self.timed_out = False
        self._task: asyncio.Task[None] | None = None
        # the target's loop: asyncio.get_running_loop() makes a getpid() system call on Python 3.11
        self._loop = target.get_loop() if target is not None else asyncio.get_running_loop()
        if watch is None:
            self._task = self._loop.create_task(self._pump())
        else:
            self.body_complete = True
            watch(self._client_left)

    def disarm(self) -> None:
        """From now on a disconnect (or the server's end-of-response notice) no longer cancels the target."""
        self.armed = False

    def close(self) -> None:
        """Disarm and stop reading."""
        self.armed = False
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()

    async def next(self) -> tuple[bytes, bool]:
        """The next body chunk and whether more follows; ClientDisconnected when the client left."""
        while not self._chunks:
            if self.disconnected or self._task is None:
                raise ClientDisconnected("the client disconnected while sending its request body")
            if self._allowance is not None and self._allowance < 0.001:
                self.timed_out = True
                raise BodyTimeout(f"the request body did not arrive within {self.body_timeout:g}s")
            await self._wait_for_client()
        chunk, more = self._chunks.popleft()
        self._queued -= len(chunk)
        producer = self._producer
        if producer is not None and not producer.done() and self._queued < self._high_water:
            producer.set_result(None)
        return chunk, more

    async def _wait_for_client(self) -> None:
        loop = self._loop
        consumer = self._consumer = loop.create_future()
        if self._allowance is None:
            try:
                await consumer
            finally:
                self._consumer = None
            return
        started = loop.time()
        timer = loop.call_later(self._allowance, _wake, consumer)
        try:
            await consumer
        finally:
            self._consumer = None
            timer.cancel()
            self._allowance -= loop.time() - started

    async def _pump(self) -> None:
        loop = self._loop
        while True:
            while self._queued >= self._high_water:
                self._producer = loop.create_future()
                try:
                    await self._producer
                finally:
                    self._producer = None
            message = await self._receive()
            if message["type"] != "http.request":
                self._client_left()
                return
            if self.body_complete:
                continue  # a server that repeats the end of the body; keep watching
            chunk = message.get("body", b"")
            more = bool(message.get("more_body", False))
            self._chunks.append((chunk, more))
            self._queued += len(chunk)
            self.body_complete = not more
            self._wake()

    def _client_left(self) -> None:
        self.disconnected = True
        self._wake()
        if self.armed and self._target is not None:
            self._target.cancel()

    def _wake(self) -> None:
        consumer = self._consumer
        if consumer is not None and not consumer.done():
            consumer.set_result(None)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
