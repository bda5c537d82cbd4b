"""Instructions per proxied request, counted by callgrind: a repeatable measure of the gateway's own CPU work.

    python benchmarks/instructions.py [--tree PATH ...] [--compiled] [--seconds 15] [--no-write]

`flowgate serve` (and, for the redis:// row, its redis-server) runs under valgrind's callgrind with
instrumentation off. After a warm-up, wrk drives the gateway with 16 connections for `--seconds` while
instrumentation is on; instructions counted / requests served = user-space instructions per request. The kernel's
share (the socket system calls) is not counted. On a shared machine req/s and CPU time swing by half from run to
run; these counts repeat within about 1%, so two source trees can be compared one after the other
(`--tree old --tree new`, e.g. a `git worktree` of the commit before). Rows: passthrough, memory:// (GET, and a
POST of a small JSON body, as webhooks send) and redis://, with a key of parallelism 64 (never throttled). Under
callgrind the gateway runs ~50 times slower, so its batches of Redis operations are fuller than at full speed:
compare trees with each other, not with `proxy.py`'s figures. `--compiled` also measures each tree's compiled
build (hatch_build.py's modules compiled into a temporary copy).
valgrind, wrk and nginx are installed with apt-get when missing. Results are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.proxy import RESULTS, ensure_tools, free_port, nginx, stop  # noqa: E402

CONNECTIONS = 16
WARM_UP = 5.0
START_TIMEOUT = 180.0  # Python under valgrind takes a while to start
# row -> (store, or None for no rule; whether each request is a POST of a small JSON body, as webhooks are)
ROWS = {
    "passthrough": (None, False),
    "memory:// p=64": ("memory", False),
    "memory:// p=64, POST": ("memory", True),
    "redis:// p=64": ("redis", False),
}
POST_SCRIPT = """wrk.method = "POST"
wrk.body = '{"event":"order.created","id":12345}'
wrk.headers["Content-Type"] = "application/json"
"""


@contextlib.contextmanager
def callgrind(args: list[str], port: int, workdir: str, name: str, tree: str) -> Iterator[Counter]:
    """Run `args` in `tree` under callgrind (instrumentation off) until the block ends; the block gets a Counter."""
    out = os.path.join(workdir, f"{name}.callgrind")
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *args]
    log = open(os.path.join(workdir, f"{name}.log"), "w")  # noqa: SIM115 - closed below
    env = dict(os.environ, PYTHONPATH=tree)  # with the cwd, `python -c` imports the tree's gateway package
    proc = subprocess.Popen(command, env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, os.path.join(workdir, f"{name}.log"))
        yield Counter(proc.pid, out)
    finally:
        stop(proc, 60)  # valgrind writes its last counts on the way out
        log.close()


class Counter:
    def __init__(self, pid: int, out: str) -> None:
        self.pid, self.out = pid, out

    def control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True, capture_output=True, timeout=120)

    def instructions(self) -> int:
        """Dump and return the instructions counted so far."""
        self.control("--dump")
        total = 0
        for path in glob.glob(self.out + "*"):
            with open(path) as handle:
                for line in handle:
                    if line.startswith(("summary:", "totals:")):
                        total = max(total, int(line.split()[1]))
            os.remove(path)
        return total


def wait_port(port: int, proc: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as handle:
                sys.stderr.write(handle.read()[-3000:])
            raise RuntimeError(f"the process for port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {START_TIMEOUT:g}s")


def wrk_requests(url: str, seconds: float, script: str | None = None) -> int:
    args = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{int(seconds)}s", "--timeout", "30s", url]
    if script is not None:
        args[1:1] = ["-s", script]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60).stdout
    found = re.search(r"(\d+) requests in", out)
    if found is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk failed or saw errors:\n{out}")
    return int(found.group(1))


def measure(
    tree: str, store: str | None, post: bool, seconds: float, workdir: str, upstream: str
) -> tuple[float, float | None]:
    """(gateway instructions per request, redis-server instructions per request or None)."""
    script = None
    if post:
        script = os.path.join(workdir, "post.lua")
        with open(script, "w") as handle:
            handle.write(POST_SCRIPT)
    with contextlib.ExitStack() as stack:
        redis_counter = None
        store_uri = "memory://"
        if store == "redis":
            redis_port = free_port()
            redis_args = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
            redis_args += ["--appendonly", "no", "--dir", workdir]
            redis_counter = stack.enter_context(callgrind(redis_args, redis_port, workdir, "redis", tree))
            store_uri = f"redis://127.0.0.1:{redis_port}/0"
        port = free_port()
        config = os.path.join(workdir, f"flowgate-{port}.toml")
        lines = [f'upstream = "{upstream}"', f'store = "{store_uri}"', f"port = {port}"]
        lines += [f"admin_port = {free_port()}", 'log_level = "warning"']
        if store is not None:
            lines += ["[[rules]]", 'name = "bench"', 'key = "bench"', 'path = "/"', "parallelism = 64"]
        with open(config, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        serve = [sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())"]
        gateway = stack.enter_context(callgrind([*serve, "serve", "--config", config], port, workdir, "gw", tree))
        url = f"http://127.0.0.1:{port}/"
        wrk_requests(url, WARM_UP, script)
        counters = [gateway] + ([redis_counter] if redis_counter else [])
        for counter in counters:
            counter.instructions()  # drop what start-up and the warm-up counted
            counter.control("--instr=on")
        requests = wrk_requests(url, seconds, script)
        for counter in counters:
            counter.control("--instr=off")
        gateway_per = gateway.instructions() / requests
        redis_per = redis_counter.instructions() / requests if redis_counter else None
        return gateway_per, redis_per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", help="a source tree to measure (default: this one)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--compiled", action="store_true", help="also measure each tree's compiled build")
    options = parser.parse_args()
    ensure_tools()
    if not shutil.which("valgrind"):
        print("installing valgrind with apt-get", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True, env=env, stdout=subprocess.DEVNULL)
    results: dict[str, dict[str, tuple[float, float | None]]] = {}
    with tempfile.TemporaryDirectory(prefix="flowgate-instr-") as workdir, contextlib.ExitStack() as servers:
        trees = {describe(tree): tree for tree in (os.path.abspath(tree) for tree in options.tree or [ROOT])}
        if options.compiled:
            for label, tree in list(trees.items()):
                dest = os.path.join(workdir, f"compiled-{len(trees)}")
                print(f"compiling {label} with mypyc (its own hatch_build.py)", flush=True)
                # the tree's own script: the modules it compiles are the tree's to say
                subprocess.run(
                    [sys.executable, "hatch_build.py", dest], cwd=tree, check=True, stdout=subprocess.DEVNULL
                )
                trees[f"{label} compiled"] = dest
        up_port = free_port()
        servers.enter_context(nginx(up_port, None, workdir))
        for label, tree in trees.items():
            for row, (store, post) in ROWS.items():
                gateway, redis = measure(tree, store, post, options.seconds, workdir, f"http://127.0.0.1:{up_port}")
                results.setdefault(label, {})[row] = (gateway, redis)
                beside = f", redis-server {redis:,.0f}" if redis is not None else ""
                print(f"{label}  {row:<16} gateway {gateway:,.0f} instructions/request{beside}", flush=True)
    report = render(results, options.seconds)
    print(report)
    if not options.no_write:
        with open(RESULTS, "a") as handle:
            handle.write(report)
        print(f"appended to {RESULTS}")


def describe(tree: str) -> str:
    """The tree's commit (and `+` when it has uncommitted changes)."""
    try:
        commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "gateway"], capture_output=True, text=True)
    except OSError:
        return tree
    return commit.stdout.strip() + ("+" if dirty.stdout.strip() else "") or tree


def render(results: dict[str, dict[str, tuple[float, float | None]]], seconds: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## Instructions per request (callgrind), {now}\n",
        f"`python benchmarks/instructions.py`: `flowgate serve` under callgrind, wrk -c{CONNECTIONS} for {seconds:g}s "
        "after a warm-up; user-space instructions per request (repeatable within ~1%). The redis:// row also counts "
        "its redis-server.\n",
        f"| tree | {' | '.join(ROWS)} | redis-server per request |",
        "|---|" + "---:|" * (len(ROWS) + 1),
    ]
    for label, rows in results.items():
        cells = [f"{rows[row][0]:,.0f}" for row in ROWS]
        redis = rows["redis:// p=64"][1]
        lines.append(f"| {label} | {' | '.join(cells)} | {redis:,.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
