"""Coalesce the script calls of one event-loop tick into one round trip per slot.

The first call of a tick schedules a flush with `call_soon` (not a timer): a lone call goes out at once,
and calls made by other tasks in the same tick ride along. One call goes as its own operation's script;
several go as the batch script. On Redis Cluster, calls are grouped by hash slot, since a script may only
touch keys of one slot; groups go out concurrently. Every operation is idempotent, so redis-py re-sending a
batch after a connection error is safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from redis.commands.core import AsyncScript

from .scripts import KEYS_PER_OP

_Call = tuple[str, Sequence[str], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(
        self,
        scripts: dict[str, AsyncScript],
        batch: AsyncScript,
        slot_of: Callable[[str], int] | None = None,
        translate: Callable[[BaseException], BaseException] = lambda exc: exc,
    ) -> None:
        self._scripts = scripts
        self._batch = batch
        self._slot_of = slot_of
        self._translate = translate
        self._pending: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.round_trips = 0  # script calls sent, for tests and benchmarks

    def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((name, keys, args, future))
        return future

    def _flush(self) -> None:
        calls, self._pending = self._pending, []
        if self._slot_of is None:
            groups = [calls]
        else:
            by_slot: dict[int, list[_Call]] = {}
            for call in calls:
                by_slot.setdefault(self._slot_of(call[1][0]), []).append(call)
            groups = list(by_slot.values())
        loop = asyncio.get_running_loop()
        for group in groups:
            task = loop.create_task(self._send(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[_Call]) -> None:
        self.round_trips += 1
        try:
            if len(group) == 1:
                name, keys, args, _ = group[0]
                replies = [await self._scripts[name](keys=keys, args=args)]
            else:
                keys, argv = _pack(group)
                replies = await self._batch(keys=keys, args=argv)
        except Exception as exc:
            error = self._translate(exc)
            for *_, future in group:
                if not future.done():
                    future.set_exception(error)
            return
        for (*_, future), reply in zip(group, replies, strict=True):
            if not future.done():
                future.set_result(reply)

    async def drain(self) -> None:
        """Wait for calls already sent."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _pack(group: list[_Call]) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    argv: list[Any] = [len(group)]
    for name, op_keys, args, _ in group:
        assert len(op_keys) == KEYS_PER_OP
        keys.extend(op_keys)
        argv.extend((name, len(args), *args))
    return keys, argv
