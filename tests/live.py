"""Serve an ASGI app on a free loopback port inside the test's event loop, through Flowgate's own server setup."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from gateway.config import Settings
from gateway.server import bind_socket, make_server
from gateway.types import ASGIApp


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, settings: Settings | None = None, role: str = "admin") -> AsyncIterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) while `app` is served; stop the server on exit."""
    settings = settings or Settings(log_level="warning")
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(app, settings, role)
    await server.start(sock)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.stop()
