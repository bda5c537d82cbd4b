"""The store parametrization shared by the engine suites (memory, single-node Redis, 3-master Redis Cluster),
and small helpers to read a key's state.

A module uses the fixtures by binding them at module level (`store_uri = store_fixtures.store_uri`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import FlowController, Policy, Store, open_store
from tests.helpers import wait_until

KEY = "tenant:1"

STORE_KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("cluster", id="cluster", marks=[pytest.mark.redis, pytest.mark.cluster]),
]


class Stores:
    """Opens stores on one URI. Memory stores are per process, so every `open()` returns the same one;
    Redis stores are opened anew each time, as separate engines (processes) would."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.memory = uri.startswith("memory")
        self._opened: list[Store] = []
        self._controllers: list[FlowController] = []

    def open(self, **options: Any) -> Store:
        """A store on the URI; `options` go to open_store (a Redis store's pickup_ttl, say)."""
        if self.memory and self._opened:
            return self._opened[0]
        store = open_store(self.uri, **options)
        self._opened.append(store)
        return store

    def controller(
        self, *, store: Store | None = None, lease_ttl: float = 60.0, safety_interval: float = 60.0
    ) -> FlowController:
        """A FlowController over `store`, or over a store of its own (shared for memory). The long safety
        interval makes sure a test never passes on the safety re-check where a wake-up is due."""
        store = store if store is not None else self.open()
        controller = FlowController(store, lease_ttl=lease_ttl, safety_interval=safety_interval)
        self._controllers.append(controller)
        return controller

    async def aclose(self) -> None:
        for controller in self._controllers:
            with contextlib.suppress(Exception):
                await controller.close()
        for store in self._opened:
            with contextlib.suppress(Exception):
                await store.close()


@pytest.fixture(params=STORE_KINDS)
def store_uri(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    fixture = "redis_url" if request.param == "redis" else "cluster_url"
    uri: str = request.getfixturevalue(fixture)
    return uri


@pytest.fixture
async def stores(store_uri: str) -> AsyncIterator[Stores]:
    opened = Stores(store_uri)
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def store(stores: Stores) -> Store:
    return stores.open()


async def active(store: Store, key: str = KEY) -> int:
    state = await store.state(key)
    return state.active if state else 0


async def waiting(store: Store, key: str = KEY) -> int:
    state = await store.state(key)
    return state.waiting if state else 0


async def has_waiting(store: Store, key: str, count: int) -> bool:
    return await waiting(store, key) == count


async def is_idle(store: Store, key: str = KEY) -> bool:
    return await active(store, key) == 0 and await waiting(store, key) == 0


async def queue(controller: FlowController, key: str, policy: Policy, count: int) -> list[asyncio.Task[object]]:
    """Start `count` acquires one after the other, each queued at the store before the next enters."""
    tasks: list[asyncio.Task[object]] = []
    before = await waiting(controller.store, key)
    for index in range(count):
        tasks.append(asyncio.create_task(controller.acquire(key, policy)))
        await wait_until(lambda n=before + index + 1: has_waiting(controller.store, key, n))
    return tasks
