"""Rules: which requests a `[[rules]]` entry matches, its key template and the limits it sets, checked as they
are made (a bad rule is a ConfigError naming the field). routing.py's `Router` applies them to requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from .errors import ConfigError, InvalidFlowControl
from .policy import MAX_PERIOD, Policy, validate_key
from .units import parse_duration

# Template parts: (kind, argument). Kinds below; the argument is literal text, a lower-cased header name
# (bytes) or a query parameter name.
LITERAL, HEADER, QUERY, PATH, METHOD, CLIENT_IP = range(6)
Part = tuple[int, object]
_SIMPLE_PLACEHOLDERS: Final = {"path": PATH, "method": METHOD, "client_ip": CLIENT_IP}


def compile_template(template: str) -> tuple[Part, ...]:
    """Split a key template into parts; ValueError naming the problem when it is malformed."""
    parts: list[Part] = []
    pos = 0
    while pos < len(template):
        start = template.find("{", pos)
        stray = template.find("}", pos, start if start >= 0 else len(template))
        if stray >= 0:
            raise ValueError(f'unmatched "}}" at position {stray} in key template "{template}"')
        if start < 0:
            parts.append((LITERAL, template[pos:]))
            break
        if start > pos:
            parts.append((LITERAL, template[pos:start]))
        end = template.find("}", start)
        if end < 0:
            raise ValueError(f'unclosed "{{" at position {start} in key template "{template}"')
        parts.append(_placeholder(template[start + 1 : end], template))
        pos = end + 1
    if not parts:
        raise ValueError("key template is empty")
    return tuple(parts)


def _placeholder(inner: str, template: str) -> Part:
    if inner in _SIMPLE_PLACEHOLDERS:
        return (_SIMPLE_PLACEHOLDERS[inner], None)
    kind, sep, name = inner.partition(":")
    if sep and kind in ("header", "query"):
        if not name or "{" in name:
            raise ValueError(f'placeholder "{{{inner}}}" in key template "{template}" names no {kind}')
        if kind == "header":
            if not all(33 <= ord(ch) < 127 and ch not in '"(),/:;<=>?@[\\]{}' for ch in name):
                raise ValueError(f'"{name}" in key template "{template}" is not a valid header name')
            return (HEADER, name.lower().encode("ascii"))
        return (QUERY, name)
    raise ValueError(
        f'unknown placeholder "{{{inner}}}" in key template "{template}"; '
        "expected {header:NAME}, {query:NAME}, {path}, {method} or {client_ip}"
    )


@dataclass(frozen=True, slots=True)
class Rule:
    """One `[[rules]]` entry: which requests it matches, the key template and the limits it sets."""

    key: str
    name: str = ""
    path: str = "/"
    methods: frozenset[str] | None = None
    host: str | None = None
    parallelism: int | None = None
    rate: int | None = None
    period: float | str | None = None
    max_waiting: int | None = None
    max_wait: float | str | None = None
    parts: tuple[Part, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f'rule "{self.name}"' if self.name else "rule"
        if not isinstance(self.name, str):
            raise ConfigError(f"{where}: name must be a string, got {self.name!r}")
        if not isinstance(self.key, str) or not self.key:
            raise ConfigError(f"{where}: key must be a non-empty template string, got {self.key!r}")
        try:
            parts = compile_template(self.key)
        except ValueError as exc:
            raise ConfigError(f"{where}: key: {exc}") from None
        if all(kind == LITERAL for kind, _ in parts):
            try:
                validate_key(self.key)
            except InvalidFlowControl as exc:
                raise ConfigError(f"{where}: key: {exc}") from None
        object.__setattr__(self, "parts", parts)
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ConfigError(f'{where}: path must be a path prefix starting with "/", got {self.path!r}')
        object.__setattr__(self, "methods", _methods(self.methods, where))
        if self.host is not None:
            if not isinstance(self.host, str) or not self.host.strip():
                raise ConfigError(f"{where}: host must be a host name, got {self.host!r}")
            object.__setattr__(self, "host", self.host.strip().lower().rstrip("."))
        _check_int(self.parallelism, "parallelism", 1, where)
        _check_int(self.rate, "rate", 1, where)
        _check_int(self.max_waiting, "max_waiting", 0, where)
        for name in ("period", "max_wait"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                seconds = parse_duration(value, name)
            except (ValueError, TypeError):
                raise ConfigError(
                    f"{where}: {name} must be a duration such as 500ms, 10s or 1m, got {value!r}"
                ) from None
            if (name == "period" and seconds <= 0) or seconds > MAX_PERIOD:
                raise ConfigError(
                    f"{where}: {name} must be {'above 0s and ' if name == 'period' else ''}at most 7d, got {value!r}"
                )
            object.__setattr__(self, name, seconds)

    @property
    def sets_limits(self) -> bool:
        """True when the rule's own limits decide the policy (flow-control headers' limits are then ignored)."""
        return self.parallelism is not None or self.rate is not None

    def policy(self, base: Policy) -> Policy:
        """`base` with this rule's limits laid over it."""
        changes: dict[str, object] = {}
        if self.sets_limits:
            changes["parallelism"] = self.parallelism
            changes["rate"] = self.rate
        for name in ("period", "max_waiting", "max_wait"):
            value = getattr(self, name)
            if value is not None:
                changes[name] = value
        return base.replace(**changes) if changes else base


def _methods(methods: Iterable[str] | None, where: str) -> frozenset[str] | None:
    if methods is None:
        return None
    if isinstance(methods, str | bytes) or not isinstance(methods, Iterable):
        raise ConfigError(f'{where}: methods must be a list of method names such as ["POST"], got {methods!r}')
    result = []
    for method in methods:
        if not isinstance(method, str) or not method.strip() or not method.strip().isalpha():
            raise ConfigError(f"{where}: methods: {method!r} is not an HTTP method name")
        result.append(method.strip().upper())
    if not result:
        raise ConfigError(f"{where}: methods is empty; omit it to match every method")
    return frozenset(result)


def _check_int(value: object, name: str, minimum: int, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive" if minimum > 0 else "a non-negative"
        raise ConfigError(f"{where}: {name} must be {kind} integer, got {value!r}")
