"""Abuse and secrets (issue 5), against a real `flowgate serve` on loopback.

- Not an open proxy. CONNECT is refused (405). An absolute-form target (`GET http://evil.example/x`) is
  rewritten by uvicorn to its path (`/x`), which goes to the configured upstream like any other path: the
  authority in the target, like the client's Host header, never chooses where a request goes. `OPTIONS *` and
  other targets that are not a path are refused (405). The upstream's Host comes from the configuration.
  Redirects from the upstream go back to the client; the gateway never follows them.
- `X-Forwarded-For` from a peer outside `trusted_proxies` is appended to, never believed for `{client_ip}`;
  from a trusted peer, the right-most untrusted address is the client.
- The admin token and Redis passwords never appear in logs, error answers or `repr`.
- Key cardinality: `max_keys` caps live keys (429 `too_many_keys` + Retry-After beyond it; exact on the memory
  store, approximate on Redis); per-key state expires when idle, so the cap frees up by itself.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path

import aiohttp
import pytest

from gateway.config import load_settings
from gateway.errors import StoreUnavailable
from gateway.stores import open_store
from tests import proxy_fixtures
from tests.faults.harness import Flowgate, clean_env, flowgate_command, http_get, raw_request, running
from tests.redis_servers import free_port

upstream = proxy_fixtures.upstream
Upstream = proxy_fixtures.Upstream


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Flowgate:
    config = '[[rules]]\npath = "/ip/"\nkey = "ip:{client_ip}"\nparallelism = 5\n'
    flowgate = Flowgate(tmp_path_factory.mktemp("abuse"), upstream.url, config=config)
    with running(flowgate):
        yield flowgate  # type: ignore[misc]
    assert "Traceback" not in flowgate.log


def tag() -> str:
    return f"abuse-{uuid.uuid4().hex[:8]}"


# -- not an open proxy -----------------------------------------------------------------------------------------------


async def test_absolute_form_goes_to_the_configured_upstream_only(gateway: Flowgate, upstream: Upstream) -> None:
    key = tag()
    request = f"GET http://evil.example/x?q=1 HTTP/1.1\r\nHost: evil.example\r\nX-Test-Key: {key}\r\n\r\n"
    answer = await raw_request(gateway.port, request.encode())
    assert answer.status == 200
    seen = answer.json()
    assert (seen["path"], seen["query"]) == ("/x", "q=1")
    headers = dict(seen["headers"])
    assert headers["host"] == upstream.url.removeprefix("http://")  # from the configuration, not the client
    assert headers["x-forwarded-host"] == "evil.example"  # what the client asked for, for the upstream to see
    assert len(upstream.app.calls(key)) == 1


@pytest.mark.parametrize(
    "request_line",
    [b"CONNECT evil.example:443 HTTP/1.1", b"OPTIONS * HTTP/1.1"],
    ids=["connect", "asterisk"],
)
async def test_targets_that_are_not_a_path_are_refused(gateway: Flowgate, request_line: bytes) -> None:
    answer = await raw_request(gateway.port, request_line + b"\r\nHost: evil.example:443\r\n\r\n")
    assert answer.status == 405
    assert answer.json()["error"] == "method_not_allowed"


async def test_host_header_never_picks_the_upstream(gateway: Flowgate, upstream: Upstream) -> None:
    key = tag()
    for host in ("evil.example", "127.0.0.1:1", "[::1]:22"):
        request = f"GET /h HTTP/1.1\r\nHost: {host}\r\nX-Test-Key: {key}\r\n\r\n"
        answer = await raw_request(gateway.port, request.encode())
        assert answer.status == 200
        assert dict(answer.json()["headers"])["host"] == upstream.url.removeprefix("http://")
    assert len(upstream.app.calls(key)) == 3


async def test_redirects_are_passed_back_never_followed(gateway: Flowgate, upstream: Upstream) -> None:
    key = tag()
    back_to_upstream = f"{upstream.url}/followed"  # a follow would show up as a second upstream call
    for status in (301, 302, 303, 307, 308):
        target = f"/r?status={status}&location={back_to_upstream}"
        request = f"GET {target} HTTP/1.1\r\nHost: gw\r\nX-Test-Key: {key}\r\n\r\n"
        answer = await raw_request(gateway.port, request.encode())
        assert answer.status == status
        assert answer.headers["location"] == back_to_upstream
    assert [call.path for call in upstream.app.calls(key)] == ["/r"] * 5


# -- X-Forwarded-For -------------------------------------------------------------------------------------------------


async def test_x_forwarded_for_from_an_untrusted_peer(gateway: Flowgate) -> None:
    answer = await raw_request(gateway.port, b"GET /ip/x HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
    headers = dict(answer.json()["headers"])
    assert headers["flow-control-key"] == "ip:127.0.0.1"
    assert headers["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"


async def test_x_forwarded_for_from_a_trusted_peer(tmp_path: Path, upstream: Upstream) -> None:
    config = 'trusted_proxies = ["127.0.0.1"]\n[[rules]]\npath = "/ip/"\nkey = "ip:{client_ip}"\nparallelism = 5\n'
    trusting = Flowgate(tmp_path, upstream.url, config=config)
    with running(trusting):
        request = b"GET /ip/x HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 9.9.9.9, 1.2.3.4\r\n\r\n"
        headers = dict((await raw_request(trusting.port, request)).json()["headers"])
    assert headers["flow-control-key"] == "ip:1.2.3.4"  # the right-most address the trusted peer vouches for
    assert headers["x-forwarded-for"] == "9.9.9.9, 1.2.3.4, 127.0.0.1"


# -- secrets ---------------------------------------------------------------------------------------------------------

PASSWORD = "hunter2-Redis-pw"
ADMIN_TOKEN = "tok-Admin-9c1e"


async def test_secrets_never_in_logs_errors_or_repr(tmp_path: Path, upstream: Upstream) -> None:
    closed = free_port()
    store = f"redis://flowgate:{PASSWORD}@127.0.0.1:{closed}/0"
    gateway = Flowgate(
        tmp_path, upstream.url, store=store, args=["--admin-token", ADMIN_TOKEN, "--log-level", "debug"],
        env={"FLOWGATE_ACCESS_LOG": "true"},
    )  # fmt: skip
    answers: list[str] = []
    with running(gateway):
        for _ in range(3):
            request = b"GET /x HTTP/1.1\r\nHost: gw\r\nFlow-Control-Key: k\r\nFlow-Control-Value: rate=1\r\n\r\n"
            answer = await raw_request(gateway.port, request)
            assert answer.status == 503 and answer.json()["error"] == "store_unavailable"
            answers.append(answer.body.decode())
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
            status, _, body = http_get(gateway.admin_url + "/readyz", headers=headers)
            answers.append(body.decode())
        assert status == 503 and "store_unavailable" in answers[-1]
        bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        status, _, body = http_get(gateway.admin_url + "/v2/flowControl/k", headers=bearer)
        answers.append(body.decode())
    log = gateway.log
    assert "cannot be reached" in " ".join(answers)  # the errors were there: they just do not carry secrets
    for text in [*answers, log]:
        assert PASSWORD not in text
        assert ADMIN_TOKEN not in text
    assert "Traceback" not in log

    # The same URI in a bad-flag error, in the settings' and the store's repr, and in a store error.
    command = [*flowgate_command(), "serve", "--upstream", "http://127.0.0.1:9", "--store", store + "x"]
    result = await asyncio.to_thread(
        subprocess.run,
        [*command, "--admin-token", ADMIN_TOKEN],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert result.returncode == 2 and PASSWORD not in result.stderr and ADMIN_TOKEN not in result.stderr
    settings = load_settings({"upstream": "http://127.0.0.1:9", "store": store, "admin_token": ADMIN_TOKEN}, {})
    opened = open_store(store)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await opened.ping()
        shown = [repr(settings), str(settings), repr(opened), str(caught.value), repr(caught.value)]
        shown += [repr(caught.value.__cause__), str(settings.store_uri)]
    finally:
        await opened.close()
    for text in shown:
        assert PASSWORD not in text and ADMIN_TOKEN not in text, text


# -- key cardinality -------------------------------------------------------------------------------------------------

MAX_KEYS = 50
FLOOD = 400


async def flood(url: str, keys: list[str], value: str) -> list[tuple[int, str, str | None]]:
    """One request per key, 20 at a time; (status, error code, Retry-After) each."""
    results: list[tuple[int, str, str | None]] = []
    limit = asyncio.Semaphore(20)
    async with aiohttp.ClientSession() as session:

        async def one(key: str) -> None:
            async with (
                limit,
                session.get(f"{url}/flood", headers={"Flow-Control-Key": key, "Flow-Control-Value": value}) as response,
            ):
                body = await response.read()
                code = json.loads(body)["error"] if response.status != 200 else ""
                results.append((response.status, code, response.headers.get("Retry-After")))

        await asyncio.gather(*(one(key) for key in keys))
    return results


@pytest.mark.parametrize("store_kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_key_cardinality_cap(
    tmp_path: Path, upstream: Upstream, store_kind: str, request: pytest.FixtureRequest
) -> None:
    """A flood of distinct keys: live keys are capped (429 too_many_keys + Retry-After beyond), keys already live
    keep working, and idle keys' state expires so new keys get in again (memory store: a 2 s rate window)."""
    store = "memory://" if store_kind == "memory" else request.getfixturevalue("redis_url")
    gateway = Flowgate(tmp_path, upstream.url, store=store, args=["--max-keys", str(MAX_KEYS)])
    run = uuid.uuid4().hex[:6]
    keys = [f"flood-{run}-{index}" for index in range(FLOOD)]
    with running(gateway):
        results = await flood(gateway.url, keys, "rate=100, period=2s")  # each key stays live for 2 s
        admitted = sum(1 for status, _, _ in results if status == 200)
        refused = [(status, code, retry) for status, code, retry in results if status != 200]
        assert all(status == 429 and code == "too_many_keys" and retry is not None for status, code, retry in refused)
        if store_kind == "memory":
            assert admitted == MAX_KEYS  # exact
        else:
            assert MAX_KEYS <= admitted <= MAX_KEYS + 20  # approximate: up to the concurrent first requests
        live = [key for key, (status, _, _) in zip(keys, results, strict=True) if status == 200]
        again = await flood(gateway.url, live[:10], "rate=100, period=2s")  # live keys are not new keys
        assert {status for status, _, _ in again} == {200}
        if store_kind == "memory":
            await asyncio.sleep(2.5)  # their windows are empty now: idle keys cost nothing and count for nothing
            fresh = [f"later-{run}-{index}" for index in range(MAX_KEYS)]
            later = await flood(gateway.url, fresh, "rate=100, period=2s")
            assert {status for status, _, _ in later} == {200}
    assert "Traceback" not in gateway.log
    print(f"\nkeys {store_kind}: max_keys {MAX_KEYS}, {FLOOD} new keys -> {admitted} admitted, {len(refused)} x 429")
