"""Which requests are flow-controlled, under which key and policy: rules and flow-control headers applied.

Shared by the proxy and the ASGI middleware. `Router.route(scope)` runs on every request, so everything that can
be worked out once (templates, lower-cased header names, a rule's policy) is worked out in the constructor.

Precedence: the first matching rule wins; a rule's key wins over the `Flow-Control-Key` header, and a rule that
sets `parallelism` or `rate` wins over `Flow-Control-Value` (a rule without limits takes them from the header, or
from the defaults). Headers count only when `trust_policy_headers` is true. No rule and no header: no flow control.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

from .errors import ConfigError, InvalidFlowControl, MissingKeyPart
from .policy import Policy, parse_flow_control_value, validate_key
from .rules import HEADER, LITERAL, METHOD, PATH, QUERY, Rule
from .types import Scope

KEY_HEADERS: Final = (b"upstash-flow-control-key", b"flow-control-key")
VALUE_HEADERS: Final = (b"upstash-flow-control-value", b"flow-control-value")
_KEY_HEADER_NAMES: Final = {
    b"upstash-flow-control-key": "Upstash-Flow-Control-Key",
    b"flow-control-key": "Flow-Control-Key",
}
_VALUE_HEADER_NAMES: Final = {
    b"upstash-flow-control-value": "Upstash-Flow-Control-Value",
    b"flow-control-value": "Flow-Control-Value",
}
_POLICY_CACHE_SIZE: Final = 4096
DEFAULT_POLICY: Final = Policy()


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: its flow-control key, the policy to apply, and the rule's name ("" for headers)."""

    key: str
    policy: Policy
    rule: str


@dataclass(frozen=True, slots=True)
class _Compiled:
    rule: Rule
    policy: Policy  # with the rule's limits; used when they win, or when no header value is given
    constant_key: str | None
    fixed: Route | None  # the route of every request it matches, when neither key nor policy depend on one


class Router:
    """Maps an ASGI scope to a `Route` (flow-controlled) or None (passed straight through)."""

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        *,
        defaults: Policy = DEFAULT_POLICY,
        trust_policy_headers: bool = True,
        trusted_proxies: Sequence[str] = (),
    ) -> None:
        self.rules = tuple(rules)
        self.defaults = defaults
        self.trust_policy_headers = trust_policy_headers
        self._compiled = tuple(_compile(rule, defaults, trust_policy_headers) for rule in self.rules)
        self._trusted = tuple(_network(item) for item in trusted_proxies)
        self.has_trusted_proxies = bool(self._trusted)
        wanted: set[bytes] = set()
        if trust_policy_headers:
            wanted.update(KEY_HEADERS + VALUE_HEADERS)
        for rule in self.rules:
            wanted.update(arg for kind, arg in rule.parts if kind == HEADER and isinstance(arg, bytes))
            if rule.host is not None:
                wanted.add(b"host")
        self._wanted = frozenset(wanted)
        self._policies: dict[str, Policy] = {}

    def __repr__(self) -> str:
        return f"Router(rules={len(self.rules)}, trust_policy_headers={self.trust_policy_headers})"

    @property
    def passthrough(self) -> bool:
        """True when no request can ever be flow-controlled."""
        return not self.rules and not self.trust_policy_headers

    def route(self, scope: Scope) -> Route | None:
        """The request's route, or None. Raises InvalidFlowControl / MissingKeyPart for malformed requests."""
        found: dict[bytes, bytes] = {}
        wanted = self._wanted
        if wanted:
            for name, value in scope["headers"]:
                if name in wanted and name not in found:
                    found[name] = value
        if self._compiled:
            path: str = scope["path"]
            method: str = scope["method"]
            host: str | None = None
            for compiled in self._compiled:
                rule = compiled.rule
                if not path.startswith(rule.path) or (rule.methods is not None and method not in rule.methods):
                    continue
                if rule.host is not None:
                    if host is None:
                        host = _host_name(found.get(b"host", b""))
                    if host != rule.host:
                        continue
                if compiled.fixed is not None:
                    return compiled.fixed
                key = compiled.constant_key or self._render(rule, scope, found)
                if rule.sets_limits or not self.trust_policy_headers:
                    return Route(key, compiled.policy, rule.name)
                value, value_header = _first(found, VALUE_HEADERS)
                if value is None:
                    return Route(key, compiled.policy, rule.name)
                return Route(key, rule.policy(self._header_policy(value, value_header)), rule.name)
        if not self.trust_policy_headers:
            return None
        key_raw, key_header = _first(found, KEY_HEADERS)
        value, value_header = _first(found, VALUE_HEADERS)
        if key_raw is None and value is None:
            return None
        if key_raw is None:
            raise InvalidFlowControl(f"{_VALUE_HEADER_NAMES[value_header]} was sent without Flow-Control-Key")
        if value is None:
            raise InvalidFlowControl(
                f"{_KEY_HEADER_NAMES[key_header]} was sent without Flow-Control-Value (e.g. parallelism=3, rate=10)"
            )
        key = validate_key(key_raw.decode("latin-1"))
        return Route(key, self._header_policy(value, value_header), "")

    def trusts(self, peer: str) -> bool:
        """True when `peer` (an IP address) is one of the trusted proxies."""
        if not self._trusted:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def client_ip(self, scope: Scope) -> str:
        """The peer address, or the right-most untrusted X-Forwarded-For address when the peer is trusted."""
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        if not peer or not self.trusts(peer):
            return peer
        forwarded = [value for name, value in scope["headers"] if name == b"x-forwarded-for"]
        hops = [hop.strip() for hop in b",".join(forwarded).decode("latin-1").split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else peer

    def _render(self, rule: Rule, scope: Scope, found: dict[bytes, bytes]) -> str:
        pieces: list[str] = []
        query: dict[str, str] | None = None
        for kind, arg in rule.parts:
            if kind == LITERAL:
                pieces.append(str(arg))
            elif kind == HEADER:
                assert isinstance(arg, bytes)
                raw = found.get(arg)
                if not raw:
                    raise MissingKeyPart(
                        f'the key of rule "{rule.name}" needs header {arg.decode()}, and the request has none'
                    )
                pieces.append(raw.decode("latin-1"))
            elif kind == QUERY:
                if query is None:
                    query = {}
                    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
                        query.setdefault(name, value)
                text = query.get(str(arg))
                if not text:
                    raise MissingKeyPart(
                        f'the key of rule "{rule.name}" needs query parameter {arg}, and the request has none'
                    )
                pieces.append(text)
            elif kind == PATH:
                pieces.append(scope["path"])
            elif kind == METHOD:
                pieces.append(scope["method"])
            else:
                address = self.client_ip(scope)
                if not address:
                    raise MissingKeyPart(f'the key of rule "{rule.name}" needs the client address, which is unknown')
                pieces.append(address)
        return validate_key("".join(pieces))

    def _header_policy(self, value: bytes, header: bytes) -> Policy:
        text = value.decode("latin-1")
        policy = self._policies.get(text)
        if policy is None:
            try:
                policy = parse_flow_control_value(text, self.defaults)
            except InvalidFlowControl as exc:
                raise InvalidFlowControl(f"{_VALUE_HEADER_NAMES[header]}: {exc.message}") from None
            if len(self._policies) >= _POLICY_CACHE_SIZE:
                self._policies.clear()
            self._policies[text] = policy
        return policy


def _compile(rule: Rule, defaults: Policy, trust_policy_headers: bool) -> _Compiled:
    where = f'rule "{rule.name}"' if rule.name else "rule"
    try:
        policy = rule.policy(defaults)
    except InvalidFlowControl as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    constant = rule.key if all(kind == LITERAL for kind, _ in rule.parts) else None
    fixed = None
    if constant is not None and (rule.sets_limits or not trust_policy_headers):
        fixed = Route(constant, policy, rule.name)
    return _Compiled(rule, policy, constant, fixed)


def _network(item: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(item.strip(), strict=False)
    except (ValueError, TypeError, AttributeError):
        raise ConfigError(f"trusted_proxies: {item!r} is not an IP address or CIDR network") from None


def _first(found: dict[bytes, bytes], names: tuple[bytes, ...]) -> tuple[bytes | None, bytes]:
    for name in names:
        value = found.get(name)
        if value is not None:
            return value, name
    return None, names[0]


def _host_name(raw: bytes) -> str:
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    name, _, _ = host.partition(":")
    return name.rstrip(".")
