"""Every item of BAD_INPUTS.md against a real `flowgate serve` on loopback, over raw sockets.

Each answer is checked exactly: status, the JSON body `{"error", "message"}` with the code and the problem
named, `Retry-After` where listed, the connection closed where listed, nothing forwarded where nothing may be.
"Nothing else disturbed": after each item a normal request still goes through, and the gateway's log holds no
traceback at the end of the module. Items 20 (client gone while waiting) and 21 (Redis down) are covered at
length by S3 and F1 (test_giving_up.py, test_redis_faults.py); here they get a short check each.

Where the server library answers before Flowgate's app runs (items 1, 2, 5-9), the answer still comes from
Flowgate (its httptools protocol subclass in gateway/server.py) as JSON; see docs/configuration.md.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import proxy_fixtures
from tests.faults.harness import Answer, Flowgate, clean_env, flowgate_command, http_get, raw_request, running
from tests.raw_http import ScriptedServer
from tests.redis_servers import free_port

upstream = proxy_fixtures.upstream
Upstream = proxy_fixtures.Upstream

MAX_BODY = 100_000
TOKEN = "admin-token-7f3a9c"
CONFIG = f"""
max_body = "{MAX_BODY}"
upstream_timeout = "1s"
admin_token = "{TOKEN}"

[defaults]
max_waiting = 1
max_wait = "1s"

[[rules]]
name = "tenant"
path = "/tenant/"
key = "t:{{header:X-Tenant-Id}}"
parallelism = 1

[[rules]]
name = "ip"
path = "/ip/"
key = "ip:{{client_ip}}"
parallelism = 5
"""
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Flowgate]:
    flowgate = Flowgate(tmp_path_factory.mktemp("bad-inputs"), upstream.url, config=CONFIG)
    with running(flowgate):
        yield flowgate
    assert "Traceback" not in flowgate.log


def tag() -> str:
    """A fresh X-Test-Key: the upstream records passthrough calls under it."""
    return f"bad-{uuid.uuid4().hex[:8]}"


def expect(answer: Answer, status: int, code: str | None = None, *named: str, closed: bool | None = None) -> None:
    assert answer.status == status, (answer.status, answer.body[:300])
    if code is not None:
        body = answer.json()
        assert set(body) == {"error", "message"}, body
        assert body["error"] == code, body
        assert "Traceback" not in body["message"]
        for word in named:
            assert word in body["message"], (word, body["message"])
    if closed is not None:
        assert answer.closed is closed, answer


async def still_serving(gateway: Flowgate) -> None:
    """Nothing else disturbed: a plain request on a new connection goes through."""
    answer = await raw_request(gateway.port, b"GET /still HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert answer.status == 200, answer


def head(target: str = "/x", *lines: str, method: str = "GET", key: str | None = None) -> bytes:
    extra = "".join(f"{line}\r\n" for line in lines)
    test_key = f"X-Test-Key: {key}\r\n" if key else ""
    return f"{method} {target} HTTP/1.1\r\nHost: gw\r\n{test_key}{extra}\r\n".encode("latin-1")


# -- framing and heads (items 1-10) ----------------------------------------------------------------------------------


async def test_01_content_length_with_chunked(gateway: Flowgate, upstream: Upstream) -> None:
    key = tag()
    request = head("/x", "Content-Length: 5", "Transfer-Encoding: chunked", method="POST", key=key)
    expect(await raw_request(gateway.port, request + b"5\r\nhello\r\n0\r\n\r\n"), 400, "bad_request", closed=True)
    assert upstream.app.calls(key) == []
    await still_serving(gateway)


@pytest.mark.parametrize("lengths", [["5", "6"], ["-1"], ["abc"]], ids=["two-different", "negative", "not-a-number"])
async def test_02_bad_content_length(gateway: Flowgate, upstream: Upstream, lengths: list[str]) -> None:
    key = tag()
    request = head("/x", *(f"Content-Length: {value}" for value in lengths), method="POST", key=key)
    expect(await raw_request(gateway.port, request + b"hello"), 400, "bad_request", closed=True)
    assert upstream.app.calls(key) == []
    await still_serving(gateway)


async def test_03_declared_body_over_max_body_refused_before_reading(gateway: Flowgate, upstream: Upstream) -> None:
    key = tag()
    request = head("/x", f"Content-Length: {MAX_BODY + 1}", method="POST", key=key)
    answer = await raw_request(gateway.port, request)  # the body is never sent: the answer must not wait for it
    expect(answer, 413, "body_too_large", str(MAX_BODY), closed=True)
    assert upstream.app.calls(key) == []
    await still_serving(gateway)


async def test_04_chunked_body_growing_past_max_body(gateway: Flowgate, upstream: Upstream) -> None:
    key = tag()
    request = head("/x", "Transfer-Encoding: chunked", method="POST", key=key)
    chunk = b"%x\r\n%s\r\n" % (10_000, b"c" * 10_000)
    answer = await raw_request(gateway.port, [request, *[chunk] * 15], pause=0.01)
    expect(answer, 413, "body_too_large", str(MAX_BODY), closed=True)
    await asyncio.sleep(0.3)
    calls = upstream.app.calls(key)  # forwarded while streaming, then aborted: the upstream never got it all
    assert len(calls) <= 1 and all(call.body_size <= MAX_BODY for call in calls)
    await still_serving(gateway)


@pytest.mark.parametrize("shape", ["bytes", "fields"])
async def test_05_header_block_too_large(gateway: Flowgate, upstream: Upstream, shape: str) -> None:
    key = tag()
    lines = [f"X-Big: {'b' * 17_000}"] if shape == "bytes" else [f"X-F{index}: v" for index in range(101)]
    expect(await raw_request(gateway.port, head("/x", *lines, key=key)), 431, "headers_too_large", closed=True)
    assert upstream.app.calls(key) == []
    await still_serving(gateway)


@pytest.mark.parametrize("value", [b"a\rb", b"a\nb", b"a\x00b"], ids=["CR", "LF", "NUL"])
async def test_06_control_characters_in_a_header_value(gateway: Flowgate, upstream: Upstream, value: bytes) -> None:
    key = tag()
    request = head("/x", key=key)[:-2] + b"X-Bad: " + value + b"\r\n\r\n"
    expect(await raw_request(gateway.port, request), 400, "bad_request", closed=True)
    assert upstream.app.calls(key) == []
    await still_serving(gateway)


async def test_07_request_target_over_8k(gateway: Flowgate) -> None:
    expect(await raw_request(gateway.port, head("/" + "t" * 8200)), 414, "uri_too_long", "8192", closed=True)
    await still_serving(gateway)


async def test_08_http11_without_host(gateway: Flowgate) -> None:
    answer = await raw_request(gateway.port, b"GET /x HTTP/1.1\r\n\r\n")
    expect(answer, 400, "missing_host", "Host", closed=True)
    await still_serving(gateway)


async def test_09_connect(gateway: Flowgate) -> None:
    answer = await raw_request(gateway.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    expect(answer, 405, "method_not_allowed", "CONNECT", closed=True)
    assert "GET" in answer.headers["allow"]
    await still_serving(gateway)


async def test_10_websocket_upgrade(gateway: Flowgate, upstream: Upstream) -> None:
    key = tag()
    request = head(
        "/ws", "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", key=key,
    )  # fmt: skip
    expect(await raw_request(gateway.port, request), 501, "not_implemented", "WebSocket")
    assert upstream.app.calls(key) == []
    await still_serving(gateway)


# -- forwarded headers (items 11, 12) --------------------------------------------------------------------------------


async def test_11_names_listed_in_connection_are_stripped(gateway: Flowgate) -> None:
    request = head(
        "/x", "Connection: close, X-Forwarded-For, Authorization", "X-Forwarded-For: 6.6.6.6",
        "Authorization: Bearer client-secret", "X-Kept: yes",
    )  # fmt: skip
    answer = await raw_request(gateway.port, request)
    expect(answer, 200)
    seen = dict(answer.json()["headers"])
    assert "authorization" not in seen and "connection" not in seen
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the gateway's own, without the client's listed one
    assert seen["x-kept"] == "yes"


async def test_12_untrusted_x_forwarded_for_is_appended_to_never_trusted(gateway: Flowgate, upstream: Upstream) -> None:
    answer = await raw_request(gateway.port, head("/ip/x", "X-Forwarded-For: 1.2.3.4"))
    expect(answer, 200)
    seen = dict(answer.json()["headers"])
    assert seen["flow-control-key"] == "ip:127.0.0.1"  # {client_ip} is the peer, not the claimed 1.2.3.4
    assert seen["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"


# -- flow-control headers and keys (items 13-15) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("parallelism=0", ["parallelism", '"0"']),
        ("rate=-1", ["rate", '"-1"']),
        ("rate=ten", ["rate", '"ten"']),
        ("rate=1, period=10x", ["period", '"10x"']),
        ("period=10x", ["period", '"10x"']),
        ("rate=1, period=8d", ["period", '"8d"']),
        ("period=8d", ["period", '"8d"']),
        ("foo=1", ['"foo"']),
        ("", ["empty"]),
        ("period=1s", ["parallelism", "rate"]),
    ],
)
async def test_13_malformed_flow_control_value(gateway: Flowgate, value: str, named: list[str]) -> None:
    request = head("/x", "Upstash-Flow-Control-Key: k13", f"Upstash-Flow-Control-Value: {value}")
    expect(await raw_request(gateway.port, request), 400, "invalid_flow_control", "Upstash-Flow-Control-Value", *named)
    await still_serving(gateway)


@pytest.mark.parametrize(
    ("key", "named"),
    [("", ["empty"]), ("k" * 257, ["257", "256"]), ("a\tb", ["control"]), ("a\x7fb", ["control"])],
    ids=["empty", "too-long", "tab", "DEL"],
)
async def test_14_bad_flow_control_key(gateway: Flowgate, key: str, named: list[str]) -> None:
    request = head("/x", f"Flow-Control-Key: {key}", "Flow-Control-Value: parallelism=1")
    answer = await raw_request(gateway.port, request)
    if answer.json()["error"] == "bad_request":  # the HTTP parser may refuse the raw byte first: also a 400
        expect(answer, 400, "bad_request", closed=True)
    else:
        expect(answer, 400, "invalid_flow_control", "key", *named)
    await still_serving(gateway)


async def test_15_missing_key_part(gateway: Flowgate) -> None:
    answer = await raw_request(gateway.port, head("/tenant/x"))
    expect(answer, 400, "missing_key_part", '"tenant"')  # the rule...
    assert "x-tenant-id" in answer.json()["message"].lower()  # ...and the header (names are case-insensitive)
    await still_serving(gateway)


# -- waiting (items 16, 17) ------------------------------------------------------------------------------------------


async def test_16_17_waitlist_full_and_wait_timeout(gateway: Flowgate, upstream: Upstream) -> None:
    tenant = tag()
    key = f"t:{tenant}"
    tenant_line = f"X-Tenant-Id: {tenant}"
    holder = await raw_request(gateway.port, head("/tenant/hold?hold=1", tenant_line))
    expect(holder, 200)  # Flow-Control-Hold: the token stays held until the lease is released below
    waiter = asyncio.create_task(raw_request(gateway.port, head("/tenant/wait", tenant_line)))
    await asyncio.sleep(0.3)
    full = await raw_request(gateway.port, head("/tenant/full", tenant_line))
    expect(full, 429, "waitlist_full", key)
    assert int(full.headers["retry-after"]) >= 1
    timed_out = await waiter
    expect(timed_out, 429, "wait_timeout", key, "1s")
    assert int(timed_out.headers["retry-after"]) >= 1
    assert [call.path for call in upstream.app.calls(key)] == ["/tenant/hold"]
    lease = upstream.app.calls(key)[0].lease
    status, _, _ = http_get(f"{gateway.admin_url}/v2/leases/{lease}/release", method="POST", headers=AUTH)
    assert status == 200
    expect(await raw_request(gateway.port, head("/tenant/after", tenant_line)), 200)


# -- the upstream misbehaves (items 18, 19) --------------------------------------------------------------------------


async def test_18_upstream_times_out(gateway: Flowgate) -> None:
    expect(await raw_request(gateway.port, head("/x?sleep=3")), 504, "upstream_timeout", "within 1")
    await still_serving(gateway)


async def test_18_upstream_refuses_or_answers_garbage(tmp_path: Path) -> None:
    async def garbage(peer: object) -> None:
        request = await peer.read_request()  # type: ignore[attr-defined]
        if request is not None:
            peer.send(b"this is not HTTP\r\n\r\n")  # type: ignore[attr-defined]
            await peer.drain()  # type: ignore[attr-defined]

    refusing = Flowgate(tmp_path, f"http://127.0.0.1:{free_port()}", name="refusing")
    async with ScriptedServer(garbage) as scripted:
        malformed = Flowgate(tmp_path, scripted.url, name="malformed")
        with running(refusing, malformed):
            expect(await raw_request(refusing.port, head("/x")), 502, "upstream_unreachable")
            expect(await raw_request(malformed.port, head("/x")), 502, "upstream_unreachable")
    assert "Traceback" not in refusing.log + malformed.log


async def test_19_redirect_passed_on_never_followed(gateway: Flowgate, upstream: Upstream) -> None:
    key = tag()
    answer = await raw_request(gateway.port, head("/r?status=302&location=http://elsewhere.invalid/x", key=key))
    expect(answer, 302)
    assert answer.headers["location"] == "http://elsewhere.invalid/x"
    assert len(upstream.app.calls(key)) == 1


# -- the client leaves (item 20) -------------------------------------------------------------------------------------


async def test_20_client_gone_mid_upload_and_mid_download(gateway: Flowgate, upstream: Upstream) -> None:
    tenant = tag()
    key = f"t:{tenant}"
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(head("/tenant/up", f"X-Tenant-Id: {tenant}", "Content-Length: 50000", method="POST") + b"u" * 10_000)
    await writer.drain()
    await _until(lambda: len(upstream.app.calls(key)) == 1)  # forwarded while the body streams
    writer.close()
    await _until(lambda: upstream.app.in_flight(key) == 0)  # the upstream call was aborted
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(head("/tenant/down?drip=400", f"X-Tenant-Id: {tenant}"))
    await reader.readuntil(b"\r\n\r\n")
    await reader.read(2048)
    writer.close()
    await _until(lambda: upstream.app.in_flight(key) == 0)
    assert upstream.app.calls(key)[1].body_size == -1  # the upstream saw the gateway hang up mid-stream
    status, _, body = http_get(f"{gateway.admin_url}/v2/flowControl/{key}", headers=AUTH)
    assert status == 404 or json.loads(body)["parallelismCount"] == 0  # the leases were released
    expect(await raw_request(gateway.port, head("/tenant/next", f"X-Tenant-Id: {tenant}")), 200)
    assert len(upstream.app.calls(key)) == 3  # nothing forwarded later


# -- the store is down (item 21) -------------------------------------------------------------------------------------


async def test_21_redis_unreachable(tmp_path: Path, upstream: Upstream) -> None:
    gateway = Flowgate(tmp_path, upstream.url, store=f"redis://127.0.0.1:{free_port()}/0", name="no-redis")
    with running(gateway):
        answer = await raw_request(gateway.port, head("/x", "Flow-Control-Key: k21", "Flow-Control-Value: rate=5"))
        expect(answer, 503, "store_unavailable", "cannot be reached")
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.elapsed < 10
        status, _, body = http_get(f"{gateway.admin_url}/readyz")
        assert status == 503 and json.loads(body)["error"] == "store_unavailable"
        await still_serving(gateway)  # requests without flow control do not need the store
    assert "Traceback" not in gateway.log


# -- command line and config (items 22, 23, 28) ----------------------------------------------------------------------


def flowgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*flowgate_command(), *args], capture_output=True, text=True, timeout=30, env=clean_env())


def one_line_exit_2(result: subprocess.CompletedProcess[str], *named: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    first = result.stderr.strip().splitlines()[0]
    for word in named:
        assert word in first, (word, result.stderr)


@pytest.mark.parametrize(
    ("uri", "named"),
    [("mongo://x", ["mongo://x", "redis://"]), ("redis://host:notaport", ["port", "notaport"])],
)
def test_22_bad_store_uri(uri: str, named: list[str]) -> None:
    result = flowgate("serve", "--upstream", "http://127.0.0.1:9", "--store", uri)
    one_line_exit_2(result, *named)
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('upstream = "http://127.0.0.1:9"\ncolour = "blue"\n', [":2", "colour"]),
        ('upstream = "http://127.0.0.1:9"\nport = "eighty"\n', [":2", "port"]),
        ('upstream = "http://127.0.0.1:9"\n[[rules]]\nkey = "k"\nrate = 1\nperiod = "10x"\n', [":5", "period", "10x"]),
    ],
    ids=["unknown-field", "wrong-type", "bad-period"],
)
def test_23_bad_config_file(tmp_path: Path, text: str, named: list[str]) -> None:
    path = tmp_path / "flowgate.toml"
    path.write_text(text)
    one_line_exit_2(flowgate("check", str(path)), *named)
    one_line_exit_2(flowgate("serve", "--config", str(path), "--port", str(free_port())), *named)


def test_28_workers_on_the_memory_store() -> None:
    result = flowgate("serve", "--upstream", "http://127.0.0.1:9", "--workers", "4")
    one_line_exit_2(result, "workers", "memory://")


# -- the admin port (items 24-27) ------------------------------------------------------------------------------------


def admin(gateway: Flowgate, path: str, method: str = "GET", token: str | None = TOKEN) -> tuple[int, dict, dict]:  # type: ignore[type-arg]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, answer_headers, body = http_get(gateway.admin_url + path, method=method, headers=headers)
    payload = json.loads(body)
    if status >= 400:
        assert set(payload) == {"error", "message"}, payload
    return status, answer_headers, payload


def test_24_admin_without_or_with_a_wrong_token(gateway: Flowgate) -> None:
    status, headers, body = admin(gateway, "/v2/flowControl", token=None)
    assert (status, body["error"]) == (401, "unauthorized")
    assert headers["www-authenticate"].startswith("Bearer")
    status, _, body = admin(gateway, "/v2/flowControl", token="wrong")
    assert (status, body["error"]) == (401, "unauthorized")
    assert admin(gateway, "/healthz", token=None)[0] == 200  # the one open route


def test_25_pin_with_a_bad_parameter(gateway: Flowgate) -> None:
    status, _, body = admin(gateway, "/v2/flowControl/k25/pin?parallelism=abc", method="POST")
    assert status == 400
    assert "parallelism" in body["message"] and "abc" in body["message"]


def test_26_unknown_key(gateway: Flowgate) -> None:
    status, _, body = admin(gateway, "/v2/flowControl/unknown-key")
    assert status == 404
    assert "unknown-key" in body["message"]


async def test_27_release_of_an_unknown_or_released_lease(gateway: Flowgate, upstream: Upstream) -> None:
    tenant = tag()
    expect(await raw_request(gateway.port, head("/tenant/hold?hold=1", f"X-Tenant-Id: {tenant}")), 200)
    lease = upstream.app.calls(f"t:{tenant}")[0].lease
    assert admin(gateway, f"/v2/leases/{lease}/release", method="POST")[0] == 200
    for _ in range(2):  # released already: 404, as often as asked
        status, _, body = admin(gateway, f"/v2/leases/{lease}/release", method="POST")
        assert (status, body["error"]) == (404, "lease_not_found")
    unknown = "0" * 24 + "." + lease.partition(".")[2]
    assert admin(gateway, f"/v2/leases/{unknown}/release", method="POST")[0] == 404
    assert admin(gateway, "/v2/leases/not-a-lease/release", method="POST")[0] == 400


async def _until(condition: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - state lives in another thread
            await asyncio.sleep(0.02)
