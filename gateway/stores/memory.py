"""The embedded store: every key's state in this process, every operation atomic by construction.

asyncio runs one callback at a time and no method here awaits, so each operation is a critical section.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..policy import Policy
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

_SWEEP_EVERY = 1024  # new keys between two sweeps of idle keys (keeps the sweep amortised O(1))


@dataclass(slots=True)
class _Ticket:
    owner: str
    deadline: float
    lease_ttl: float


@dataclass(slots=True)
class _Key:
    requested: Policy
    policy: Policy  # requested, with the operator's pins on top
    pin_parallelism: int | None = None
    pin_rate: tuple[int, float] | None = None
    paused: bool = False
    leases: dict[str, float] = field(default_factory=dict)  # lease -> expires at
    next_expiry: float = float("inf")  # no lease expires before this (renewals only push expiries later)
    starts: deque[float] = field(default_factory=deque)  # start times, oldest first (only when rate-limited)
    waiting: OrderedDict[str, _Ticket] = field(default_factory=OrderedDict)
    window_reset_at: float = float("-inf")
    timer: asyncio.Handle | None = None  # re-admits when the rate window reopens or a lease expires
    timer_at: float = float("inf")  # when it fires (uvloop's handles for delays under 0.5 ms have no when())

    def request(self, policy: Policy) -> bool:
        """Make `policy` the requested one; True when the effective policy changed."""
        if policy is self.requested or policy == self.requested:
            return False
        self.requested = policy
        return self.repin()

    def repin(self) -> bool:
        policy = self.requested
        if self.pin_parallelism is not None:
            policy = policy.replace(parallelism=self.pin_parallelism)
        if self.pin_rate is not None:
            policy = policy.replace(rate=self.pin_rate[0], period=self.pin_rate[1])
        changed = policy != self.policy
        self.policy = policy
        return changed

    def idle(self, now: float) -> bool:
        self.trim(now)
        pinned = self.pin_parallelism is not None or self.pin_rate is not None
        return not (self.leases or self.waiting or self.starts or self.paused or pinned)

    def trim(self, now: float) -> None:
        """Drop expired leases and starts that left the sliding window."""
        if now >= self.next_expiry:
            leases = self.leases
            for lease in [lease for lease, expires in leases.items() if expires <= now]:
                del leases[lease]
            self.next_expiry = min(leases.values(), default=float("inf"))
        starts = self.starts
        if starts:
            horizon = now - self.policy.period
            while starts and starts[0] <= horizon:
                starts.popleft()

    def blocked_for(self, now: float) -> float | None:
        """0 when a start may happen now; else seconds until the rate window or a lease expiry may allow
        one, or None when only a release/resume can."""
        policy = self.policy
        if self.paused or policy.rate == 0:
            return None
        wait = 0.0
        if policy.parallelism is not None and len(self.leases) >= policy.parallelism:
            wait = self.next_expiry - now  # a lower bound: a timer that fires early just looks again
        if policy.rate is not None and len(self.starts) >= policy.rate:
            wait = max(wait, self.starts[len(self.starts) - policy.rate] + policy.period - now)
        return max(wait, 0.001) if wait > 0 else 0.0

    def start(self, lease: str, ttl: float, now: float) -> None:
        expires = now + ttl
        self.leases[lease] = expires
        if expires < self.next_expiry:
            self.next_expiry = expires
        if self.policy.rate is not None:
            self.starts.append(now)


class MemoryStore(Store):
    """In-process store: `memory://`. One process only; limits are not shared between processes."""

    admits_at_once = True

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int | None = None) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._keys: dict[str, _Key] = {}
        self._listeners: dict[str, AdmitCallback] = {}
        self._new_keys = 0

    def __repr__(self) -> str:
        return f"MemoryStore(keys={len(self._keys)})"

    def subscribe(self, owner: str, on_admit: AdmitCallback) -> None:
        self._listeners[owner] = on_admit

    def unsubscribe(self, owner: str) -> None:
        self._listeners.pop(owner, None)

    async def enter(self, key: str, policy: Policy, ticket: str, owner: str, lease_ttl: float) -> Entry:
        now = self._clock()
        state = self._keys.get(key) or self._new_key(key, policy, now)
        if state is None:
            return Refused("too_many_keys", 1.0)
        if ticket in state.leases:
            return Admitted(ticket)
        if ticket in state.waiting:
            return Queued(list(state.waiting).index(ticket) + 1, state.blocked_for(now))
        if self._may_start(key, state, policy, now):
            state.start(ticket, lease_ttl, now)
            return Admitted(ticket)
        effective = state.policy
        if len(state.waiting) >= effective.max_waiting:
            return Refused("waitlist_full", _retry_after(state.blocked_for(now)))
        state.waiting[ticket] = _Ticket(owner, now + effective.max_wait, lease_ttl)
        blocked_for = state.blocked_for(now)
        self._arm(key, state, blocked_for)
        return Queued(len(state.waiting), blocked_for)

    def admit_now(self, key: str, policy: Policy, ticket: str, lease_ttl: float) -> bool:
        now = self._clock()
        state = self._keys.get(key) or self._new_key(key, policy, now)
        if state is None or not self._may_start(key, state, policy, now):
            return False
        state.start(ticket, lease_ttl, now)
        return True

    def _new_key(self, key: str, policy: Policy, now: float) -> _Key | None:
        """A new key's state, or None when `max_keys` live keys leave no room for it."""
        if self._max_keys is not None and len(self._keys) >= self._max_keys:
            self._sweep(now)
            if len(self._keys) >= self._max_keys:
                return None
        state = self._keys[key] = _Key(policy, policy)
        self._new_keys += 1
        if self._new_keys % _SWEEP_EVERY == 0:
            self._sweep(now)
            self._keys[key] = state
        return state

    def _may_start(self, key: str, state: _Key, policy: Policy, now: float) -> bool:
        """Apply `policy`, reap, admit waiters it lets go; True when a newcomer may start now."""
        changed = state.request(policy)
        state.trim(now)
        if changed and state.waiting:
            self._admit_waiting(key, state, now)
        return not state.waiting and state.blocked_for(now) == 0.0

    async def pump(self, key: str, tickets: Sequence[str] = ()) -> PumpResult:
        now = self._clock()
        state = self._keys.get(key)
        if state is None:
            return PumpResult({ticket: "gone" for ticket in tickets}, None)
        state.trim(now)
        self._admit_waiting(key, state, now)
        statuses: dict[str, TicketStatus] = {}
        for ticket in tickets:
            if ticket in state.waiting:
                statuses[ticket] = "waiting"
            else:
                statuses[ticket] = "admitted" if ticket in state.leases else "gone"
        recheck = state.blocked_for(now) if state.waiting else None
        self._forget_if_idle(key, state, now)
        return PumpResult(statuses, recheck)

    async def cancel(self, key: str, ticket: str) -> bool:
        state = self._keys.get(key)
        if state is None:
            return False
        now = self._clock()
        if state.waiting.pop(ticket, None) is not None:
            # Removing a head ticket blocked by nothing but itself can let the next one go.
            self._admit_waiting(key, state, now)
            self._forget_if_idle(key, state, now)
            return False
        return self.release_now(key, ticket)

    async def release(self, key: str, lease: str) -> bool:
        return self.release_now(key, lease)

    def release_now(self, key: str, lease: str) -> bool:
        state = self._keys.get(key)
        if state is None:
            return False
        now = self._clock()
        state.trim(now)
        found = state.leases.pop(lease, None) is not None
        if state.waiting:
            self._admit_waiting(key, state, now)
        return found  # an idle key stays until a sweep: hot keys are not rebuilt on every delivery

    async def renew(self, key: str, leases: Sequence[str], ttl: float) -> list[bool]:
        state = self._keys.get(key)
        if state is None:
            return [False] * len(leases)
        now = self._clock()
        state.trim(now)
        renewed = []
        for lease in leases:
            live = lease in state.leases
            if live:
                state.leases[lease] = now + ttl
                state.next_expiry = min(state.next_expiry, now + ttl)
            renewed.append(live)
        return renewed

    async def state(self, key: str) -> KeyState | None:
        state = self._keys.get(key)
        if state is None:
            return None
        now = self._clock()
        if state.idle(now):  # trims; an idle key's state has expired, as it does in Redis
            del self._keys[key]
            return None
        policy = state.policy
        window_start = max(now - policy.period, state.window_reset_at)
        return KeyState(
            key=key,
            policy=policy,
            active=len(state.leases),
            waiting=len(state.waiting),
            rate_count=len(state.starts),
            rate_period_start=time.time() - (now - window_start),
            paused=state.paused,
            pinned_parallelism=state.pin_parallelism is not None,
            pinned_rate=state.pin_rate is not None,
        )

    async def keys(self, prefix: str = "") -> list[str]:
        self._sweep(self._clock())
        return sorted(key for key in self._keys if key.startswith(prefix))

    async def set_policy(self, key: str, policy: Policy) -> None:
        state = self._key(key, policy)
        state.request(policy)
        self._admit_waiting(key, state, self._clock())

    async def pause(self, key: str) -> None:
        self._key(key).paused = True

    async def resume(self, key: str) -> None:
        state = self._key(key)
        state.paused = False
        self._admit_waiting(key, state, self._clock())

    async def pin(
        self, key: str, parallelism: int | None = None, rate: int | None = None, period: float | None = None
    ) -> None:
        state = self._key(key)
        if parallelism is not None:
            Policy(parallelism=parallelism)  # validates
            state.pin_parallelism = parallelism
        if rate is not None:
            pinned = Policy(rate=rate, period=period or state.requested.period)
            assert pinned.rate is not None
            state.pin_rate = (pinned.rate, pinned.period)
        state.repin()
        self._admit_waiting(key, state, self._clock())

    async def unpin(self, key: str, parallelism: bool = True, rate: bool = True) -> None:
        state = self._keys.get(key)
        if state is None:
            return
        if parallelism:
            state.pin_parallelism = None
        if rate:
            state.pin_rate = None
        state.repin()
        now = self._clock()
        self._admit_waiting(key, state, now)
        self._forget_if_idle(key, state, now)

    async def reset_rate(self, key: str) -> None:
        state = self._keys.get(key)
        if state is None:
            return
        now = self._clock()
        state.starts.clear()
        state.window_reset_at = now
        self._admit_waiting(key, state, now)

    async def in_flight(self) -> int:
        now = self._clock()
        total = 0
        for state in self._keys.values():
            state.trim(now)
            total += len(state.leases)
        return total

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._listeners.clear()
        for state in self._keys.values():
            if state.timer is not None:
                state.timer.cancel()

    def _key(self, key: str, policy: Policy | None = None) -> _Key:
        state = self._keys.get(key)
        if state is None:
            policy = policy or Policy()
            state = self._keys[key] = _Key(policy, policy)
        return state

    def _admit_waiting(self, key: str, state: _Key, now: float) -> None:
        """Admit head tickets while a token and a rate slot are free; wake their owners."""
        state.trim(now)  # blocked_for trusts next_expiry, which is stale once a renewed lease passes it
        waiting = state.waiting
        admitted: list[tuple[str, str]] = []
        while waiting:
            ticket, entry = next(iter(waiting.items()))
            if entry.deadline <= now:  # its owner has given up (or is gone): never admit it
                del waiting[ticket]
                continue
            if state.blocked_for(now) != 0.0:
                break
            del waiting[ticket]
            state.start(ticket, entry.lease_ttl, now)
            admitted.append((ticket, entry.owner))
        for ticket, owner in admitted:
            listener = self._listeners.get(owner)
            if listener is not None:
                listener(key, ticket)
        if waiting:
            self._arm(key, state, state.blocked_for(now))

    def _arm(self, key: str, state: _Key, delay: float | None) -> None:
        """One timer per key for the instant the window reopens or a lease expires (never a poll)."""
        if not delay:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if state.timer is not None:
            if state.timer_at <= when:
                return
            state.timer.cancel()
        state.timer = loop.call_at(when, self._on_timer, key)
        state.timer_at = when

    def _on_timer(self, key: str) -> None:
        state = self._keys.get(key)
        if state is not None:
            state.timer = None
            self._admit_waiting(key, state, self._clock())

    def _forget_if_idle(self, key: str, state: _Key, now: float) -> None:
        if state.idle(now):
            del self._keys[key]

    def _sweep(self, now: float) -> None:
        for key in [key for key, state in self._keys.items() if state.idle(now)]:
            del self._keys[key]


def _retry_after(blocked_for: float | None) -> float:
    return max(1.0, blocked_for or 1.0)
