"""JSON error responses and hop-by-hop header filtering (gateway/http.py)."""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import Rejected, StoreUnavailable, UpstreamTimeout
from gateway.http import connection_tokens, send_error, strip_hop_by_hop


async def sent_error(exc: Exception, **options: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        messages.append(message)

    await send_error(send, exc, **options)  # type: ignore[arg-type]
    return messages


async def test_error_json_with_retry_after_ceiled() -> None:
    start, body = await sent_error(Rejected("waitlist_full", "the waitlist of key 'k' is full", 1.2))
    assert start["status"] == 429
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"2"
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body["body"]) == {"error": "waitlist_full", "message": "the waitlist of key 'k' is full"}
    assert int(headers[b"content-length"]) == len(body["body"])


async def test_error_without_retry_after_and_with_close() -> None:
    start, _ = await sent_error(UpstreamTimeout("slow"), close=True)
    headers = dict(start["headers"])
    assert start["status"] == 504 and b"retry-after" not in headers and headers[b"connection"] == b"close"
    start, _ = await sent_error(StoreUnavailable("down"))
    assert dict(start["headers"])[b"retry-after"] == b"1"


def test_strip_hop_by_hop_and_listed_names() -> None:
    headers = [
        (b"Connection", b"keep-alive, X-Listed"),
        (b"connection", b"Upgrade"),
        (b"X-Listed", b"1"),
        (b"Keep-Alive", b"5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"),
        (b"Trailer", b"x"),
        (b"Proxy-Authenticate", b"x"),
        (b"Proxy-Authorization", b"x"),
        (b"Proxy-Connection", b"x"),
        (b"Upgrade", b"h2c"),
        (b"Content-Type", b"text/plain"),
        (b"X-Other", b"kept"),
    ]
    assert strip_hop_by_hop(headers) == [(b"Content-Type", b"text/plain"), (b"X-Other", b"kept")]
    assert connection_tokens(headers) == {b"keep-alive", b"x-listed", b"upgrade"}
