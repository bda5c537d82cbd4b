"""Instance liveness on Redis: which instances are there to pick up the admissions made for them.

An instance's waiting tickets stay in the waitlists when its process dies. Without liveness, each one that
reaches the head is admitted with the pickup TTL and holds its token that long for nobody, one after another.

- Each instance that has entered a ticket keeps `fc:alive:{I}` set (SET PX, refreshed every third of its TTL by
  one background task, one SET in flight at a time). Its TTL is the pickup TTL admissions for this instance get,
  min(lease TTL, pickup TTL): an instance that cannot refresh it for that long could not pick them up either.
  Entering a ticket waits for the first SET, so no other instance ever sees a waiting ticket of an instance that
  is not alive yet.
- A wake-up goes out only to a live instance: one script (lua/wake.lua) on the owner's slot checks its liveness
  key and pushes to its inbox (`fc:inst:{I}`, same hash tag). An admission made for a dead instance is revoked at
  once (lua/revoke.lua) and its token goes to the next waiter.
- An owner alive at the push may die before picking up. The pusher remembers its pushes until their pickup TTL
  has passed and checks the owner again when its liveness key would have run out (the script returns the key's
  remaining TTL); if the owner is gone, those admissions are revoked.

Revoking takes back only an admission still marked as awaiting pickup in the store: an owner that picked it up
(its wake-up's renewal, or its safety re-check's take-over) keeps it, even if its liveness key lapsed meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ..errors import StoreUnavailable

INBOX_TTL_MS = 60_000
REFRESHES = 3  # the liveness key is set this many times per its TTL
MIN_TTL_MS = 300  # however short the lease TTL, the key is not set more than REFRESHES times in this long
WATCH_SLACK = 0.02  # seconds after an owner's liveness key should have run out before it is checked
MAX_WATCHED = 100_000  # pushed admissions remembered per owner (the oldest are forgotten: the pickup TTL frees them)

_T = TypeVar("_T")
_Pushed = deque[tuple[float, str, str]]  # (pickup TTL passes at, key, ticket), oldest first


def alive_key(instance: str) -> str:
    """The liveness key of an instance: beside its inbox, under the same hash tag."""
    return f"fc:alive:{{{instance}}}"


def inbox_key(instance: str) -> str:
    """The inbox list of an instance: admissions of its tickets, read with BLPOP."""
    return f"fc:inst:{{{instance}}}"


class Liveness:
    """This instance's liveness key, and the wake-ups it sends to other instances.

    `wake_script` is lua/wake.lua registered on `client`; `guard` translates an outage into StoreUnavailable;
    `revoke(key, ticket)` takes back an admission whose owner is gone; `spawn` runs a coroutine in the background.
    """

    def __init__(
        self,
        client: Any,
        wake_script: Any,
        instance: str,
        pickup_ms: int,
        *,
        guard: Callable[[Awaitable[Any]], Awaitable[Any]],
        revoke: Callable[[str, str], object],
        spawn: Callable[[Awaitable[Any]], object],
    ) -> None:
        self._client = client
        self._wake = wake_script
        self.instance = instance
        self.pickup_ms = pickup_ms
        self.ttl_ms = max(pickup_ms, MIN_TTL_MS)  # lowered to the shortest lease TTL entered
        self._guard = guard
        self._revoke = revoke
        self._spawn = spawn
        # time.monotonic() until which a ticket may be entered without a SET first (not the loop's clock: on
        # Python 3.11 each get_running_loop() costs a getpid() system call, and this is checked on every enter)
        self._fresh_until = float("-inf")
        self._keeper: asyncio.Task[None] | None = None
        self._setting: asyncio.Task[None] | None = None
        self._pushed: dict[str, _Pushed] = {}  # owner -> admissions pushed to it, not yet past their pickup TTL
        self._watches: dict[str, asyncio.TimerHandle] = {}  # owner -> the check of its liveness

    # -- this instance ---------------------------------------------------------------------------------------------

    def needs_refresh(self, lease_ms: int) -> bool:
        """Whether `ensure` must run before a ticket with this lease TTL is entered (cheap: no I/O)."""
        return max(lease_ms, MIN_TTL_MS) < self.ttl_ms or time.monotonic() >= self._fresh_until

    async def ensure(self, lease_ms: int) -> None:
        """Be alive before a ticket is entered, and stay alive from then on. StoreUnavailable if it cannot be set."""
        self.ttl_ms = min(self.ttl_ms, max(lease_ms, MIN_TTL_MS))
        loop = asyncio.get_running_loop()
        if self._keeper is None or self._keeper.done():
            self._keeper = loop.create_task(self._keep())
        if time.monotonic() >= self._fresh_until:
            await asyncio.shield(self._refresh())

    def _refresh(self) -> asyncio.Task[None]:
        """The SET in flight, or a new one: never two at once."""
        if self._setting is None or self._setting.done():
            self._setting = asyncio.get_running_loop().create_task(self._set())
        return self._setting

    async def _set(self) -> None:
        ttl_ms = self.ttl_ms
        sent = time.monotonic()
        await self._guard(self._client.set(alive_key(self.instance), "1", px=ttl_ms))
        # Entering needs no SET first while the key has half its TTL left: the keeper refreshes it every third, so
        # only a stalled keeper or an outage makes an enter wait.
        self._fresh_until = sent + ttl_ms / 2000

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 1000 / REFRESHES)
            refresh = self._refresh()
            try:
                await asyncio.shield(refresh)
            except StoreUnavailable:
                pass  # again next round; entering waits for a successful SET meanwhile
            except asyncio.CancelledError:
                refresh.cancel()
                raise

    # -- other instances -------------------------------------------------------------------------------------------

    async def wake(self, key: str, instance: str, tickets: Sequence[str]) -> None:
        """Tell `instance` that its `tickets` of `key` were admitted; revoke them if it is gone."""
        alive_ms = await self._ask(instance, [f"{ticket} {key}" for ticket in tickets])
        if alive_ms < 0:
            for ticket in tickets:
                self._revoke(key, ticket)
            return
        now = asyncio.get_running_loop().time()
        pushed = self._pushed.setdefault(instance, deque(maxlen=MAX_WATCHED))
        _forget_lapsed(pushed, now)
        pushed.extend((now + self.pickup_ms / 1000, key, ticket) for ticket in tickets)
        self._watch(instance, alive_ms)

    async def _ask(self, instance: str, items: Sequence[str]) -> int:
        """Push `items` to a live instance's inbox: the ms it stays alive without a refresh, or -1 (gone)."""
        keys = [alive_key(instance), inbox_key(instance)]
        return int(await self._guard(self._wake(keys=keys, args=[INBOX_TTL_MS, *items])))

    def _watch(self, instance: str, alive_ms: int) -> None:
        """Check the owner again when its liveness key would run out (a refresh would have pushed that on)."""
        if instance not in self._watches:
            delay = (alive_ms or self.ttl_ms) / 1000 + WATCH_SLACK
            self._watches[instance] = asyncio.get_running_loop().call_later(delay, self._on_watch, instance)

    def _on_watch(self, instance: str) -> None:
        del self._watches[instance]
        pushed = self._pushed.get(instance)
        if pushed is not None:
            _forget_lapsed(pushed, asyncio.get_running_loop().time())
        if not pushed:
            self._pushed.pop(instance, None)
            return
        self._spawn(self._check(instance))

    async def _check(self, instance: str) -> None:
        try:
            alive_ms = await self._ask(instance, ())
        except StoreUnavailable:
            alive_ms = 0  # look again in a liveness TTL
        if alive_ms >= 0:
            self._watch(instance, alive_ms)
            return
        for _, key, ticket in self._pushed.pop(instance, ()):
            self._revoke(key, ticket)  # a no-op for the admissions it did pick up

    def watching(self, instance: str) -> bool:
        """Whether admissions pushed to `instance` are being watched (for tests)."""
        return instance in self._watches

    # -- shutdown --------------------------------------------------------------------------------------------------

    async def stop(self) -> bool:
        """Stop refreshing and watching; True if this instance had been alive (its key is then to be deleted)."""
        for watch in self._watches.values():
            watch.cancel()
        self._watches.clear()
        self._pushed.clear()
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return False
        keeper.cancel()
        await asyncio.wait({keeper})
        return True

    async def forget(self) -> None:
        """Delete this instance's liveness key: admissions for it are revoked from now on, not pushed."""
        await self._guard(self._client.delete(alive_key(self.instance)))


def _forget_lapsed(pushed: _Pushed, now: float) -> None:
    """Drop pushed admissions past their pickup TTL: picked up, or their lease has lapsed by itself."""
    while pushed and pushed[0][0] <= now:
        pushed.popleft()
