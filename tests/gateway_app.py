"""An app factory for running the proxy in its own process: `python -m uvicorn tests.gateway_app:create_app --factory`.

Settings come from the environment: FLOWGATE_TEST_UPSTREAM (required), FLOWGATE_TEST_STORE (default memory://),
FLOWGATE_TEST_RULES (JSON list of Rule keyword dicts), FLOWGATE_TEST_MAX_BODY (bytes), FLOWGATE_TEST_TIMEOUT (s),
FLOWGATE_TEST_UPSTREAM_CLIENT (auto, lean or aiohttp).
The controller and the store are closed on lifespan shutdown.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gateway.engine import FlowController
from gateway.proxy import DEFAULT_MAX_BODY, ProxyApp
from gateway.routing import Router
from gateway.rules import Rule
from gateway.stores import open_store
from gateway.upstream import open_upstream_client


def create_app() -> Any:
    store = open_store(os.environ.get("FLOWGATE_TEST_STORE", "memory://"))
    controller = FlowController(store)
    upstream = os.environ["FLOWGATE_TEST_UPSTREAM"]
    rules = [Rule(**item) for item in json.loads(os.environ.get("FLOWGATE_TEST_RULES", "[]"))]
    proxy = ProxyApp(
        upstream=upstream,
        controller=controller,
        router=Router(rules),
        max_body=int(os.environ.get("FLOWGATE_TEST_MAX_BODY", DEFAULT_MAX_BODY)),
        upstream_timeout=float(os.environ.get("FLOWGATE_TEST_TIMEOUT", "60")),
        client=open_upstream_client(upstream, os.environ.get("FLOWGATE_TEST_UPSTREAM_CLIENT", "auto")),
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await proxy(scope, receive, send)
            return

        async def send_after_closing(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await controller.close()
                await store.close()
            await send(message)

        await proxy(scope, receive, send_after_closing)

    return app
