"""Real processes for fault tests: `flowgate serve` (the console script) on free loopback ports with its log in a
file, a load generator that records every request's fate, raw-socket HTTP, and Redis inspection.

Every process here is started by the test and stopped by its pid (SIGTERM, then SIGKILL), never by name.
`FLOWGATE_SOAK=1` runs the fault scenarios at the issue's full figures (see each test's docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.gateway_process import clean_env, flowgate_command
from tests.proxy_harness import response_complete
from tests.redis_servers import free_ports

SOAK = os.environ.get("FLOWGATE_SOAK", "") not in ("", "0")
ROOT = Path(__file__).resolve().parents[2]


class Flowgate:
    """One `flowgate serve` process. `start()` again after `kill()` restarts it on the same ports."""

    def __init__(
        self,
        workdir: Path,
        upstream: str,
        *,
        store: str = "memory://",
        config: str = "",
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        name: str = "flowgate",
    ) -> None:
        self.upstream = upstream
        self.store = store
        self.port, self.admin_port = free_ports(2)
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / f"{name}.log"
        self.env = env or {}
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        args = ["serve", "--config", str(self.config_path), "--upstream", self.upstream, "--store", self.store]
        args += ["--port", str(self.port), "--admin-port", str(self.admin_port), "--log-level", "warning"]
        return [*flowgate_command(), *args, *self.args]

    def start(self, wait: bool = True) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), env=clean_env(**self.env), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self.starts += 1
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the admin port's /healthz and the proxy port both answer (generous: the box is shared)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"flowgate exited with {self.process.returncode}:\n{self.log}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_get(self.admin_url + "/healthz", timeout=1)[0] == 200:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return
            time.sleep(0.05)
        raise AssertionError(f"flowgate did not start within {timeout}s:\n{self.log}")

    def kill(self) -> None:
        """SIGKILL (a crash: nothing is released, nothing is flushed)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        """SIGTERM (drain), then SIGKILL if it does not exit within 20 s; the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
        return process.returncode

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def admin(self, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, Any]:
        status, _, body = http_get(self.admin_url + path, method=method, headers=headers)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")


@contextlib.contextmanager
def running(*gateways: Flowgate) -> Iterator[None]:
    """Start the gateways (in parallel) and stop them by pid afterwards, whatever happens."""
    try:
        for gateway in gateways:
            gateway.start(wait=False)
        for gateway in gateways:
            gateway.wait_ready()
        yield
    finally:
        for gateway in gateways:
            gateway.stop()


def http_get(
    url: str, *, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One blocking request with http.client (no client library behaviour in between)."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, "/" + path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, body
    finally:
        connection.close()


# -- raw HTTP over a socket -----------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after answering
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(port: int, data: bytes | Sequence[bytes], timeout: float = 10.0, pause: float = 0.0) -> Answer:
    """Send raw bytes (chunks, `pause` apart); read one answer; report whether the server then closed."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks = [data] if isinstance(data, bytes) else list(data)
    try:
        for chunk in chunks:
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                break  # refused mid-request: read the answer already sent
            if pause:
                await asyncio.sleep(pause)
        buffer = b""
        closed = False
        async with asyncio.timeout(timeout):
            while True:
                try:
                    piece = await reader.read(65536)
                except ConnectionError:
                    closed = True
                    break
                if not piece:
                    closed = True
                    break
                buffer += piece
                if response_complete(buffer):
                    try:
                        closed = await asyncio.wait_for(reader.read(1), 0.5) == b""
                    except (TimeoutError, ConnectionError):
                        closed = False
                    break
        return _parse(buffer, closed, time.monotonic() - started)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _parse(data: bytes, closed: bool, elapsed: float) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return Answer(0, {}, b"", closed, elapsed)
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body, closed, elapsed)


# -- load -----------------------------------------------------------------------------------------------------------

_REQUEST_IDS = itertools.count(1)  # unique over the session: the upstream records them as `seq`

#: Answers the gateway may give under load besides forwarding (each a documented JSON error).
DOCUMENTED = {429: {"waitlist_full", "wait_timeout", "too_many_keys"}, 503: {"store_unavailable"}}


@dataclass
class Outcome:
    """What became of one request of the load: its id (the upstream records it as `seq`)."""

    rid: int
    target: int  # which gateway it was sent to
    key: str
    sent: float
    done: float = 0.0
    status: int = 0  # 0: no HTTP answer (connection refused or reset)
    error: str = ""  # the JSON error code, or the exception name when there was no answer
    retry_after: str | None = None
    message: str = ""  # the JSON error message


@dataclass
class Load:
    """Closed-loop clients, each sending one request at a time until the duration is over. Client i uses key
    `keys[i % len(keys)]` and gateway `targets[(i // len(keys)) % len(targets)]`: every key is shared by every
    gateway (when there are at least as many clients as keys times gateways)."""

    targets: Sequence[str]
    keys: Sequence[str]
    path: str = "/load"
    query: str = "sleep=0.1"
    timeout: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)

    async def run(self, clients: int, duration: float, header: str = "X-Tenant") -> None:
        stop_at = time.monotonic() + duration
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, index, stop_at, header) for index in range(clients)))

    async def _client(self, session: aiohttp.ClientSession, index: int, stop_at: float, header: str) -> None:
        target = (index // len(self.keys)) % len(self.targets)
        key = self.keys[index % len(self.keys)]
        while time.monotonic() < stop_at:
            outcome = Outcome(next(_REQUEST_IDS), target, key, time.monotonic())
            self.outcomes.append(outcome)
            url = f"{self.targets[target]}{self.path}?{self.query}&seq={outcome.rid}"
            try:
                async with session.get(url, headers={header: key}) as response:
                    body = await response.read()
                    outcome.status = response.status
                    outcome.retry_after = response.headers.get("Retry-After")
                    if response.status != 200:
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            answer = json.loads(body)
                            outcome.error, outcome.message = answer["error"], answer["message"]
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                outcome.error = type(exc).__name__
                await asyncio.sleep(0.05)  # a dead gateway: do not spin
            outcome.done = time.monotonic()

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            label = f"{outcome.status} {outcome.error}".strip()
            counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items()))

    def undocumented(self, allow_no_answer: bool = False) -> list[Outcome]:
        """Outcomes that are neither forwarded (200) nor a documented error (nor, if allowed, no answer)."""
        bad = []
        for outcome in self.outcomes:
            if outcome.status == 200:
                continue
            if outcome.status in DOCUMENTED and outcome.error in DOCUMENTED[outcome.status]:
                if outcome.retry_after is None:
                    bad.append(outcome)
                continue
            if outcome.status == 0 and allow_no_answer:
                continue
            bad.append(outcome)
        return bad


# -- Redis inspection ------------------------------------------------------------------------------------------------


def key_tag(key: str) -> str:
    return key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


async def redis_now_ms(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def live_leases(client: Any, key: str) -> dict[str, float]:
    """Leases of `key` that Redis still counts (expiry in the future), lease id -> expires at (ms)."""
    now = await redis_now_ms(client)
    members = await client.zrangebyscore(f"fc:{{{key_tag(key)}}}:l", f"({now}", "+inf", withscores=True)
    return {(m.decode() if isinstance(m, bytes) else m): score for m, score in members}


async def waiting(client: Any, key: str) -> int:
    return int(await client.zcard(f"fc:{{{key_tag(key)}}}:w"))


@dataclass
class AdmissionLog:
    """The store's own record of starts (`fc:{K}:s`: start id -> admitted at, Redis ms), polled often enough
    (every 250 ms, the window is 1 s) that no start is trimmed before it is seen."""

    client: Any
    keys: Sequence[str]
    starts: dict[str, dict[str, int]] = field(default_factory=dict)  # key -> lease id -> admitted at (ms)
    sampled: list[float] = field(default_factory=list)  # when each sample began (wall-clock seconds)

    async def poll(self, until: float, every: float = 0.1) -> None:
        while time.monotonic() < until:
            await self.sample()
            await asyncio.sleep(every)
        await self.sample()

    def gap_around(self, at: float) -> float:
        """The longest time without a sample around wall-clock `at` (a start older than the period when the
        next sample ran was trimmed unseen: this box can stall the test's own loop under load)."""
        after = next((moment for moment in self.sampled if moment >= at), float("inf"))
        before = max((moment for moment in self.sampled if moment <= at), default=float("-inf"))
        return after - before

    async def sample(self) -> None:
        self.sampled.append(time.time())
        for key in self.keys:
            members = await self.client.zrange(f"fc:{{{key_tag(key)}}}:s", 0, -1, withscores=True)
            seen = self.starts.setdefault(key, {})
            for member, score in members:
                seen[member.decode() if isinstance(member, bytes) else member] = int(score)


def wall(monotonic: float) -> float:
    """A `time.monotonic()` reading of this process as wall-clock seconds (Redis TIME's clock)."""
    return monotonic + (time.time() - time.monotonic())
