"""Upstream HTTP clients behind one small interface (`base.UpstreamClient`)."""

from __future__ import annotations

from .base import UpstreamClient

KINDS = ("auto", "lean", "aiohttp")


def open_upstream_client(upstream: str, kind: str = "auto") -> UpstreamClient:
    """The proxy's client for `upstream`: "lean" (HTTP/1.1 on asyncio protocols, http:// only, ~6x aiohttp),
    "aiohttp" (also https://), or "auto" (lean for http://, aiohttp for https://)."""
    if kind == "auto":
        kind = "aiohttp" if upstream.startswith("https:") else "lean"
    if kind == "lean":
        from .lean import LeanClient

        return LeanClient(upstream)
    from .aiohttp_client import AiohttpClient

    return AiohttpClient(upstream)
