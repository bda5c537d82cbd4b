"""The admin port: health, completion reporting, the flow-control API, metrics and the dashboard (Starlette).

    GET  /healthz                          200 while the process serves (never needs the token)
    GET  /readyz                           200 when the store answers; 503 when it does not or while draining
    POST /v2/leases/{lease}/release        200 {"released": true}; 404 unknown or already released; 400 malformed
    POST /v2/leases/{lease}/extend?ttl=s   200 {"extended": true, "ttl": s}; 404 unknown; 400 bad lease or ttl
    /v2/flowControl…, /v2/globalParallelism   QStash's flow-control API (see flow_api)
    GET  /metrics                          Prometheus text format (when built with `metrics`)
    GET  /dashboard                        the live page (static HTML: served without the token; its API calls
                                           carry the token the operator types in)

With a token configured every route but /healthz and /dashboard needs `Authorization: Bearer <token>`. Every error
is JSON `{"error", "message"}`, including unknown routes (404) and wrong methods (405). More routes can come in
through `extra_routes`; their handlers find the controller and the settings on `request.app.state` and may raise any
DeliveryError (answered with its status and code).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .config import Settings
from .dashboard import dashboard
from .engine import FlowController, Lease
from .errors import DeliveryError, InvalidFlowControl, StoreUnavailable
from .flow_api import flow_control_routes
from .metrics import CONTENT_TYPE, Metrics
from .types import ASGIApp, Receive, Scope, Send
from .units import parse_duration

logger = logging.getLogger("flowgate.admin")

#: Longest /readyz waits for the store before answering 503.
READY_TIMEOUT = 2.0
MAX_LEASE_EXTENSION = 86400.0
#: Served without the token: liveness probes, and the dashboard's static page (it holds no data itself).
OPEN_PATHS = frozenset({"/healthz", "/dashboard"})

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The gateway's JSON error body: `{"error": code, "message": message}`."""
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def build_admin_app(
    controller: FlowController,
    settings: Settings | None = None,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    metrics: Metrics | None = None,
) -> Starlette:
    """The admin ASGI app over `controller`; `settings.admin_token` (if set) guards every route but `OPEN_PATHS`.
    `/metrics` serves `metrics` (404 without)."""
    settings = settings or Settings()
    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/dashboard", dashboard, methods=["GET"]),
        Route("/v2/leases/{lease}/release", release_lease, methods=["POST"]),
        Route("/v2/leases/{lease}/extend", extend_lease, methods=["POST"]),
        *flow_control_routes(),
        *extra_routes,
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BearerAuth, token=settings.admin_token)],
        exception_handlers={
            HTTPException: _http_error,
            DeliveryError: _delivery_error,
            Exception: _internal_error,
        },
    )
    app.state.controller = controller
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False  # set by `flowgate serve` on SIGTERM: /readyz then answers 503
    return app


def is_loopback(host: str) -> bool:
    """True for loopback addresses and `localhost`."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: Settings) -> bool:
    """Log a loud warning (and return True) when the admin port listens beyond loopback without a token."""
    if settings.admin_token is None and not is_loopback(settings.admin_host):
        logger.warning(
            "!!! The admin port listens on %s:%d WITHOUT a token: anyone who can reach it can release leases and "
            "steer flow control. Set --admin-token / FLOWGATE_ADMIN_TOKEN, or bind it to 127.0.0.1. !!!",
            settings.admin_host,
            settings.admin_port,
        )
        return True
    return False


class BearerAuth:
    """Pure ASGI middleware: `Authorization: Bearer <token>` on every path but `OPEN_PATHS` (off without a token)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if given is None:
            response: Response = error_response(
                401,
                "unauthorized",
                "this route needs an Authorization: Bearer <token> header",
                {"WWW-Authenticate": 'Bearer realm="flowgate"'},
            )
        else:
            scheme, _, credentials = given.strip().partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token):
                await self.app(scope, receive, send)
                return
            response = error_response(
                401,
                "unauthorized",
                "the bearer token is wrong",
                {"WWW-Authenticate": 'Bearer realm="flowgate", error="invalid_token"'},
            )
        await response(scope, receive, send)


# -- routes -------------------------------------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    if request.app.state.draining:
        return error_response(503, "draining", "the gateway is shutting down", {"Retry-After": "1"})
    controller: FlowController = request.app.state.controller
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await controller.store.ping()
    except (StoreUnavailable, TimeoutError) as exc:
        reason = exc.message if isinstance(exc, StoreUnavailable) else f"no answer within {READY_TIMEOUT:g}s"
        return error_response(503, "store_unavailable", f"the store cannot be reached: {reason}", {"Retry-After": "1"})
    return JSONResponse({"status": "ready"})


async def metrics_text(request: Request) -> Response:
    metrics: Metrics | None = request.app.state.metrics
    if metrics is None:
        return error_response(404, "not_found", "this admin app was built without metrics")
    return Response(metrics.render(), media_type=CONTENT_TYPE)


async def release_lease(request: Request) -> Response:
    lease = _lease(request)
    controller: FlowController = request.app.state.controller
    if not await controller.release(lease):
        return _unknown_lease(lease)
    return JSONResponse({"released": True})


async def extend_lease(request: Request) -> Response:
    lease = _lease(request)
    controller: FlowController = request.app.state.controller
    raw = request.query_params.get("ttl")
    ttl = controller.lease_ttl
    if raw is not None:
        try:
            ttl = parse_duration(raw, "ttl")
        except ValueError as exc:
            return error_response(400, "invalid_ttl", str(exc))
        if not 0 < ttl <= MAX_LEASE_EXTENSION:
            return error_response(400, "invalid_ttl", f'ttl must be above 0s and at most 1d, got "{raw}"')
    if not await controller.renew(lease, ttl):
        return _unknown_lease(lease)
    return JSONResponse({"extended": True, "ttl": ttl})


def _lease(request: Request) -> Lease:
    token: str = request.path_params["lease"]
    try:
        return Lease.from_token(token)
    except InvalidFlowControl as exc:
        raise HTTPException(400, exc.message) from None


def _unknown_lease(lease: Lease) -> Response:
    return error_response(
        404, "lease_not_found", f"lease {lease.token} is unknown: already released, expired, or never granted"
    )


# -- error handlers -----------------------------------------------------------------------------------------------


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 400 and request.url.path.startswith("/v2/leases/"):
        code = "invalid_lease"
    message = exc.detail
    if exc.status_code == 404:
        message = f"no admin route {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


async def _delivery_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DeliveryError)
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
    return error_response(exc.status, exc.code, exc.message, headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("admin route %s failed", request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "the admin API failed unexpectedly; see the gateway's log")
