"""Lease ids and tokens: unguessable, unique, and a token names its lease and key."""

from __future__ import annotations

import re

from gateway.engine import FlowController, Lease
from gateway.policy import Policy
from gateway.stores.memory import MemoryStore


async def test_ids_are_unique_random_hex_across_blocks() -> None:
    controller = FlowController(MemoryStore())
    policy = Policy(parallelism=None)
    leases = [await controller.acquire("k", policy) for _ in range(600)]  # more than two blocks of ids
    ids = [lease.id for lease in leases]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{24}", id_) for id_ in ids)
    other = FlowController(MemoryStore())
    assert (await other.acquire("k", policy)).id not in set(ids)  # each controller draws its own
    await controller.close()
    await other.close()


def test_token_round_trips_with_the_key() -> None:
    for key in ("tenant:42", "ä/ö {x}", "k" * 256):
        lease = Lease(key, "abc123")
        assert Lease.from_token(lease.token) == lease
        assert lease.token == Lease(key, "abc123").token  # the key's part, cached, stays the same
