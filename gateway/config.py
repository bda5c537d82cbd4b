"""Settings of `flowgate serve`: flags > environment (`FLOWGATE_*`) > TOML config file > defaults.

`load_settings` merges the sources and validates every value; a bad value raises `ConfigProblems` (a
`ConfigError`) whose `problems` name the source (`flowgate.toml:12`, `FLOWGATE_PORT`, `--port`), the field
(`rules[2].period`) and what is wrong. `check_config_file` collects every problem of one file for `flowgate check`.
Secrets (the admin token, a Redis password) never appear in a repr or an error message.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from .engine import DEFAULT_LEASE_TTL
from .errors import ConfigError
from .policy import MAX_PERIOD, Policy, parse_rate
from .routing import Router
from .rules import Rule
from .stores import StoreURI, parse_store_uri
from .units import parse_duration, parse_size
from .upstream import KINDS

#: Without a store URI the gateway keeps flow-control state in its own memory (one process).
DEFAULT_STORE = "memory://"
#: The proxy listens on loopback unless told otherwise: a gateway must not expose an app by accident. Containers
#: need `0.0.0.0`; the Dockerfile sets `FLOWGATE_HOST=0.0.0.0` for that reason (see docs/configuration.md).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
#: The admin port steers the gateway (lease release, later pause/pin): loopback only by default.
DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_ADMIN_PORT = 8081
DEFAULT_WORKERS = 1
MAX_WORKERS = 256
DEFAULT_LOG_LEVEL = "info"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
#: `text` (one readable line per event) or `json` (one JSON object per line, for log shippers).
DEFAULT_LOG_FORMAT = "text"
LOG_FORMATS = ("text", "json")
#: The proxy's upstream HTTP client: "lean" (HTTP/1.1 on asyncio protocols, ~6x aiohttp; http:// only),
#: "aiohttp", or "auto" (lean for http://, aiohttp for https://). See benchmarks/RESULTS.md.
DEFAULT_UPSTREAM_CLIENT = "auto"
UPSTREAM_CLIENTS = KINDS
#: Longest the upstream may take to answer (headers) and the longest stall while streaming its body.
DEFAULT_UPSTREAM_TIMEOUT = 60.0
#: Largest request body forwarded ("10MB", decimal megabytes as in units.parse_size).
DEFAULT_MAX_BODY = 10_000_000
#: Live flow-control keys one store tracks; a new key beyond it is refused with 429 too_many_keys (approximate on
#: Redis: see docs/engine.md). Idle keys expire and stop counting.
DEFAULT_MAX_KEYS = 100_000
#: Longest a client may take to send a request head (slow-loris guard; 408 request_timeout, connection closed).
DEFAULT_HEADER_TIMEOUT = 10.0
#: Longest the proxy waits, summed over a request body, for the client's bytes (408 body_timeout); time the
#: request spends waiting for a token does not count.
DEFAULT_BODY_TIMEOUT = 60.0
#: A lease not renewed for this long is reclaimed (see engine.FlowController).
DEFAULT_LEASE_TTL_SECONDS = DEFAULT_LEASE_TTL
MIN_LEASE_TTL = 1.0
#: On SIGTERM, in-flight requests get this long to finish before they are cancelled.
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_TRUST_POLICY_HEADERS = True
#: One log line per request costs ~10-20 µs; off unless asked for.
DEFAULT_ACCESS_LOG = False
#: Requests that can go at once are relayed without a task (gateway/relay.py); off only to compare or rule it out.
DEFAULT_EXPRESS_LANE = True
MAX_TIMEOUT = 86400.0

ENV_PREFIX = "FLOWGATE_"
CONFIG_ENV = "FLOWGATE_CONFIG"


@dataclass(frozen=True, slots=True)
class Problem:
    """One invalid setting: where it came from (`file:line`, an environment variable or a flag) and what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ConfigProblems(ConfigError):
    """Every problem found; `str()` is the first one (one line), `problems` holds them all."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        more = len(problems) - 1
        super().__init__(str(problems[0]) + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""))


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `flowgate serve` needs. Build it with `load_settings`; direct construction is not validated."""

    upstream: str | None = None
    store: str = DEFAULT_STORE
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    admin_host: str = DEFAULT_ADMIN_HOST
    admin_port: int = DEFAULT_ADMIN_PORT
    admin_token: str | None = None
    workers: int = DEFAULT_WORKERS
    log_level: str = DEFAULT_LOG_LEVEL
    log_format: str = DEFAULT_LOG_FORMAT
    access_log: bool = DEFAULT_ACCESS_LOG
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    upstream_client: str = DEFAULT_UPSTREAM_CLIENT
    express_lane: bool = DEFAULT_EXPRESS_LANE
    max_body: int = DEFAULT_MAX_BODY
    max_keys: int = DEFAULT_MAX_KEYS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    lease_ttl: float = DEFAULT_LEASE_TTL_SECONDS
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    trust_policy_headers: bool = DEFAULT_TRUST_POLICY_HEADERS
    trusted_proxies: tuple[str, ...] = ()
    defaults: Policy = field(default_factory=Policy)
    rules: tuple[Rule, ...] = ()
    config: str | None = None  # the config file read, if any

    def __repr__(self) -> str:
        shown: list[str] = []
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "admin_token" and value is not None:
                text = "'***'"
            elif item.name == "store":
                try:
                    text = repr(str(parse_store_uri(value)))
                except ConfigError:
                    text = "'<invalid store URI>'"
            else:
                text = repr(value)
            shown.append(f"{item.name}={text}")
        return f"Settings({', '.join(shown)})"

    @property
    def store_uri(self) -> StoreURI:
        """The parsed store URI (its `str` hides the password)."""
        return parse_store_uri(self.store)

    def default_policy(self) -> Policy:
        """The policy every key starts from (the `[defaults]` table)."""
        return self.defaults

    def router(self) -> Router:
        """The request router for these rules and header settings."""
        return Router(
            self.rules,
            defaults=self.defaults,
            trust_policy_headers=self.trust_policy_headers,
            trusted_proxies=self.trusted_proxies,
        )


# -- value parsers: each returns the parsed value or raises ValueError with a message naming `name` -------------


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {_kind(value)}")
    return value


def _integer(value: object, name: str, low: int, high: int, from_text: bool) -> int:
    if from_text and isinstance(value, str):
        raw = value.strip()
        if not raw.isascii() or not raw.lstrip("-").isdigit() or len(raw) > 12:
            raise ValueError(f'{name} must be an integer from {low} to {high}, got "{value}"')
        value = int(raw)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {_kind(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value}")
    return value


def _boolean(value: object, name: str, from_text: bool) -> bool:
    if from_text and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f'{name} must be true or false, got "{value}"')
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_kind(value)}")
    return value


def _duration(value: object, name: str, low: float, high: float, low_inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{name} must be a duration such as 500ms, 10s or 1h30m, got {_kind(value)}")
    seconds = parse_duration(value, name)
    too_low = seconds < low if low_inclusive else seconds <= low
    if too_low or seconds > high:
        lower = f"at least {low:g}s" if low_inclusive else f"above {low:g}s"
        raise ValueError(f"{name} must be {lower} and at most {_human(high)}, got {_shown(value)}")
    return seconds


def _size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{name} must be a size such as 512KB or 10MB, got {_kind(value)}")
    size = parse_size(value, name)
    if size < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {_shown(value)}")
    return size


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62})?)*\.?")


def _host(value: object, name: str) -> str:
    host = _text(value, name).strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host) or len(host) > 253:
            raise ValueError(f'{name} must be an IP address or a host name, got "{value}"') from None
    return host


def _upstream(value: object, name: str) -> str:
    raw = _text(value, name).strip()
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ValueError(f'{name} must be a URL such as http://127.0.0.1:8000, got "{_strip_userinfo(raw)}"') from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f'{name} must be a URL such as http://127.0.0.1:8000, got "{_strip_userinfo(raw)}"')
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{name} must not carry credentials (user:password@); the upstream sees the client's headers")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f'{name} must be scheme://host[:port] without a path or query, got "{raw}"')
    if port == 0:
        raise ValueError(f'{name} must name a port from 1 to 65535, got "{raw}"')
    return raw.rstrip("/")


def _strip_userinfo(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    _, at, hostpart = rest.rpartition("@")
    return f"{scheme}{sep}***@{hostpart}" if at else url


def _store(value: object, name: str) -> str:
    raw = _text(value, name).strip()
    try:
        parse_store_uri(raw)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None  # names the "store URI", with any password masked
    return raw


def _token(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")  # never echo a secret
    if not value or any(not (33 <= ord(ch) < 127) for ch in value):
        raise ValueError(f"{name} must be non-empty printable ASCII without spaces (it is sent in a header)")
    return value


def _log_level(value: object, name: str) -> str:
    level = _text(value, name).strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f'{name} must be one of {", ".join(LOG_LEVELS)}, got "{value}"')
    return level


def _log_format(value: object, name: str) -> str:
    text = _text(value, name).strip().lower()
    if text not in LOG_FORMATS:
        raise ValueError(f'{name} must be one of {", ".join(LOG_FORMATS)}, got "{value}"')
    return text


def _upstream_client(value: object, name: str) -> str:
    text = _text(value, name).strip().lower()
    if text not in UPSTREAM_CLIENTS:
        raise ValueError(f'{name} must be one of {", ".join(UPSTREAM_CLIENTS)}, got "{value}"')
    return text


def _proxies(value: object, name: str, from_text: bool) -> tuple[str, ...]:
    if from_text and isinstance(value, str):
        items: list[object] = [item for item in value.split(",") if item.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise ValueError(
            f'{name} must be a list of IP addresses or networks such as ["10.0.0.0/8"], got {_kind(value)}'
        )
    result = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"{name}[{index}] must be a string, got {_kind(item)}")
        try:
            ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise ValueError(f'{name}[{index}] must be an IP address or CIDR network, got "{item}"') from None
        result.append(item.strip())
    return tuple(result)


Parser = Callable[[object, str, bool], Any]

# Top-level scalar settings: the parser, and whether an environment variable / flag may set it.
_TOP: dict[str, Parser] = {
    "upstream": lambda v, n, t: _upstream(v, n),
    "store": lambda v, n, t: _store(v, n),
    "host": lambda v, n, t: _host(v, n),
    "port": lambda v, n, t: _integer(v, n, 1, 65535, t),
    "admin_host": lambda v, n, t: _host(v, n),
    "admin_port": lambda v, n, t: _integer(v, n, 1, 65535, t),
    "admin_token": lambda v, n, t: _token(v, n),
    "workers": lambda v, n, t: _integer(v, n, 1, MAX_WORKERS, t),
    "log_level": lambda v, n, t: _log_level(v, n),
    "log_format": lambda v, n, t: _log_format(v, n),
    "access_log": lambda v, n, t: _boolean(v, n, t),
    "upstream_timeout": lambda v, n, t: _duration(v, n, 0, MAX_TIMEOUT),
    "upstream_client": lambda v, n, t: _upstream_client(v, n),
    "express_lane": lambda v, n, t: _boolean(v, n, t),
    "max_body": lambda v, n, t: _size(v, n),
    "max_keys": lambda v, n, t: _integer(v, n, 1, 10**9, t),
    "header_timeout": lambda v, n, t: _duration(v, n, 0, MAX_TIMEOUT),
    "body_timeout": lambda v, n, t: _duration(v, n, 0, MAX_TIMEOUT),
    "lease_ttl": lambda v, n, t: _duration(v, n, MIN_LEASE_TTL, MAX_TIMEOUT, low_inclusive=True),
    "drain_timeout": lambda v, n, t: _duration(v, n, 0, MAX_TIMEOUT, low_inclusive=True),
    "trust_policy_headers": lambda v, n, t: _boolean(v, n, t),
    "trusted_proxies": _proxies,
}
_DEFAULTS_FIELDS: dict[str, Callable[[object, str], Any]] = {
    "max_waiting": lambda v, n: _integer(v, n, 0, 10**9, False),
    "max_wait": lambda v, n: _duration(v, n, 0, MAX_PERIOD, low_inclusive=True),
}
_RULE_FIELDS = ("name", "path", "methods", "host", "key", "parallelism", "rate", "period", "max_waiting", "max_wait")

#: The environment variable of each top-level setting (`FLOWGATE_` + upper-cased name).
ENV_VARS: dict[str, str] = {name: ENV_PREFIX + name.upper() for name in _TOP}


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    for kind, text in names.items():
        if type(value) is kind:
            return f"{text} ({_shown(value)})" if kind in (bool, int, float, str) else text
    return type(value).__name__


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value[:80]}"'
    return repr(value)


def _human(seconds: float) -> str:
    return f"{seconds / 86400:g}d" if seconds >= 86400 else f"{seconds:g}s"


# -- the config file ----------------------------------------------------------------------------------------------

_HEADER_LINE = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")
_PARENT = re.compile(r"(\.[^.\[\]]+|\[\d+\])$")
_KEY_LINE = re.compile(r"\s*[\"']?([A-Za-z0-9_-]+)[\"']?\s*(\.\s*[\"']?[A-Za-z0-9_-]+[\"']?\s*)*=")


def key_lines(text: str) -> dict[str, int]:
    """Line numbers of the keys of a TOML text: `port`, `defaults`, `defaults.max_wait`, `rules[2]`,
    `rules[2].period` (first occurrence). A best-effort scan: dotted or inline-table keys map to their table."""
    lines: dict[str, int] = {}
    section = ""
    counters: dict[str, int] = {}
    in_multiline: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if in_multiline is not None:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        header = _HEADER_LINE.match(line)
        if header is not None and "=" not in line.split("#")[0]:
            name = header.group(2).strip().strip("\"'")
            if header.group(1) == "[[":
                index = counters[name] = counters.get(name, -1) + 1
                section = f"{name}[{index}]"
            else:
                section = name
            lines.setdefault(section, number)
            continue
        match = _KEY_LINE.match(line)
        if match is not None:
            name = match.group(1)
            lines.setdefault(f"{section}.{name}" if section else name, number)
            for quote in ('"""', "'''"):
                if line.count(quote) % 2 == 1:
                    in_multiline = quote
    return lines


@dataclass
class _FileReader:
    """Parses and validates one config file, collecting every problem."""

    path: str
    text: str = ""
    lines: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def where(self, name: str) -> str:
        probe = name
        while probe not in self.lines:
            parent = _PARENT.sub("", probe)
            if parent == probe:
                return self.path
            probe = parent
        return f"{self.path}:{self.lines[probe]}"

    def problem(self, name: str, message: str) -> None:
        self.problems.append(Problem(self.where(name), message))

    def read(self) -> dict[str, Any]:
        """Return the validated values the file sets (Settings field names)."""
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            self.problems.append(Problem(self.path, f"cannot read the config file: {exc.strerror or exc}"))
            return {}
        try:
            self.text = raw.decode("utf-8")
            document = tomllib.loads(self.text)
        except UnicodeDecodeError:
            self.problems.append(Problem(self.path, "the config file is not UTF-8 text"))
            return {}
        except tomllib.TOMLDecodeError as exc:
            line = re.search(r"at line (\d+)", str(exc))
            where = f"{self.path}:{line.group(1)}" if line else self.path
            self.problems.append(Problem(where, f"invalid TOML: {re.sub(r' [(]at line.*', '', str(exc))}"))
            return {}
        self.lines = key_lines(self.text)
        values: dict[str, Any] = {}
        for name, value in document.items():
            if name in _TOP:
                try:
                    values[name] = _TOP[name](value, name, False)
                except ValueError as exc:
                    self.problem(name, str(exc))
            elif name == "defaults":
                policy = self._defaults(value)
                if policy is not None:
                    values["defaults"] = policy
            elif name == "rules":
                rules = self._rules(value)
                if rules is not None:
                    values["rules"] = rules
            else:
                known = ", ".join([*_TOP, "defaults", "rules"])
                self.problem(name, f'unknown setting "{name}"; known settings: {known}')
        return values

    def _defaults(self, table: object) -> Policy | None:
        if not isinstance(table, dict):
            self.problem("defaults", f"defaults must be a table ([defaults]), got {_kind(table)}")
            return None
        changes: dict[str, Any] = {}
        ok = True
        for name, value in table.items():
            full = f"defaults.{name}"
            if name not in _DEFAULTS_FIELDS:
                self.problem(full, f'unknown setting "{full}"; [defaults] takes max_waiting and max_wait')
                ok = False
                continue
            try:
                changes[name] = _DEFAULTS_FIELDS[name](value, full)
            except ValueError as exc:
                self.problem(full, str(exc))
                ok = False
        return Policy(**changes) if ok else None

    def _rules(self, items: object) -> tuple[Rule, ...] | None:
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            self.problem("rules", "rules must be an array of tables ([[rules]] sections)")
            return None
        rules: list[Rule] = []
        names: dict[str, int] = {}
        for index, item in enumerate(items):
            rule = self._rule(index, item)
            if rule is None:
                continue
            if rule.name:
                if rule.name in names:
                    self.problem(
                        f"rules[{index}].name",
                        f'rules[{index}].name "{rule.name}" is already the name of rules[{names[rule.name]}]',
                    )
                    continue
                names[rule.name] = index
            rules.append(rule)
        return tuple(rules) if len(rules) == len(items) else None

    def _rule(self, index: int, item: dict[str, Any]) -> Rule | None:
        prefix = f"rules[{index}]"
        before = len(self.problems)
        fields_: dict[str, Any] = {}
        for name, value in item.items():
            full = f"{prefix}.{name}"
            if name not in _RULE_FIELDS:
                self.problem(full, f'unknown setting "{full}"; a rule takes {", ".join(_RULE_FIELDS)}')
                continue
            try:
                fields_[name] = _rule_field(name, value, full)
            except ValueError as exc:
                self.problem(full, str(exc))
        if "key" not in item:
            self.problem(prefix, f'{prefix} needs a key, e.g. key = "tenant:{{header:X-Tenant-Id}}"')
        rate = fields_.get("rate")
        if isinstance(rate, tuple):
            if "period" in item:
                self.problem(f"{prefix}.period", f'{prefix}.rate "{item["rate"]}" already sets the period; drop period')
            fields_["rate"], fields_["period"] = rate
        if len(self.problems) > before:
            return None
        try:
            return Rule(**fields_)
        except ConfigError as exc:
            message = str(exc)
            # Rule's messages read 'rule "name": field ...': point at that field's line when we can tell it.
            detail = message.split(": ", 1)[-1]
            named = next((name for name in _RULE_FIELDS if detail.startswith(name)), None)
            self.problem(f"{prefix}.{named}" if named else prefix, f"{prefix}: {detail}")
            return None


def _rule_field(name: str, value: object, full: str) -> Any:
    if name in ("name", "key"):
        text = _text(value, full)
        if name == "key" and not text:
            raise ValueError(f"{full} must not be empty")
        return text
    if name == "path":
        text = _text(value, full)
        if not text.startswith("/"):
            raise ValueError(f'{full} must be a path prefix starting with "/", got "{text}"')
        return text
    if name == "host":
        return _host(value, full)
    if name == "methods":
        if not isinstance(value, list) or not value:
            raise ValueError(f'{full} must be a non-empty list of methods such as ["POST"], got {_kind(value)}')
        for position, method in enumerate(value):
            if not isinstance(method, str) or not method.isascii() or not method.isalpha():
                raise ValueError(f"{full}[{position}] must be an HTTP method name such as POST, got {_kind(method)}")
        return frozenset(method.upper() for method in value)
    if name == "parallelism":
        return _integer(value, full, 1, 10**9, False)
    if name == "rate":
        if isinstance(value, str):
            try:
                return parse_rate(value)
            except ValueError as exc:
                raise ValueError(f"{full}: {exc}") from None
        return _integer(value, full, 1, 10**9, False)
    if name == "max_waiting":
        return _integer(value, full, 0, 10**9, False)
    if name == "period":
        return _duration(value, full, 0, MAX_PERIOD)
    return _duration(value, full, 0, MAX_PERIOD, low_inclusive=True)  # max_wait


def check_config_file(path: str) -> list[Problem]:
    """Every problem of the config file at `path` (empty when it is valid)."""
    reader = _FileReader(path)
    values = reader.read()
    if not reader.problems:
        _check_router(values, reader.problems, reader.where("rules"))
    return reader.problems


def _check_router(values: Mapping[str, Any], problems: list[Problem], where: str) -> None:
    try:
        Router(values.get("rules", ()), defaults=values.get("defaults", Policy()))
    except ConfigError as exc:
        problems.append(Problem(where, str(exc)))


# -- merging the sources ------------------------------------------------------------------------------------------


def load_settings(
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_upstream: bool = True,
) -> Settings:
    """Settings from `flags` (Settings field names -> text, None = not given) > `environ` > the config file
    (`flags["config"]`, else `FLOWGATE_CONFIG`) > defaults. Raises ConfigProblems listing every problem."""
    flags = {name: value for name, value in (flags or {}).items() if value is not None}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    problems: list[Problem] = []

    config_path = flags.get("config") or environ.get(CONFIG_ENV) or None
    if config_path is not None:
        config_path = str(config_path)
        reader = _FileReader(config_path)
        file_values = reader.read()
        problems += reader.problems
        values.update(file_values)
        origin.update({name: reader.where(name) for name in file_values})

    for name, parser in _TOP.items():
        variable = ENV_VARS[name]
        if variable in environ:
            try:
                values[name] = parser(environ[variable], name, True)
                origin[name] = variable
            except ValueError as exc:
                problems.append(Problem(variable, str(exc)))
    for name, value in flags.items():
        if name == "config":
            continue
        if name not in _TOP:
            raise TypeError(f"unknown setting {name!r}")
        flag = "--" + name.replace("_", "-")
        try:
            values[name] = _TOP[name](value, name, isinstance(value, str))
            origin[name] = flag
        except ValueError as exc:
            problems.append(Problem(flag, str(exc)))

    if not problems:
        _cross_checks(values, origin, problems, require_upstream)
    if problems:
        raise ConfigProblems(problems)
    return Settings(config=config_path, **values)


def _cross_checks(values: dict[str, Any], origin: dict[str, str], problems: list[Problem], need_upstream: bool) -> None:
    settings = Settings(**values)
    if need_upstream and settings.upstream is None:
        problems.append(
            Problem("", "no upstream: pass --upstream URL, set FLOWGATE_UPSTREAM or upstream in the config file")
        )
    if settings.workers > 1 and settings.store_uri.scheme == "memory":
        problems.append(
            Problem(
                origin.get("workers", "workers"),
                f"workers = {settings.workers} needs a shared store: the memory:// store lives inside one process, "
                "so each worker would enforce the limits on its own; use --store redis://… or run one worker",
            )
        )
    if settings.upstream_client == "lean" and (settings.upstream or "").startswith("https:"):
        problems.append(
            Problem(
                origin.get("upstream_client", "upstream_client"),
                'upstream_client = "lean" speaks plain http:// only; use "aiohttp" or "auto" for an https:// upstream',
            )
        )
    if settings.port == settings.admin_port and _same_interface(settings.host, settings.admin_host):
        problems.append(
            Problem(
                origin.get("admin_port", origin.get("port", "admin_port")),
                f"port and admin_port are both {settings.port}",
            )
        )
    _check_router(values, problems, origin.get("rules", "rules"))


def _same_interface(first: str, second: str) -> bool:
    wildcard = ("0.0.0.0", "::", "")
    return first == second or first in wildcard or second in wildcard


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """`FLOWGATE_*` variables that set nothing (probably typos), for a warning at start."""
    environ = os.environ if environ is None else environ
    known = {*ENV_VARS.values(), CONFIG_ENV, "FLOWGATE_ADMIN_URL"}  # the last one: `flowgate status`
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)
