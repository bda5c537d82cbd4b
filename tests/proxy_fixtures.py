"""Fixtures shared by the proxy suites; a module binds them at module level (`upstream = proxy_fixtures.upstream`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.upstream_app import RecordingUpstream, ServerThread, serve_in_thread

PROXY_STORES = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]
_keys = itertools.count()


@dataclass
class Upstream:
    app: RecordingUpstream
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    """One recording upstream (uvicorn in a thread) for the session; tests use their own keys."""
    app = RecordingUpstream()
    with serve_in_thread(app, timeout_keep_alive=30, timeout_graceful_shutdown=1) as server:
        yield Upstream(app, server)


@pytest.fixture(params=PROXY_STORES)
def store_uri(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture(params=["lean", "aiohttp"], autouse=True)
def upstream_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every proxy test runs once per upstream client (read by proxy_harness and gateway_app)."""
    monkeypatch.setenv("FLOWGATE_TEST_UPSTREAM_CLIENT", request.param)
    kind: str = request.param
    return kind


@pytest.fixture
def key() -> str:
    """A flow-control key no other test uses (the upstream's records are per key)."""
    return f"test-key-{next(_keys)}"


def fc(key: str, value: str = "parallelism=1") -> dict[str, str]:
    """The flow-control headers of a request for `key` under `value`."""
    return {"Flow-Control-Key": key, "Flow-Control-Value": value}
