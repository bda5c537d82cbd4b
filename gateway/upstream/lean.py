"""A lean HTTP/1.1 upstream client: asyncio protocols, httptools' parser, a keep-alive pool per upstream.

`LeanClient(base_url)` implements `UpstreamClient` for one `http://host[:port][/prefix]` upstream (https is not
supported yet: a ConfigError says so). What it does, and the rules it keeps:

- **Pool**: at most `max_connections` connections open or opening; callers beyond that wait FIFO. A connection idle
  for `idle_timeout` seconds is closed. Connecting takes at most `connect_timeout` seconds (else UpstreamTimeout).
- **Request framing**: headers are sent as given, plus `Host` when missing. With a body, a `Content-Length` header
  frames it (the body must match it exactly; the iterator is not advanced past the announced length); without one,
  the body is sent chunked (`Transfer-Encoding: chunked` is added when missing). `body=None` sends no body; a
  `bytes` body is the whole body, written with the head in one send.
  Inconsistent framing (a length or Transfer-Encoding without a body, both headers with a body) is a ValueError.
- **Response framing**: Content-Length, chunked (extensions ignored, trailers kept in `response.trailers`) or
  read-until-close; no body for HEAD, 204, 304; interim 1xx responses are skipped. A 101 is returned as final and
  its body relays the raw bytes that follow until the upstream closes (no bidirectional upgrade).
- **Timeouts** (`timeout` of `request`): the response head must arrive within it once the request is written; the
  response body, or the upstream's reading of a request body, may stall at most that long. Expiry: UpstreamTimeout.
- **Errors**: everything else the upstream does wrong raises UpstreamUnreachable: refused, reset, closed early,
  malformed, a head over 64 KiB, a body shorter than its Content-Length (raised by `body()`, never a clean end).
  Errors raised by the caller's body iterator propagate unchanged (the connection is closed).
- **Reuse**: a connection is pooled again only after a clean exchange (request fully written, response fully read,
  keep-alive). If a *reused* connection fails before any response byte and the request has no body, the request is
  sent once more on a fresh connection if its method is idempotent; a request with a body, a non-idempotent one
  (a bodiless POST), or one on a fresh connection is never retried.
- **Back-pressure**: reading pauses while more than 256 KiB of response wait for the consumer; request body writes
  wait for the transport to drain. `UpstreamResponse.aclose()` before the body's end closes the connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from urllib.parse import urlsplit

from gateway.errors import ConfigError, UpstreamUnreachable
from gateway.upstream.base import Headers
from gateway.upstream.lean_conn import Connection
from gateway.upstream.lean_pool import Pool
from gateway.upstream.lean_response import LeanResponse

__all__ = ["IDEMPOTENT", "LeanClient", "LeanResponse"]

_METHODS = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 §9.2.2: safe to resend


class LeanClient:
    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 256,
        idle_timeout: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme == "https":
            raise ConfigError(
                f"upstream {base_url!r}: the lean upstream client speaks plain http:// only; "
                "use the aiohttp upstream client for https:// upstreams"
            )
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"upstream {base_url!r}: expected http://host[:port][/prefix]")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError(f"upstream {base_url!r}: no query, fragment or credentials allowed in the upstream URL")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise ConfigError(f"upstream {base_url!r}: {exc}") from None
        if max_connections < 1:
            raise ConfigError(f"max_connections must be at least 1, got {max_connections}")
        if idle_timeout <= 0 or connect_timeout <= 0:
            raise ConfigError(f"timeouts must be positive, got idle {idle_timeout} and connect {connect_timeout}")
        authority = parts.netloc.rsplit("@", 1)[-1]
        self.base_url = base_url
        self._host_line = b"Host: " + authority.encode("idna")
        self._prefix = parts.path.rstrip("/").encode("ascii")
        self._pool = Pool(parts.hostname, port, authority, max_connections, idle_timeout, connect_timeout)

    async def request(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: AsyncIterable[bytes] | bytes | None,
        *,
        timeout: float,
    ) -> LeanResponse:
        head, length = self._head(method, target, headers, body)
        chunks: AsyncIterable[bytes] | None
        if isinstance(body, bytes):  # the whole body: written with the head, in one send
            head += _framed(body, length)
            chunks = None
        else:
            chunks = body
        is_head = method == "HEAD"
        conn = self._pool.idle_connection() or await self._pool.acquire(False)
        try:
            return await conn.exchange(head, chunks, length, timeout, is_head)
        except UpstreamUnreachable:
            if body is not None or not conn.retryable or method not in IDEMPOTENT:
                raise
        conn = await self._pool.acquire(True)  # once, on a fresh connection
        return await conn.exchange(head, None, length, timeout, is_head)

    def head(self, method: str, target: str, headers: Headers, has_body: bool) -> bytes:
        """The request head `request` would send, for a body given whole and framed by its Content-Length."""
        return self._head(method, target, headers, b"" if has_body else None)[0]

    def idle_connection(self) -> Connection | None:
        """An idle pooled connection, taken out of the pool, if there is one (for `Connection.relay`)."""
        return self._pool.idle_connection()

    def give_back(self, conn: Connection) -> None:
        """Return a connection from `idle_connection` unused (one closed meanwhile has left the pool already)."""
        if not conn.closing:
            self._pool.release(conn)

    def _head(
        self, method: str, target: str, headers: Headers, body: AsyncIterable[bytes] | bytes | None
    ) -> tuple[bytes, int]:
        """The request head as one bytes object, and the body's length (-1: chunked)."""
        if "\r" in target or "\n" in target or " " in target:
            raise ValueError(f"request target contains whitespace: {target!r}")
        method_bytes = _METHODS.get(method) or method.encode("ascii")
        lines = [method_bytes + b" " + self._prefix + target.encode() + b" HTTP/1.1"]
        length = -1
        has_host = has_te = False
        for pair in headers:
            name = pair[0]
            size = len(name)  # the names looked at have distinct lengths: most headers cost one comparison
            if size == 4:
                has_host = has_host or name.lower() == b"host"
            elif size == 14 and name.lower() == b"content-length":
                length = _content_length(pair[1])
            elif size == 17 and name.lower() == b"transfer-encoding":
                if not pair[1].rstrip().lower().endswith(b"chunked"):
                    raise ValueError(f"request Transfer-Encoding must end with chunked, got {pair[1]!r}")
                has_te = True
            lines.append(b": ".join(pair))
        if not has_host:
            lines.append(self._host_line)
        if body is None:
            if length > 0 or has_te:
                raise ValueError("Content-Length or Transfer-Encoding given for a request without a body")
        elif length >= 0:
            if has_te:
                raise ValueError("both Content-Length and Transfer-Encoding given for the request body")
        elif not has_te:
            lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"\r\n")
        return b"\r\n".join(lines), length

    @property
    def open_connections(self) -> int:
        """Connections open or opening (for metrics and tests)."""
        return self._pool.total

    @property
    def idle_connections(self) -> int:
        return self._pool.idle_count

    async def aclose(self) -> None:
        """Close every connection, idle or busy; requests in flight fail with UpstreamUnreachable."""
        await self._pool.aclose()


def _framed(body: bytes, length: int) -> bytes:
    """A whole request body as it goes on the wire: as is under its Content-Length, else chunked."""
    if length < 0:
        return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    if len(body) != length:
        raise ValueError(f"request body of {len(body)} bytes under Content-Length {length}")
    return body


def _content_length(value: bytes) -> int:
    stripped = value.strip()
    if not stripped.isdigit():
        raise ValueError(f"invalid Content-Length {value!r}")
    return int(stripped)
