"""FlowController: "may this delivery go now, and tell me when it may".

The store decides atomically and wakes us; the controller waits. A queued ticket waits on a future that the
store's admission callback resolves (no polling); the store itself arms one timer per key for the instant the
rate window reopens or a lease expires. On stores where a wake-up can be lost (Redis, when another instance
dies between admitting our ticket and telling us), one slow safety re-check per key with waiters asks the
store about our tickets. Leases held by this controller are renewed in one batch per key every `lease_ttl/3`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .errors import InvalidFlowControl, Rejected, StoreUnavailable
from .policy import Policy, validate_key
from .stores.base import Admitted, Refused, Store

DEFAULT_LEASE_TTL = 60.0
DEFAULT_SAFETY_INTERVAL = 5.0
RETRY_FIRST = 0.5  # seconds before a failed release or withdrawal is tried again (doubling, up to RETRY_MAX)
RETRY_MAX = 5.0

_Freeing = Callable[[str, str], Awaitable[object]]  # store.release or store.cancel


@dataclass(frozen=True, slots=True)
class Lease:
    """A held parallelism token of `key`. `waited` is the seconds the delivery spent waiting."""

    key: str
    id: str
    waited: float = 0.0

    @property
    def token(self) -> str:
        """The lease's public name (`Flow-Control-Lease`), enough to release it from anywhere."""
        return f"{self.id}.{_encoded_key(self.key)}"

    @classmethod
    def from_token(cls, token: str) -> Lease:
        """Parse a public lease name; InvalidFlowControl when it is not one."""
        lease_id, _, encoded = token.partition(".")
        try:
            key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise InvalidFlowControl(f'"{token[:80]}" is not a Flowgate lease') from None
        if not lease_id or not key or not lease_id.isalnum():
            raise InvalidFlowControl(f'"{token[:80]}" is not a Flowgate lease')
        return cls(validate_key(key), lease_id)


class FlowController:
    """Admission, waiting, release and renewal of leases over one `Store`."""

    def __init__(
        self,
        store: Store,
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        safety_interval: float = DEFAULT_SAFETY_INTERVAL,
    ) -> None:
        self.store = store
        self.lease_ttl = lease_ttl
        self.safety_interval = safety_interval
        self.owner = os.urandom(8).hex()
        self._ids = _RandomIds()
        self._waiters: dict[str, asyncio.Future[None] | None] = {}  # None: enter not answered yet
        self._early: set[str] = set()
        self._waiting_by_key: dict[str, set[str]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._held: dict[str, str] = {}  # lease id -> key, renewed while held
        self._renewer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[object]] = set()
        self._retries: set[asyncio.Task[None]] = set()  # releases and withdrawals waiting for the store
        store.subscribe(self.owner, self._on_admit)

    def __repr__(self) -> str:
        return f"FlowController(store={self.store!r}, held={len(self._held)}, waiting={len(self._waiters)})"

    @property
    def held(self) -> int:
        """Leases this controller holds and renews."""
        return len(self._held)

    @property
    def waiting(self) -> int:
        """Deliveries of this controller waiting for a token."""
        return len(self._waiters)

    async def acquire(self, key: str, policy: Policy) -> Lease:
        """Wait for a lease of `key` under `policy`.

        Raises Rejected (waitlist_full, wait_timeout, too_many_keys) or StoreUnavailable. When the calling
        task is cancelled while waiting (client gone), the ticket is withdrawn and never admitted later.
        """
        ticket = self._ids.next()
        started = time.monotonic()
        self._waiters[ticket] = None  # before enter: the wake-up may come before enter's reply
        try:
            entry = await self.store.enter(key, policy, ticket, self.owner, self.lease_ttl)
        except BaseException:
            self._waiters.pop(ticket, None)
            self._early.discard(ticket)
            self._withdraw(key, ticket)
            raise
        if isinstance(entry, Admitted):
            self._waiters.pop(ticket, None)
            return self._hold(key, ticket, started)
        if isinstance(entry, Refused):
            self._waiters.pop(ticket, None)
            raise Rejected(entry.reason, _refusal_message(entry.reason, key), entry.retry_after)
        future = self._waiters[ticket] = asyncio.get_running_loop().create_future()
        if ticket in self._early:  # admitted by another instance before enter's reply reached us
            self._early.discard(ticket)
            future.set_result(None)
        self._waiting_by_key.setdefault(key, set()).add(ticket)
        self._schedule(key)
        try:
            # not asyncio.timeout: a compiled (mypyc) coroutine that it times out corrupts memory (python/mypy#12867)
            await asyncio.wait((future,), timeout=policy.max_wait)
        except asyncio.CancelledError:
            self._forget_ticket(key, ticket)
            self._withdraw(key, ticket)
            raise
        except BaseException:
            self._forget_ticket(key, ticket)
            raise
        self._forget_ticket(key, ticket)
        if not future.done():
            await self._cancel(key, ticket)
            raise Rejected(
                "wait_timeout",
                f"waited {policy.max_wait:g}s for a token of key {key!r} without getting one",
                max(1.0, policy.max_wait),
            )
        if future.cancelled():  # the controller is closing
            self._withdraw(key, ticket)
        future.result()  # raises what ended the wait, when it was not an admission
        return self._hold(key, ticket, started)

    def has_waiters(self, key: str) -> bool:
        """Deliveries of this controller wait for a token of `key` (a newcomer cannot go at once)."""
        return key in self._waiting_by_key

    def try_acquire(self, key: str, policy: Policy) -> Lease | None:
        """A lease of `key` at once, with no waiting and no I/O, when the store can grant one that way (the
        memory store, nothing waiting, within the limits); else None, with nothing changed: then `acquire`."""
        ticket = self._ids.next()
        if not self.store.admit_now(key, policy, ticket, self.lease_ttl):
            return None
        return self._hold(key, ticket, time.monotonic())

    def try_acquire_soon(self, key: str, policy: Policy, then: Callable[[Lease | None], object]) -> bool:
        """`try_acquire` for a store that needs a round trip (Redis): `then(lease)`, or `then(None)` when the
        delivery may not go at once or the store failed (nothing is left behind: then `acquire`), is called from
        a callback, with no task. False when the store cannot ask that way now (then `acquire`)."""
        ticket = self._ids.next()
        started = time.monotonic()

        def answered(result: bool | BaseException) -> None:
            if result is True:
                then(self._hold(key, ticket, started))
                return
            if isinstance(result, BaseException):  # it may have been admitted before the reply was lost
                self._withdraw(key, ticket)
            then(None)

        return self.store.admit_soon(key, policy, ticket, self.lease_ttl, answered)

    def release_now(self, lease: Lease) -> bool | None:
        """`release` with no I/O when the store can (the memory store); None when it cannot (then `release`)."""
        self._held.pop(lease.id, None)
        return self.store.release_now(lease.key, lease.id)

    def release_nowait(self, lease: Lease) -> None:
        """Release without waiting for the store, and without a task when the store allows (a failed release is
        retried in the background, like `release`'s)."""
        if self.release_now(lease) is not None:
            return
        key, lease_id = lease.key, lease.id

        def released(error: BaseException | None) -> None:
            if isinstance(error, StoreUnavailable):
                self._retry(self.store.release, key, lease_id)

        if not self.store.release_soon(key, lease_id, released):
            self.release_soon(lease)

    async def release(self, lease: Lease) -> bool:
        """Free the token (it goes to the next waiter at once); False if the lease was unknown or expired.

        StoreUnavailable when the store is down: the release is then retried in the background."""
        self._held.pop(lease.id, None)
        try:
            return await self.store.release(lease.key, lease.id)
        except StoreUnavailable:
            self._retry(self.store.release, lease.key, lease.id)
            raise

    def release_soon(self, lease: Lease) -> None:
        """Release in the background (for paths that cannot await, such as a cancelled task)."""
        self._held.pop(lease.id, None)
        self._spawn(self._free(self.store.release, lease.key, lease.id))

    def detach(self, lease: Lease) -> None:
        """Stop renewing `lease`: its holder reports completion later or lets it expire after lease_ttl."""
        self._held.pop(lease.id, None)

    async def renew(self, lease: Lease, ttl: float | None = None) -> bool:
        """Push the lease's expiry to now + ttl (default lease_ttl); False if unknown or expired."""
        (renewed,) = await self.store.renew(lease.key, [lease.id], ttl or self.lease_ttl)
        return renewed

    def hold(self, key: str, policy: Policy) -> Holding:
        """`async with controller.hold(key, policy) as lease:` acquire, and release on every exit path."""
        return Holding(self, key, policy)

    async def close(self) -> None:
        """Stop timers and the renewer, release held leases, withdraw waiting tickets."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for future in self._waiters.values():
            if future is not None and not future.done():
                future.cancel()
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        for task in self._retries:
            task.cancel()
        held, self._held = list(self._held.items()), {}
        with contextlib.suppress(StoreUnavailable):
            await asyncio.gather(*(self.store.release(key, lease) for lease, key in held))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.store.unsubscribe(self.owner)

    # -- admission callbacks and timers ------------------------------------------------------------------------

    def _on_admit(self, key: str, ticket: str) -> None:
        if ticket in self._held:
            return  # a second wake-up for a lease we already hold (the safety re-check found it first)
        if ticket not in self._waiters:
            # Its delivery is gone (timed out or cancelled while the admission was on its way): free the token.
            self._spawn(self._free(self.store.release, key, ticket))
            return
        future = self._waiters[ticket]
        if future is None:
            self._early.add(ticket)
        elif not future.done():
            future.set_result(None)

    def _schedule(self, key: str) -> None:
        """The slow safety re-check, on stores where a wake-up can be lost. Time-based admissions (the rate
        window reopening, a lease expiring) are the store's own timer's job."""
        if not self.store.wakeups_can_be_lost:
            return
        if key not in self._timers:
            self._timers[key] = asyncio.get_running_loop().call_later(self.safety_interval, self._on_timer, key)

    def _on_timer(self, key: str) -> None:
        self._timers.pop(key, None)
        if self._waiting_by_key.get(key):
            self._spawn(self._recheck(key))

    async def _recheck(self, key: str) -> None:
        tickets = list(self._waiting_by_key.get(key, ()))
        if not tickets:
            return
        try:
            statuses = (await self.store.pump(key, tickets)).statuses
        except StoreUnavailable:
            statuses = {}
        for ticket, status in statuses.items():
            future = self._waiters.get(ticket)
            if future is None or future.done():
                continue
            if status == "admitted":
                future.set_result(None)
            elif status == "gone":  # not withdrawn by us, not admitted: the store lost it (a restart, a failover)
                future.set_exception(
                    StoreUnavailable(f"the store lost the waiting request's ticket of key {key!r}; try again")
                )
        if self._waiting_by_key.get(key):
            self._schedule(key)

    # -- helpers -----------------------------------------------------------------------------------------------

    def _hold(self, key: str, lease_id: str, started: float) -> Lease:
        self._held[lease_id] = key
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_held())
        return Lease(key, lease_id, time.monotonic() - started)

    async def _renew_held(self) -> None:
        try:
            while self._held:
                await asyncio.sleep(self.lease_ttl / 3)
                by_key: dict[str, list[str]] = {}
                for lease, key in list(self._held.items()):
                    by_key.setdefault(key, []).append(lease)
                for key, leases in by_key.items():
                    with contextlib.suppress(StoreUnavailable):
                        await self.store.renew(key, leases, self.lease_ttl)
        finally:
            if self._renewer is asyncio.current_task():
                self._renewer = None

    def _forget_ticket(self, key: str, ticket: str) -> None:
        self._waiters.pop(ticket, None)
        tickets = self._waiting_by_key.get(key)
        if tickets is not None:
            tickets.discard(ticket)
            if not tickets:
                del self._waiting_by_key[key]
                timer = self._timers.pop(key, None)
                if timer is not None:
                    timer.cancel()

    async def _cancel(self, key: str, ticket: str) -> None:
        try:
            await asyncio.shield(self.store.cancel(key, ticket))
        except StoreUnavailable:
            self._retry(self.store.cancel, key, ticket)

    async def _free(self, operation: _Freeing, key: str, id_: str) -> None:
        try:
            await operation(key, id_)
        except StoreUnavailable:
            self._retry(operation, key, id_)

    def _retry(self, operation: _Freeing, key: str, id_: str) -> None:
        """A release or withdrawal the store could not take (down or frozen) is tried again, with backoff, until
        it goes through or `lease_ttl` has passed (what it frees has expired by then). Found by the Redis freeze
        test: a release sent while Redis is frozen may never reach it (redis-py's connection set-up times out
        first), and a frozen Redis that resumes still runs the `enter` of a request that was answered 503
        meanwhile; without the retry, those tokens stayed taken for a whole `lease_ttl`."""
        task = asyncio.get_running_loop().create_task(self._retrying(operation, key, id_))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retrying(self, operation: _Freeing, key: str, id_: str) -> None:
        deadline = time.monotonic() + self.lease_ttl
        delay = RETRY_FIRST
        while time.monotonic() + delay < deadline:
            await asyncio.sleep(delay)
            try:
                await operation(key, id_)
                return
            except StoreUnavailable:
                delay = min(delay * 2, RETRY_MAX)

    def _withdraw(self, key: str, ticket: str) -> None:
        self._spawn(self._cancel(key, ticket))

    def _spawn(self, operation: Awaitable[object]) -> None:
        task = asyncio.get_running_loop().create_task(_quietly(operation))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class Holding:
    """`FlowController.hold`'s context (a class: the compiled build cannot compile an async generator)."""

    def __init__(self, controller: FlowController, key: str, policy: Policy) -> None:
        self.controller = controller
        self.key = key
        self.policy = policy
        self.lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self.lease = await self.controller.acquire(self.key, self.policy)
        return self.lease

    async def __aexit__(self, *exc_info: object) -> None:
        lease = self.lease
        if lease is not None and lease.id in self.controller._held:
            with contextlib.suppress(StoreUnavailable):  # the lease then expires by itself after lease_ttl
                await asyncio.shield(self.controller.release(lease))


async def _quietly(operation: Awaitable[object]) -> object:
    """Run a background store operation; a store outage only delays it (leases and tickets expire)."""
    try:
        return await operation
    except StoreUnavailable:
        return None


@functools.lru_cache(maxsize=4096)
def _encoded_key(key: str) -> str:
    """The key part of a lease token (a hot key's is worked out once)."""
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


class _RandomIds:
    """Unguessable ticket and lease ids (96 random bits, hex), drawn from the OS in blocks: one system call per
    256 ids instead of one per delivery."""

    __slots__ = ("_block", "_pos")

    SIZE = 24  # hex digits
    BLOCK = 256

    def __init__(self) -> None:
        self._block = ""
        self._pos = 0

    def next(self) -> str:
        pos = self._pos
        if pos >= len(self._block):
            self._block = os.urandom(self.SIZE // 2 * self.BLOCK).hex()
            pos = 0
        self._pos = pos + self.SIZE
        return self._block[pos : pos + self.SIZE]


def _refusal_message(reason: str, key: str) -> str:
    if reason == "waitlist_full":
        return f"the waitlist of key {key!r} is full"
    if reason == "too_many_keys":
        return "the gateway tracks too many flow-control keys; try again later"
    return f"key {key!r} refused the delivery ({reason})"
