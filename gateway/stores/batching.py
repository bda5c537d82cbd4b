"""Coalesce the script calls of one event-loop tick into one round trip per slot.

The first call of a tick schedules a flush with `call_soon` (not a timer): a lone call goes out at once,
and calls made by other tasks in the same tick ride along. One call goes as its own operation's script;
several go as the batch script. On Redis Cluster, calls are grouped by hash slot, since a script may only
touch keys of one slot; groups go out concurrently. Every operation is idempotent (client-chosen ids), so a
batch that runs late or twice after a connection error takes nothing twice.

Two ways to send a group: `PipelinedBatcher` writes it on the lean RESP client (single node, the hot path);
`RedisPyBatcher` sends it through redis-py, a task per group (Redis Cluster).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any

from redis.commands.core import AsyncScript

from .resp import Receiver, RespClient, Script, settle
from .scripts import KEYS_PER_OP

_Call = tuple[str, Sequence[str], Sequence[Any], Receiver]
Translate = Callable[[BaseException], BaseException]


class ScriptBatcher:
    def __init__(self, slot_of: Callable[[str], int] | None = None) -> None:
        self._slot_of = slot_of
        self._pending: list[_Call] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the calls pending
        self.round_trips = 0  # script calls sent, for tests and benchmarks

    def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """The script call's reply (or the exception that replaced it), joining this tick's batch."""
        future: asyncio.Future[Any] = self._tick().create_future()
        self._pending.append((name, keys, args, future))
        return future

    def call_then(self, name: str, keys: Sequence[str], args: Sequence[Any], then: Callable[[Any], object]) -> None:
        """`call` with `then(reply or exception)` called as the reply arrives, instead of a future."""
        self._tick()
        self._pending.append((name, keys, args, then))

    def _tick(self) -> asyncio.AbstractEventLoop:
        """The loop of this tick's calls; the tick's first call schedules the flush."""
        loop = self._loop
        if loop is None or not self._pending:
            # the others share the first call's loop (get_running_loop() makes a getpid() system call on 3.11)
            loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)
        return loop

    def _flush(self) -> None:
        calls, self._pending = self._pending, []
        if self._slot_of is None:
            self.round_trips += 1
            self._send(calls)
            return
        by_slot: dict[int, list[_Call]] = {}
        for call in calls:
            by_slot.setdefault(self._slot_of(call[1][0]), []).append(call)
        for group in by_slot.values():
            self.round_trips += 1
            self._send(group)

    def _send(self, group: list[_Call]) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        """Wait for calls already sent."""

    async def aclose(self) -> None:
        """Fail what is still unanswered and close the connections of the batcher's own."""


class PipelinedBatcher(ScriptBatcher):
    """Each group is written at once on the RESP client's connection; its reply resolves the callers' futures
    from `data_received`, with no task in between."""

    def __init__(self, client: RespClient, scripts: dict[str, str], batch: str, translate: Translate) -> None:
        super().__init__()
        self._client = client
        self._scripts = {name: Script.of(body) for name, body in scripts.items()}
        self._batch = Script.of(batch)
        self._translate = translate

    def _send(self, group: list[_Call]) -> None:
        receivers = [call[3] for call in group]
        if len(group) == 1:
            name, keys, args, _ = group[0]
            deliver = functools.partial(self._deliver, receivers, True)
            self._client.evalsha(self._scripts[name], keys, args, deliver)
        else:
            keys, argv = _pack(group)
            self._client.evalsha(self._batch, keys, argv, functools.partial(self._deliver, receivers, False))

    def _deliver(self, receivers: list[Receiver], single: bool, reply: Any) -> None:
        if isinstance(reply, BaseException):
            reply = self._translate(reply)
        settle(receivers, reply, single)

    async def drain(self) -> None:
        await self._client.drain()

    async def aclose(self) -> None:
        self._client.close()


class RedisPyBatcher(ScriptBatcher):
    """Each group is one redis-py script call in a task of its own (redis-py re-sends it once after a connection
    error)."""

    def __init__(
        self,
        scripts: dict[str, AsyncScript],
        batch: AsyncScript,
        slot_of: Callable[[str], int] | None = None,
        translate: Translate = lambda exc: exc,
    ) -> None:
        super().__init__(slot_of)
        self._scripts = scripts
        self._batch = batch
        self._translate = translate
        self._tasks: set[asyncio.Task[None]] = set()

    def _send(self, group: list[_Call]) -> None:
        task = asyncio.get_running_loop().create_task(self._send_later(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_later(self, group: list[_Call]) -> None:
        receivers = [call[3] for call in group]
        try:
            if len(group) == 1:
                name, keys, args, _ = group[0]
                reply = await self._scripts[name](keys=keys, args=args)
            else:
                keys, argv = _pack(group)
                reply = await self._batch(keys=keys, args=argv)
        except Exception as exc:
            settle(receivers, self._translate(exc))
            return
        settle(receivers, reply, single=len(group) == 1)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _pack(group: list[_Call]) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the batch script (scripts.py): each flow key's keys once, each operation naming them."""
    keys: list[str] = []
    numbers: dict[str, int] = {}  # a flow key's first key -> its number in the batch (from 1)
    argv: list[Any] = [len(group)]
    for name, op_keys, args, _ in group:
        number = numbers.get(op_keys[0])
        if number is None:
            assert len(op_keys) == KEYS_PER_OP
            keys.extend(op_keys)
            number = numbers[op_keys[0]] = len(numbers) + 1
        argv.extend((name, number, len(args), *args))
    return keys, argv
