"""The store contract: the atomic half of flow control, shared by the memory and Redis stores.

A store keeps, per key, the policy, the live leases, the log of recent starts and the FIFO waitlist. Every
operation on one key is atomic. Ticket ids are chosen by the caller and double as lease ids, so a re-sent
operation (after a connection error) is idempotent.

Wake-ups: when a release, a policy change or a `pump` admits waiting tickets, the store calls the admission
callback registered by each ticket's owner (`subscribe`); it never needs to be polled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ..policy import Policy

# Called with (key, ticket) when a ticket owned by the subscriber has been admitted: its lease id is the ticket.
AdmitCallback = Callable[[str, str], None]
TicketStatus = Literal["waiting", "admitted", "gone"]


@dataclass(frozen=True, slots=True)
class Admitted:
    """The ticket holds a lease (its id is the ticket id) and may start now."""

    lease: str


@dataclass(frozen=True, slots=True)
class Queued:
    """The ticket waits at `position` (1 = head).

    `recheck_after` (seconds) is when the store may admit without any release: the rate window reopens or a
    lease expires. None means only a release, resume or policy change can admit it (and those wake the owner).
    """

    position: int
    recheck_after: float | None


@dataclass(frozen=True, slots=True)
class Refused:
    """The ticket was not queued: `reason` is waitlist_full or too_many_keys."""

    reason: str
    retry_after: float


Entry = Admitted | Queued | Refused


@dataclass(frozen=True, slots=True)
class PumpResult:
    """What `pump` found: the status of the asked tickets and when to look again (see `Queued`)."""

    statuses: dict[str, TicketStatus]
    recheck_after: float | None


@dataclass(frozen=True, slots=True)
class KeyState:
    """A snapshot of one key, as the admin API shows it."""

    key: str
    policy: Policy
    active: int
    waiting: int
    rate_count: int  # starts in the current window; 0 when the key has no rate limit (nothing is logged)
    rate_period_start: float  # unix seconds: start of the current sliding window
    paused: bool
    pinned_parallelism: bool
    pinned_rate: bool


class Store(ABC):
    """One async interface over the memory and Redis stores (see the module docstring)."""

    #: True when wake-ups can be lost (another process admitted a ticket and died before telling its
    #: owner); the engine then re-checks its waiting tickets on a slow safety timer.
    wakeups_can_be_lost: bool = False
    #: True when `admit_now` can admit (it answers without I/O); False when it always answers False.
    admits_at_once: bool = False

    @abstractmethod
    def subscribe(self, owner: str, on_admit: AdmitCallback) -> None:
        """Deliver admissions of tickets entered by `owner` to `on_admit` from now on."""

    @abstractmethod
    def unsubscribe(self, owner: str) -> None:
        """Stop delivering admissions to `owner`."""

    @abstractmethod
    async def enter(self, key: str, policy: Policy, ticket: str, owner: str, lease_ttl: float) -> Entry:
        """Admit `ticket` now, queue it at the tail, or refuse it.

        `policy` becomes the key's policy unless the key is pinned (pinned fields win) and applies to waiting
        tickets at once. A ticket is admitted at once only when nothing waits ahead of it.
        """

    def admit_now(self, key: str, policy: Policy, ticket: str, lease_ttl: float) -> bool:
        """Admit `ticket` at once, with no I/O, if it may start now with nothing waiting ahead; False leaves no
        trace of it (the caller then `enter`s it). Stores that need I/O to decide always answer False."""
        return False

    def release_now(self, key: str, lease: str) -> bool | None:
        """`release` with no I/O, for stores that can; None when this store cannot (then `release`)."""
        return None

    def admit_soon(
        self, key: str, policy: Policy, ticket: str, lease_ttl: float, then: Callable[[bool | BaseException], object]
    ) -> bool:
        """`admit_now` for a store that needs a round trip: the answer comes as `then(admitted)` from a callback
        (no task), or `then(error)`. False when this store cannot ask that way now (then `enter`)."""
        return False

    def release_soon(self, key: str, lease: str, then: Callable[[BaseException | None], object]) -> bool:
        """`release` answered by `then(None)`, or `then(error)`, from a callback (no task); False when this store
        cannot (then `release`)."""
        return False

    @abstractmethod
    async def pump(self, key: str, tickets: Sequence[str] = ()) -> PumpResult:
        """Reap expired leases and tickets, admit what may go now, and report the status of `tickets`."""

    @abstractmethod
    async def cancel(self, key: str, ticket: str) -> bool:
        """Withdraw `ticket`: remove it from the waitlist, or release its lease if it was already admitted.

        Returns True when the ticket had been admitted (its lease is now released).
        """

    @abstractmethod
    async def release(self, key: str, lease: str) -> bool:
        """Free a lease and admit the next waiters in the same atomic step; False if the lease is unknown."""

    @abstractmethod
    async def renew(self, key: str, leases: Sequence[str], ttl: float) -> list[bool]:
        """Push the expiry of `leases` to now + `ttl`; one flag per lease (False: unknown or expired)."""

    @abstractmethod
    async def state(self, key: str) -> KeyState | None:
        """The key's state, or None when the store knows nothing of it."""

    @abstractmethod
    async def keys(self, prefix: str = "") -> list[str]:
        """Live keys starting with `prefix`, sorted."""

    @abstractmethod
    async def set_policy(self, key: str, policy: Policy) -> None:
        """Make `policy` the key's requested policy (pins still win); waiting tickets see it at once."""

    @abstractmethod
    async def pause(self, key: str) -> None:
        """Stop admissions of `key`; its waitlist is kept."""

    @abstractmethod
    async def resume(self, key: str) -> None:
        """Restart admissions of `key`, admitting its waitlist in order."""

    @abstractmethod
    async def pin(
        self, key: str, parallelism: int | None = None, rate: int | None = None, period: float | None = None
    ) -> None:
        """Override the parallelism and/or rate (with period) of `key` until `unpin`."""

    @abstractmethod
    async def unpin(self, key: str, parallelism: bool = True, rate: bool = True) -> None:
        """Drop the operator override; the key's latest requested policy applies again."""

    @abstractmethod
    async def reset_rate(self, key: str) -> None:
        """Forget the key's recent starts: a fresh rate window begins now."""

    @abstractmethod
    async def in_flight(self) -> int:
        """Live leases over all keys."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and background tasks."""
