"""Proxy benchmark: one run, side by side, wrk on loopback; results appended to benchmarks/RESULTS.md.

    python benchmarks/proxy.py [--duration 5] [--connections 64] [--no-profile] [--no-write]

Rows (all against the same upstream, an nginx worker answering a static 3-byte body; nginx proxy_pass is measured
again just before each Python row, and that row's ratio is taken against it):
upstream direct · nginx proxy_pass with keepalive · naive Starlette+aiohttp proxy (also with two Redis calls per
request) · naive Starlette+httpx proxy · `flowgate serve` (what ships: uvicorn with Flowgate's protocol, one
worker) passing through, and with a flow-controlled key (parallelism 64, so the limit never throttles) on
memory:// and redis:// (its own redis-server), with the lean and the aiohttp upstream clients (and on memory://
with the express lane off: every request through the ASGI app), and the compiled build (hatch_build.py, compiled
into a temporary copy of this tree) passing through, on memory:// and on redis:// · the same proxy
as a plain ASGI app under stock uvicorn and under granian (the server comparison).
Each Python row also reports the gateway process's CPU time per request (from /proc). With profiling on, py-spy
samples `flowgate serve` on redis:// during its row and the report says where that CPU time goes.
Then latency at a fixed 1,000 req/s (open loop, from scheduled send time): direct vs Flowgate; and a
flow-controlled run (parallelism 8, rate 2,000/s) against a recording upstream, reporting achieved rate, the
most calls in flight the upstream saw, and the most starts in any 1 s window, at the store and at the upstream
(violations must be 0).
Every process is started here and stopped by its pid. wrk and nginx are installed with apt-get when missing,
granian and py-spy (the `bench` extra) with pip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import redis as redis_sync  # noqa: E402

from tests.helpers import max_starts_in_window  # noqa: E402
from tests.redis_servers import redis_server  # noqa: E402

PYTHON = sys.executable
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_tools() -> None:
    missing = [name for name in ("wrk", "nginx") if not (shutil.which(name) or os.path.exists(f"/usr/sbin/{name}"))]
    if missing:
        print(f"installing {', '.join(missing)} with apt-get", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
    if not all(os.path.exists(venv_tool(name)) for name in ("granian", "py-spy")):
        print("installing the bench extra (granian, py-spy) with pip", flush=True)
        subprocess.run([PYTHON, "-m", "pip", "install", "-q", "-e", f"{ROOT}[bench]"], check=True)


def venv_tool(name: str) -> str:
    return os.path.join(os.path.dirname(PYTHON), name)


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for port {port} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@contextlib.contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    environment = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    # stderr to a file: a pipe nobody reads fills up and blocks the process (the naive apps log a traceback for
    # every request cut off when wrk stops)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, env=environment, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        try:
            try:
                wait_port(port, proc)
            except RuntimeError:
                log.seek(0)
                sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
                raise
            yield proc
        finally:
            stop(proc, 15)


def stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL if it is still running after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def nginx(port: int, upstream_port: int | None, workdir: str) -> Iterator[subprocess.Popen[bytes]]:
    """One nginx worker: a static `ok` on `port`, or proxy_pass to `upstream_port` with keepalive."""
    prefix = os.path.join(workdir, f"nginx-{port}")
    os.makedirs(prefix, exist_ok=True)
    if upstream_port is None:
        body = 'location / { return 200 "ok\\n"; }'
        upstream_block = ""
    else:
        upstream_block = f"upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}"
        body = (
            "location / { proxy_pass http://up; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; proxy_buffering on; }'
        )
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in kinds)
    config = f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; {temp}
  {upstream_block}
  server {{ listen 127.0.0.1:{port} backlog=4096; {body} }}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as handle:
        handle.write(config)
    with process([nginx_binary(), "-c", path, "-p", prefix, "-g", "daemon off;"], port) as proc:
        yield proc


def uvicorn_args(target: str, port: int, factory: bool = True) -> list[str]:
    args = [PYTHON, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"]
    args += ["--http", "httptools", "--no-access-log", "--log-level", "warning", "--backlog", "4096"]
    args += ["--no-proxy-headers", "--no-server-header", "--no-date-header"]
    return args + (["--factory"] if factory else [])


def granian_args(target: str, port: int) -> list[str]:
    args = [venv_tool("granian"), "--interface", "asgi", "--factory", target]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    return [*args, "--loop", "uvloop", "--no-ws", "--log-level", "warning", "--backlog", "4096"]


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float | None = None  # the proxy process's CPU time per request
    nginx_rps: float | None = None  # nginx proxy_pass measured just before this row

    def ratio(self, default_nginx: float) -> float:
        """Times nginx proxy_pass, against the nginx run next to this one when there is one (the box's load drifts)."""
        return self.rps / (self.nginx_rps or default_nginx)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of `pid` and its child processes (granian serves from a child)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as handle:
        total += sum(cpu_seconds(int(child)) for child in handle.read().split())
    return total


def wrk(url: str, duration: float, connections: int) -> WrkResult:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency", "--timeout", "10s", url]
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M)}
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    return WrkResult(rps, latency.get("50", float("nan")), latency.get("99", float("nan")), errors)


def _ms(text: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def measure(url: str, duration: float, connections: int, pid: int | None = None) -> WrkResult:
    with urllib.request.urlopen(url, timeout=10) as response:  # one request alone first: lazy set-up done
        response.read()
    wrk(url, 1, connections)  # warm up: pools filled, code paths hot
    before = cpu_seconds(pid) if pid else 0.0
    result = wrk(url, duration, connections)
    if pid and result.rps:
        result.cpu_us = (cpu_seconds(pid) - before) / (result.rps * duration) * 1e6
    return result


@contextlib.contextmanager
def flowgate_serve(
    port: int,
    upstream: str,
    store: str,
    rules: list[dict[str, object]],
    client: str,
    workdir: str,
    express_lane: bool = True,
    tree: str = ROOT,
) -> Iterator[subprocess.Popen[bytes]]:
    """`flowgate serve` as users run it (one worker), with `rules` in its TOML config, from the source `tree` (or a
    compiled copy of it, see `compiled_tree`)."""
    path = os.path.join(workdir, f"flowgate-{port}.toml")
    admin_port = free_port()
    while admin_port == port:  # the OS may hand out the same free port twice; the config refuses that
        admin_port = free_port()
    lines = [
        f'upstream = "{upstream}"',
        f'store = "{store}"',
        f"port = {port}",
        f"admin_port = {admin_port}",
        'log_level = "warning"',
        f'upstream_client = "{client}"',
        f"express_lane = {str(express_lane).lower()}",
    ]
    for index, rule in enumerate(rules):
        lines += ["[[rules]]", f'name = "r{index}"', *(f"{name} = {json.dumps(value)}" for name, value in rule.items())]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with process([venv_tool("flowgate"), "serve", "--config", path], port, {"PYTHONPATH": tree}) as proc:
        yield proc


def compiled_tree(workdir: str) -> str:
    """A copy of this project with the hot-path modules compiled (hatch_build.py: the container image's build)."""
    from hatch_build import compile_tree

    dest = os.path.join(workdir, "compiled")
    print("compiling the hot-path modules with mypyc (about a minute)", flush=True)
    compile_tree(Path(ROOT), Path(dest))
    return dest


@contextlib.contextmanager
def py_spy(pid: int, duration: float, out: str) -> Iterator[None]:
    """Sample `pid` with py-spy (raw collapsed stacks to `out`) while the block runs."""
    args = [venv_tool("py-spy"), "record", "-p", str(pid), "-d", str(int(duration)), "-r", "250", "-f", "raw"]
    spy = subprocess.Popen([*args, "-o", out, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        spy.wait(duration + 30)


class StartLog:
    """Every start of flow key `key` on a Redis store with the server's time: its start log (a sorted set that
    keeps one period of starts) read every 50 ms while the block runs. `max_in_window` is exact."""

    def __init__(self, store: str, key: str) -> None:
        self._redis = redis_sync.Redis.from_url(store) if store.startswith("redis") else None
        self._key = f"fc:{{{key}}}:s"
        self._starts: dict[bytes, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> StartLog:
        if self._redis is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._redis is not None:
            self._stop.set()
            self._thread.join()
            self._redis.close()

    def _poll(self) -> None:
        assert self._redis is not None
        while True:
            stopping = self._stop.wait(0.05)
            self._starts.update(self._redis.zrange(self._key, 0, -1, withscores=True))
            if stopping:
                return

    def max_in_window(self, period_ms: float) -> int | None:
        """The most starts in any window (t - period, t], or None without a Redis store."""
        if self._redis is None:
            return None
        return max_starts_in_window(self._starts.values(), period_ms)


#: Where a sample's innermost frame is decides its share (first match wins).
COMPONENTS = [
    ("HTTP server: uvicorn's protocol + gateway/server.py, cycle.py",
     ("uvicorn/", "gateway/server.py", "gateway/cycle.py", "gateway/deadlines.py")),
    ("upstream client: gateway/upstream", ("gateway/upstream/",)),
    ("proxy: gateway/proxy.py, relay.py, inbox, rules, http",
     ("gateway/proxy.py", "gateway/relay.py", "gateway/inbox.py", "gateway/rules.py", "gateway/http.py",
      "gateway/metrics.py")),
    ("engine + store: gateway/engine.py, gateway/stores",
     ("gateway/engine.py", "gateway/stores/", "gateway/policy.py")),
    ("redis-py + hiredis", ("redis/", "hiredis")),
    ("event loop: uvloop's C loop and socket I/O", ("asyncio/runners.py",)),
    ("asyncio: tasks, futures, streams, locks", ("asyncio/", "_weakrefset", "weakref.py")),
]  # fmt: skip


def components(raw_profile: str) -> list[tuple[str, float]]:
    """Shares of the samples in py-spy's raw output, by the component of the innermost frame."""
    counts: dict[str, int] = {}
    total = 0
    with open(raw_profile) as handle:
        for line in handle:
            stack, _, count = line.rstrip().rpartition(" ")
            innermost = stack.rsplit(";", 1)[-1]
            name = next((name for name, marks in COMPONENTS if any(mark in innermost for mark in marks)), "other")
            counts[name] = counts.get(name, 0) + int(count)
            total += int(count)
    return sorted(((name, count / total) for name, count in counts.items()), key=lambda item: -item[1])


async def fixed_rate(
    port: int, path: str, rate: int, duration: float, connections: int = 32
) -> tuple[float, float, int]:
    """Open-loop load at `rate` req/s over keep-alive connections; (p50 ms, p99 ms, errors) from scheduled times."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    total = int(rate * duration)
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while (scheduled := await queue.get()) is not None:
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 2"):
                    errors += 1
                latencies.append((time.perf_counter() - scheduled) * 1000)
            except (OSError, asyncio.IncompleteReadError, AttributeError):
                errors += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    start = time.perf_counter() + 0.05
    for index in range(total):
        scheduled = start + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(scheduled)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)], errors


def get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def flowgate_env(upstream: str, store: str, rules: list[dict[str, object]], client: str = "lean") -> dict[str, str]:
    return {
        "FLOWGATE_TEST_UPSTREAM": upstream,
        "FLOWGATE_TEST_STORE": store,
        "FLOWGATE_TEST_RULES": json.dumps(rules),
        "FLOWGATE_TEST_UPSTREAM_CLIENT": client,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy breakdown")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    options = parser.parse_args()
    ensure_tools()
    duration, conns = options.duration, options.connections
    rows: list[tuple[str, WrkResult]] = []
    latency_rows: list[tuple[str, float, float, int]] = []
    flow_rows: list[str] = []
    profile: list[tuple[str, float]] = []
    started = time.monotonic()
    bench_rules: list[dict[str, object]] = [{"key": "bench", "path": "/", "parallelism": 64}]

    nginx_port = free_port()

    def run(name: str, port: int, pid: int | None = None) -> WrkResult:
        adjacent = wrk(f"http://127.0.0.1:{nginx_port}/", duration, conns) if pid else None
        result = measure(f"http://127.0.0.1:{port}/", duration, conns, pid)
        result.nginx_rps = adjacent.rps if adjacent else None
        rows.append((name, result))
        cpu = f"  {result.cpu_us:5.1f} us CPU/req" if result.cpu_us else ""
        beside = f"  (nginx just before: {adjacent.rps:.0f})" if adjacent else ""
        summary = f"{result.rps:>9.0f} req/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms{cpu}{beside}"
        print(f"{name:<60} {summary}", flush=True)
        return result

    with (
        tempfile.TemporaryDirectory(prefix="flowgate-bench-") as workdir,
        redis_server() as redis,
        contextlib.ExitStack() as servers,
    ):
        up_port = free_port()
        servers.enter_context(nginx(up_port, None, workdir))
        upstream = f"http://127.0.0.1:{up_port}"
        run("upstream direct (nginx static)", up_port)
        servers.enter_context(nginx(nginx_port, up_port, workdir))  # kept running: measured beside every row
        run("nginx proxy_pass, keepalive", nginx_port)
        env = {"BENCH_UPSTREAM": upstream, "BENCH_REDIS": redis.url}
        for name, target in [
            ("naive Starlette + aiohttp", "benchmarks.apps:naive_aiohttp"),
            ("naive Starlette + aiohttp + 2 Redis calls", "benchmarks.apps:naive_aiohttp_redis"),
            ("naive Starlette + httpx", "benchmarks.apps:naive_httpx"),
        ]:
            port = free_port()
            with process(uvicorn_args(target, port), port, env) as proc:
                run(name, port, proc.pid)
        compiled = compiled_tree(workdir)
        memory_lean = "flowgate serve, memory:// p=64, lean client"
        served = [
            ("flowgate serve, passthrough, lean client", "memory://", [], "lean", True, ROOT),
            ("flowgate serve, passthrough, compiled", "memory://", [], "lean", True, compiled),
            (memory_lean, "memory://", bench_rules, "lean", True, ROOT),
            ("flowgate serve, memory:// p=64, compiled", "memory://", bench_rules, "lean", True, compiled),
            (f"{memory_lean}, express lane off", "memory://", bench_rules, "lean", False, ROOT),
            ("flowgate serve, memory:// p=64, aiohttp client", "memory://", bench_rules, "aiohttp", True, ROOT),
            ("flowgate serve, redis:// p=64, lean client", redis.url, bench_rules, "lean", True, ROOT),
            ("flowgate serve, redis:// p=64, compiled", redis.url, bench_rules, "lean", True, compiled),
            ("flowgate serve, redis:// p=64, aiohttp client", redis.url, bench_rules, "aiohttp", True, ROOT),
        ]  # fmt: skip
        for name, store, rules, client, lane, tree in served:
            port = free_port()
            with flowgate_serve(port, upstream, store, rules, client, workdir, lane, tree) as proc:
                profiled = not options.no_profile and store != "memory://" and client == "lean" and tree == ROOT
                if profiled:
                    raw = os.path.join(workdir, "profile.txt")
                    with py_spy(proc.pid, duration + 1, raw):
                        run(name, port, proc.pid)
                    profile = components(raw)
                else:
                    run(name, port, proc.pid)
                if rules and client == "lean" and lane:
                    p50, p99, errors = asyncio.run(fixed_rate(port, "/", 1000, duration))
                    latency_rows.append((name, p50, p99, errors))
        for name, server in [
            ("ProxyApp as a plain ASGI app, memory:// p=64, stock uvicorn", "uvicorn"),
            ("ProxyApp as a plain ASGI app, memory:// p=64, granian", "granian"),
        ]:
            port = free_port()
            target = "tests.gateway_app:create_app"
            args = uvicorn_args(target, port) if server == "uvicorn" else granian_args(target, port)
            with process(args, port, flowgate_env(upstream, "memory://", bench_rules, "lean")) as proc:
                run(name, port, proc.pid)
        p50, p99, errors = asyncio.run(fixed_rate(up_port, "/", 1000, duration))
        latency_rows.insert(0, ("upstream direct", p50, p99, errors))

        rec_port = free_port()
        with process(uvicorn_args("benchmarks.apps:recorder", rec_port), rec_port):
            recorder_url = f"http://127.0.0.1:{rec_port}"
            fc_rules: list[dict[str, object]] = [{"key": "fc", "path": "/", "parallelism": 8, "rate": 2000}]
            for store_name, store, tree in (
                ("memory://", "memory://", ROOT),
                ("redis://", redis.url, ROOT),
                ("redis://, compiled", redis.url, compiled),
            ):
                port = free_port()
                log = StartLog(store, "fc")
                with flowgate_serve(port, recorder_url, store, fc_rules, "lean", workdir, True, tree), log:
                    get_json(f"{recorder_url}/__reset")
                    result = wrk(f"http://127.0.0.1:{port}/fc?sleep=0.002", duration, conns)
                    stats = get_json(f"{recorder_url}/__stats?period=1&slack=0.03")
                count, span = int(stats["count"]), float(stats["span"])  # type: ignore[arg-type]
                achieved = count / span if span else 0.0
                peak, in_window = int(stats["max_concurrency"]), int(stats["max_in_window"])  # type: ignore[arg-type]
                at_store = log.max_in_window(1000)
                violations = int(peak > 8) + int((in_window if at_store is None else at_store) > 2000)
                cells = [store_name, f"{achieved:,.0f}/s", peak, "—" if at_store is None else at_store, in_window]
                cells += [violations, f"{result.p99_ms:.1f} ms"]
                flow_rows.append("| " + " | ".join(str(cell) for cell in cells) + " |")
                print(f"flow-controlled {store_name}: {achieved:.0f}/s, max in flight {peak}, max starts/1s "
                      f"at the store {at_store}, at the upstream {in_window}, violations {violations}")  # fmt: skip

    elapsed = time.monotonic() - started
    report = render(rows, latency_rows, flow_rows, profile, duration, conns, elapsed)
    print(report)
    if not options.no_write:
        with open(RESULTS, "a") as handle:
            handle.write(report)
        print(f"appended to {RESULTS}")


def render(
    rows: list[tuple[str, WrkResult]],
    latency_rows: list[tuple[str, float, float, int]],
    flow_rows: list[str],
    profile: list[tuple[str, float]],
    duration: float,
    conns: int,
    elapsed: float,
) -> str:
    nginx_rps = next(result.rps for name, result in rows if name.startswith("nginx"))
    naive_redis = next(result.ratio(nginx_rps) for name, result in rows if "2 Redis" in name) or float("nan")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## Proxy benchmark, {now}\n",
        f"`python benchmarks/proxy.py`: wrk -t1 -c{conns} -d{duration:g}s on loopback, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; upstream = one nginx worker answering `ok`; every proxy one process. "
        f"Run took {elapsed:.0f}s.\n",
        "Each Python row's ratio is against nginx proxy_pass measured just before it (the box's load drifts over a "
        "run); `x naive+2 Redis` divides those ratios.",
        "",
        "| row | req/s | p50 | p99 | x nginx proxy_pass | x naive+2 Redis | CPU µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in rows:
        cpu = f"{result.cpu_us:.0f}" if result.cpu_us else "—"
        lines.append(
            f"| {name} | {result.rps:,.0f} | {result.p50_ms:.2f} ms | {result.p99_ms:.2f} ms | "
            f"{result.ratio(nginx_rps):.3f} | {result.ratio(nginx_rps) / naive_redis:.2f} | {cpu} | {result.errors} |"
        )
    if profile:
        served = next(result for name, result in rows if name.startswith("flowgate serve, redis:// p=64, lean"))
        lines += [
            "",
            f"Where `flowgate serve` on redis:// (lean client) spends its {served.cpu_us or 0:.0f} µs of CPU per "
            "request: py-spy samples (250/s, during that row) by the component of the innermost Python frame. "
            "A C call (a socket write, a task switch) counts where Python called it.",
            "",
            "| component | share | µs/req |",
            "|---|---:|---:|",
            *(f"| {name} | {share:.0%} | {share * (served.cpu_us or 0):.0f} |" for name, share in profile),
        ]
    direct = latency_rows[0]
    lines += [
        "",
        "Latency at a fixed 1,000 req/s (open loop, 32 keep-alive connections, measured from the scheduled send):",
        "",
        "| target | p50 | p99 | added p50 | added p99 | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, p50, p99, errors in latency_rows:
        added = f"{p50 - direct[1]:+.2f} ms | {p99 - direct[2]:+.2f} ms"
        lines.append(f"| {name} | {p50:.2f} ms | {p99:.2f} ms | {added} | {errors} |")
    lines += [
        "",
        "Flow-controlled (one key, parallelism 8, rate 2,000/s, upstream holds each call 2 ms; wrk -c64). Calls "
        "in flight are counted at the upstream. Starts are counted where they happen, in the store's own window "
        "(Redis: every start with its server time, read from the key's start log while the run goes; exact), and at "
        "the upstream, where a start arrives a moment later: delivery jitter beyond the 30 ms slack can bunch a "
        "few starts into one window there (a violation counts the store's figure when there is one):",
        "",
        "| store | achieved rate | max in flight | max starts in 1 s at the store "
        "| max starts in 0.97 s at the upstream | violations | client p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *flow_rows,
        "",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
