"""Rules, key templates and flow-control headers: `Router.route(scope)`."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import ConfigError, InvalidFlowControl, MissingKeyPart
from gateway.policy import Policy
from gateway.routing import Route, Router
from gateway.rules import Rule, compile_template


def scope(
    path: str = "/", method: str = "GET", headers: dict[str, str] | None = None, query: str = "",
    client: str = "10.0.0.1",
) -> dict[str, Any]:  # fmt: skip
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query.encode(),
        "headers": [(name.lower().encode(), value.encode("latin-1")) for name, value in (headers or {}).items()],
        "client": (client, 5000),
    }


def test_no_rule_no_header_passes_through() -> None:
    assert Router().route(scope()) is None
    assert Router([Rule(key="k", path="/api/")]).route(scope("/other")) is None
    assert Router(trust_policy_headers=False).passthrough


def test_header_flow_control_and_aliases() -> None:
    router = Router(defaults=Policy(max_waiting=7))
    route = router.route(scope(headers={"Upstash-Flow-Control-Key": "t-1", "Upstash-Flow-Control-Value": "rate=5"}))
    assert route == Route("t-1", Policy(rate=5, max_waiting=7), "")
    route = router.route(scope(headers={"Flow-Control-Key": "t-2", "Flow-Control-Value": "parallelism=2, period=1m"}))
    assert route == Route("t-2", Policy(parallelism=2, period=60.0, max_waiting=7), "")


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"Flow-Control-Key": "k"}, "Flow-Control-Value"),
        ({"Flow-Control-Value": "rate=1"}, "Flow-Control-Key"),
        ({"Flow-Control-Key": "k", "Flow-Control-Value": "rate=ten"}, "ten"),
        ({"Flow-Control-Key": "k", "Flow-Control-Value": "period=8d, rate=1"}, "8d"),
        ({"Flow-Control-Key": "k" * 257, "Flow-Control-Value": "rate=1"}, "256"),
    ],
)
def test_malformed_headers(headers: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidFlowControl, match=named):
        Router().route(scope(headers=headers))


def test_headers_ignored_when_untrusted() -> None:
    router = Router(trust_policy_headers=False)
    assert router.route(scope(headers={"Flow-Control-Key": "k", "Flow-Control-Value": "junk"})) is None


def test_rule_matching_first_wins_by_path_method_host() -> None:
    rules = [
        Rule(key="posts", name="a", path="/hooks/", methods=["post"], parallelism=1),
        Rule(key="hosted", name="b", host="API.example.com", rate=3),
        Rule(key="rest", name="c", path="/hooks/"),
    ]
    router = Router(rules)
    assert router.route(scope("/hooks/x", "POST")).rule == "a"  # type: ignore[union-attr]
    assert router.route(scope("/hooks/x", "GET")).rule == "c"  # type: ignore[union-attr]
    hosted = router.route(scope("/y", headers={"Host": "api.example.com:8080"}))
    assert hosted == Route("hosted", Policy(rate=3), "b")
    assert router.route(scope("/y", headers={"Host": "other.example.com"})) is None


def test_rule_limits_win_over_header_limits_and_key() -> None:
    router = Router([Rule(key="tenant:{header:X-Tenant}", parallelism=2, period="1m")])
    route = router.route(scope(headers={"X-Tenant": "9", "Flow-Control-Key": "x", "Flow-Control-Value": "rate=99"}))
    assert route == Route("tenant:9", Policy(parallelism=2, period=60.0), "")


def test_rule_without_limits_takes_them_from_header_or_defaults() -> None:
    router = Router([Rule(key="k:{method}", name="n", max_wait="5s")], defaults=Policy(max_waiting=3))
    assert router.route(scope(headers={"Flow-Control-Value": "rate=4"})) == Route(
        "k:GET", Policy(rate=4, max_waiting=3, max_wait=5.0), "n"
    )
    assert router.route(scope()) == Route("k:GET", Policy(max_waiting=3, max_wait=5.0), "n")


def test_templates() -> None:
    router = Router([Rule(key="{method} {path} {query:region} {header:X-A} {client_ip}")])
    route = router.route(scope("/p", "PUT", {"X-A": "a"}, "region=eu&region=us"))
    assert route is not None and route.key == "PUT /p eu a 10.0.0.1"
    with pytest.raises(MissingKeyPart, match="x-a"):
        router.route(scope("/p", query="region=eu"))
    with pytest.raises(MissingKeyPart, match="region"):
        router.route(scope("/p", headers={"X-A": "a"}))


@pytest.mark.parametrize("template", ["{nope}", "{header:}", "a{path", "a}b", "{query:}", "{header:bad name}", ""])
def test_bad_templates_are_config_errors(template: str) -> None:
    with pytest.raises(ConfigError, match="key"):
        Rule(key=template)
    if template:
        with pytest.raises(ValueError):
            compile_template(template)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("parallelism", 0),
        ("parallelism", True),
        ("rate", "10"),
        ("period", "10x"),
        ("period", 0),
        ("max_wait", "8d"),
        ("max_waiting", -1),
        ("path", "api"),
        ("methods", "POST"),
        ("methods", ["P O"]),
        ("host", ""),
    ],
)
def test_bad_rule_fields_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field.rstrip("s") if field == "methods" else field):
        Rule(key="k", name="r", **{field: value})  # type: ignore[arg-type]


def test_rule_normalises_fields() -> None:
    rule = Rule(key="k", methods=("get", "Post"), period="1h30m", max_wait=2, host="Api.Example.COM.")
    assert rule.methods == frozenset({"GET", "POST"})
    assert rule.period == 5400.0 and rule.max_wait == 2.0
    assert rule.host == "api.example.com"


def test_client_ip_trusts_only_configured_proxies() -> None:
    router = Router([Rule(key="{client_ip}")], trusted_proxies=["10.0.0.0/8", "192.168.1.1"])
    forwarded = {"X-Forwarded-For": "1.2.3.4, 5.6.7.8, 192.168.1.1"}
    assert router.route(scope(headers=forwarded, client="10.1.1.1")).key == "5.6.7.8"  # type: ignore[union-attr]
    assert router.route(scope(headers=forwarded, client="8.8.8.8")).key == "8.8.8.8"  # type: ignore[union-attr]
    assert router.route(scope(client="10.1.1.1")).key == "10.1.1.1"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="trusted_proxies"):
        Router(trusted_proxies=["not-an-ip"])
