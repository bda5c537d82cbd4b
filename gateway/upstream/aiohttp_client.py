"""`UpstreamClient` over one pooled `aiohttp.ClientSession` kept for the app's lifetime.

Bodies stream both ways, nothing is decompressed, redirects are passed back, cookies are never stored (a shared
session must not carry one client's cookies to another). aiohttp's errors become UpstreamTimeout (nothing
received within `timeout`) and UpstreamUnreachable (refused connection, malformed response, connection lost).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator

import aiohttp
from yarl import URL

from ..errors import ConfigError, UpstreamTimeout, UpstreamUnreachable
from .base import Headers

DEFAULT_POOL_LIMIT = 1024
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class AiohttpResponse:
    """One upstream response; `body()` streams it, `aclose()` returns the connection to the pool or closes it."""

    __slots__ = ("_chunks_iterator", "_complete", "_response", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._complete = False
        self._chunks_iterator: AsyncGenerator[bytes, None] | None = None
        self.status = response.status
        self.reason = (response.reason or "").encode("latin-1", "replace")
        self.headers: Headers = list(response.raw_headers)

    @property
    def complete(self) -> bool:
        content = self._response.content
        if not self._complete and content.at_eof() and content.exception() is None:
            self._complete = True
        return self._complete

    def body(self) -> AsyncIterator[bytes]:
        iterator = self._chunks_iterator = self._chunks()
        return iterator

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the upstream stopped sending its response body") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(f"the upstream connection failed mid-response: {_describe(exc)}") from exc
        self._complete = True

    async def aclose(self) -> None:
        if self._chunks_iterator is not None:
            await self._chunks_iterator.aclose()  # a reader that stopped at the last chunk left it open
        if self.complete:
            self._response.release()
        else:
            self._response.close()


class AiohttpClient:
    """Send requests to one upstream (`http://host:port` or `https://…`, optionally with a base path)."""

    def __init__(self, upstream: str, *, pool_limit: int = DEFAULT_POOL_LIMIT) -> None:
        url = URL(upstream)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f'upstream "{upstream}" must be an http:// or https:// URL with a host')
        if url.query_string or url.fragment:
            raise ConfigError(f'upstream "{upstream}" must not have a query string or fragment')
        self.upstream = upstream
        self._base = str(url.origin()) + url.raw_path.rstrip("/")
        self._pool_limit = pool_limit
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"AiohttpClient({self.upstream!r})"

    async def open(self) -> None:
        """Create the pooled session (done lazily by the first request otherwise)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._pool_limit, ttl_dns_cache=60, enable_cleanup_closed=False)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )

    async def request(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: AsyncIterable[bytes] | bytes | None,
        *,
        timeout: float,
    ) -> AiohttpResponse:
        if self._session is None or self._session.closed:
            await self.open()
        assert self._session is not None
        pairs = [
            (name.decode("latin-1"), _text(value))
            for name, value in headers
            if name.lower() != b"transfer-encoding"  # aiohttp frames a body without Content-Length itself
        ]
        try:
            response = await self._session.request(
                method,
                URL(self._base + target, encoded=True),
                headers=pairs,
                data=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"the upstream did not answer within {timeout:g}s") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(f"the upstream could not be reached: {_describe(exc)}") from exc
        return AiohttpResponse(response)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
            await asyncio.sleep(0)  # let the connector's transports close before the loop does


def _text(raw: bytes) -> str:
    # aiohttp encodes header values as UTF-8: decode UTF-8 where it is valid, so the bytes go out unchanged.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]
