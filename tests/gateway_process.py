"""A real `flowgate serve` process for operator-surface tests, with its log captured in a file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_servers import free_ports


def flowgate_command() -> list[str]:
    """The installed console script (what users and the Docker image run), else the module."""
    script = Path(sys.executable).parent / "flowgate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without FLOWGATE_* settings, plus `extra`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLOWGATE_")}
    env.update(extra)
    return env


TOKEN = "operator-token-4711"

CONFIG = """
upstream_timeout = "3s"
drain_timeout = "1s"
lease_ttl = "30s"

[defaults]
max_waiting = 100
max_wait = "25s"

[[rules]]
name = "metered"
path = "/metered"
key = "metered"
parallelism = 1
max_waiting = 1

[[rules]]
name = "timing"
path = "/timing"
key = "timing"
parallelism = 5
"""


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    proxy: str
    admin: str
    log_path: Path
    token: str | None = TOKEN
    _log: Any = field(default=None, repr=False)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def admin_client(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.admin, headers=self.auth, timeout=10, **options)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (every line must be one)."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
        return self.process.returncode


def start_gateway(
    upstream: str,
    workdir: Path,
    *,
    store: str = "memory://",
    workers: int = 1,
    token: str | None = TOKEN,
    log_format: str = "json",
    config: str = CONFIG,
) -> Gateway:
    config_path = workdir / "flowgate.toml"
    config_path.write_text(config)
    port, admin_port = free_ports(2)
    log_path = workdir / f"gateway-{port}.log"
    env = clean_env(FLOWGATE_LOG_FORMAT=log_format)
    if token:
        env["FLOWGATE_ADMIN_TOKEN"] = token  # not on the command line: the logs must not show it either
    args = [*flowgate_command(), "serve", "--config", str(config_path), "--upstream", upstream, "--store", store]
    args += ["--port", str(port), "--admin-port", str(admin_port), "--workers", str(workers)]
    log = log_path.open("wb")
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    gateway = Gateway(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", log_path, token, log)
    try:
        _wait_ready(gateway, workers)
    except BaseException:
        gateway.stop()
        raise
    return gateway


def _wait_ready(gateway: Gateway, workers: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if gateway.process.poll() is not None:
            raise AssertionError(f"flowgate serve exited with {gateway.process.returncode}:\n{gateway.log_text()}")
        with contextlib.suppress(httpx.HTTPError):
            ready = httpx.get(f"{gateway.admin}/readyz", headers=gateway.auth, timeout=1).status_code == 200
            # Every worker has its own proxy socket: count the distinct ones that answer.
            if ready and _proxy_answers(gateway.proxy, workers):
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"flowgate serve did not get ready within {timeout}s:\n{gateway.log_text()}")
        time.sleep(0.05)


def _proxy_answers(url: str, workers: int) -> bool:
    for _ in range(4 * workers):
        try:
            httpx.get(f"{url}/ready-probe", timeout=2, headers={"Connection": "close"})
        except httpx.HTTPError:
            return False
    return True


@contextlib.contextmanager
def gateway_running(upstream: str, workdir: Path, **options: Any) -> Iterator[Gateway]:
    gateway = start_gateway(upstream, workdir, **options)
    try:
        yield gateway
    finally:
        gateway.stop()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample `name` with `labels` in a Prometheus text exposition (0 when absent)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Await `predicate()` (an async callable) until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)
