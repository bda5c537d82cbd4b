"""Scripted HTTP/1.1 servers on loopback for upstream-client tests: each connection runs a test's script, which
reads requests and writes exactly the bytes it wants (well-formed or not). The server counts what it saw:
connections accepted, connections open at once (max), requests received (with their raw bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    head: bytes  # raw request line + headers, up to and including the blank line
    body: bytes = b""
    raw_body: bytes = b""  # body bytes as framed on the wire (chunk sizes included)
    conn: int = 0  # which accepted connection (1-based) carried it

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class Peer:
    """One accepted connection, as the script sees it."""

    def __init__(self, server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.n = n

    async def read_head(self) -> Request | None:
        """The next request's head, or None when the client closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [(k, v.strip()) for k, v in (line.split(":", 1) for line in lines[1:] if line)]
        request = Request(method, target, headers, head, conn=self.n)
        self.server.requests.append(request)
        return request

    async def read_body(self, request: Request, *, keep: bool = True) -> int:
        """Read the request's body by its framing; returns its size (kept in `request.body` when `keep`)."""
        body = bytearray()
        raw = bytearray()
        size = 0
        length = request.header("content-length")
        if length is not None:
            remaining = int(length)
            while remaining:
                data = await self.reader.read(min(remaining, 1 << 16))
                if not data:
                    raise EOFError("client closed inside the body")
                remaining -= len(data)
                size += len(data)
                if keep:
                    body += data
                    raw += data
        elif (request.header("transfer-encoding") or "").lower() == "chunked":
            while True:
                line = await self.reader.readuntil(b"\r\n")
                chunk_size = int(line.split(b";")[0], 16)
                data = await self.reader.readexactly(chunk_size + 2)
                size += chunk_size
                if keep:
                    raw += line + data
                    body += data[:-2]
                if chunk_size == 0:
                    break
        request.body, request.raw_body = bytes(body), bytes(raw)
        return size

    async def read_request(self) -> Request | None:
        request = await self.read_head()
        if request is not None:
            await self.read_body(request)
        return request

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()


Script = Callable[[Peer], Awaitable[None]]


@dataclass
class ScriptedServer:
    script: Script
    rcvbuf: int | None = None  # a small receive buffer makes the client feel back-pressure early
    port: int = 0
    accepted: int = 0
    live: int = 0
    max_live: int = 0
    closed: int = 0  # connections finished (script returned or client closed)
    requests: list[Request] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self, method: str) -> int:
        return sum(1 for r in self.requests if r.method == method)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        peer = Peer(self, reader, writer, self.accepted)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, EOFError):
                await self.script(peer)
                # the script is done with the connection: hold it until the client goes away
                while await reader.read(1 << 16):
                    pass
        except asyncio.CancelledError:
            pass  # the server is shutting down (a cancelled handler task makes asyncio's streams log an error)
        finally:
            self.live -= 1
            self.closed += 1
            writer.close()
            self._tasks.discard(task)

    async def __aenter__(self) -> ScriptedServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._handle, sock=sock, limit=1 << 20)
        self.port = sock.getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll until `condition()` holds (a generous bound: this box is shared and noisy)."""
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110 - conditions span client and server state
                await asyncio.sleep(0.01)


def respond_each(make: Callable[[Request], bytes | Awaitable[bytes]]) -> Script:
    """A script answering every request on the connection with `make(request)`'s bytes."""

    async def script(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            answer = make(request)
            if not isinstance(answer, bytes):
                answer = await answer
            peer.send(answer)
            await peer.drain()

    return script


def ok(body: bytes = b"ok", *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in extra)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), head.encode(), body)


async def agen(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
