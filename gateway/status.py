"""`flowgate status`: a terminal table of the keys of a running gateway, read from its admin port.

    flowgate status [--admin URL] [--token TOKEN] [--watch] [--interval SECONDS] [--limit N] [--search PREFIX]

Keys are sorted by backlog (waiting, then in flight); the top `--limit` are shown. `--watch` redraws every
`--interval` seconds until Ctrl-C (exit 0). Exit 1 with one line on stderr when the admin port cannot be reached or
refuses the token (a watch that loses the gateway after its first table keeps retrying and says so instead).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Final

import httpx
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

DEFAULT_ADMIN_URL: Final = "http://127.0.0.1:8081"
ADMIN_URL_ENV: Final = "FLOWGATE_ADMIN_URL"
TOKEN_ENV: Final = "FLOWGATE_ADMIN_TOKEN"
DEFAULT_INTERVAL: Final = 2.0
MIN_INTERVAL: Final = 0.5
MAX_INTERVAL: Final = 60.0
DEFAULT_LIMIT: Final = 50
REQUEST_TIMEOUT: Final = 5.0


class StatusError(Exception):
    """The admin port could not be read; `str()` is the one line to print."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal  # a refused token: retrying will not help


@dataclass(frozen=True, slots=True)
class Snapshot:
    keys: list[dict[str, Any]]
    in_flight: int
    at: float


def fetch(client: httpx.Client, url: str, search: str = "") -> Snapshot:
    """Read the keys; StatusError naming what went wrong."""
    try:
        listing = client.get("/v2/flowControl", params={"search": search} if search else None)
        _check(listing, url)
        keys = listing.json()
        in_flight = sum(int(info["parallelismCount"]) for info in keys)
    except httpx.TimeoutException:
        raise StatusError(f"the admin port at {url} did not answer within {REQUEST_TIMEOUT:g}s") from None
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise StatusError(f"cannot reach the admin port at {url}: {reason}") from None
    except (ValueError, KeyError, TypeError):
        raise StatusError(f"{url} did not answer like a Flowgate admin port") from None
    return Snapshot(keys, in_flight, time.time())


def _check(response: httpx.Response, url: str) -> None:
    if response.status_code == 401:
        hint = "the token was refused" if response.request.headers.get("authorization") else "it needs a token"
        raise StatusError(f"the admin port at {url} answered 401: {hint} (--token or {TOKEN_ENV})", fatal=True)
    if response.status_code != 200:
        try:
            message = response.json()["message"]
        except (ValueError, KeyError, TypeError):
            message = response.reason_phrase
        raise StatusError(f"the admin port at {url} answered {response.status_code}: {message}")


def table(snapshot: Snapshot, limit: int = DEFAULT_LIMIT, problem: str | None = None) -> Group:
    """The keys as a rich table, with a one-line summary above it."""
    keys = sorted(snapshot.keys, key=lambda k: (-k["waitListSize"], -k["parallelismCount"], k["flowControlKey"]))
    waiting = sum(k["waitListSize"] for k in keys)
    summary = Text(
        f"{len(keys)} key{'s' * (len(keys) != 1)} · {waiting} waiting · {snapshot.in_flight} in flight · "
        f"{time.strftime('%H:%M:%S', time.localtime(snapshot.at))}"
    )
    if problem:
        summary.append(f"  ! {problem}", style="bold red")
    grid = Table(box=None, pad_edge=False, header_style="bold")
    grid.add_column("KEY", overflow="fold", max_width=60)
    grid.add_column("WAITING", justify="right")
    grid.add_column("IN FLIGHT", justify="right")
    grid.add_column("RATE USED", justify="right")
    grid.add_column("STATE")
    for info in keys[:limit]:
        state = Text("paused", style="bold red") if info["isPaused"] else Text("running", style="green")
        flags = (("parallelism", info["isPinnedParallelism"]), ("rate", info["isPinnedRate"]))
        pinned = [name for name, flag in flags if flag]
        if pinned:
            state.append(f" pinned {'+'.join(pinned)}", style="magenta")
        grid.add_row(
            info["flowControlKey"],
            str(info["waitListSize"]),
            f"{info['parallelismCount']}/{_limit(info['parallelismMax'])}",
            f"{info['rateCount']}/{_limit(info['rateMax'])} per {_period(info['ratePeriod'])}",
            state,
        )
    parts: list[Any] = [summary, grid]
    if len(keys) > limit:
        parts.append(Text(f"… and {len(keys) - limit} more keys (--limit)", style="dim"))
    elif not keys:
        parts.append(Text("no active key", style="dim"))
    return Group(*parts)


def _limit(value: int) -> str:
    return str(value) if value > 0 else "∞"


def _period(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def run(
    admin: str | None = None,
    token: str | None = None,
    *,
    watch: bool = False,
    interval: float = DEFAULT_INTERVAL,
    limit: int = DEFAULT_LIMIT,
    search: str = "",
    console: Console | None = None,
) -> int:
    """Print the table (or keep redrawing it with `watch`); return the exit code."""
    url = (admin or os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL).rstrip("/")
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    interval = min(max(interval, MIN_INTERVAL), MAX_INTERVAL)
    with httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT, trust_env=False) as client:
        try:
            snapshot = fetch(client, url, search)
        except StatusError as exc:
            print(f"flowgate: {exc}", file=sys.stderr)
            return 1
        if not watch:
            console.print(table(snapshot, limit))
            return 0
        return _watch(client, url, search, snapshot, interval, limit, console)


def _watch(
    client: httpx.Client, url: str, search: str, snapshot: Snapshot, interval: float, limit: int, console: Console
) -> int:
    """Redraw in place on a terminal; elsewhere (a pipe, a log file) print one table after another."""
    from rich.live import Live

    live = Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else None

    def show(view: Group) -> None:
        if live is not None:
            live.update(view, refresh=True)
        else:
            console.print(view)

    try:
        if live is not None:
            live.start()
        show(table(snapshot, limit))
        while True:
            time.sleep(interval)
            try:
                snapshot = fetch(client, url, search)
                show(table(snapshot, limit))
            except StatusError as exc:
                if exc.fatal:
                    if live is not None:
                        live.stop()
                    print(f"flowgate: {exc}", file=sys.stderr)
                    return 1
                show(table(snapshot, limit, problem=f"{exc} (retrying)"))
    except KeyboardInterrupt:
        return 0
    finally:
        if live is not None:
            live.stop()


__all__ = ["StatusError", "fetch", "run", "table"]
