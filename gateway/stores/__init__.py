"""Stores chosen by URI: `memory://`, `redis://`, `rediss://`, `redis+cluster://host:port[,host:port…]`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import ConfigError
from .base import Admitted, Entry, KeyState, PumpResult, Queued, Refused, Store
from .memory import MemoryStore

__all__ = [
    "Admitted",
    "Entry",
    "KeyState",
    "MemoryStore",
    "PumpResult",
    "Queued",
    "Refused",
    "Store",
    "StoreURI",
    "open_store",
    "parse_store_uri",
]

SCHEMES = ("memory", "redis", "rediss", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True, slots=True)
class StoreURI:
    """A validated store URI. `repr` and `str` never show the password."""

    scheme: str
    nodes: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("rediss")

    @property
    def cluster(self) -> bool:
        return self.scheme.endswith("+cluster")

    def __str__(self) -> str:
        if self.scheme == "memory":
            return "memory://"
        auth = f"{self.username or ''}:***@" if self.password else (f"{self.username}@" if self.username else "")
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        return f"{self.scheme}://{auth}{hosts}" + ("" if self.cluster else f"/{self.db}")

    def __repr__(self) -> str:
        return f"StoreURI({str(self)!r})"


def parse_store_uri(uri: str) -> StoreURI:
    """Validate `uri`; raise ConfigError naming the problem (never echoing a password)."""
    shown = _redact(uri)
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ConfigError(f'store URI "{shown}" must start with memory://, redis://, rediss:// or redis+cluster://')
    if scheme == "memory":
        if rest.strip("/"):
            raise ConfigError(f'store URI "{shown}": memory:// takes no host or path')
        return StoreURI("memory", (), 0, None, None)
    parts = urlsplit(f"redis://{rest}")
    if parts.query or parts.fragment:
        raise ConfigError(f'store URI "{shown}": query strings and fragments are not supported')
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    if not hostlist:
        raise ConfigError(f'store URI "{shown}" names no host')
    nodes = tuple(_node(item, shown) for item in hostlist.split(","))
    cluster = scheme.endswith("+cluster")
    if len(nodes) > 1 and not cluster:
        raise ConfigError(f'store URI "{shown}": several hosts need redis+cluster://')
    path = parts.path.strip("/")
    if cluster and path:
        raise ConfigError(f'store URI "{shown}": Redis Cluster has only database 0; drop "/{path}"')
    if path and (not path.isdigit() or int(path) > 15):
        raise ConfigError(f'store URI "{shown}": database must be a number from 0 to 15, got "{path}"')
    return StoreURI(scheme, nodes, int(path or 0), username or None, password or None)


def open_store(uri: str, **options: object) -> Store:
    """Build the store for `uri`; its connections open lazily on first use."""
    parsed = parse_store_uri(uri)
    if parsed.scheme == "memory":
        return MemoryStore(**options)  # type: ignore[arg-type]
    from .redis import RedisClusterStore, RedisStore  # redis-py is only imported when used

    if parsed.cluster:
        return RedisClusterStore(parsed, **options)  # type: ignore[arg-type]
    return RedisStore(parsed, **options)  # type: ignore[arg-type]


def _node(item: str, shown: str) -> tuple[str, int]:
    host, port_text = item, "6379"
    if item.startswith("["):
        host, _, tail = item[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else port_text
    elif ":" in item:
        host, _, port_text = item.rpartition(":")
    if not host:
        raise ConfigError(f'store URI "{shown}" names no host')
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f'store URI "{shown}": port must be a number from 1 to 65535, got "{port_text}"')
    return host, int(port_text)


def _redact(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if at and ":" in userinfo:
        return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{hosts}"
    return uri
