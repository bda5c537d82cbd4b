"""Per-tick batching on Redis: the operations of one event-loop tick share one round trip (per slot on a
cluster), and each caller gets the result it would have had unbatched."""

from __future__ import annotations

import asyncio

import pytest
import redis

from gateway.policy import Policy
from gateway.stores import Admitted, Queued, open_store
from gateway.stores.redis import RedisStore, key_names

pytestmark = pytest.mark.redis


async def warm_up(store: object) -> None:
    """Load the scripts (a first EVALSHA answers NOSCRIPT and is counted)."""
    assert isinstance(store, RedisStore)
    await asyncio.gather(*(store.release("warm-up", f"w{i}") for i in range(2)))
    await store.release("warm-up", "w")
    await store.enter("warm-up", Policy(), "w", "o", 1)


def evalsha_calls(url: str) -> int:
    """EVALSHA calls the server has seen (commands run inside scripts are not counted here)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    entry = stats.get("cmdstat_evalsha", {"calls": 0})
    return int(entry["calls"])


async def test_one_tick_of_enters_is_one_round_trip_with_each_callers_result(redis_url: str) -> None:
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    admitted: list[str] = []
    store.subscribe("owner", lambda key, ticket: admitted.append(ticket))
    try:
        await warm_up(store)
        policy = Policy(parallelism=3)
        before = evalsha_calls(redis_url)
        entries = await asyncio.gather(*(store.enter("k", policy, f"t{i:02}", "owner", 30) for i in range(10)))
        assert evalsha_calls(redis_url) - before == 1  # ten enters, one script call
        # exactly what ten unbatched enters in this order give: three admitted, seven queued in order
        assert entries[:3] == [Admitted("t00"), Admitted("t01"), Admitted("t02")]
        assert [entry.position for entry in entries[3:] if isinstance(entry, Queued)] == list(range(1, 8))
        before = evalsha_calls(redis_url)
        released = await asyncio.gather(*(store.release("k", f"t{i:02}") for i in range(3)), store.release("k", "x"))
        assert released == [True, True, True, False]
        assert evalsha_calls(redis_url) - before == 1
        state = await store.state("k")
        assert state is not None and (state.active, state.waiting) == (3, 4)
        assert admitted == ["t03", "t04", "t05"]  # the releases handed their tokens on in FIFO order
    finally:
        await store.close()


async def test_many_keys_in_one_tick_share_a_batch_and_stay_apart(redis_url: str) -> None:
    store = open_store(redis_url)
    try:
        await warm_up(store)
        policy = Policy(parallelism=1)
        before = evalsha_calls(redis_url)
        entries = await asyncio.gather(*(store.enter(f"key-{i % 5}", policy, f"u{i:02}", "o", 30) for i in range(10)))
        assert evalsha_calls(redis_url) - before == 1
        assert [isinstance(entry, Admitted) for entry in entries] == [True] * 5 + [False] * 5  # one token per key
    finally:
        await store.close()


async def test_a_lone_call_is_one_round_trip_of_its_own(redis_url: str) -> None:
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    try:
        await warm_up(store)
        before = store._batcher.round_trips
        assert await store.enter("solo", Policy(parallelism=1), "s1", "o", 30) == Admitted("s1")
        assert store._batcher.round_trips - before == 1
    finally:
        await store.close()


async def test_a_failing_reply_callback_leaves_the_other_replies_of_its_batch_alone(redis_url: str) -> None:
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    replies: list[object] = []

    def broken(reply: object) -> None:
        raise RuntimeError("a bug in a callback")

    try:
        await warm_up(store)
        args = ["t1", store.instance, 30_000, 5_000, "1", "-1", "1000", "10", "30000"]
        store._batcher.call_then("enter", key_names("k"), args, broken)
        store._batcher.call_then("enter", key_names("k"), ["t2", *args[1:]], replies.append)
        # the same batch, awaited (without the guard, the failing callback would leave this unanswered)
        entry = await asyncio.wait_for(store.enter("k", Policy(parallelism=1), "t3", "o", 30), 5)
        assert isinstance(entry, Queued) and entry.position == 2  # t1 took the token, t2 waits ahead of t3
        assert [list(reply[:2]) for reply in replies] == [[2, 1]]  # type: ignore[index]
        assert [str(context["exception"]) for context in reported] == ["a bug in a callback"]
    finally:
        loop.set_exception_handler(None)
        await store.close()
