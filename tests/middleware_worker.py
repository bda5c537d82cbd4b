"""The Starlette test app as a module for a separate uvicorn process:
`FLOWGATE_TEST_STORE=redis://… python -m uvicorn tests.middleware_worker:app`."""

from __future__ import annotations

import os

from tests.middleware_harness import RULES, AppLog, starlette_app

app = starlette_app(AppLog(), store=os.environ["FLOWGATE_TEST_STORE"], rules=RULES)
