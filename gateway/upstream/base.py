"""The proxy's upstream client interface: send one request, stream the response back.

Implementations: `aiohttp` (library client) and `lean` (HTTP/1.1 on asyncio protocols with httptools).
Both raise only UpstreamUnreachable (connect failure, malformed response, connection lost) and
UpstreamTimeout (no response headers within the timeout, or a stalled body read).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

Headers = list[tuple[bytes, bytes]]  # raw header pairs, names as sent, in order


class UpstreamResponse(Protocol):
    status: int
    reason: bytes
    headers: Headers  # hop-by-hop headers NOT yet removed: the proxy filters them

    @property
    def complete(self) -> bool:
        """The whole body has arrived and been handed out: the chunk `body()` gave last was its end."""
        ...

    def body(self) -> AsyncIterator[bytes]:
        """The body in chunks, read with back-pressure; ends cleanly or raises an upstream error."""
        ...

    async def aclose(self) -> None:
        """Stop reading; a connection whose exchange did not end cleanly is closed, not reused."""
        ...


class UpstreamClient(Protocol):
    async def request(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: AsyncIterable[bytes] | bytes | None,
        *,
        timeout: float,
    ) -> UpstreamResponse:
        """Send `method target` (origin-form path + query) to the configured upstream.

        `headers` are sent as given (the proxy already set Host and stripped hop-by-hop headers); framing
        headers (Content-Length / Transfer-Encoding) describe `body`: None (no body), the whole body as bytes, or
        its chunks as they come. Returns once response headers arrive.
        """
        ...

    async def aclose(self) -> None:
        """Close every pooled connection."""
        ...
