"""HTTP helpers for pure ASGI code: the gateway's JSON error responses and hop-by-hop header filtering."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Final

from .errors import DeliveryError
from .types import Send

Headers = list[tuple[bytes, bytes]]

#: Hop-by-hop headers (RFC 9110 §7.6.1, plus the de-facto Keep-Alive and Proxy-Connection): never forwarded.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)


def error_body(exc: DeliveryError) -> bytes:
    return json.dumps({"error": exc.code, "message": exc.message}).encode()


def error_headers(exc: DeliveryError, body: bytes, *, close: bool = False) -> Headers:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(max(0, math.ceil(exc.retry_after))).encode()))
    if close:
        headers.append((b"connection", b"close"))
    return headers


async def send_error(send: Send, exc: DeliveryError, *, close: bool = False) -> None:
    """Answer `exc` as `{"error": code, "message": ...}` with its status (and Retry-After when it has one).

    `close` asks the server to close the connection afterwards (a request body that will not be read).
    """
    body = error_body(exc)
    await send({"type": "http.response.start", "status": exc.status, "headers": error_headers(exc, body, close=close)})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Lower-cased header names listed in every `Connection` header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """`headers` without hop-by-hop headers and without the names listed in `Connection`; names keep their case."""
    headers = list(headers)
    listed = connection_tokens(headers)
    drop = HOP_BY_HOP | listed if listed else HOP_BY_HOP
    return [(name, value) for name, value in headers if name.lower() not in drop]
