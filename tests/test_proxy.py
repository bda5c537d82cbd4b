"""The proxy's forwarding contract (INTERFACE.md): what the upstream receives, what the client receives, every
error status with its JSON body. Real servers on loopback: the proxy under uvicorn in the test's loop, the
recording upstream in a thread."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from gateway.rules import Rule
from tests import proxy_fixtures
from tests.proxy_harness import eventually, key_idle, parse_response, raw_exchange, running_gateway
from tests.upstream_app import free_port

upstream = proxy_fixtures.upstream
upstream_client = proxy_fixtures.upstream_client
key = proxy_fixtures.key
Upstream = proxy_fixtures.Upstream


async def fetch(method: str, url: str, **kwargs: object) -> tuple[int, dict[str, str], bytes, aiohttp.ClientResponse]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, url, allow_redirects=False, **kwargs) as response,  # type: ignore[arg-type]
    ):
        body = await response.read()
        headers = {name.lower(): value for name, value in response.headers.items()}
        return response.status, headers, body, response


def upstream_headers(body: bytes) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        seen.setdefault(name, []).append(value)
    return seen


async def test_forwards_request_unchanged_plus_forwarded_headers(upstream: Upstream) -> None:
    async with running_gateway(upstream.url) as gateway:
        status, headers, body, _ = await fetch(
            "POST",
            f"{gateway.url}/some/a%2Fb%20c?b=2&a=1",
            data=b"payload",
            headers={"X-Forwarded-For": "203.0.113.7", "X-Custom": "kept", "Host": "public.example"},
        )
    assert status == 200
    seen = json.loads(body)
    assert seen["method"] == "POST"
    assert seen["raw_path"] == "/some/a%2Fb%20c"  # the target as sent, not re-encoded
    assert seen["query"] == "b=2&a=1"
    assert seen["body_size"] == len(b"payload")
    received = upstream_headers(body)
    assert received["host"] == [upstream.url.removeprefix("http://")]  # from the configured upstream
    assert received["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]  # appended, not trusted
    assert received["x-forwarded-proto"] == ["http"]
    assert received["x-forwarded-host"] == ["public.example"]
    assert received["x-custom"] == ["kept"]
    assert "flow-control-key" not in received and "flow-control-lease" not in received
    assert "flow-control-waited" not in headers  # not flow-controlled


async def test_flow_controlled_request_carries_key_lease_and_waited(upstream: Upstream, key: str) -> None:
    async with running_gateway(upstream.url) as gateway:
        status, headers, body, _ = await fetch(
            "GET",
            f"{gateway.url}/x",
            headers={
                "Upstash-Flow-Control-Key": key,
                "Upstash-Flow-Control-Value": "parallelism=2",
                "Flow-Control-Lease": "forged",
            },
        )
        assert status == 200
        received = upstream_headers(body)
        assert received["flow-control-key"] == [key]
        (token,) = received["flow-control-lease"]
        assert token != "forged" and token == upstream.app.calls(key)[-1].lease
        assert headers["flow-control-waited"].isdigit()
        await eventually(lambda: key_idle(gateway.store, key))


async def test_rule_key_template_and_limits_win_over_headers(upstream: Upstream, key: str) -> None:
    rule = Rule(key=f"{key}:{{header:X-Tenant}}:{{query:region}}", name="t", path="/hooks/", parallelism=1)
    async with running_gateway(upstream.url, rules=[rule]) as gateway:
        status, _, body, _ = await fetch(
            "GET",
            f"{gateway.url}/hooks/a?region=eu",
            headers={"X-Tenant": "42", "Flow-Control-Key": "other", "Flow-Control-Value": "parallelism=99"},
        )
        assert status == 200
        assert upstream_headers(body)["flow-control-key"] == [f"{key}:42:eu"]
        status, _, body, _ = await fetch("GET", f"{gateway.url}/elsewhere")  # no rule, no header
        assert status == 200 and "flow-control-key" not in upstream_headers(body)


async def test_headers_ignored_when_not_trusted(upstream: Upstream, key: str) -> None:
    async with running_gateway(upstream.url, trust_policy_headers=False) as gateway:
        status, headers, body, _ = await fetch(
            "GET", f"{gateway.url}/x", headers={"Flow-Control-Key": key, "Flow-Control-Value": "rate=ten"}
        )
    assert status == 200
    assert "flow-control-waited" not in headers
    assert "flow-control-key" not in upstream_headers(body)


async def test_hop_by_hop_headers_stripped_both_ways(upstream: Upstream) -> None:
    async with running_gateway(upstream.url) as gateway:
        request = (
            "GET /x?hop=1 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{gateway.port}\r\n"
            "Connection: keep-alive, X-Listed, Authorization, X-Forwarded-For\r\n"
            "X-Listed: secret\r\nAuthorization: Bearer t\r\nX-Forwarded-For: 6.6.6.6\r\n"
            "Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Sum\r\nProxy-Authorization: Basic eA==\r\n"
            "Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-End-To-End: yes\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        status, headers, body = parse_response(await raw_exchange(gateway.port, request))
    assert status == 200
    received = upstream_headers(body)
    for name in (
        "x-listed",
        "authorization",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ):
        assert name not in received, name
    assert received.get("connection", ["keep-alive"]) != ["keep-alive, X-Listed, Authorization, X-Forwarded-For"]
    assert received["x-forwarded-for"] == ["127.0.0.1"]  # the gateway's own, the listed one dropped
    assert received["x-end-to-end"] == ["yes"]
    # and the upstream's hop-by-hop response headers never reach the client
    assert "x-hop-secret" not in headers
    assert "proxy-authenticate" not in headers
    assert headers.get("keep-alive") is None
    assert headers["x-end-to-end"] == "passes"


async def test_redirects_passed_through(upstream: Upstream) -> None:
    async with running_gateway(upstream.url) as gateway:
        status, headers, _, _ = await fetch("GET", f"{gateway.url}/r?status=302&location=http://elsewhere.test/")
    assert status == 302 and headers["location"] == "http://elsewhere.test/"


# -- errors ---------------------------------------------------------------------------------------------------


def assert_error(status: int, headers: dict[str, str], body: bytes, expected: int, code: str) -> dict[str, str]:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    payload: dict[str, str] = json.loads(body)
    assert payload["error"] == code
    assert payload["message"] and "Traceback" not in payload["message"]
    return payload


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("parallelism=0", "parallelism"),
        ("rate=-1", "rate"),
        ("rate=ten", "ten"),
        ("period=10x, rate=1", "10x"),
        ("rate=1, period=8d", "8d"),
        ("foo=1", "foo"),
        ("", "empty"),
        ("period=1s", "period"),
    ],
)
async def test_400_invalid_flow_control_value(upstream: Upstream, key: str, value: str, named: str) -> None:
    async with running_gateway(upstream.url) as gateway:
        status, headers, body, _ = await fetch(
            "GET", f"{gateway.url}/x", headers={"Upstash-Flow-Control-Key": key, "Upstash-Flow-Control-Value": value}
        )
    payload = assert_error(status, headers, body, 400, "invalid_flow_control")
    assert named in payload["message"]
    assert upstream.app.calls(key) == []


@pytest.mark.parametrize("bad_key", ["", "k" * 257, "a\x01b"])
async def test_400_invalid_flow_control_key(upstream: Upstream, bad_key: str) -> None:
    async with running_gateway(upstream.url) as gateway:
        request = (
            f"GET /x HTTP/1.1\r\nHost: gw\r\nFlow-Control-Key: {bad_key}\r\nFlow-Control-Value: rate=1\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode("latin-1")
        status, headers, body = parse_response(await raw_exchange(gateway.port, request))
    assert status == 400
    # a control character in any header value is refused by flowgate's server before routing (bad_request);
    # a plain ASGI server may pass it on, and then the router refuses the key
    expected = "bad_request" if "\x01" in bad_key else "invalid_flow_control"
    if headers.get("content-type") == "application/json":
        assert json.loads(body)["error"] == expected


async def test_400_missing_key_part_names_the_header(upstream: Upstream, key: str) -> None:
    rule = Rule(key=f"{key}:{{header:X-Tenant-Id}}", name="webhooks", parallelism=5)
    async with running_gateway(upstream.url, rules=[rule]) as gateway:
        status, headers, body, _ = await fetch("POST", f"{gateway.url}/hooks", data=b"x")
    payload = assert_error(status, headers, body, 400, "missing_key_part")
    assert "x-tenant-id" in payload["message"].lower()


async def test_413_declared_body_too_large_is_refused_before_reading(upstream: Upstream, key: str) -> None:
    async with running_gateway(upstream.url, max_body=1000) as gateway:
        status, headers, body, _ = await fetch(
            "POST", f"{gateway.url}/x", data=b"y" * 5000, headers={"X-Test-Key": key}
        )
    assert_error(status, headers, body, 413, "body_too_large")
    assert upstream.app.calls(key) == []


async def test_413_chunked_body_growing_past_limit(upstream: Upstream, key: str) -> None:
    sent = 0

    async def chunks():  # type: ignore[no-untyped-def]
        nonlocal sent
        for _ in range(200):
            sent += 16384
            yield b"z" * 16384
            await asyncio.sleep(0)

    async with running_gateway(upstream.url, max_body=100_000) as gateway:
        status, headers, body, _ = await fetch(
            "POST",
            f"{gateway.url}/x",
            data=chunks(),
            headers={"Flow-Control-Key": key, "Flow-Control-Value": "parallelism=1"},
        )
        assert_error(status, headers, body, 413, "body_too_large")
        await eventually(lambda: key_idle(gateway.store, key))
        assert gateway.controller.held == 0
    for call in upstream.app.calls(key):
        assert call.body_size <= 100_000 + 65536  # the upstream call was aborted, never completed with it all


async def test_429_waitlist_full_with_retry_after(upstream: Upstream, key: str) -> None:
    rule = Rule(key=key, parallelism=1, max_waiting=1)
    async with running_gateway(upstream.url, rules=[rule]) as gateway:
        first = asyncio.create_task(fetch("GET", f"{gateway.url}/x?sleep=1"))
        await eventually(lambda: upstream.app.in_flight(key) == 1)
        second = asyncio.create_task(fetch("GET", f"{gateway.url}/x"))
        await eventually(lambda: gateway.controller.waiting == 1)
        status, headers, body, _ = await fetch("GET", f"{gateway.url}/x")
        assert_error(status, headers, body, 429, "waitlist_full")
        assert int(headers["retry-after"]) >= 1
        assert (await first)[0] == 200 and (await second)[0] == 200


async def test_429_wait_timeout_with_retry_after(upstream: Upstream, key: str) -> None:
    rule = Rule(key=key, parallelism=1, max_wait="300ms")
    async with running_gateway(upstream.url, rules=[rule]) as gateway:
        first = asyncio.create_task(fetch("GET", f"{gateway.url}/x?sleep=1.5"))
        await eventually(lambda: upstream.app.in_flight(key) == 1)
        status, headers, body, _ = await fetch("GET", f"{gateway.url}/x")
        assert_error(status, headers, body, 429, "wait_timeout")
        assert int(headers["retry-after"]) >= 1
        assert (await first)[0] == 200
    assert len(upstream.app.calls(key)) == 1  # the timed-out request was never forwarded


async def test_502_upstream_unreachable(key: str) -> None:
    async with running_gateway(f"http://127.0.0.1:{free_port()}") as gateway:
        status, headers, body, _ = await fetch(
            "GET", f"{gateway.url}/x", headers={"Flow-Control-Key": key, "Flow-Control-Value": "parallelism=1"}
        )
        assert_error(status, headers, body, 502, "upstream_unreachable")
        await eventually(lambda: key_idle(gateway.store, key))
        assert gateway.controller.held == 0


async def test_502_malformed_upstream_response(key: str) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 2OO NOT OK\r\nbroken header line\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, running_gateway(f"http://127.0.0.1:{port}") as gateway:
        status, headers, body, _ = await fetch("GET", f"{gateway.url}/x")
    assert_error(status, headers, body, 502, "upstream_unreachable")


async def test_503_store_unavailable_with_retry_after(upstream: Upstream, key: str) -> None:
    pytest.importorskip("redis")
    dead_store = f"redis://127.0.0.1:{free_port()}/0"
    async with running_gateway(upstream.url, store_uri=dead_store) as gateway:
        status, headers, body, _ = await fetch(
            "GET", f"{gateway.url}/x", headers={"Flow-Control-Key": key, "Flow-Control-Value": "parallelism=1"}
        )
        assert_error(status, headers, body, 503, "store_unavailable")
        assert int(headers["retry-after"]) >= 1
        status, _, _, _ = await fetch("GET", f"{gateway.url}/x")  # not flow-controlled: still flows
        assert status == 200
    assert upstream.app.calls(key) == []


async def test_504_upstream_timeout(upstream: Upstream, key: str) -> None:
    async with running_gateway(upstream.url, upstream_timeout=0.3) as gateway:
        status, headers, body, _ = await fetch(
            "GET",
            f"{gateway.url}/x?sleep=3",
            headers={"Flow-Control-Key": key, "Flow-Control-Value": "parallelism=1"},
        )
        assert_error(status, headers, body, 504, "upstream_timeout")
        await eventually(lambda: key_idle(gateway.store, key))
        assert gateway.controller.held == 0


async def test_405_connect_refused(upstream: Upstream) -> None:
    async with running_gateway(upstream.url) as gateway:
        answer = await raw_exchange(gateway.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    status, _headers, body = parse_response(answer)
    assert status in (400, 405)  # 405 from the gateway, or the server library refusing the authority form
    if status == 405:
        assert json.loads(body)["error"] == "method_not_allowed"


async def test_501_websocket_upgrade(upstream: Upstream) -> None:
    request = (
        b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    async with running_gateway(upstream.url) as gateway:
        status, _, body = parse_response(await raw_exchange(gateway.port, request))
    assert status == 501
    assert json.loads(body)["error"] == "not_implemented"


async def test_400_content_length_and_chunked_together(upstream: Upstream, key: str) -> None:
    request = (
        (
            "POST /x HTTP/1.1\r\nHost: gw\r\nX-Test-Key: {key}\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .replace("{key}", key)
        .encode()
    )
    async with running_gateway(upstream.url) as gateway:
        status, _, _ = parse_response(await raw_exchange(gateway.port, request))
    assert status == 400
    assert upstream.app.calls(key) == []
