"""`GET /dashboard`: one self-contained page (inline CSS and JavaScript, no CDN) that polls the admin API.

The page is static: it holds no data, so it is served without the token. It asks the operator for the token (kept
in the tab's sessionStorage, sent as `Authorization: Bearer`) and then reads `/v2/flowControl` and `/metrics` every
second (every 5 s beyond 1000 keys); pause and resume call the API's POST routes.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

#: The page may only talk to its own origin and runs only its own inline code.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def page() -> str:
    """The dashboard's HTML."""
    return (resources.files(__package__) / "dashboard.html").read_text(encoding="utf-8")


async def dashboard(request: Request) -> Response:
    return HTMLResponse(page(), headers=_HEADERS)


__all__ = ["dashboard", "page"]
