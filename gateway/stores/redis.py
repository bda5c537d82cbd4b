"""The Redis store: limits shared by every instance on one Redis (or Redis Cluster).

Each operation is one Lua script (lua/*.lua, with lua/lib.lua prepended) over the five keys of one flow key,
all under one hash tag, so a script touches one slot. Admissions of tickets that another instance entered
are pushed to that instance's inbox list (`fc:inst:{I}`), which it reads with BLPOP: no polling. In Redis
Cluster the inbox lives in another slot than the flow key, so the push is a second step; a push lost to a
crash is recovered by the owner's safety re-check (`pump`), and an admission nobody picks up frees its token
after a short pickup TTL.

The push goes only to a live instance: an admission made for a dead one (a crashed process's waiting ticket
reaching the head) is revoked and its token goes to the next waiter at once (liveness.py).

On a single node the batched operations (the hot path) travel on a lean pipelined RESP client (resp.py);
everything else, and Redis Cluster, goes through redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import StoreUnavailable
from ..policy import Policy
from . import StoreURI, scripts
from .base import (
    AdmitCallback,
    Admitted,
    Entry,
    KeyState,
    PumpResult,
    Queued,
    Refused,
    Store,
    TicketStatus,
)
from .batching import PipelinedBatcher, RedisPyBatcher, ScriptBatcher
from .liveness import Liveness, inbox_key
from .resp import RespClient

DEFAULT_PICKUP_TTL = 10.0
DEFAULT_SOCKET_TIMEOUT = 2.0
#: Connections one store may open at once. redis-py 8's asyncio pool defaults to 100 and then fails calls with
#: MaxConnectionsError (a 503) at once; a loaded instance whose event loop lags behind Redis's replies has more
#: batches in flight than that (seen under S1's 200 clients on 2 cores).
MAX_CONNECTIONS = 1024
INBOX_BLOCK = 5  # seconds one BLPOP waits before it is re-issued
INDEX_KEY = "fc:keys"
KNOWN_KEYS = 4096  # keys an instance remembers as live, skipping the max_keys check (bounds the overshoot)
PRUNE_EVERY = 10.0  # seconds between two prunings of the key index by one instance, once it reaches max_keys
_MAX_TAKEN = 100_000
_STATUS = {"w": "waiting", "a": "admitted", "g": "gone"}
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError)
_T = TypeVar("_T")


class _Connection(aioredis.Connection):
    """redis-py's asyncio connection packs commands in Python; hiredis packs them in C (a batch of a tick
    carries hundreds of arguments, where the Python packer costs several microseconds each)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        head = tuple(name.encode().split()) if isinstance(name, str) else tuple(bytes(name).split())
        try:
            return [hiredis.pack_command(head + args[1:])]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


class _SSLConnection(_Connection, aioredis.SSLConnection):
    pass


@lru_cache(maxsize=4096)  # hot keys are few; building five names costs more than the lookup
def key_names(key: str) -> tuple[str, ...]:
    """The five Redis keys of one flow key, under one hash tag (braces in the key are escaped)."""
    tag = key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return tuple(f"fc:{{{tag}}}:{suffix}" for suffix in ("p", "l", "s", "w", "t"))


@dataclass(slots=True)
class _Local:
    """A ticket this store entered and is waiting for: who to wake and the lease TTL to renew to."""

    owner: str
    lease_ttl: float


def _num(value: int) -> int | None:
    return None if value < 0 else value


class RedisStore(Store):
    """`redis://[user:pass@]host:port/db` and `rediss://…`."""

    wakeups_can_be_lost = True

    def __init__(
        self,
        uri: StoreURI,
        *,
        pickup_ttl: float = DEFAULT_PICKUP_TTL,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        max_keys: int | None = None,
    ) -> None:
        self.uri = uri
        self.max_keys = max_keys
        self._known: OrderedDict[str, None] = OrderedDict()  # keys seen live lately: no cap check (bounded LRU)
        self._pruned_at = float("-inf")
        self.instance = os.urandom(8).hex()
        self._pickup_ms = str(round(pickup_ttl * 1000))
        self._lease_ms = round(pickup_ttl * 1000)  # the longest lease TTL entered: what a take-over renews to
        self._socket_timeout = socket_timeout
        self._client = self._make_client(socket_timeout)
        self._inbox_client: Any = None
        self._scripts = {name: self._client.register_script(scripts.script(name)) for name in scripts.OPERATIONS}
        self._liveness = Liveness(
            self._client,
            self._client.register_script(scripts.instance_script("wake")),
            self.instance,
            int(self._pickup_ms),
            guard=self._guard,
            revoke=lambda key, ticket: self._spawn(self._revoke(key, ticket)),
            spawn=self._spawn,
        )
        self._batcher = self._make_batcher()
        self._listeners: dict[str, AdmitCallback] = {}
        self._local: dict[str, _Local] = {}
        # Tickets a pump found admitted before their wake-up came (taken over): their wake-up, if it still
        # arrives, is a duplicate to ignore, not an abandoned admission to release. Dropped on release/cancel.
        self._taken: set[str] = set()
        self._inbox_task: asyncio.Task[None] | None = None
        # key -> (when, handle): uvloop returns a plain Handle without when() for delays under 0.5 ms
        self._timers: dict[str, tuple[float, asyncio.Handle]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._unindexed: set[str] = set()  # new keys of this tick, added to the index in one SADD
        self._indexing: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.uri)!r})"

    def _make_client(self, socket_timeout: float) -> Any:
        uri = self.uri
        host, port = uri.nodes[0]
        pool = aioredis.ConnectionPool(
            connection_class=_SSLConnection if uri.tls else _Connection,
            host=host,
            port=port,
            db=uri.db,
            username=uri.username,
            password=uri.password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.01), 1),
            health_check_interval=30,
            max_connections=MAX_CONNECTIONS,
        )
        return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it

    def _make_batcher(self) -> ScriptBatcher:
        """The hot path: the operations of each tick, pipelined on one connection of the lean RESP client."""
        uri = self.uri
        host, port = uri.nodes[0]
        client = RespClient(
            host,
            port,
            db=uri.db,
            username=uri.username,
            password=uri.password,
            ssl_context=self._ssl_context(),
            timeout=self._socket_timeout,
        )
        bodies = {name: scripts.script(name) for name in scripts.BATCHED}
        return PipelinedBatcher(client, bodies, scripts.batch_script(), self._unavailable)

    def _ssl_context(self) -> ssl.SSLContext | None:
        """For rediss://, the TLS settings of redis-py's pool (certificate and host name verified)."""
        if not self.uri.tls:
            return None
        connection = _SSLConnection(**self._client.connection_pool.connection_kwargs)
        context: ssl.SSLContext = connection.ssl_context.get()
        return context

    # -- subscriptions and wake-ups ------------------------------------------------------------------------------

    def subscribe(self, owner: str, on_admit: AdmitCallback) -> None:
        self._listeners[owner] = on_admit

    def unsubscribe(self, owner: str) -> None:
        self._listeners.pop(owner, None)

    def _inbox(self) -> str:
        return inbox_key(self.instance)

    def _ensure_inbox(self) -> None:
        if self._inbox_task is None or self._inbox_task.done():
            self._inbox_task = asyncio.get_running_loop().create_task(self._read_inbox())

    async def _read_inbox(self) -> None:
        """Admissions that other instances made for our tickets arrive here (BLPOP, no polling)."""
        if self._inbox_client is None:
            self._inbox_client = self._make_client(INBOX_BLOCK + self._socket_timeout + 1)
        while True:
            try:
                item = await self._inbox_client.blpop([self._inbox()], timeout=INBOX_BLOCK)
            except _UNAVAILABLE:
                await asyncio.sleep(1.0)  # the safety re-check covers what arrives meanwhile
                continue
            if item is None:
                if not self._local:
                    self._inbox_task = None
                    return
                continue
            ticket, _, key = item[1].decode().partition(" ")
            self._handoffs(key, [ticket, self.instance], foreign=True)

    def _handoffs(self, key: str, flat: Sequence[Any], foreign: bool = False) -> None:
        """Wake the owners of admitted tickets: ours by callback, other instances' through their inbox."""
        remote: list[tuple[str, str]] = []
        for index in range(0, len(flat), 2):
            ticket = _text(flat[index])
            instance = _text(flat[index + 1])
            if instance != self.instance:
                remote.append((ticket, instance))
                continue
            local = self._local.pop(ticket, None)
            if local is None and ticket in self._taken:
                self._taken.discard(ticket)  # a late duplicate of a wake-up a pump already acted on
                continue
            listener = self._listeners.get(local.owner) if local is not None else None
            if listener is None:  # its delivery is gone: do not let the token idle until expiry
                self._spawn(self.release(key, ticket))
                continue
            if foreign:  # admitted with a pickup TTL: take it over for the full lease TTL, then wake
                assert local is not None
                self._spawn(self._pick_up(key, ticket, local.lease_ttl, listener))
                continue
            listener(key, ticket)
        if remote:
            self._spawn(self._push(key, remote))

    async def _pick_up(self, key: str, ticket: str, lease_ttl: float, listener: AdmitCallback) -> None:
        """Wake the owner only once the renewal confirms the lease: a wake-up that arrives after the pickup TTL
        ran out (its token may be someone else's by now) must not start a delivery without a lease. A lapsed
        admission is left to the owner's safety re-check, which finds the ticket gone."""
        (renewed,) = await self.renew(key, [ticket], lease_ttl)
        if renewed:
            listener(key, ticket)

    async def _push(self, key: str, remote: list[tuple[str, str]]) -> None:
        """Wake the owners of admitted tickets through their inboxes (one call per owner); the admissions of an
        owner that is gone are revoked."""
        by_instance: dict[str, list[str]] = {}
        for ticket, instance in remote:
            by_instance.setdefault(instance, []).append(ticket)
        for instance, tickets in by_instance.items():
            await self._liveness.wake(key, instance, tickets)

    async def _revoke(self, key: str, ticket: str) -> None:
        """Take back an admission made for a dead instance (unless it picked it up); its token goes on at once."""
        reply = await self._call("revoke", key, [ticket, self.instance, self._pickup_ms])
        self._handoffs(key, reply[2:])
        self._arm(key, int(reply[1]))

    # -- operations ----------------------------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> BaseException:
        """Translate a redis-py error; an outage becomes StoreUnavailable (503), a script bug stays as it is."""
        if isinstance(exc, _UNAVAILABLE) or (
            isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in ("BUSY", "LOADING", "CLUSTERDOWN")
        ):
            error = StoreUnavailable(f"the store {self.uri} cannot be reached: {type(exc).__name__}")
            error.__cause__ = exc
            return error
        return exc

    async def _call(self, script: str, key: str, args: Sequence[Any]) -> Any:
        if script in scripts.BATCHED:
            return await self._batcher.call(script, key_names(key), args)
        try:
            return await self._scripts[script](keys=key_names(key), args=args)
        except Exception as exc:
            raise self._unavailable(exc) from exc

    async def _guard(self, operation: Awaitable[_T]) -> _T:
        try:
            return await operation
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"the store {self.uri} cannot be reached: {type(exc).__name__}") from exc

    async def enter(self, key: str, policy: Policy, ticket: str, owner: str, lease_ttl: float) -> Entry:
        if self.max_keys is not None:
            known = self._known
            if key in known:
                known.move_to_end(key)
            elif await self._over_cap(key):
                return Refused("too_many_keys", 1.0)
            else:
                known[key] = None
                if len(known) > KNOWN_KEYS:
                    known.popitem(last=False)
        lease_ms = round(lease_ttl * 1000)
        self._lease_ms = max(self._lease_ms, lease_ms)
        if self._liveness.needs_refresh(lease_ms):
            await self._liveness.ensure(lease_ms)  # alive before the ticket may wait
        self._local[ticket] = _Local(owner, lease_ttl)
        args = [ticket, self.instance, lease_ms, self._pickup_ms, *_policy_args(policy)]
        try:
            reply = await self._batcher.call("enter", key_names(key), args)
        except BaseException:
            self._local.pop(ticket, None)
            raise
        status, first, second, new_key = int(reply[0]), reply[1], int(reply[2]), int(reply[3])
        if len(reply) > 4:
            self._handoffs(key, reply[4:])
        if new_key:
            self._index_soon(key)
        if status == 1:
            self._local.pop(ticket, None)
            return Admitted(ticket)
        if status == 3:
            self._local.pop(ticket, None)
            return Refused(_text(first), second / 1000)
        self._ensure_inbox()
        self._arm(key, second)
        return Queued(int(first), None if second < 0 else second / 1000)

    def admit_soon(
        self, key: str, policy: Policy, ticket: str, lease_ttl: float, then: Callable[[bool | BaseException], object]
    ) -> bool:
        if self.max_keys is not None:
            if key not in self._known:
                return False  # the cap check is a round trip of its own: `enter` does it
            self._known.move_to_end(key)
        lease_ms = round(lease_ttl * 1000)
        if self._liveness.needs_refresh(lease_ms):
            return False
        self._lease_ms = max(self._lease_ms, lease_ms)
        args = [ticket, self.instance, lease_ms, self._pickup_ms, *_policy_args(policy), "1"]
        self._batcher.call_then("enter", key_names(key), args, functools.partial(self._tried, key, then))
        return True

    def _tried(self, key: str, then: Callable[[bool | BaseException], object], reply: Any) -> None:
        if isinstance(reply, BaseException):
            then(reply)
            return
        if len(reply) > 4:
            self._handoffs(key, reply[4:])
        if int(reply[3]):
            self._index_soon(key)
        then(int(reply[0]) == 1)

    def release_soon(self, key: str, lease: str, then: Callable[[BaseException | None], object]) -> bool:
        self._taken.discard(lease)
        args = [lease, self.instance, self._pickup_ms]
        self._batcher.call_then("release", key_names(key), args, functools.partial(self._released, key, then))
        return True

    def _released(self, key: str, then: Callable[[BaseException | None], object], reply: Any) -> None:
        if isinstance(reply, BaseException):
            then(reply)
            return
        self._after_release(key, reply)
        then(None)

    def _after_release(self, key: str, reply: Any) -> bool:
        if len(reply) > 2:
            self._handoffs(key, reply[2:])
        recheck = int(reply[1])
        if recheck > 0:
            self._arm(key, recheck)
        return bool(reply[0])

    async def _over_cap(self, key: str) -> bool:
        """True when `key` is new and the index of live keys already holds `max_keys` (pruned of expired keys
        at most every PRUNE_EVERY seconds). Approximate: instances check concurrently, and keys this instance
        saw lately (KNOWN_KEYS of them) skip the check even if their state has expired meanwhile."""
        assert self.max_keys is not None
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.scard(INDEX_KEY)
            pipe.exists(key_names(key)[0])
            count, exists = await self._guard(pipe.execute())
        if exists or count < self.max_keys:
            return False
        now = asyncio.get_running_loop().time()
        if now - self._pruned_at < PRUNE_EVERY:
            return True
        self._pruned_at = now
        await self._prune_index()
        return int(await self._guard(self._client.scard(INDEX_KEY))) >= self.max_keys

    async def _prune_index(self) -> None:
        """Drop keys whose state has expired from the index (batches of EXISTS in one round trip each)."""
        batch: list[str] = []
        async for raw in self._scan_index(""):
            batch.append(_text(raw))
            if len(batch) >= 500:
                await self._prune_batch(batch)
                batch = []
        if batch:
            await self._prune_batch(batch)

    async def _prune_batch(self, batch: list[str]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for key in batch:
                names = key_names(key)
                pipe.exists(names[0], names[1], names[3])
            alive = await self._guard(pipe.execute())
        stale = [key for key, count in zip(batch, alive, strict=True) if not count]
        if stale:
            await self._guard(self._client.srem(INDEX_KEY, *stale))

    async def pump(self, key: str, tickets: Sequence[str] = ()) -> PumpResult:
        # An asked ticket found admitted is taken over in the same script, renewed to its full lease TTL.
        local = self._local
        lease_ms = max((round(local[t].lease_ttl * 1000) for t in tickets if t in local), default=self._lease_ms)
        reply = await self._call("pump", key, [self.instance, self._pickup_ms, lease_ms, *tickets])
        recheck, letters = int(reply[0]), _text(reply[1])
        self._handoffs(key, reply[2:])  # first: a ticket this very pump admitted is woken (not taken over)
        statuses: dict[str, TicketStatus] = {}
        for ticket, letter in zip(tickets, letters, strict=True):
            status: TicketStatus = _STATUS[letter]  # type: ignore[assignment]
            statuses[ticket] = status
            if status != "waiting":
                ticket_local = local.pop(ticket, None)
                if status == "admitted" and ticket_local is not None:  # a lost or late wake-up: taken over
                    if len(self._taken) >= _MAX_TAKEN:
                        self._taken.clear()  # a bound: leases released through other instances leave entries
                    self._taken.add(ticket)
        self._arm(key, recheck)
        return PumpResult(statuses, None if recheck < 0 else recheck / 1000)

    async def cancel(self, key: str, ticket: str) -> bool:
        self._local.pop(ticket, None)
        self._taken.discard(ticket)
        reply = await self._call("cancel", key, [ticket, self.instance, self._pickup_ms])
        self._handoffs(key, reply[2:])
        self._arm(key, int(reply[1]))
        return bool(reply[0])

    async def release(self, key: str, lease: str) -> bool:
        self._taken.discard(lease)
        reply = await self._batcher.call("release", key_names(key), [lease, self.instance, self._pickup_ms])
        return self._after_release(key, reply)

    async def renew(self, key: str, leases: Sequence[str], ttl: float) -> list[bool]:
        if not leases:
            return []
        reply = await self._call("renew", key, [round(ttl * 1000), *leases])
        return [bool(flag) for flag in reply]

    async def state(self, key: str) -> KeyState | None:
        reply = await self._call("state", key, [])
        if not int(reply[0]):
            return None
        par, rate, per, max_waiting, max_wait, active, waiting, used, window_start = (int(v) for v in reply[1:10])
        policy = Policy(_num(par), _num(rate), per / 1000, max_waiting, max_wait / 1000)
        return KeyState(
            key=key,
            policy=policy,
            active=active,
            waiting=waiting,
            rate_count=used,
            rate_period_start=window_start / 1000,
            paused=bool(int(reply[10])),
            pinned_parallelism=bool(int(reply[11])),
            pinned_rate=bool(int(reply[12])),
        )

    async def keys(self, prefix: str = "") -> list[str]:
        await self._index_settled()
        found: list[str] = []
        stale: list[str] = []
        async for raw in self._scan_index(prefix):
            key = _text(raw)
            if not key.startswith(prefix):
                continue
            if await self._guard(self._client.exists(*key_names(key)[:2], key_names(key)[3])):
                found.append(key)
            else:
                stale.append(key)
        if stale:
            await self._guard(self._client.srem(INDEX_KEY, *stale))
        return sorted(found)

    async def _scan_index(self, prefix: str) -> AsyncIterator[Any]:
        pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in prefix) + "*"  # glob escapes: \[ \* …
        try:
            async for item in self._client.sscan_iter(INDEX_KEY, match=pattern, count=500):
                yield item
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"the store {self.uri} cannot be reached: {type(exc).__name__}") from exc

    async def set_policy(self, key: str, policy: Policy) -> None:
        await self._steer(key, "set_policy", *_policy_args(policy))
        await self._guard(self._client.sadd(INDEX_KEY, key))

    async def pause(self, key: str) -> None:
        await self._steer(key, "pause")
        await self._guard(self._client.sadd(INDEX_KEY, key))

    async def resume(self, key: str) -> None:
        await self._steer(key, "resume")

    async def pin(
        self, key: str, parallelism: int | None = None, rate: int | None = None, period: float | None = None
    ) -> None:
        if parallelism is not None:
            Policy(parallelism=parallelism)  # validates
        if rate is not None:
            Policy(rate=rate, period=period or 1.0)
        period_ms = "" if period is None else str(round(period * 1000))
        if rate is not None and not period_ms:
            current = await self.state(key)
            period_ms = str(current.policy.period_ms if current else 1000)
        par_text = "" if parallelism is None else str(parallelism)
        await self._steer(key, "pin", par_text, "" if rate is None else str(rate), period_ms)
        await self._guard(self._client.sadd(INDEX_KEY, key))

    async def unpin(self, key: str, parallelism: bool = True, rate: bool = True) -> None:
        await self._steer(key, "unpin", int(parallelism), int(rate))

    async def reset_rate(self, key: str) -> None:
        await self._steer(key, "reset_rate")

    async def _steer(self, key: str, operation: str, *args: Any) -> None:
        reply = await self._call("steer", key, [self.instance, self._pickup_ms, operation, *args])
        self._handoffs(key, reply[1:])
        self._arm(key, int(reply[0]))

    async def in_flight(self) -> int:
        total = 0
        for key in await self.keys():
            state = await self.state(key)
            total += state.active if state else 0
        return total

    async def ping(self) -> None:
        await self._guard(self._client.ping())

    async def close(self) -> None:
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        was_alive = await self._liveness.stop()
        if self._inbox_task is not None:
            self._inbox_task.cancel()
        if self._inbox_client is not None:
            # redis-py's cluster client may sit out a cancelled BLPOP: closing its connection ends it at once
            with contextlib.suppress(*_UNAVAILABLE):
                await self._inbox_client.aclose()
            self._inbox_client = None
        if self._inbox_task is not None:
            await asyncio.wait({self._inbox_task}, timeout=1.0)
            self._inbox_task = None
        self._flush_index()  # keys created this tick: their SADD goes out now, not after the client closed
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._batcher.drain()
        await self._batcher.aclose()
        if was_alive:
            with contextlib.suppress(StoreUnavailable):
                await self._liveness.forget()
        with contextlib.suppress(*_UNAVAILABLE):
            await self._client.aclose()
        self._listeners.clear()

    def _arm(self, key: str, recheck_ms: int) -> None:
        """One timer per key for the instant the rate window reopens or a lease expires: then pump."""
        if recheck_ms <= 0:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + recheck_ms / 1000
        current = self._timers.get(key)
        if current is not None:
            if current[0] <= when:
                return
            current[1].cancel()
        self._timers[key] = (when, loop.call_at(when, self._on_timer, key))

    def _on_timer(self, key: str) -> None:
        del self._timers[key]
        self._spawn(self.pump(key))

    def _index_soon(self, key: str) -> None:
        """Add `key` to the index of live keys. The new keys of one tick share one SADD: a burst of new keys must
        not take a pooled connection each (redis-py's pool refuses more than 100, and a lost SADD hides the key
        from the admin API's listing)."""
        if not self._unindexed:
            asyncio.get_running_loop().call_soon(self._flush_index)
        self._unindexed.add(key)

    def _flush_index(self) -> None:
        keys, self._unindexed = list(self._unindexed), set()
        if keys:
            task = self._spawn(self._guard(self._client.sadd(INDEX_KEY, *keys)))
            self._indexing.add(task)
            task.add_done_callback(self._indexing.discard)

    async def _index_settled(self) -> None:
        """Read your own writes: the keys this instance created are in the index before it is read."""
        self._flush_index()
        if self._indexing:
            await asyncio.gather(*self._indexing, return_exceptions=True)

    def _spawn(self, operation: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(_quietly(operation))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


class RedisClusterStore(RedisStore):
    """`redis+cluster://host:port[,host:port…]`: the same scripts; only the client differs, and batches are
    grouped by hash slot."""

    def _make_batcher(self) -> ScriptBatcher:
        batch = self._client.register_script(scripts.batch_script())
        return RedisPyBatcher(self._scripts, batch, lambda name: key_slot(name.encode()), self._unavailable)

    def _make_client(self, socket_timeout: float) -> Any:
        uri = self.uri
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in uri.nodes],
            username=uri.username,
            password=uri.password,
            ssl=uri.tls,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.01), 1),
        )


@lru_cache(maxsize=1024)  # rules and header policies repeat: Policy is frozen and hashable
def _policy_args(policy: Policy) -> tuple[str, ...]:
    return (
        "-1" if policy.parallelism is None else str(policy.parallelism),
        "-1" if policy.rate is None else str(policy.rate),
        str(policy.period_ms),
        str(policy.max_waiting),
        str(round(policy.max_wait * 1000)),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _quietly(operation: Awaitable[Any]) -> Any:
    try:
        return await operation
    except StoreUnavailable:
        return None
