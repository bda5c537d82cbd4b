"""Prometheus metrics of the deliveries, and the hooks the proxy and the middleware call at each step.

Metrics (labelled by rule name, never by key, so their number stays bounded; `rule="-"` for deliveries whose route
has no rule name: flow-control headers, or a rule without `name`)::

    flowgate_deliveries_admitted_total{rule}            admitted (got a token), at once or after waiting
    flowgate_deliveries_rejected_total{rule,reason}     refused: waitlist_full, wait_timeout, too_many_keys,
                                                        store_unavailable; invalid_flow_control and
                                                        missing_key_part (rule "-": refused before routing)
    flowgate_deliveries_cancelled_total{rule}           the client left while its delivery waited
    flowgate_deliveries_failed_total{rule,reason}       admitted, then the upstream failed: upstream_unreachable,
                                                        upstream_timeout
    flowgate_deliveries_waiting{rule}                   waiting for a token now (gauge)
    flowgate_deliveries_in_flight{rule}                 admitted and being forwarded now (gauge)
    flowgate_wait_seconds{rule}                         time from arrival to admission (histogram)
    flowgate_upstream_latency_seconds{rule}             time from forwarding to the upstream's response head
    flowgate_store_errors_total{operation}              store (Redis) failures: acquire, release

The hooks run on every delivery, so they only add to plain integers (about a microsecond per delivery, where
prometheus-client's metric objects take ten); a prometheus-client collector turns them into metric families when
`/metrics` is scraped.

Several worker processes (`flowgate serve --workers N`) are added up like prometheus-client's multiprocess mode
does it: the parent points `FLOWGATE_METRICS_DIR` at a fresh directory before forking (`multiprocess_dir`); each
worker writes a snapshot of its numbers there (`worker-<pid>.json`, at most a second old, and fresh from the
worker that answers the scrape), and `/metrics` adds up every snapshot. Gauges count live workers only: when one
exits the parent marks its snapshot dead (`mark_dead`), and only its counters and histograms still count.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from . import logs
from .errors import DeliveryError, StoreUnavailable

if TYPE_CHECKING:
    from .engine import Lease
    from .routing import Route

DIR_ENV: Final = "FLOWGATE_METRICS_DIR"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# Not Final: mypyc (the compiled build) would leave a Final tuple of floats unset.
WAIT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Seconds between two snapshots of a worker (multiprocess mode).
FLUSH_INTERVAL: Final = 1.0
#: Reasons a delivery is refused before it reaches flow control (the request names no usable key).
ROUTING_REASONS: Final = frozenset({"invalid_flow_control", "missing_key_part"})
NO_RULE: Final = logs.NO_RULE

logger = logging.getLogger("flowgate.metrics")


class Histogram:
    """Bucket counts (not cumulative; the last bucket is +Inf) and the sum of the observed values."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        self.total += value


class RuleStats:
    """One rule's numbers in this process."""

    __slots__ = ("admitted", "cancelled", "failed", "in_flight", "latency", "rejected", "wait", "waiting")

    def __init__(self) -> None:
        self.admitted = 0
        self.cancelled = 0
        self.waiting = 0
        self.in_flight = 0
        self.rejected: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.wait = Histogram(WAIT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def __enter__(self) -> None:  # `with stats:` counts one delivery being forwarded
        self.in_flight += 1

    def __exit__(self, *exc: object) -> None:
        self.in_flight -= 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "admitted": self.admitted,
            "cancelled": self.cancelled,
            "waiting": self.waiting,
            "in_flight": self.in_flight,
            "rejected": self.rejected,
            "failed": self.failed,
            "wait": [*self.wait.counts, self.wait.total],
            "latency": [*self.latency.counts, self.latency.total],
        }


class Metrics:
    """The gateway's metrics: this process's numbers, exposed (with the other workers' in multiprocess mode) by
    `render()`. `collector()` plugs them into any prometheus-client registry."""

    def __init__(self, rules: Iterable[str] = ()) -> None:
        self.rules: dict[str, RuleStats] = {}
        self.store_errors: dict[str, int] = {}
        self.directory = os.environ.get(DIR_ENV) or None
        self._flush_armed = False
        for name in rules:  # known rules show up as 0 before their first delivery
            self.rule(name)

    def __repr__(self) -> str:
        return f"Metrics(rules={sorted(self.rules)}, multiprocess={self.directory is not None})"

    def rule(self, name: str) -> RuleStats:
        """The numbers of rule `name` ("" is shown as "-")."""
        label = name or NO_RULE
        stats = self.rules.get(label)
        if stats is None:
            stats = self.rules[label] = RuleStats()
        if not self._flush_armed and self.directory is not None:
            self._arm_flush()  # a worker's snapshots start with its first delivery
        return stats

    def store_error(self, operation: str) -> None:
        self.store_errors[operation] = self.store_errors.get(operation, 0) + 1

    def render(self) -> bytes:
        """The Prometheus text exposition (added up over the workers in multiprocess mode)."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector())
        return generate_latest(registry)

    def collector(self) -> Any:
        """A prometheus-client collector of these metrics (e.g. `prometheus_client.REGISTRY.register(...)`)."""
        return _Collector(self)

    # -- multiprocess snapshots ------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "rules": {name: stats.snapshot() for name, stats in self.rules.items()},
            "store_errors": dict(self.store_errors),
        }

    def flush(self) -> None:
        """Write this worker's snapshot (multiprocess mode); atomic, so a reader never sees half of one."""
        if self.directory is None:
            return
        path = os.path.join(self.directory, f"worker-{os.getpid()}.json")
        try:
            with tempfile.NamedTemporaryFile("w", dir=self.directory, prefix=".tmp-", delete=False) as handle:
                json.dump(self.snapshot(), handle)
            os.replace(handle.name, path)
        except OSError as exc:
            logger.warning("cannot write the metrics snapshot %s: %s", path, exc)

    def _arm_flush(self) -> None:
        if self.directory is None or self._flush_armed:
            return
        with contextlib.suppress(RuntimeError):  # no event loop yet (at construction): the next delivery arms it
            asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush_tick)
            self._flush_armed = True

    def _flush_tick(self) -> None:
        self._flush_armed = False
        self.flush()
        self._arm_flush()

    def gathered(self) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
        """Every worker's numbers added up: (per-rule snapshots, store errors)."""
        if self.directory is None:
            return self.snapshot()["rules"], dict(self.store_errors)
        self.flush()
        self._arm_flush()
        rules: dict[str, dict[str, Any]] = {}
        errors: dict[str, int] = {}
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                with open(os.path.join(self.directory, name)) as handle:
                    data = json.load(handle)
            except (OSError, ValueError):
                continue  # a worker's file mid-rename or unreadable: skipped this time
            live = name.startswith("worker-")
            for rule, stats in data.get("rules", {}).items():
                _add(rules.setdefault(rule, RuleStats().snapshot()), stats, live)
            for operation, count in data.get("store_errors", {}).items():
                errors[operation] = errors.get(operation, 0) + count
        return rules, errors


def _add(total: dict[str, Any], stats: dict[str, Any], live: bool) -> None:
    for name in ("admitted", "cancelled"):
        total[name] += stats.get(name, 0)
    if live:  # a dead worker's gauges are gone with it
        for name in ("waiting", "in_flight"):
            total[name] += stats.get(name, 0)
    for name in ("rejected", "failed"):
        for reason, count in stats.get(name, {}).items():
            total[name][reason] = total[name].get(reason, 0) + count
    for name in ("wait", "latency"):
        values = stats.get(name, [])
        if len(values) == len(total[name]):
            total[name] = [a + b for a, b in zip(total[name], values, strict=True)]


class _Collector:
    """Builds the metric families from `Metrics.gathered()` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        rules, errors = self.metrics.gathered()
        admitted = CounterMetricFamily(
            "flowgate_deliveries_admitted", "Deliveries admitted (given a token).", labels=["rule"]
        )
        rejected = CounterMetricFamily(
            "flowgate_deliveries_rejected", "Deliveries refused, by reason.", labels=["rule", "reason"]
        )
        cancelled = CounterMetricFamily(
            "flowgate_deliveries_cancelled", "Deliveries whose client left while they waited.", labels=["rule"]
        )
        failed = CounterMetricFamily(
            "flowgate_deliveries_failed", "Admitted deliveries the upstream failed.", labels=["rule", "reason"]
        )
        waiting = GaugeMetricFamily("flowgate_deliveries_waiting", "Deliveries waiting for a token.", labels=["rule"])
        in_flight = GaugeMetricFamily(
            "flowgate_deliveries_in_flight", "Admitted deliveries being forwarded.", labels=["rule"]
        )
        wait = HistogramMetricFamily("flowgate_wait_seconds", "Time from arrival to admission.", labels=["rule"])
        latency = HistogramMetricFamily(
            "flowgate_upstream_latency_seconds",
            "Time from forwarding a delivery to the upstream's response head.",
            labels=["rule"],
        )
        for rule in sorted(rules):
            stats = rules[rule]
            admitted.add_metric([rule], stats["admitted"])
            cancelled.add_metric([rule], stats["cancelled"])
            waiting.add_metric([rule], stats["waiting"])
            in_flight.add_metric([rule], stats["in_flight"])
            for reason, count in sorted(stats["rejected"].items()):
                rejected.add_metric([rule, reason], count)
            for reason, count in sorted(stats["failed"].items()):
                failed.add_metric([rule, reason], count)
            wait.add_metric([rule], *_buckets(WAIT_BUCKETS, stats["wait"]))
            latency.add_metric([rule], *_buckets(LATENCY_BUCKETS, stats["latency"]))
        store = CounterMetricFamily(
            "flowgate_store_errors", "Store (Redis) operations that failed.", labels=["operation"]
        )
        for operation, count in sorted(errors.items()):
            store.add_metric([operation], count)
        yield from (admitted, rejected, cancelled, failed, waiting, in_flight, wait, latency, store)


def _buckets(bounds: tuple[float, ...], values: list[float]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs ending with +Inf, and the sum, from `Histogram` counts + total."""
    cumulative: list[tuple[str, float]] = []
    running = 0.0
    for bound, count in zip((*(repr(float(b)) for b in bounds), "+Inf"), values[:-1], strict=True):
        running += count
        cumulative.append((bound, running))
    return cumulative, values[-1]


class DeliveryObserver:
    """What the proxy and the middleware report at each step of a delivery: updates `metrics` (if any) and logs
    one line per rejected or failed delivery."""

    __slots__ = ("_stats", "metrics")

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._stats: dict[str, RuleStats] = {}  # metrics.rule(name), kept: the hot calls skip a call each

    def _rule(self, name: str) -> RuleStats:
        assert self.metrics is not None
        stats = self._stats[name] = self.metrics.rule(name)
        return stats

    def entered(self, route: Route) -> None:
        """The delivery asks for a token (it may get one at once)."""
        if self.metrics is not None:
            (self._stats.get(route.rule) or self._rule(route.rule)).waiting += 1

    def admitted(self, route: Route, lease: Lease) -> None:
        if self.metrics is not None:
            stats = self._stats.get(route.rule) or self._rule(route.rule)
            stats.waiting -= 1
            stats.admitted += 1
            stats.wait.observe(lease.waited)

    def rejected(self, route: Route, exc: DeliveryError) -> None:
        """The engine refused the delivery (429) or the store failed (503)."""
        if self.metrics is not None:
            stats = self.metrics.rule(route.rule)
            stats.waiting -= 1
            stats.rejected[exc.code] = stats.rejected.get(exc.code, 0) + 1
            if isinstance(exc, StoreUnavailable):
                self.metrics.store_error("acquire")
        level = logging.WARNING if isinstance(exc, StoreUnavailable) else logging.INFO
        logs.delivery(level, "rejected", route.key, route.rule, exc.code, exc.status)

    def cancelled(self, route: Route) -> None:
        """The delivery stopped waiting without an answer (its client left, or the server is stopping)."""
        if self.metrics is not None:
            stats = self.metrics.rule(route.rule)
            stats.waiting -= 1
            stats.cancelled += 1

    def refused(self, exc: DeliveryError) -> None:
        """A request refused before routing; counted when it is a flow-control problem (400)."""
        if exc.code not in ROUTING_REASONS:
            return
        if self.metrics is not None:
            stats = self.metrics.rule("")
            stats.rejected[exc.code] = stats.rejected.get(exc.code, 0) + 1
        logs.delivery(logging.INFO, "rejected", None, "", exc.code, exc.status)

    def in_flight(self, route: Route) -> contextlib.AbstractContextManager[None]:
        """Context manager around forwarding an admitted delivery."""
        if self.metrics is None:
            return _NOTHING
        return self._stats.get(route.rule) or self._rule(route.rule)

    def answered(self, route: Route | None, started: float) -> None:
        """The upstream sent its response head (`started`: `time.perf_counter()` when forwarding began)."""
        if route is not None and self.metrics is not None:
            stats = self._stats.get(route.rule) or self._rule(route.rule)
            stats.latency.observe(time.perf_counter() - started)

    def failed(self, route: Route | None, exc: DeliveryError) -> None:
        """The upstream could not be reached or did not answer in time (502 / 504)."""
        if route is not None and self.metrics is not None:
            stats = self.metrics.rule(route.rule)
            stats.failed[exc.code] = stats.failed.get(exc.code, 0) + 1
        key, rule = (route.key, route.rule) if route is not None else (None, "")
        logs.delivery(logging.WARNING, "failed", key, rule, exc.code, exc.status)

    def store_error(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.store_error(operation)


_NOTHING: Final = contextlib.nullcontext()


# -- multiprocess mode (set up by `flowgate serve --workers N`) -------------------------------------------------


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[str]:
    """Point `FLOWGATE_METRICS_DIR` at a fresh private directory (before forking workers); remove it after."""
    previous = os.environ.get(DIR_ENV)
    path = tempfile.mkdtemp(prefix="flowgate-metrics-")
    os.environ[DIR_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(DIR_ENV, None)
        else:
            os.environ[DIR_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def mark_dead(pid: int) -> None:
    """Keep an exited worker's counters and histograms in the totals, and drop its gauges."""
    directory = os.environ.get(DIR_ENV)
    if directory:
        with contextlib.suppress(OSError):  # it never wrote a snapshot
            os.replace(os.path.join(directory, f"worker-{pid}.json"), os.path.join(directory, f"dead-{pid}.json"))


__all__ = ["CONTENT_TYPE", "DeliveryObserver", "Metrics", "mark_dead", "multiprocess_dir"]
