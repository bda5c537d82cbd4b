"""The flow-control REST API on the admin port, with QStash's paths and JSON field names.

QStash's SDKs pointed at the admin port (`QStash(token, base_url="http://127.0.0.1:8081")`) read and steer a running
gateway unchanged::

    GET  /v2/flowControl[?search=prefix]           JSON array of info objects, sorted by key
    GET  /v2/flowControl/{key}                     info object; 404 flow_control_key_not_found
    POST /v2/flowControl/{key}/pause               stop admissions (the waitlist is kept)
    POST /v2/flowControl/{key}/resume              restart admissions; the waitlist drains in order
    POST /v2/flowControl/{key}/pin?parallelism=&rate=&period=<s>
    POST /v2/flowControl/{key}/unpin?parallelism=true&rate=true
    POST /v2/flowControl/{key}/resetRate           a fresh rate window starts now
    GET  /v2/globalParallelism                     {"parallelismMax": 0, "parallelismCount": <live leases>}

Steering routes answer 200 with the key's info object after the change. `{key}` is the flow-control key,
URL-encoded (it may contain `/`). A limit that is not set reads 0 (`parallelismMax`, `rateMax`), as QStash's SDKs
read a field QStash leaves out; Flowgate has no global parallelism cap, so `/v2/globalParallelism` reports
`parallelismMax` 0. Pause and pin work on keys the gateway has not seen yet (an operator may prepare a key); the
other routes answer 404 for them. Bad query parameters answer 400 `invalid_parameter` naming the parameter.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .engine import FlowController
from .errors import InvalidFlowControl
from .policy import MAX_KEY_LENGTH, MAX_PERIOD, validate_key
from .stores.base import KeyState
from .units import parse_duration

#: Largest pinned parallelism or rate.
MAX_LIMIT: Final = 10**9
#: Key states read at once while listing (the Redis store answers them over several connections).
LIST_CONCURRENCY: Final = 64
_PIN_PARAMS: Final = ("parallelism", "rate", "period")
_UNPIN_PARAMS: Final = ("parallelism", "rate")
_TRUE: Final = ("true", "1")
_FALSE: Final = ("false", "0")


class ParameterError(InvalidFlowControl):
    """400 invalid_parameter: a query parameter of the admin API is missing, unknown or malformed."""

    code = "invalid_parameter"


class KeyNotFound(InvalidFlowControl):
    status = 404
    code = "flow_control_key_not_found"


def info(state: KeyState) -> dict[str, Any]:
    """QStash's info object for one key."""
    policy = state.policy
    return {
        "flowControlKey": state.key,
        "waitListSize": state.waiting,
        "parallelismMax": policy.parallelism or 0,
        "parallelismCount": state.active,
        "rateMax": policy.rate or 0,
        "rateCount": state.rate_count,
        "ratePeriod": _number(policy.period),
        "ratePeriodStart": int(state.rate_period_start),
        "isPaused": state.paused,
        "isPinnedParallelism": state.pinned_parallelism,
        "isPinnedRate": state.pinned_rate,
    }


def flow_control_routes() -> list[BaseRoute]:
    """The routes above; handlers find the controller on `request.app.state.controller`."""
    key = "/v2/flowControl/{key:path}"
    return [
        Route("/v2/flowControl", list_keys, methods=["GET"]),
        Route("/v2/flowControl/", list_keys, methods=["GET"]),
        Route("/v2/globalParallelism", global_parallelism, methods=["GET"]),
        Route(key + "/pause", pause, methods=["POST"]),
        Route(key + "/resume", resume, methods=["POST"]),
        Route(key + "/pin", pin, methods=["POST"]),
        Route(key + "/unpin", unpin, methods=["POST"]),
        Route(key + "/resetRate", reset_rate, methods=["POST"]),
        Route(key, get_key, methods=["GET"]),
    ]


# -- handlers -------------------------------------------------------------------------------------------------------


async def list_keys(request: Request) -> Response:
    search = request.query_params.get("search", "")
    if len(search) > MAX_KEY_LENGTH:
        raise ParameterError(f"search must be at most {MAX_KEY_LENGTH} characters, got {len(search)}")
    store = _controller(request).store
    keys = await store.keys(search)
    states: list[KeyState | None] = []
    for start in range(0, len(keys), LIST_CONCURRENCY):
        chunk = keys[start : start + LIST_CONCURRENCY]
        states += await asyncio.gather(*(store.state(key) for key in chunk))
    return JSONResponse([info(state) for state in states if state is not None])


async def get_key(request: Request) -> Response:
    return JSONResponse(info(await _state(request, _key(request))))


async def global_parallelism(request: Request) -> Response:
    count = await _controller(request).store.in_flight()
    return JSONResponse({"parallelismMax": 0, "parallelismCount": count})


async def pause(request: Request) -> Response:
    key = _key(request)
    await _controller(request).store.pause(key)
    return JSONResponse(info(await _state(request, key)))


async def resume(request: Request) -> Response:
    key = _key(request)
    await _state(request, key)  # 404 for an unknown key
    await _controller(request).store.resume(key)
    return await _answer(request, key)


async def pin(request: Request) -> Response:
    key = _key(request)
    params = _params(request, _PIN_PARAMS)
    parallelism = _limit(params, "parallelism")
    rate = _limit(params, "rate")
    period = _period(params)
    if period is not None and rate is None:
        raise ParameterError("period goes with rate: pin both, e.g. ?rate=10&period=60")
    if parallelism is None and rate is None:
        raise ParameterError("pin needs parallelism or rate (or both), e.g. ?parallelism=3 or ?rate=10&period=60")
    await _controller(request).store.pin(key, parallelism, rate, period)
    return await _answer(request, key)


async def unpin(request: Request) -> Response:
    key = _key(request)
    params = _params(request, _UNPIN_PARAMS)
    if params:
        parallelism, rate = (_flag(params, name) for name in _UNPIN_PARAMS)
    else:
        parallelism = rate = True  # no parameter: drop both overrides
    await _state(request, key)
    await _controller(request).store.unpin(key, parallelism, rate)
    return await _answer(request, key)


async def reset_rate(request: Request) -> Response:
    key = _key(request)
    await _state(request, key)
    await _controller(request).store.reset_rate(key)
    return await _answer(request, key)


# -- helpers --------------------------------------------------------------------------------------------------------


def _controller(request: Request) -> FlowController:
    controller: FlowController = request.app.state.controller
    return controller


def _key(request: Request) -> str:
    return validate_key(request.path_params["key"])  # 400 invalid_flow_control when empty, too long, ...


async def _state(request: Request, key: str) -> KeyState:
    state = await _controller(request).store.state(key)
    if state is None:
        raise KeyNotFound(f"flow-control key {key!r} is unknown: nothing waits, runs, or is pinned or paused under it")
    return state


async def _answer(request: Request, key: str) -> Response:
    """The key's info after a change; a key that the change left idle has no state any more (204)."""
    state = await _controller(request).store.state(key)
    return Response(status_code=204) if state is None else JSONResponse(info(state))


def _params(request: Request, known: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in known:
            raise ParameterError(f'unknown parameter "{name[:40]}"; this route takes {", ".join(known)}')
        if name in params:
            raise ParameterError(f"{name} is given twice")
        params[name] = value
    return params


def _limit(params: dict[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    text = raw.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 10 or not 1 <= int(text) <= MAX_LIMIT:
        raise ParameterError(f'{name} must be an integer from 1 to {MAX_LIMIT}, got "{raw[:40]}"')
    return int(text)


def _period(params: dict[str, str]) -> float | None:
    raw = params.get("period")
    if raw is None:
        return None
    try:
        seconds = parse_duration(raw.strip(), "period")
    except ValueError:
        raise ParameterError(f'period must be seconds or a duration such as 60 or 1m, got "{raw[:40]}"') from None
    if not 0 < seconds <= MAX_PERIOD:
        raise ParameterError(f'period must be above 0s and at most 7d, got "{raw[:40]}"')
    return seconds


def _flag(params: dict[str, str], name: str) -> bool:
    raw = params.get(name)
    if raw is None:
        return False
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ParameterError(f'{name} must be true or false, got "{raw[:40]}"')


def _number(seconds: float) -> int | float:
    return int(seconds) if float(seconds).is_integer() else seconds


__all__ = ["KeyNotFound", "ParameterError", "flow_control_routes", "info"]
