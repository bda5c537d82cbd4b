"""A FastAPI app flow-controlled in process by the sidecar's own config file (examples/flowgate.toml). Run it with

    uvicorn examples.fastapi_app:app

Endpoints:

    POST /hooks/{name}   at most 5 webhooks per tenant (X-Tenant-Id) at once and 100 per minute; the rest wait
    POST /jobs           202 at once; the job runs in the background and keeps its token (2 jobs at a time)
                         until it is done: completion reporting with Flow-Control-Hold: 1
    GET  /               not flow-controlled
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse

from gateway import FlowControlMiddleware
from gateway.middleware import FlowGrant

app = FastAPI(title="Flowgate middleware example")
# The same TOML as `flowgate serve --config examples/flowgate.toml`: store, rules, [defaults] and lease_ttl are
# used; upstream and the other sidecar-only settings are ignored.
app.add_middleware(FlowControlMiddleware, config=Path(__file__).with_name("flowgate.toml"))


@app.get("/")
async def home() -> dict[str, str]:
    return {"hello": "world"}


@app.post("/hooks/{name}")
async def hook(name: str, work: float = 0.1) -> dict[str, str]:
    await asyncio.sleep(min(work, 10.0))  # process the webhook
    return {"hook": name, "status": "processed"}


async def run_job(grant: FlowGrant | None, seconds: float) -> None:
    try:
        await asyncio.sleep(seconds)  # the job itself
    finally:
        if grant is not None:
            await grant.release()  # the next job may start now


@app.post("/jobs")
async def start_job(request: Request, background: BackgroundTasks, seconds: float = 2.0) -> JSONResponse:
    grant: FlowGrant | None = request.scope.get("flowgate")
    background.add_task(run_job, grant, min(seconds, 60.0))
    # Flow-Control-Hold: 1 keeps the token after the response; the job releases it (or it expires after lease_ttl).
    return JSONResponse({"job": "accepted"}, status_code=202, headers={"Flow-Control-Hold": "1"})
