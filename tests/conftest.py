"""Shared fixtures: our own redis-server (and cluster) on free loopback ports, flushed per test.

Locally, Redis tests skip when no redis-server binary exists; in CI (`CI` set) they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.redis_servers import RedisServer, redis_binary, redis_cluster, redis_server

IN_CI = bool(os.environ.get("CI"))


def need_redis() -> None:
    """Skip the calling test when no redis-server binary exists; in CI, fail it instead."""
    if redis_binary() is None:
        if IN_CI:
            pytest.fail("redis-server is required in CI (.ci/run installs it)")
        pytest.skip("redis-server is not installed")


@pytest.fixture(scope="session")
def redis_node() -> Iterator[RedisServer]:
    need_redis()
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_node: RedisServer) -> str:
    """A clean single-node Redis for this test."""
    if redis_node.process is None or redis_node.process.poll() is not None:
        redis_node.start()  # a fault test killed it
    redis_node.cli("flushall")
    return redis_node.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to freeze, kill and restart."""
    need_redis()
    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def cluster_nodes() -> Iterator[list[RedisServer]]:
    need_redis()
    with redis_cluster() as nodes:
        yield nodes


@pytest.fixture
def cluster_url(cluster_nodes: list[RedisServer]) -> str:
    """A clean 3-master Redis Cluster for this test."""
    for node in cluster_nodes:
        node.cli("flushall")
    return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in cluster_nodes)
