"""A Starlette app that flow-controls itself with FlowControlMiddleware: no sidecar process. Run it with

    uvicorn examples.middleware_app:app
    FLOWGATE_STORE=redis://127.0.0.1:6379/0 uvicorn examples.middleware_app:app --workers 4   # one shared limit

Endpoints:

    GET /reports/{name}   at most 2 reports per user (X-User header) at once and 10 per minute; the rest wait
    GET /events           a server-sent-events stream; it holds its token (one stream per user) until it ends
    GET /                 not flow-controlled
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway import FlowControlMiddleware, Rule


async def report(request: Request) -> Response:
    await asyncio.sleep(1.0)  # the expensive part
    grant = request.scope.get("flowgate")  # present on flow-controlled requests
    waited = grant.waited if grant is not None else 0.0
    return JSONResponse({"report": request.path_params["name"], "waited_s": round(waited, 3)})


async def events(request: Request) -> Response:
    async def stream() -> AsyncIterator[bytes]:
        for tick in range(10):
            yield f"data: tick {tick}\n\n".encode()
            await asyncio.sleep(1.0)

    return StreamingResponse(stream(), media_type="text/event-stream")


async def home(request: Request) -> Response:
    return JSONResponse({"hello": "world"})


app = Starlette(
    routes=[
        Route("/", home),
        Route("/reports/{name}", report),
        Route("/events", events),
    ]
)
app.add_middleware(
    FlowControlMiddleware,
    store=os.environ.get("FLOWGATE_STORE", "memory://"),
    rules=[
        Rule(name="reports", path="/reports/", key="user:{header:X-User}", parallelism=2, rate=10, period="1m"),
        Rule(name="events", path="/events", key="events:{header:X-User}", parallelism=1),
    ],
    trust_policy_headers=False,  # only the rules decide; clients cannot pick keys or limits
)
