"""Random enter/cancel/release/renew/expire/pause/resume sequences by three owners on the Store API, checking the
invariants after every step: live leases <= parallelism, starts in any window <= rate, FIFO per key, no ticket
lost (each is waiting, admitted, cancelled, refused, or gone only after its deadline).

The memory store runs on an event loop whose clock the test drives (its timers fire when the test's clock
passes them), so every check is exact. Redis runs in real time with small settings and two store objects
(two instances: admissions reach the other one through its inbox); there the checks use lower bounds on the
time of each event and the store's own counts where client-side times cannot be exact.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway import Policy, Store, open_store
from gateway.stores import Admitted, MemoryStore, Queued, Refused
from tests import store_fixtures
from tests.helpers import max_starts_in_window

store_uri = store_fixtures.store_uri

OWNERS = ("owner-a", "owner-b", "owner-c")
KEY_NAMES = ("k0", "k1")
_examples = itertools.count()


class ManualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose time only moves when the test says: timers fire once the clock passes them."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000.0

    def time(self) -> float:
        return self.now


@dataclass
class Ticket:
    key: str
    owner: str
    deadline_lo: float  # the store's deadline lies between these two
    deadline_hi: float
    status: str = "waiting"  # waiting | admitted | released | cancelled | refused | gone
    admitted_at: float | None = None  # a lower bound of the admission instant
    live_until: float = math.inf  # the earliest instant its lease may expire


class EngineMachine(RuleBasedStateMachine):
    uri = "memory://"

    def __init__(self) -> None:
        super().__init__()
        self.memory = self.uri.startswith("memory")
        self.stores: list[Store]
        if self.memory:
            self.loop: asyncio.AbstractEventLoop = ManualClockLoop()
            self.stores = [MemoryStore(clock=self.loop.time)]
            self.store_of = dict.fromkeys(OWNERS, self.stores[0])
        else:
            self.loop = asyncio.new_event_loop()
            self.stores = [open_store(self.uri), open_store(self.uri)]  # two instances
            self.store_of = dict(zip(OWNERS, [self.stores[0], self.stores[0], self.stores[1]], strict=True))
        example = next(_examples)
        self.keys = [f"sm{example}:{name}" for name in KEY_NAMES]
        self.tickets: dict[str, Ticket] = {}
        self.order: dict[str, list[str]] = {key: [] for key in self.keys}
        self.starts: dict[str, list[float]] = {key: [] for key in self.keys}
        self.paused: dict[str, bool] = dict.fromkeys(self.keys, False)
        self.serial = itertools.count()
        self.step_started = self.now()
        for owner in OWNERS:
            self.store_of[owner].subscribe(owner, self._admitter(owner))

    # -- plumbing --------------------------------------------------------------------------------------------

    def now(self) -> float:
        return self.loop.time() if self.memory else time.monotonic()

    def run(self, operation: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(operation)

    def settle(self) -> None:
        """Let timers that are due and wake-ups on their way arrive."""
        self.run(asyncio.sleep(0 if self.memory else 0.015))

    def teardown(self) -> None:
        for store in self.stores:
            self.run(store.close())
        self.loop.close()

    def _admitter(self, owner: str) -> Any:
        def on_admit(key: str, ticket: str) -> None:
            self._admitted(owner, key, ticket)

        return on_admit

    def _admitted(self, owner: str, key: str, ticket_id: str) -> None:
        ticket = self.tickets[ticket_id]
        assert (ticket.owner, ticket.key) == (owner, key), f"{ticket_id} woke the wrong owner or key"
        if ticket.admitted_at is not None:
            return  # a late second word of the same admission
        assert ticket.status == "waiting", f"{ticket_id} admitted while {ticket.status}"
        at = self.now() if self.memory else self.step_started
        assert at < ticket.deadline_hi, f"{ticket_id} admitted after its deadline"
        if self.memory:
            assert not self.paused[key], f"{ticket_id} admitted while {key} is paused"
            for earlier in self.order[key][: self.order[key].index(ticket_id)]:
                other = self.tickets[earlier]
                assert other.status != "waiting" or other.deadline_lo <= at, f"{ticket_id} overtook {earlier}"
        ticket.status, ticket.admitted_at, ticket.live_until = "admitted", at, at + self.lease_ttl
        self.starts[key].append(at)

    def live(self, key: str) -> list[Ticket]:
        now = self.now()
        return [t for t in self.tickets.values() if t.key == key and t.status == "admitted" and now < t.live_until]

    def in_status(self, status: str) -> list[str]:
        return sorted(ticket_id for ticket_id, ticket in self.tickets.items() if ticket.status == status)

    # -- rules -----------------------------------------------------------------------------------------------

    @initialize(
        parallelism=st.integers(1, 3),
        rate=st.none() | st.integers(1, 4),
        period=st.sampled_from([0.2, 0.5, 1.0]),
        max_waiting=st.integers(1, 4),
        max_wait=st.sampled_from([0.5, 1.0, 3.0]),
        lease_ttl=st.sampled_from([0.3, 1.0, 5.0]),
    )
    def configure(
        self, parallelism: int, rate: int | None, period: float, max_waiting: int, max_wait: float, lease_ttl: float
    ) -> None:
        self.policy = Policy(parallelism, rate, period, max_waiting, max_wait)
        self.lease_ttl = lease_ttl
        self.step_started = self.now()

    @rule(owner=st.sampled_from(OWNERS), key_index=st.integers(0, len(KEY_NAMES) - 1))
    def enter(self, owner: str, key_index: int) -> None:
        key = self.keys[key_index]
        ticket_id = f"{next(self.serial):06x}"
        started = self.now()
        self.tickets[ticket_id] = ticket = Ticket(key, owner, started + self.policy.max_wait, math.inf)
        self.order[key].append(ticket_id)
        entry = self.run(self.store_of[owner].enter(key, self.policy, ticket_id, owner, self.lease_ttl))
        ticket.deadline_hi = self.now() + self.policy.max_wait
        if isinstance(entry, Admitted):
            assert entry.lease == ticket_id
            self._admitted(owner, key, ticket_id)
        elif isinstance(entry, Refused):
            assert entry.reason == "waitlist_full" and entry.retry_after > 0
            waiting = sum(1 for t in self.tickets.values() if t.key == key and t.status == "waiting") - 1
            assert waiting >= self.policy.max_waiting, "refused with room in the waitlist"
            ticket.status = "refused"
        else:
            assert isinstance(entry, Queued) and entry.position >= 1
            assert ticket.status == "waiting" or not self.memory

    @precondition(lambda self: any(t.status == "waiting" for t in self.tickets.values()))
    @rule(data=st.data())
    def cancel_waiting(self, data: st.DataObject) -> None:
        ticket_id = data.draw(st.sampled_from(self.in_status("waiting")))
        ticket = self.tickets[ticket_id]
        was_admitted = self.run(self.store_of[ticket.owner].cancel(ticket.key, ticket_id))
        if ticket.status == "admitted" or (was_admitted and not self.memory):  # its wake-up was on the way
            self._admitted(ticket.owner, ticket.key, ticket_id)
            ticket.status = "released"
        else:
            assert not was_admitted, f"cancel of waiting {ticket_id} released a lease"
            ticket.status = "cancelled"

    @precondition(lambda self: any(t.status == "admitted" for t in self.tickets.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ticket_id = data.draw(st.sampled_from(self.in_status("admitted")))
        ticket = self.tickets[ticket_id]
        started = self.now()
        found = self.run(self.store_of[ticket.owner].release(ticket.key, ticket_id))
        if started < ticket.live_until - (0 if self.memory else 0.02):
            assert found, f"release of live lease {ticket_id} found nothing"
        elif self.memory:
            assert not found, f"lease {ticket_id} outlived its ttl"
        ticket.status = "released"

    @precondition(lambda self: any(t.status == "admitted" for t in self.tickets.values()))
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        ticket_id = data.draw(st.sampled_from(self.in_status("admitted")))
        ticket = self.tickets[ticket_id]
        started = self.now()
        (renewed,) = self.run(self.store_of[ticket.owner].renew(ticket.key, [ticket_id], self.lease_ttl))
        if started < ticket.live_until - (0 if self.memory else 0.02):
            assert renewed, f"renewal of live lease {ticket_id} failed"
        elif self.memory:
            assert not renewed, f"lease {ticket_id} was renewed after its ttl"
        if renewed:
            ticket.live_until = started + self.lease_ttl

    @rule(seconds=st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0, 2.0]))
    def time_passes(self, seconds: float) -> None:
        if self.memory:
            assert isinstance(self.loop, ManualClockLoop)
            self.loop.now += seconds
        else:
            self.run(asyncio.sleep(seconds / 4))  # real time: keep the test short

    @rule(key_index=st.integers(0, len(KEY_NAMES) - 1))
    def pause(self, key_index: int) -> None:
        key = self.keys[key_index]
        self.paused[key] = True
        self.run(self.stores[0].pause(key))

    @rule(key_index=st.integers(0, len(KEY_NAMES) - 1))
    def resume(self, key_index: int) -> None:
        key = self.keys[key_index]
        self.paused[key] = False
        self.run(self.stores[-1].resume(key))

    # -- invariants ------------------------------------------------------------------------------------------

    @invariant()
    def limits_hold_and_no_ticket_is_lost(self) -> None:
        if not hasattr(self, "policy"):
            return
        self.settle()
        for key in self.keys:
            self._check_key(key)
        self.step_started = self.now()

    def _check_key(self, key: str) -> None:
        policy = self.policy
        assert policy.parallelism is not None
        admissions = len(self.starts[key])
        by_store: dict[int, list[str]] = {}
        for ticket_id in self.order[key]:
            ticket = self.tickets[ticket_id]
            if ticket.status == "waiting":
                by_store.setdefault(id(self.store_of[ticket.owner]), []).append(ticket_id)
        for ticket_ids in by_store.values():
            store = self.store_of[self.tickets[ticket_ids[0]].owner]
            statuses = self.run(store.pump(key, ticket_ids)).statuses
            for ticket_id, status in statuses.items():
                ticket = self.tickets[ticket_id]
                if status == "admitted":
                    self._admitted(ticket.owner, key, ticket_id)
                elif status == "gone" and ticket.status == "waiting":
                    assert ticket.deadline_lo <= self.now(), f"{ticket_id} left the waitlist before its deadline"
                    ticket.status = "gone"
        if self.memory:
            assert len(self.starts[key]) == admissions, "a pump admitted what the store should already have"
        now = self.now()
        # FIFO: no ticket has been admitted while an earlier one of its key waits (and is not past its deadline)
        for position, ticket_id in enumerate(self.order[key]):
            ticket = self.tickets[ticket_id]
            if ticket.status == "waiting" and now < ticket.deadline_lo:
                overtook = [t for t in self.order[key][position + 1 :] if self.tickets[t].admitted_at is not None]
                assert not overtook, f"{overtook} overtook {ticket_id}"
                break
        assert len(self.live(key)) <= policy.parallelism
        state = self.run(self.stores[0].state(key))
        active = state.active if state else 0
        assert active <= policy.parallelism
        if self.memory:
            assert active == len(self.live(key)), "the store and the record disagree on live leases"
        if policy.rate is not None:
            if self.memory:
                assert max_starts_in_window(self.starts[key], policy.period) <= policy.rate
            assert (state.rate_count if state else 0) <= policy.rate


def _machine_for(uri: str) -> type[EngineMachine]:
    return type("EngineMachineOn", (EngineMachine,), {"uri": uri})


BUDGET = {"memory": (200, 40), "redis": (10, 25), "cluster": (6, 25)}  # examples, steps


def test_invariants_hold_under_random_operations(store_uri: str) -> None:
    kind = "memory" if store_uri.startswith("memory") else ("cluster" if "+cluster" in store_uri else "redis")
    examples, steps = BUDGET[kind]
    run_state_machine_as_test(
        _machine_for(store_uri),
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            derandomize=kind != "memory",
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )


def test_manual_clock_loop_fires_timers_when_the_clock_passes_them() -> None:
    loop = ManualClockLoop()
    fired: list[float] = []
    loop.call_later(1.0, lambda: fired.append(loop.time()))
    loop.run_until_complete(asyncio.sleep(0))
    assert fired == []
    loop.now += 1.0
    loop.run_until_complete(asyncio.sleep(0))
    assert fired == [1_001.0]
    loop.close()
