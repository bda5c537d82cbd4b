"""A lean pipelined RESP client for the script calls of a single-node Redis store's hot path.

redis-py spends tens of microseconds of client CPU per call (pool checkout under a lock, a StreamReader, a task
per batch) and wakes two tasks per round trip. Here one connection carries every call: a command is packed by
hiredis and written straight to the transport, its reply handler queued in a FIFO; `data_received` parses the
replies with hiredis and hands each to its handler in order, with no task in between.

Failures end the connection and fail every call on it with redis-py's own exceptions (ConnectionError,
TimeoutError, the error-reply classes), so callers translate them exactly as they translate redis-py's: a reply
later than `timeout` (frozen server), a refused or reset connection, a protocol error. The next call opens a new
connection. Nothing is re-sent after a failure; a call that met NOSCRIPT never ran, and is re-sent once as EVAL.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union, cast

import hiredis
from redis._parsers import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Receives a reply, or the exception that replaced it (an error reply, a lost connection, a timeout).
Deliver = Callable[[Any], None]
#: Where a batched call's reply goes: a future to await, or a callback called straight from the reply's arrival
#: (no future, no extra turn of the event loop: the express lane's way).
Receiver = Union["asyncio.Future[Any]", Callable[[Any], object]]


@dataclass(frozen=True, slots=True)
class Script:
    body: str
    sha: str

    @classmethod
    def of(cls, body: str) -> Script:
        return cls(body, hashlib.sha1(body.encode()).hexdigest())


@dataclass(slots=True)
class _Pending:
    deliver: Deliver
    deadline: float
    script: Script | None = None  # set for EVALSHA: re-sent as EVAL on NOSCRIPT
    command: tuple[Any, ...] = ()


class RespConnection(asyncio.Protocol):
    """One connection: commands are written at once (or held until connected / while the transport is paused),
    replies matched to commands in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, handshake: list[tuple[Any, ...]]) -> None:
        self.loop = loop
        self.closed = False
        self._timeout = timeout
        self._handshake = handshake
        self._reader = hiredis.Reader(replyError=BaseParser.parse_error)
        self._pending: deque[_Pending] = deque()
        self._transport: asyncio.Transport | None = None
        self._held: list[bytes] = []  # written once connected and writable
        self._writable = False
        self._timer: asyncio.TimerHandle | None = None
        self._idle: asyncio.Future[None] | None = None
        self.connecting: asyncio.Task[Any] | None = None

    def send(self, command: tuple[Any, ...], deliver: Deliver, script: Script | None = None) -> None:
        payload = hiredis.pack_command(command)
        self._pending.append(_Pending(deliver, self.loop.time() + self._timeout, script, command))
        if self._writable:
            assert self._transport is not None
            self._transport.write(payload)
        else:
            self._held.append(payload)
        if self._timer is None:
            self._timer = self.loop.call_at(self._pending[0].deadline, self._check_deadline)

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        if self.closed:  # failed (timed out) while connecting
            stream.abort()
            return
        self._transport = stream
        deadline = self.loop.time() + self._timeout
        # AUTH and SELECT go first, pipelined with what waited for the connection
        self._pending.extendleft(_Pending(self._handshake_reply, deadline) for _ in self._handshake)
        self._held[:0] = [hiredis.pack_command(command) for command in self._handshake]
        self._writable = True
        self._write_held()
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis sent a reply that is not RESP: {exc}"))
                return
            if reply is False:
                break
            if not pending:
                self.fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            call = pending.popleft()
            if isinstance(reply, NoScriptError) and call.script is not None:
                self.send(("EVAL", call.script.body, *call.command[2:]), call.deliver)  # loads the script too
                continue
            call.deliver(reply)
            if self.closed:
                return
        if not pending and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"Connection to Redis lost: {exc or 'closed by the server'}"))

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._write_held()

    # -- failures ------------------------------------------------------------------------------------------------

    def _handshake_reply(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            self.fail(reply)

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._pending:
            return
        head = self._pending[0].deadline
        if head <= self.loop.time():
            self.fail(RedisTimeoutError(f"Redis did not answer within {self._timeout:g}s"))
        else:
            self._timer = self.loop.call_at(head, self._check_deadline)

    def fail(self, error: Exception) -> None:
        """Close the connection and fail every call on it with `error`."""
        if self.closed:
            return
        self.closed = True
        self._writable = False
        self._held.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        if self._transport is not None:
            self._transport.abort()
        pending, self._pending = self._pending, deque()
        for call in pending:
            call.deliver(error)
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _write_held(self) -> None:
        if self._held and self._transport is not None:
            held, self._held = self._held, []
            self._transport.write(b"".join(held))

    async def drain(self) -> None:
        """Wait until every call sent so far has its reply (or has failed)."""
        if self._pending and not self.closed:
            if self._idle is None or self._idle.done():
                self._idle = self.loop.create_future()
            await asyncio.shield(self._idle)

    def close(self) -> None:
        self.fail(RedisConnectionError("the Redis client was closed"))


class RespClient:
    """Pipelined calls to one Redis node over one connection, opened on first use (AUTH, SELECT, TLS as the URI
    says) and re-opened by the first call after a failure."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._timeout = timeout
        self._handshake: list[tuple[Any, ...]] = []
        if password is not None:
            self._handshake.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._handshake.append(("SELECT", db))
        self._connection: RespConnection | None = None

    def send(self, command: tuple[Any, ...], deliver: Deliver) -> None:
        self._connected().send(command, deliver)

    def evalsha(self, script: Script, keys: Sequence[Any], args: Sequence[Any], deliver: Deliver) -> None:
        self._connected().send(("EVALSHA", script.sha, len(keys), *keys, *args), deliver, script)

    async def execute(self, *command: Any) -> Any:
        """One command, awaited (an error reply or a failure is raised)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.send(command, lambda reply: settle([future], reply, single=True))
        return await future

    def _connected(self) -> RespConnection:
        connection = self._connection
        if connection is None or connection.closed or connection.loop is not asyncio.get_running_loop():
            connection = self._connection = self._open()
        return connection

    def _open(self) -> RespConnection:
        loop = asyncio.get_running_loop()
        connection = RespConnection(loop, self._timeout, self._handshake)
        connection.connecting = loop.create_task(self._connect(connection))
        return connection

    async def _connect(self, connection: RespConnection) -> None:
        """Failures, and a connection that takes longer than the timeout (the first call's deadline), fail the
        calls that wait for it."""
        try:
            await connection.loop.create_connection(lambda: connection, self.host, self.port, ssl=self._ssl)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            connection.connecting = None
            error = RedisConnectionError(f"Error connecting to {self.host}:{self.port}: {exc}")
            error.__cause__ = exc
            connection.fail(error)
        else:
            connection.connecting = None

    async def drain(self) -> None:
        if self._connection is not None and self._connection.loop is asyncio.get_running_loop():
            await self._connection.drain()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.loop.is_closed():
            connection.close()


def settle(receivers: Sequence[Receiver], reply: Any, single: bool = False) -> None:
    """Give each receiver its part of `reply` (or each the exception that replaced it)."""
    if isinstance(reply, BaseException):
        for receiver in receivers:
            _give(receiver, reply)
    elif single:
        _give(receivers[0], reply)
    else:
        for receiver, part in zip(receivers, reply, strict=True):
            _give(receiver, part)


def _give(receiver: Receiver, value: Any) -> None:
    if isinstance(receiver, asyncio.Future):
        if not receiver.done():
            if isinstance(value, BaseException):
                receiver.set_exception(value)
            else:
                receiver.set_result(value)
        return
    try:
        receiver(value)
    except Exception as exc:  # a failing callback must not keep the replies after it from theirs
        asyncio.get_running_loop().call_exception_handler(
            {"message": "a Redis reply's callback failed", "exception": exc}
        )
