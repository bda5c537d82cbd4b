"""Metrics and the delivery log, below the proxy: the observer's hooks, the exposition, JSON and text log lines, the
middleware's hooks, and `--log-format` settings."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route as StarletteRoute

from gateway import FlowControlMiddleware
from gateway.config import ConfigProblems, load_settings
from gateway.engine import Lease
from gateway.errors import InvalidFlowControl, Rejected, StoreUnavailable, UpstreamTimeout
from gateway.logs import JsonFormatter
from gateway.metrics import DIR_ENV, DeliveryObserver, Metrics, mark_dead
from gateway.policy import Policy
from gateway.routing import Route
from tests.gateway_process import metric
from tests.live import serving

HOOKS = Route("tenant:1", Policy(parallelism=1), "hooks")
HEADERS = Route("tenant:2", Policy(parallelism=1), "")


def test_observer_hooks_feed_the_metrics() -> None:
    metrics = Metrics(["hooks", "idle"])
    observer = DeliveryObserver(metrics)
    observer.entered(HOOKS)
    observer.entered(HOOKS)
    observer.entered(HEADERS)
    text = metrics.render().decode()
    assert metric(text, "flowgate_deliveries_waiting", rule="hooks") == 2
    assert metric(text, "flowgate_deliveries_admitted_total", rule="idle") == 0  # declared rules show up at once
    assert "tenant:1" not in text  # labelled by rule, never by key

    observer.admitted(HOOKS, Lease("tenant:1", "a", waited=0.2))
    observer.rejected(HOOKS, Rejected("waitlist_full", "full", 1.0))
    observer.cancelled(HEADERS)
    with observer.in_flight(HOOKS):
        assert metric(metrics.render().decode(), "flowgate_deliveries_in_flight", rule="hooks") == 1
        observer.answered(HOOKS, 0.0)
    observer.failed(HOOKS, UpstreamTimeout("slow"))
    observer.refused(InvalidFlowControl("bad"))
    observer.refused(Rejected("body_too_large", "not a flow-control refusal", 1.0))
    observer.entered(HOOKS)
    observer.rejected(HOOKS, StoreUnavailable("down"))
    observer.store_error("release")

    text = metrics.render().decode()
    assert metric(text, "flowgate_deliveries_waiting") == 0
    assert metric(text, "flowgate_deliveries_in_flight") == 0
    assert metric(text, "flowgate_deliveries_admitted_total", rule="hooks") == 1
    assert metric(text, "flowgate_deliveries_rejected_total", rule="hooks", reason="waitlist_full") == 1
    assert metric(text, "flowgate_deliveries_rejected_total", rule="hooks", reason="store_unavailable") == 1
    assert metric(text, "flowgate_deliveries_rejected_total", rule="-", reason="invalid_flow_control") == 1
    assert metric(text, "flowgate_deliveries_rejected_total", reason="body_too_large") == 0
    assert metric(text, "flowgate_deliveries_cancelled_total", rule="-") == 1
    assert metric(text, "flowgate_deliveries_failed_total", rule="hooks", reason="upstream_timeout") == 1
    assert metric(text, "flowgate_wait_seconds_sum", rule="hooks") == pytest.approx(0.2)
    assert metric(text, "flowgate_wait_seconds_bucket", rule="hooks", le="0.25") == 1
    assert metric(text, "flowgate_wait_seconds_bucket", rule="hooks", le="0.1") == 0
    assert metric(text, "flowgate_upstream_latency_seconds_count", rule="hooks") == 1
    assert metric(text, "flowgate_store_errors_total", operation="acquire") == 1
    assert metric(text, "flowgate_store_errors_total", operation="release") == 1


def test_worker_snapshots_add_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    other = Metrics()  # another worker's numbers: one admitted, one waiting
    observer = DeliveryObserver(other)
    observer.entered(HOOKS)
    observer.admitted(HOOKS, Lease("tenant:1", "a", waited=2.0))
    observer.entered(HOOKS)
    observer.store_error("release")
    (tmp_path / "worker-999999.json").write_text(json.dumps(other.snapshot()))
    (tmp_path / "dead-999998.json").write_text(json.dumps(other.snapshot()))  # a worker that exited
    (tmp_path / "worker-999997.json").write_text("{not json")  # skipped

    mine = Metrics(["hooks"])
    DeliveryObserver(mine).entered(HOOKS)
    text = mine.render().decode()
    assert (tmp_path / f"worker-{os.getpid()}.json").exists()  # the scraping worker's own numbers, fresh
    assert metric(text, "flowgate_deliveries_admitted_total", rule="hooks") == 2  # counters: live and dead
    assert metric(text, "flowgate_wait_seconds_count", rule="hooks") == 2
    assert metric(text, "flowgate_wait_seconds_bucket", rule="hooks", le="2.5") == 2
    assert metric(text, "flowgate_store_errors_total", operation="release") == 2
    assert metric(text, "flowgate_deliveries_waiting", rule="hooks") == 2  # gauges: live workers only

    mark_dead(999999)
    text = mine.render().decode()
    assert metric(text, "flowgate_deliveries_waiting", rule="hooks") == 1
    assert metric(text, "flowgate_deliveries_admitted_total", rule="hooks") == 2


def test_collector_plugs_into_any_registry() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    metrics = Metrics(["a"])
    registry = CollectorRegistry()
    registry.register(metrics.collector())
    DeliveryObserver(metrics).entered(Route("k", Policy(), "a"))
    assert metric(generate_latest(registry).decode(), "flowgate_deliveries_waiting", rule="a") == 1


def test_delivery_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    observer = DeliveryObserver()  # logs without metrics
    with caplog.at_level(logging.INFO, logger="flowgate.delivery"):
        observer.rejected(HOOKS, Rejected("wait_timeout", "waited", 30.0))
        observer.failed(HEADERS, UpstreamTimeout("slow"))
        observer.failed(None, UpstreamTimeout("slow"))
        observer.refused(InvalidFlowControl("bad"))
        observer.rejected(Route('a "quoted" key', Policy(), "hooks"), StoreUnavailable("down"))
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        'delivery rejected: key="tenant:1" rule=hooks reason=wait_timeout status=429',
        'delivery failed: key="tenant:2" rule=- reason=upstream_timeout status=504',
        "delivery failed: key=- rule=- reason=upstream_timeout status=504",
        "delivery rejected: key=- rule=- reason=invalid_flow_control status=400",
        'delivery rejected: key="a \\"quoted\\" key" rule=hooks reason=store_unavailable status=503',
    ]
    assert [record.levelname for record in caplog.records] == ["INFO", "WARNING", "WARNING", "INFO", "WARNING"]

    formatter = JsonFormatter()
    first = json.loads(formatter.format(caplog.records[0]))
    assert (
        first.items()
        >= {
            "level": "info",
            "logger": "flowgate.delivery",
            "event": "rejected",
            "key": "tenant:1",
            "rule": "hooks",
            "reason": "wait_timeout",
            "status": 429,
        }.items()
    )
    assert {"time", "pid", "message"} <= first.keys()
    assert "key" not in json.loads(formatter.format(caplog.records[3]))


def test_json_lines_carry_tracebacks_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("it",), None)
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "failed: it"
    assert "ValueError: boom" in parsed["exception"]


def test_log_format_setting() -> None:
    assert load_settings({"upstream": "http://a:1"}, {}).log_format == "text"
    assert load_settings({"upstream": "http://a:1"}, {"FLOWGATE_LOG_FORMAT": "JSON"}).log_format == "json"
    assert load_settings(
        {"upstream": "http://a:1", "log_format": "text"}, {"FLOWGATE_LOG_FORMAT": "json"}
    ).log_format == ("text")
    with pytest.raises(ConfigProblems, match='--log-format: log_format must be one of text, json, got "xml"'):
        load_settings({"upstream": "http://a:1", "log_format": "xml"}, {})


async def test_middleware_reports_to_metrics() -> None:
    release = asyncio.Event()

    async def work(request: Request) -> PlainTextResponse:
        await release.wait()
        return PlainTextResponse("done")

    metrics = Metrics()
    app = FlowControlMiddleware(
        Starlette(routes=[StarletteRoute("/work", work)]),
        key=lambda scope: "mw",
        policy="parallelism=1",
        metrics=metrics,
    )
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        first = asyncio.create_task(client.get("/work"))
        second = asyncio.create_task(client.get("/work"))
        deadline = asyncio.get_running_loop().time() + 5
        while metric(metrics.render().decode(), "flowgate_deliveries_waiting", rule="-") != 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        text = metrics.render().decode()
        assert metric(text, "flowgate_deliveries_in_flight", rule="-") == 1
        release.set()
        assert [(await task).status_code for task in (first, second)] == [200, 200]
        bad = await client.get("/work", headers={"Upstash-Flow-Control-Key": "x"})  # key= wins: still admitted
        assert bad.status_code == 200
    text = metrics.render().decode()
    assert metric(text, "flowgate_deliveries_admitted_total", rule="-") == 3
    assert metric(text, "flowgate_deliveries_waiting", rule="-") == 0
    assert metric(text, "flowgate_deliveries_in_flight", rule="-") == 0
