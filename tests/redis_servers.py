"""Throwaway redis-server processes on free loopback ports: one node, or a 3-master cluster."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: each is held while the next is chosen (two `free_port()` calls in a row can
    return the same port, and a gateway refuses the same port for its proxy and admin sockets)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; Redis wants both below 65536."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 55000)
        if _port_free(port) and _port_free(port + 10000):
            return port


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@dataclass
class RedisServer:
    """One redis-server we started; `kill`/`start`/`freeze`/`thaw` are for fault tests."""

    port: int
    workdir: str
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = redis_binary()
        assert binary is not None, "redis-server is not installed"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self.workdir, "--daemonize", "no", "--loglevel", "warning", *self.extra]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"redis-server on port {port} did not start within {timeout}s")


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="flowgate-redis-") as workdir:
        server = RedisServer(free_port(), workdir)
        server.start()
        try:
            yield server
        finally:
            server.kill()


@contextlib.contextmanager
def redis_cluster(masters: int = 3) -> Iterator[list[RedisServer]]:
    """A cluster of `masters` nodes without replicas, all slots assigned."""
    with tempfile.TemporaryDirectory(prefix="flowgate-cluster-") as workdir:
        nodes: list[RedisServer] = []
        try:
            for index in range(masters):
                node_dir = os.path.join(workdir, str(index))
                os.mkdir(node_dir)
                extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                extra += ["--cluster-node-timeout", "5000"]
                node = RedisServer(free_cluster_port(), node_dir, extra)
                node.start()
                nodes.append(node)
            addresses = [f"127.0.0.1:{node.port}" for node in nodes]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                timeout=60,
                check=True,
            )
            _wait_cluster_ok(nodes[0])
            yield nodes
        finally:
            for node in nodes:
                node.kill()


def _wait_cluster_ok(node: RedisServer, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "cluster_state:ok" in node.cli("cluster", "info"):
            return
        time.sleep(0.1)
    raise RuntimeError("the test Redis Cluster did not reach cluster_state:ok")
