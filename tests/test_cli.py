"""The `flowgate` command as users (and the Docker entrypoint) run it: real processes on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import BUILD, __version__
from tests.gateway_process import clean_env, flowgate_command
from tests.redis_servers import free_port, free_ports

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = str(ROOT / "examples" / "flowgate.toml")
EXAMPLE_APP = str(ROOT / "examples" / "upstream_app.py")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*flowgate_command(), *args], capture_output=True, text=True, timeout=30, env=env or clean_env()
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flowgate: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


# -- version and check ----------------------------------------------------------------------------------------------


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"flowgate {__version__} ({BUILD})"


def test_check_accepts_the_example_config() -> None:
    result = run("check", EXAMPLE_CONFIG)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{EXAMPLE_CONFIG}: OK"


def test_check_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('upstream = "http://127.0.0.1:8000"\ncolour = "blue"\n\n[[rules]]\nkey = "k"\nperiod = "10x"\n')
    result = run("check", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f'{path}:2: unknown setting "colour"; known settings: '
        + result.stderr.split("known settings: ")[1].split("\n")[0],
        f'{path}:6: rules[0].period must be a duration such as 500ms, 10s or 1h30m, got "10x"',
    ]
    assert "Traceback" not in result.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    result = run("check", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read the config file" in result.stderr


# -- serve refuses bad settings with one line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--store", "mongo://x"], ['store URI "mongo://x" must start with memory://, redis://']),
        (["--store", "redis://host:notaport"], ['port must be a number from 1 to 65535, got "notaport"']),
        (["--store", "redis://u:hunter2@host:notaport"], ["redis://u:***@host:notaport"]),
        (["--workers", "4"], ["--workers", "memory:// store lives inside one process"]),
        (["--port", "http"], ['--port: port must be an integer from 1 to 65535, got "http"']),
        (["--upstream", "localhost:8000"], ["upstream must be a URL such as http://127.0.0.1:8000"]),
    ],
)
def test_serve_refuses_bad_settings(args: list[str], needles: list[str]) -> None:
    result = run("serve", "--upstream", "http://127.0.0.1:9", *args)
    assert_one_line_error(result, *needles)
    assert "hunter2" not in result.stderr


def test_serve_needs_an_upstream() -> None:
    assert_one_line_error(run("serve"), "no upstream")


def test_serve_with_a_bad_config_file_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('upstream = "http://127.0.0.1:8000"\n\n[[rules]]\nkey = "k"\nperiod = "10x"\nrate = "x"\n')
    result = run("serve", env=clean_env(FLOWGATE_CONFIG=str(path)))
    assert_one_line_error(result, f"{path}:5: rules[0].period", "1 more problem", f"flowgate check {path}")


def test_serve_port_in_use_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--upstream", "http://127.0.0.1:9", "--port", str(port), "--admin-port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["flowgate: cannot listen: Address already in use"]


# -- serve for real -------------------------------------------------------------------------------------------------


def wait_for_http(url: str, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before {url} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


@pytest.fixture
def upstream_app(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """The example upstream app on a free port; yields (app port, the admin port it reports completions to)."""
    port, admin_port = free_ports(2)
    env = clean_env(FLOWGATE_ADMIN_URL=f"http://127.0.0.1:{admin_port}")
    process = subprocess.Popen(
        [sys.executable, EXAMPLE_APP, "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", process)
        yield port, admin_port
    finally:
        stop(process)
        if process.stderr is not None:
            process.stderr.close()


def start_gateway(
    app_port: int, admin_port: int, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = ["serve", "--config", EXAMPLE_CONFIG, "--upstream", f"http://127.0.0.1:{app_port}"]
    args += ["--port", str(port), "--admin-port", str(admin_port), *extra]
    process = subprocess.Popen(
        [*flowgate_command(), *args],
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return process, port


async def test_serve_proxies_reports_completion_and_drains_on_sigterm(upstream_app: tuple[int, int]) -> None:
    app_port, admin_port = upstream_app
    process, port = start_gateway(app_port, admin_port, env=clean_env(FLOWGATE_DRAIN_TIMEOUT="20s"))
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        await asyncio.to_thread(wait_for_http, f"{admin}/healthz", process)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert (await client.get(f"{admin}/readyz")).json() == {"status": "ready"}

            hello = await client.get("/")  # no rule, no headers: passed straight through
            assert hello.status_code == 200
            assert hello.json()["key"] is None

            hook = await client.post("/hooks/signup", headers={"X-Tenant-Id": "t1"}, content=b"{}")
            assert hook.status_code == 200
            assert hook.json()["key"] == "tenant:t1"
            assert hook.headers["flow-control-waited"].isdigit()

            missing = await client.post("/hooks/signup")
            assert missing.status_code == 400
            assert missing.json()["error"] == "missing_key_part"

            # Completion reporting: rule "jobs" allows 2 at a time; each job holds its token (Flow-Control-Hold)
            # until the app's background work releases the lease on the admin port, so a third job must wait.
            jobs = await asyncio.gather(*(client.post("/jobs", params={"work": "0.4"}) for _ in range(3)))
            assert [job.status_code for job in jobs] == [202, 202, 202]
            waited = sorted(int(job.headers["flow-control-waited"]) for job in jobs)
            assert waited[2] >= 200, waited  # lower bound only: the third waited for a completion report

            # SIGTERM while a slow request is in flight: it completes, new connections are refused, exit 0.
            slow = asyncio.create_task(client.get("/slow", params={"seconds": "2"}))
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (draining := await client.get(f"{admin}/readyz")).status_code == 200:  # signal not handled yet
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert draining.status_code == 503  # the admin port stays up while the proxy drains
            assert draining.json()["error"] == "draining"
            response = await slow
            assert response.status_code == 200
            assert response.json() == {"slept": 2.0}
        with pytest.raises(OSError):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the listener closes within moments of SIGTERM
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                await asyncio.sleep(0.05)
        code = await asyncio.to_thread(process.wait, 30)
        stderr = process.stderr.read().decode() if process.stderr else ""
        assert code == 0, stderr
        assert "Traceback" not in stderr
        assert "draining" in stderr
    finally:
        stop(process)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.redis
async def test_serve_with_workers_on_redis(upstream_app: tuple[int, int], redis_url: str) -> None:
    app_port, admin_port = upstream_app
    process, port = start_gateway(app_port, admin_port, "--workers", "2", "--store", redis_url)
    try:
        await asyncio.to_thread(wait_for_http, f"http://127.0.0.1:{admin_port}/readyz", process)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 15
            while True:  # every worker must be up before all requests can succeed; wait_for_http saw one
                try:
                    responses = await asyncio.gather(
                        *(client.post("/hooks/x", headers={"X-Tenant-Id": f"t{i % 3}"}) for i in range(20))
                    )
                    break
                except httpx.ConnectError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            assert [response.status_code for response in responses] == [200] * 20
            assert {response.json()["key"] for response in responses} == {"tenant:t0", "tenant:t1", "tenant:t2"}
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
        stderr = process.stderr.read().decode() if process.stderr else ""
        assert code == 0, stderr
        assert "Traceback" not in stderr
        assert stderr.count("draining") == 2  # each worker drained
    finally:
        stop(process)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
