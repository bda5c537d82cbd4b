"""Property tests (hypothesis): the policy parser, the duration parser, key templates and header filtering.

No input raises anything but the documented error (InvalidFlowControl, MissingKeyPart, ValueError naming the
field, ConfigError), valid inputs mean what they say, and hop-by-hop headers (and the names a `Connection`
header lists) never reach the other side, in either direction. The header properties run through a real proxy
(uvicorn on loopback, in a background thread) and a scripted upstream that answers with the headers it is told
to and reports the headers it received, raw.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError, InvalidFlowControl, MissingKeyPart
from gateway.http import HOP_BY_HOP, strip_hop_by_hop
from gateway.policy import MAX_KEY_LENGTH, MAX_PERIOD, Policy, parse_flow_control_value
from gateway.routing import Router
from gateway.rules import Rule, compile_template
from gateway.units import parse_duration
from tests.proxy_harness import running_gateway
from tests.raw_http import Peer, ScriptedServer

# -- the policy parser -----------------------------------------------------------------------------------------------

UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}


@st.composite
def durations(draw: st.DrawFn) -> tuple[str, float]:
    """A duration as text (compound, units in decreasing order, or a bare integer) and its seconds."""
    if draw(st.booleans()):
        seconds = draw(st.integers(0, 10**6))
        return str(seconds), float(seconds)
    units = draw(st.lists(st.sampled_from(list(UNITS)), min_size=1, max_size=5, unique=True))
    units.sort(key=lambda unit: -UNITS[unit])
    numbers = [draw(st.integers(0, 999)) for _ in units]
    text = "".join(f"{number}{unit}" for number, unit in zip(numbers, units, strict=True))
    return text, sum(number * UNITS[unit] for number, unit in zip(numbers, units, strict=True))


@given(
    st.one_of(st.none(), st.integers(1, 10**9)),
    st.one_of(st.none(), st.integers(1, 10**9)),
    st.one_of(st.none(), durations()),
    st.randoms(use_true_random=False),
    st.sampled_from(["", " ", "\t"]),
)
def test_valid_policies_parse_to_what_they_say(
    parallelism: int | None, rate: int | None, period: tuple[str, float] | None, rnd: Any, space: str
) -> None:
    assume(parallelism is not None or rate is not None)
    pairs = [(name, value) for name, value in (("parallelism", parallelism), ("rate", rate)) if value is not None]
    if period is not None:
        pairs.append(("period", period[0]))
    rnd.shuffle(pairs)
    text = ",".join(f"{space}{name}{space}={space}{value}{space}" for name, value in pairs)
    seconds = period[1] if period is not None else 1.0
    if not 0 < seconds <= MAX_PERIOD:
        with pytest.raises(InvalidFlowControl, match="period"):
            parse_flow_control_value(text)
        return
    assert parse_flow_control_value(text) == Policy(parallelism, rate, seconds)


@given(st.binary(max_size=80), st.binary(max_size=80))
@example(b"k", b"period=10x")
@example(b"k", b"rate=1, period=\xb2")
@example(b"\x00", b"parallelism=1")
@example(b"", b"rate=1")
def test_flow_control_headers_raise_only_invalid_flow_control(key: bytes, value: bytes) -> None:
    """Whatever bytes arrive in Flow-Control-Key/Value, the router answers a route or a 400 naming the header."""
    scope = {
        "type": "http",
        "path": "/",
        "method": "GET",
        "headers": [(b"flow-control-key", key), (b"upstash-flow-control-value", value)],
        "query_string": b"",
        "client": ("127.0.0.1", 1),
    }
    try:
        route = Router().route(scope)
    except InvalidFlowControl as exc:
        assert exc.status == 400 and exc.code == "invalid_flow_control"
        assert "Upstash-Flow-Control-Value" in exc.message or "key" in exc.message
    else:
        assert route is not None
        assert 1 <= len(route.key) <= MAX_KEY_LENGTH and route.key.isprintable()
        policy = route.policy
        assert policy.parallelism is not None or policy.rate is not None
        assert policy.parallelism is None or policy.parallelism >= 1
        assert policy.rate is None or policy.rate >= 1
        assert 0 < policy.period <= MAX_PERIOD


# -- the duration parser ---------------------------------------------------------------------------------------------


@given(durations())
def test_durations_mean_what_they_say(duration: tuple[str, float]) -> None:
    text, seconds = duration
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_duration(f"  {text} ") == pytest.approx(seconds)


@given(st.one_of(st.text(max_size=30), st.text(alphabet="0123456789msdh\u00b2\u00b3\u0663 .-+eE_", max_size=20)))
@example("1h30m")
@example("30m1h")
@example("1s1s")
@example("\u0661\u0662s")  # Arabic-Indic digits: str.isdigit() says yes, the grammar says no
def test_durations_raise_only_value_error_naming_the_field(text: str) -> None:
    try:
        seconds = parse_duration(text, "lease_ttl")
    except ValueError as exc:
        assert "lease_ttl" in str(exc)
        assert not isinstance(exc, InvalidFlowControl)  # config errors are not request errors
    else:
        assert math.isfinite(seconds) and seconds >= 0
        assert text.strip().isascii()  # only ASCII digits count


# -- key templates ---------------------------------------------------------------------------------------------------

TOKEN = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True)
LITERAL = st.text(alphabet=st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), max_size=8)
VALUE = st.from_regex(r"[ -~]{0,12}", fullmatch=True).map(str.strip)


@given(st.text(max_size=40))
@example("{header:}")
@example("{query:a{b}")
@example("}{")
@example("{header:X Y}")
def test_any_template_text_is_a_rule_or_a_config_error(text: str) -> None:
    try:
        parts = compile_template(text)
    except ValueError:
        with pytest.raises(ConfigError):
            Rule(key=text)
        return
    assert parts
    with contextlib.suppress(ConfigError):  # e.g. a literal key with control characters
        Rule(key=text)


@st.composite
def templates(draw: st.DrawFn) -> tuple[str, list[tuple[str, str | None]]]:
    """A template, and its parts: ("literal", text) or (placeholder, header/query name)."""
    parts: list[tuple[str, str | None]] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["literal", "header", "query", "path", "method", "client_ip"]))
        if kind == "literal":
            parts.append(("literal", draw(LITERAL.filter(bool))))
        elif kind in ("header", "query"):
            parts.append((kind, draw(TOKEN)))
        else:
            parts.append((kind, None))
    text = "".join(arg if kind == "literal" else f"{{{kind}:{arg}}}" if arg else f"{{{kind}}}" for kind, arg in parts)
    return text, parts


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    templates(),
    st.dictionaries(TOKEN.map(str.lower), VALUE, max_size=6),
    st.from_regex(r"/[a-z/]{0,10}", fullmatch=True),
)
def test_templates_render_what_they_say(
    template: tuple[str, list[tuple[str, str | None]]], values: dict[str, str], path: str
) -> None:
    text, parts = template
    try:
        rule = Rule(key=text, path="/")
    except ConfigError:
        assert all(kind == "literal" for kind, _ in parts)  # only a literal key is validated up front
        return
    headers = [(name.encode(), value.encode()) for name, value in values.items()]
    query = "&".join(f"{name}={value}" for name, value in values.items() if value.isalnum())
    scope = {
        "type": "http",
        "path": path,
        "method": "PATCH",
        "headers": headers,
        "query_string": query.encode(),
        "client": ("10.1.2.3", 5),
    }
    expected: list[str] = []
    missing = False
    for kind, arg in parts:
        if kind == "literal":
            expected.append(str(arg))
        elif kind == "header":
            found = values.get(str(arg).lower(), "")
            missing = missing or not found
            expected.append(found)
        elif kind == "query":
            found = values.get(str(arg), "") if values.get(str(arg), "").isalnum() else ""
            missing = missing or not found
            expected.append(found)
        else:
            expected.append({"path": path, "method": "PATCH", "client_ip": "10.1.2.3"}[kind])
    key = "".join(expected)
    router = Router([rule], trust_policy_headers=False)
    if missing:
        with pytest.raises(MissingKeyPart):
            router.route(scope)
    elif not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        with pytest.raises(InvalidFlowControl):
            router.route(scope)
    else:
        route = router.route(scope)
        assert route is not None and route.key == key


# -- header filtering ------------------------------------------------------------------------------------------------

#: Request headers the property leaves out: they frame the request, pick its route, or are the gateway's own.
FRAMING = {
    "host", "content-length", "transfer-encoding", "upgrade", "expect", "x-test-key",
    "flow-control-key", "flow-control-value", "upstash-flow-control-key", "upstash-flow-control-value",
    "flow-control-lease", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
}  # fmt: skip
#: Headers the gateway itself sets on what it sends upstream.
GATEWAY_OWN = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
#: Headers the gateway's HTTP server sets on its answer (framing and connection management).
SERVER_OWN = {"connection", "transfer-encoding", "content-length", "date", "server"}
HOP = sorted(name.decode() for name in HOP_BY_HOP)


def casing(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.upper(), name.title()])


NAMES = st.one_of(TOKEN.map(lambda name: "x-" + name), st.sampled_from(HOP).flatmap(casing))
FIELD_VALUE = st.from_regex(r"[!-~]([ !-~]{0,16}[!-~])?", fullmatch=True)


@st.composite
def header_sets(draw: st.DrawFn) -> list[tuple[str, str]]:
    """End-to-end and hop-by-hop headers, plus 0-2 Connection headers listing some of them (and others)."""
    headers = draw(st.lists(st.tuples(NAMES, FIELD_VALUE), max_size=10))
    headers = [(name, value) for name, value in headers if name.lower() not in FRAMING | {"connection"}]
    names = [name for name, _ in headers] or ["x-none"]
    for _ in range(draw(st.integers(0, 2))):
        listed = draw(st.lists(st.one_of(st.sampled_from(names), NAMES, st.just("keep-alive")), max_size=4))
        listed = [name for name in listed if name.lower() not in FRAMING]
        headers.insert(draw(st.integers(0, len(headers))), ("Connection", ", ".join(listed) or "keep-alive"))
    return headers


def listed_in(headers: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower() for name, value in headers if name.lower() == "connection" for token in value.split(",")
    } - {""}


def end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    listed = listed_in(headers)
    drop = {name.decode() for name in HOP_BY_HOP} | listed
    return sorted((name.lower(), value) for name, value in headers if name.lower() not in drop)


@given(header_sets())
def test_strip_hop_by_hop(headers: list[tuple[str, str]]) -> None:
    raw = [(name.encode(), value.encode()) for name, value in headers]
    kept = [(name.decode().lower(), value.decode()) for name, value in strip_hop_by_hop(raw)]
    assert sorted(kept) == end_to_end(headers)


class Background:
    """An event loop in a thread, holding a scripted upstream and a proxy in front of it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stack = contextlib.AsyncExitStack()

    def run(self, coroutine: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def echo_and_emit(peer: Peer) -> None:
    """Answer each request with the headers named in its `X-Emit` (base64 JSON pairs), and a body listing the
    headers it received, raw."""
    while (request := await peer.read_request()) is not None:
        emit = json.loads(base64.b64decode(request.header("x-emit") or "W10="))
        body = json.dumps(request.headers).encode()
        head = "".join(f"{name}: {value}\r\n" for name, value in emit)
        peer.send(b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (head.encode(), len(body), body))
        await peer.drain()


@pytest.fixture(scope="module")
def proxy_port() -> Iterator[int]:
    background = Background()
    try:

        async def start() -> int:
            upstream = await background.stack.enter_async_context(ScriptedServer(echo_and_emit))
            gateway = await background.stack.enter_async_context(running_gateway(upstream.url))
            return gateway.port

        yield background.run(start())
    finally:
        background.close()


def exchange(port: int, request: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:])]
        length = int(next(value for name, value in headers if name.lower() == "content-length"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk
            body += chunk
        return int(lines[0].split()[1]), headers, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_headers=header_sets(), response_headers=header_sets())
def test_hop_by_hop_never_crosses_the_proxy(
    proxy_port: int, request_headers: list[tuple[str, str]], response_headers: list[tuple[str, str]]
) -> None:
    emit = base64.b64encode(json.dumps(response_headers).encode()).decode()
    lines = "".join(f"{name}: {value}\r\n" for name, value in request_headers)
    request = f"GET /p HTTP/1.1\r\nHost: gw\r\nX-Emit: {emit}\r\n{lines}\r\n".encode()
    status, got, body = exchange(proxy_port, request)
    assert status == 200, body
    # Request side: what the upstream received.
    received = [(name.lower(), value) for name, value in json.loads(body)]
    listed = listed_in(request_headers)
    for name, _ in received:
        assert name not in HOP_BY_HOP_NAMES, name
        assert name not in listed or name in GATEWAY_OWN, name
    forwarded = sorted(pair for pair in received if pair[0] not in GATEWAY_OWN and pair[0] != "x-emit")
    assert forwarded == end_to_end(request_headers)
    # Response side: what the client received.
    upstream_listed = listed_in(response_headers)
    for name, _ in got:
        lower = name.lower()
        if lower in SERVER_OWN:
            continue
        assert lower not in HOP_BY_HOP_NAMES, name
        assert lower not in upstream_listed, name
    passed = sorted((name.lower(), value) for name, value in got if name.lower() not in SERVER_OWN)
    expected = [pair for pair in end_to_end(response_headers) if pair[0] not in SERVER_OWN]
    assert passed == expected


HOP_BY_HOP_NAMES = {name.decode() for name in HOP_BY_HOP}
