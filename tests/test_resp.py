"""The lean RESP client of the single-node store's hot path, against real redis-server processes: pipelined replies
in order, NOSCRIPT recovery, a frozen server (timeout, then recovery), a restarted server, AUTH and SELECT, and
how error replies map to the store's errors."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import StoreUnavailable
from gateway.policy import Policy
from gateway.stores import Admitted, open_store
from gateway.stores.redis import RedisStore, key_names
from gateway.stores.resp import RespClient, RespConnection, Script
from tests.conftest import need_redis
from tests.redis_servers import RedisServer, free_port

pytestmark = pytest.mark.redis

COUNT = Script.of("return redis.call('INCR', KEYS[1])")


def client_for(server: RedisServer, timeout: float = 2.0) -> RespClient:
    return RespClient("127.0.0.1", server.port, timeout=timeout)


def script_calls(url: str) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name: int(stats.get(f"cmdstat_{name}", {"calls": 0})["calls"]) for name in ("eval", "evalsha")}


async def evalsha(client: RespClient, script: Script, keys: list[str], args: list[Any]) -> Any:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def deliver(reply: Any) -> None:
        if isinstance(reply, BaseException):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    client.evalsha(script, keys, args, deliver)
    return await future


async def test_pipelined_replies_reach_their_callers_in_order(redis_url: str) -> None:
    client = RespClient("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        replies = await asyncio.gather(*(client.execute("INCR", "n") for _ in range(500)))
        assert replies == list(range(1, 501))
        echoed = await asyncio.gather(*(client.execute("ECHO", f"m{i}") for i in range(200)))
        assert echoed == [f"m{i}".encode() for i in range(200)]
    finally:
        client.close()


async def test_noscript_is_recovered_with_one_eval_per_call_that_met_it(own_redis: RedisServer) -> None:
    client = client_for(own_redis)
    try:
        assert await evalsha(client, COUNT, ["c"], []) == 1  # not loaded yet: NOSCRIPT, then EVAL
        before = script_calls(own_redis.url)
        assert await asyncio.gather(*(evalsha(client, COUNT, ["c"], []) for _ in range(5))) == [2, 3, 4, 5, 6]
        after = script_calls(own_redis.url)
        assert (after["evalsha"] - before["evalsha"], after["eval"] - before["eval"]) == (5, 0)
        await client.execute("SCRIPT", "FLUSH")
        before = script_calls(own_redis.url)
        assert await asyncio.gather(*(evalsha(client, COUNT, ["c"], []) for _ in range(3))) == [7, 8, 9]
        after = script_calls(own_redis.url)
        # all three were in flight before the first EVAL loaded the script: each re-sent once, none run twice
        assert after["eval"] - before["eval"] == 3
        assert await evalsha(client, COUNT, ["c"], []) == 10  # loaded again: EVALSHA alone
    finally:
        client.close()


async def test_store_operations_survive_a_script_flush(redis_url: str) -> None:
    store = open_store(redis_url)
    try:
        assert await store.enter("flush", Policy(parallelism=2), "a", "o", 30) == Admitted("a")
        redis.Redis.from_url(redis_url).script_flush()
        entries = await asyncio.gather(*(store.enter("flush", Policy(parallelism=2), t, "o", 30) for t in "bc"))
        assert entries[0] == Admitted("b") and not isinstance(entries[1], Admitted)
        state = await store.state("flush")
        assert state is not None and (state.active, state.waiting) == (2, 1)
    finally:
        await store.close()


async def test_a_frozen_server_times_out_every_pending_call_then_service_resumes(own_redis: RedisServer) -> None:
    client = client_for(own_redis, timeout=0.5)
    try:
        assert await client.execute("PING") == b"PONG"
        own_redis.freeze()
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(client.execute("INCR", "f") for _ in range(10)), return_exceptions=True)
            took = time.monotonic() - started
            assert all(isinstance(result, RedisTimeoutError) for result in results), results
            assert 0.4 < took < 2.0, took
            with pytest.raises(RedisTimeoutError):  # a new connection: the kernel accepts it, Redis never answers
                await client.execute("PING")
        finally:
            own_redis.thaw()
        assert await client.execute("PING") == b"PONG"
    finally:
        client.close()


async def test_the_store_answers_store_unavailable_while_redis_is_frozen(own_redis: RedisServer) -> None:
    store = open_store(own_redis.url, socket_timeout=0.5)
    try:
        assert await store.enter("frozen", Policy(parallelism=5), "a", "o", 30) == Admitted("a")
        own_redis.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.enter("frozen", Policy(parallelism=5), "b", "o", 30)
            assert time.monotonic() - started < 2.0
        finally:
            own_redis.thaw()
        assert await store.release("frozen", "a")
    finally:
        await store.close()


async def test_a_restarted_server_is_reconnected_by_the_next_call(own_redis: RedisServer) -> None:
    store = open_store(own_redis.url)
    try:
        assert await store.enter("restart", Policy(parallelism=1), "a", "o", 30) == Admitted("a")
        own_redis.kill()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):  # the connection is reset
            await store.release("restart", "a")
        with pytest.raises(StoreUnavailable):  # refused
            await store.enter("restart", Policy(parallelism=1), "b", "o", 30)
        assert time.monotonic() - started < 1.0  # refused at once, no timeout
        own_redis.start()  # empty, on the same port
        assert await store.enter("restart", Policy(parallelism=1), "b", "o", 30) == Admitted("b")
    finally:
        await store.close()


async def test_close_fails_the_calls_still_waiting(own_redis: RedisServer) -> None:
    client = client_for(own_redis)
    own_redis.freeze()
    try:
        pending = asyncio.ensure_future(client.execute("PING"))
        await asyncio.sleep(0.05)
        client.close()
        with pytest.raises(RedisConnectionError):
            await pending
    finally:
        own_redis.thaw()


@pytest.fixture
def password_redis() -> Iterator[RedisServer]:
    need_redis()
    with tempfile.TemporaryDirectory(prefix="flowgate-redis-") as workdir:
        extra = ["--requirepass", "secret", "--user", "alice", "on", ">wonderland", "~*", "&*", "+@all"]
        server = RedisServer(free_port(), workdir, extra)
        server.start()
        try:
            yield server
        finally:
            server.kill()


@pytest.mark.parametrize("userinfo", [":secret", "alice:wonderland"])
async def test_auth_and_database_from_the_uri(password_redis: RedisServer, userinfo: str) -> None:
    url = f"redis://{userinfo}@127.0.0.1:{password_redis.port}/3"
    store = open_store(url)
    check = redis.Redis.from_url(url)
    try:
        assert await store.enter("authed", Policy(parallelism=1), "a", "o", 30) == Admitted("a")
        assert check.zcard(key_names("authed")[1]) == 1  # in database 3
        assert redis.Redis.from_url(url.replace("/3", "/0")).zcard(key_names("authed")[1]) == 0
    finally:
        check.close()
        await store.close()


async def test_a_wrong_password_is_store_unavailable(password_redis: RedisServer) -> None:
    store = open_store(f"redis://:wrong@127.0.0.1:{password_redis.port}/0")
    try:
        with pytest.raises(StoreUnavailable):
            await store.enter("denied", Policy(parallelism=1), "a", "o", 30)
    finally:
        await store.close()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    """A redis-server speaking only TLS, with a certificate for 127.0.0.1 from a throwaway CA."""
    need_redis()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, capture_output=True, check=True, timeout=60)

    key = ["-newkey", "rsa:2048", "-nodes", "-days", "1"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test CA")
    openssl("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=test server")
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    sign = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.cnf", "-days", "1"]
    openssl("x509", "-req", "-in", "server.csr", *sign, "-out", "server.crt")
    port = free_port()
    extra = ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
    extra += ["--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt"]
    server = RedisServer(port, str(tmp_path), extra)
    try:
        server.start()
    except RuntimeError:
        pytest.skip("this redis-server has no TLS support")
    try:
        yield server, tmp_path / "ca.crt"
    finally:
        server.kill()


async def test_rediss_verifies_the_certificate(tls_redis: tuple[RedisServer, Path], monkeypatch: Any) -> None:
    server, ca = tls_redis
    url = f"rediss://127.0.0.1:{server.port}/0"
    untrusting = open_store(url)  # built before the CA is trusted: the certificate check fails
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    store = open_store(url)
    try:
        with pytest.raises(StoreUnavailable):
            await untrusting.enter("tls", Policy(parallelism=1), "a", "o", 30)
        assert await store.enter("tls", Policy(parallelism=1), "a", "o", 30) == Admitted("a")
        assert await store.release("tls", "a")
    finally:
        await untrusting.close()
        await store.close()


async def test_a_script_error_reaches_the_caller_as_a_response_error(redis_url: str) -> None:
    client = RespClient("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        with pytest.raises(ResponseError, match="boom"):
            await evalsha(client, Script.of("return redis.error_reply('boom')"), [], [])
        assert await client.execute("PING") == b"PONG"  # the connection stays usable
    finally:
        client.close()


@pytest.mark.parametrize(
    ("reply", "outage"),
    [
        (b"-BUSY Redis is busy running a script.\r\n", True),
        (b"-LOADING Redis is loading the dataset in memory\r\n", True),
        (b"-ERR user_script:1: Script attempted to access nonexistent global variable\r\n", False),
    ],
)
async def test_error_replies_map_to_outages_or_stay_errors(reply: bytes, outage: bool) -> None:
    store = open_store("redis://127.0.0.1:1/0")
    assert isinstance(store, RedisStore)
    connection = RespConnection(asyncio.get_running_loop(), 1.0, [])
    got: list[Any] = []
    connection.send(("PING",), got.append)
    connection.data_received(reply)
    connection.close()
    assert isinstance(got[0], ResponseError | RedisConnectionError)
    assert isinstance(store._unavailable(got[0]), StoreUnavailable) is outage
    await store.close()


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        pass


async def test_writes_wait_while_the_transport_is_paused() -> None:
    connection = RespConnection(asyncio.get_running_loop(), 1.0, [])
    transport = _Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    got: list[Any] = []
    connection.send(("PING",), got.append)
    connection.pause_writing()
    connection.send(("ECHO", "a"), got.append)
    connection.send(("ECHO", "b"), got.append)
    assert len(transport.written) == 1
    connection.resume_writing()
    assert transport.written[1:] == [b"*2\r\n$4\r\nECHO\r\n$1\r\na\r\n*2\r\n$4\r\nECHO\r\n$1\r\nb\r\n"]
    connection.data_received(b"+PONG\r\n$1\r\na\r\n$1\r")
    connection.data_received(b"\nb\r\n")
    assert got == [b"PONG", b"a", b"b"]
    connection.close()
