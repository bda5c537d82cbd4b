"""A sample upstream app to put behind Flowgate (Starlette; run it with uvicorn or `python upstream_app.py`).

    GET  /                    hello, with the flow-control headers Flowgate added
    POST /hooks/{name}        a webhook receiver that takes `?work=<seconds>` (default 0.1) to process
    GET  /slow?seconds=2      answers after a delay (drain and timeout demos)
    POST /jobs                202 + `Flow-Control-Hold: 1`: the job runs in the background, then reports its
                              completion to Flowgate's admin port, which frees the token for the next request

The admin port's address and token come from FLOWGATE_ADMIN_URL (default http://127.0.0.1:8081) and
FLOWGATE_ADMIN_TOKEN.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import urllib.request

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

ADMIN_URL = os.environ.get("FLOWGATE_ADMIN_URL", "http://127.0.0.1:8081")
ADMIN_TOKEN = os.environ.get("FLOWGATE_ADMIN_TOKEN")
MAX_DELAY = 60.0
logger = logging.getLogger("upstream_app")


def _seconds(request: Request, name: str, default: float) -> float:
    try:
        return min(max(float(request.query_params.get(name, default)), 0.0), MAX_DELAY)
    except ValueError:
        return default


def _flow_headers(request: Request) -> dict[str, str | None]:
    return {
        "key": request.headers.get("flow-control-key"),
        "lease": request.headers.get("flow-control-lease"),
        "forwarded_for": request.headers.get("x-forwarded-for"),
    }


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world", **_flow_headers(request)})


async def hook(request: Request) -> JSONResponse:
    body = await request.body()
    await asyncio.sleep(_seconds(request, "work", 0.1))
    return JSONResponse({"hook": request.path_params["name"], "bytes": len(body), **_flow_headers(request)})


async def slow(request: Request) -> JSONResponse:
    seconds = _seconds(request, "seconds", 2.0)
    await asyncio.sleep(seconds)
    return JSONResponse({"slept": seconds})


def _release(lease: str) -> None:
    request = urllib.request.Request(f"{ADMIN_URL}/v2/leases/{lease}/release", method="POST", data=b"")
    if ADMIN_TOKEN:
        request.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    with urllib.request.urlopen(request, timeout=5):
        pass


async def _run_job(lease: str | None, seconds: float) -> None:
    await asyncio.sleep(seconds)  # the real work
    if lease:
        try:
            await asyncio.to_thread(_release, lease)  # completion report: the token goes to the next request
        except OSError as exc:  # Flowgate reclaims the lease after lease_ttl anyway
            logger.warning("could not report the completion of lease %s: %s", lease, exc)


async def job(request: Request) -> JSONResponse:
    lease = request.headers.get("flow-control-lease")
    seconds = _seconds(request, "work", 1.0)
    return JSONResponse(
        {"accepted": True, "lease": lease},
        status_code=202,
        headers={"Flow-Control-Hold": "1"} if lease else None,
        background=BackgroundTask(_run_job, lease, seconds),
    )


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/hooks/{name}", hook, methods=["POST"]),
        Route("/slow", slow),
        Route("/jobs", job, methods=["POST"]),
    ]
)


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("APP_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("APP_PORT", "8000")))
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
