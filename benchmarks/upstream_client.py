"""Upstream clients side by side: LeanClient vs aiohttp.ClientSession vs httpx.AsyncClient.

One fast loopback upstream (a raw asyncio protocol server in a subprocess, fixed 13-byte answer), 64 concurrent
tasks per client, a fixed number of GET requests per round (httpx gets fewer: it is ~100x slower here; a time budget
bounds every round). Rounds interleave the clients (lean, aiohttp, httpx, lean, ...) so that noise from a shared
machine hits them alike; the medians are reported. Every client reads each response body whole and keeps a pool of
64 connections. Prints req/s, client CPU µs per request and ratios, and appends a dated section to
benchmarks/RESULTS.md. Takes about 30 s.

    python benchmarks/upstream_client.py [--rounds 3] [--requests 30000] [--httpx-requests 1000] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.upstream.lean import LeanClient

CONCURRENCY = 64
BUDGET = 6.0  # seconds per client and round at most (the whole run stays under 60 s)
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nHello, world!"
HEADERS = [(b"User-Agent", b"bench"), (b"Accept", b"*/*"), (b"Accept-Encoding", b"gzip, deflate")]


# -- the upstream (runs in its own process) -------------------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """Answers every request head with ANSWER (requests here never carry a body); pipelining-safe."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.pending + data
        count = buffer.count(b"\r\n\r\n")
        if count:
            self.transport.write(ANSWER * count)
            buffer = buffer[buffer.rindex(b"\r\n\r\n") + 4 :]
        self.pending = buffer


async def _serve() -> None:
    # exit with the parent: it holds our stdin open, and EOF means it is gone (even when killed)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


# -- the clients --------------------------------------------------------------------------------------------------

Sender = Callable[[], Awaitable[None]]


async def run(send: Sender, total: int) -> tuple[int, float, float]:
    """`total` requests over CONCURRENCY tasks (or as many as BUDGET allows): (done, seconds, cpu seconds)."""
    done = 0
    deadline = time.perf_counter() + BUDGET

    async def worker() -> None:
        nonlocal done
        while done < total and time.perf_counter() < deadline:
            done += 1
            await send()

    for _ in range(CONCURRENCY):  # warm the pool
        await send()
    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done, time.perf_counter() - start, time.process_time() - cpu


async def bench_lean(url: str, total: int) -> tuple[int, float, float]:
    client = LeanClient(url, max_connections=CONCURRENCY)

    async def send() -> None:
        response = await client.request("GET", "/", HEADERS, None, timeout=10)
        async for _ in response.body():
            pass
        assert response.status == 200

    try:
        return await run(send, total)
    finally:
        await client.aclose()


async def bench_aiohttp(url: str, total: int) -> tuple[int, float, float]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(url, connector=connector, auto_decompress=False) as session:

        async def send() -> None:
            async with session.get("/", headers={"User-Agent": "bench"}) as response:
                await response.read()
                assert response.status == 200

        return await run(send, total)


async def bench_httpx(url: str, total: int) -> tuple[int, float, float]:
    import httpx

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, headers={"User-Agent": "bench"}) as client:

        async def send() -> None:
            response = await client.get("/")
            assert response.status_code == 200

        return await run(send, total)


async def main(url: str, args: argparse.Namespace) -> list[tuple[str, int, float, float]]:
    """Interleaved rounds; per client the median round by req/s: (name, requests, seconds, cpu seconds)."""
    clients = (
        ("LeanClient", bench_lean, args.requests),
        ("aiohttp.ClientSession", bench_aiohttp, args.requests),
        ("httpx.AsyncClient", bench_httpx, args.httpx_requests),
    )
    rounds: dict[str, list[tuple[int, float, float]]] = {name: [] for name, _, _ in clients}
    for n in range(args.rounds):
        for name, bench, total in clients:
            done, seconds, cpu = await bench(url, total)
            rounds[name].append((done, seconds, cpu))
            print(
                f"round {n + 1}: {name:24} {done:7d} req in {seconds:6.2f} s = {done / seconds:9.0f} req/s, "
                f"{cpu / done * 1e6:7.1f} µs CPU/req",
                flush=True,
            )
    rows = []
    for name, results in rounds.items():
        done, seconds, cpu = sorted(results, key=lambda r: r[0] / r[1])[len(results) // 2]
        rows.append((name, done, seconds, cpu))
    return rows


def report(rows: list[tuple[str, int, float, float]], args: argparse.Namespace) -> str:
    lean_rate = rows[0][1] / rows[0][2]
    lines = [
        f"## {datetime.datetime.now():%Y-%m-%d %H:%M} — upstream clients (`benchmarks/upstream_client.py`)",
        "",
        f"One process per side on loopback: a raw asyncio upstream answering 13 bytes (subprocess), the clients in "
        f"this process on {args.loop}; {CONCURRENCY} concurrent tasks, pools of {CONCURRENCY}, GET with the body "
        f"read whole; median of {args.rounds} interleaved rounds. {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, httptools {version('httptools')}, aiohttp {version('aiohttp')}, "
        f"httpx {version('httpx')} (anyio {version('anyio')}).",
        "",
        "| client | requests | req/s | client CPU µs/req | LeanClient speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, done, seconds, cpu in rows:
        rate = done / seconds
        lines.append(f"| {name} | {done} | {rate:,.0f} | {cpu / done * 1e6:.1f} | {lean_rate / rate:.1f} |")
    return "\n".join(lines) + "\n"


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30000)
    parser.add_argument("--httpx-requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    if args.serve:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve())
        return
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, __file__, "--serve", "--loop", args.loop]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True) as upstream:
        try:
            assert upstream.stdout is not None
            url = f"http://127.0.0.1:{int(upstream.stdout.readline())}"
            with asyncio.Runner(loop_factory=factory) as runner:
                rows = runner.run(main(url, args))
        finally:
            upstream.terminate()
    section = report(rows, args)
    print()
    print(section)
    if not args.no_write:
        new = not RESULTS.exists()
        with RESULTS.open("a", encoding="utf-8") as results:
            results.write("# Benchmark results\n" if new else "\n")
            results.write("\n" + section)


if __name__ == "__main__":
    cli()
