"""FlowControlMiddleware: the sidecar's admission in front of any ASGI app (Starlette, FastAPI, ...).

Per HTTP request: route it (the `key=` function first, then the rules and flow-control headers, shared with the
proxy through `Router`) → wait for a lease in FIFO order, reading the request in the background so a client that
leaves withdraws its ticket and the app never runs → call the app → release the lease when the response's last
body chunk is sent, or when the app raises or is cancelled. A response carrying `Flow-Control-Hold: 1` keeps the
token (detached) until `scope["flowgate"].release()` or the lease's expiry. Other scopes pass straight through;
lifespan messages are watched to open the store at startup and close it at shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Final

from .config import Settings, load_settings
from .engine import FlowController, Lease
from .errors import ConfigError, DeliveryError, InvalidFlowControl
from .http import send_error
from .inbox import ClientDisconnected, RequestInbox
from .metrics import DeliveryObserver, Metrics
from .policy import Policy, parse_flow_control_value, validate_key
from .routing import Route, Router
from .rules import Rule
from .stores import Store, open_store, parse_store_uri
from .types import ASGIApp, Message, Receive, Scope, Send
from .units import parse_duration

logger = logging.getLogger("flowgate.middleware")

#: The scope entry holding a flow-controlled request's `FlowGrant`.
SCOPE_KEY: Final = "flowgate"
_HOLD: Final = b"flow-control-hold"
_WAITED: Final = b"flow-control-waited"
_FINAL: Final = frozenset({"http.response.body", "http.response.zerocopysend", "http.response.pathsend"})
_LIFESPAN_END: Final = frozenset({"lifespan.startup.failed", "lifespan.shutdown.complete", "lifespan.shutdown.failed"})

KeyFunction = Callable[[Scope], str | None]


class FlowGrant:
    """The lease of one flow-controlled request, found at `scope["flowgate"]` while the app runs.

    An app that answers before its work is done sends `Flow-Control-Hold: 1` and later calls `release()` (or
    lets the lease expire after `lease_ttl`; `extend()` pushes the expiry back).
    """

    __slots__ = ("_state", "controller", "lease")

    def __init__(self, lease: Lease, controller: FlowController) -> None:
        self.lease = lease
        self.controller = controller
        self._state = "open"  # open → held (Flow-Control-Hold) → done; or open → done

    def __repr__(self) -> str:
        return f"FlowGrant(key={self.lease.key!r}, state={self._state})"

    @property
    def key(self) -> str:
        return self.lease.key

    @property
    def waited(self) -> float:
        """Seconds the request waited for its token."""
        return self.lease.waited

    async def release(self) -> bool:
        """Free the token now; False if it was already released or had expired."""
        if self._state == "done":
            return False
        self._state = "done"
        return await self.controller.release(self.lease)

    async def extend(self, ttl: float | None = None) -> bool:
        """Push a held lease's expiry to now + `ttl` (default `lease_ttl`); False if unknown or expired."""
        return await self.controller.renew(self.lease, ttl)

    def _hold(self) -> None:
        if self._state == "open":
            self._state = "held"
            self.controller.detach(self.lease)

    def _finish(self) -> None:
        if self._state == "open":
            self._state = "done"
            self.controller.release_soon(self.lease)


class FlowControlMiddleware:
    """Pure ASGI middleware: requests over their key's limits wait for a token, exactly as behind the sidecar.

    `config` reads the sidecar's TOML file (store, rules, defaults, lease_ttl, trust_policy_headers,
    trusted_proxies; upstream is not needed, environment variables are not read). Every other argument, when
    given, wins over the file. `store` is a URI (`memory://`, `redis://…`, opened at startup or on first use and
    closed at shutdown) or a `Store` you own. `key(scope)` returns a request's key, or None to leave it to the
    rules and headers; `policy` (a `Policy` or `"parallelism=2, rate=10, period=1m"`) gives that key's limits.
    `metrics` (a `gateway.metrics.Metrics`) counts admissions, rejections, waiting and in-flight requests; serve
    `metrics.render()` wherever your app exposes Prometheus metrics.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: str | os.PathLike[str] | None = None,
        store: str | Store | None = None,
        rules: Sequence[Rule] = (),
        key: KeyFunction | None = None,
        policy: Policy | str | None = None,
        lease_ttl: float | str | None = None,
        trust_policy_headers: bool | None = None,
        defaults: Policy | None = None,
        trusted_proxies: Sequence[str] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.observer = DeliveryObserver(metrics)
        settings = Settings()
        if config is not None:
            settings = load_settings({"config": os.fspath(config)}, environ={}, require_upstream=False)
        overrides: dict[str, object] = {}
        if isinstance(store, str):
            parse_store_uri(store)  # ConfigError naming the problem
            overrides["store"] = store
        elif store is not None and not isinstance(store, Store):
            raise ConfigError(f"store must be a store URI or a Store, got {type(store).__name__}")
        if rules:
            for rule in rules:
                if not isinstance(rule, Rule):
                    raise ConfigError(f"rules must be Rule objects, got {type(rule).__name__}")
            overrides["rules"] = tuple(rules)
        if lease_ttl is not None:
            overrides["lease_ttl"] = _lease_ttl(lease_ttl)
        if trust_policy_headers is not None:
            overrides["trust_policy_headers"] = trust_policy_headers
        if defaults is not None:
            overrides["defaults"] = defaults
        if trusted_proxies is not None:
            overrides["trusted_proxies"] = tuple(trusted_proxies)
        self.settings = dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]
        self.router: Router = self.settings.router()
        self._store = store if isinstance(store, Store) else None
        self._key = key
        self._policy = _key_policy(key, policy, self.settings.defaults)
        self._controller: FlowController | None = None
        self._owned: Store | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        store = repr(self._store) if self._store is not None else repr(str(self.settings.store_uri))
        return f"FlowControlMiddleware(store={store}, router={self.router!r}, key={self._key is not None})"

    @property
    def controller(self) -> FlowController | None:
        """The FlowController while the store is open, else None."""
        return self._controller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            try:
                route = self._route(scope)
            except DeliveryError as exc:  # 400 invalid_flow_control / missing_key_part
                self.observer.refused(exc)
                await send_error(send, exc)
                return
            if route is None:
                await self.app(scope, receive, send)
            else:
                await self._controlled(scope, receive, send, route)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def open(self) -> FlowController:
        """The controller, building it and the store on first use in this event loop.

        Nothing here awaits (stores connect lazily), so concurrent first requests cannot race.
        """
        loop = asyncio.get_running_loop()
        if self._controller is not None and self._loop is loop:
            return self._controller
        # First use, or a new event loop (e.g. test clients that run each request in its own loop): the old
        # controller's timers and connections belong to a loop that is gone.
        store = self._store
        if store is None:
            store = self._owned = open_store(self.settings.store, max_keys=self.settings.max_keys)
        self._controller = FlowController(store, lease_ttl=self.settings.lease_ttl)
        self._loop = loop
        return self._controller

    async def aclose(self) -> None:
        """Release held leases, withdraw waiting tickets, and close the store if it was opened from a URI."""
        controller, self._controller = self._controller, None
        owned, self._owned = self._owned, None
        self._loop = None
        if controller is not None:
            await controller.close()
        if owned is not None:
            await owned.close()

    # -- HTTP ---------------------------------------------------------------------------------------------------

    def _route(self, scope: Scope) -> Route | None:
        if self._key is not None:
            key = self._key(scope)
            if key is not None:
                assert self._policy is not None
                return Route(validate_key(key), self._policy, "")
        return None if self.router.passthrough else self.router.route(scope)

    async def _controlled(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        controller = self.open()
        observer = self.observer
        task = asyncio.current_task()
        inbox = RequestInbox(receive, task)  # while armed, a client that leaves cancels this task
        try:
            observer.entered(route)
            try:
                lease = await controller.acquire(route.key, route.policy)
            except asyncio.CancelledError:
                observer.cancelled(route)
                inbox.disarm()
                if inbox.disconnected and task is not None and task.uncancel() == 0:
                    return  # the client left while waiting: its ticket is withdrawn, the app never runs
                raise
            except DeliveryError as exc:  # 429 waitlist_full / wait_timeout, 503 store_unavailable
                observer.rejected(route, exc)
                inbox.disarm()
                await send_error(send, exc)
                return
            except BaseException:
                observer.cancelled(route)
                raise
            observer.admitted(route, lease)
            inbox.disarm()
            grant = FlowGrant(lease, controller)
            scope[SCOPE_KEY] = grant
            try:
                with observer.in_flight(route):
                    await self.app(scope, _receiver(inbox), _sender(send, grant))
            finally:
                grant._finish()
        finally:
            inbox.close()

    # -- lifespan -----------------------------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def lifespan_receive() -> Message:
            nonlocal started
            message = await receive()
            if message["type"] == "lifespan.startup":
                started = True
                self.open()
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"] in _LIFESPAN_END:
                await self._close_quietly()
            await send(message)

        try:
            await self.app(scope, lifespan_receive, lifespan_send)
        except Exception:
            if started:
                raise
            logger.debug("the app does not handle lifespan; the middleware answers it alone", exc_info=True)
        if not started:
            await self._own_lifespan(receive, send)

    async def _own_lifespan(self, receive: Receive, send: Send) -> None:
        """The lifespan protocol for an app that does not speak it."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._close_quietly()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _close_quietly(self) -> None:
        try:
            await self.aclose()
        except Exception:  # shutdown goes on; leases expire by themselves
            logger.warning("closing the flow-control store failed", exc_info=True)


def _receiver(inbox: RequestInbox) -> Receive:
    """The app's `receive`: the body the inbox read ahead, then `http.disconnect` when the client leaves."""

    async def receive() -> Message:
        try:
            chunk, more = await inbox.next()
        except ClientDisconnected:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": more}

    return receive


def _sender(send: Send, grant: FlowGrant) -> Send:
    """The app's `send`: adds Flow-Control-Waited, honours Flow-Control-Hold, releases after the last chunk."""
    waited = str(round(grant.waited * 1000)).encode()

    async def wrapped(message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = []
            for name, value in message.get("headers", ()):
                if name.lower() == _HOLD:
                    if value.strip().lower() in (b"1", b"true"):
                        grant._hold()
                    continue
                headers.append((name, value))
            headers.append((_WAITED, waited))
            message = {**message, "headers": headers}
        elif kind in _FINAL and not message.get("more_body", False):
            try:
                await send(message)
            finally:
                grant._finish()
            return
        await send(message)

    return wrapped


def _lease_ttl(value: float | str) -> float:
    try:
        seconds = parse_duration(value, "lease_ttl")
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if seconds < 1:
        raise ConfigError(f"lease_ttl must be at least 1s, got {value!r}")
    return seconds


def _key_policy(key: KeyFunction | None, policy: Policy | str | None, defaults: Policy) -> Policy | None:
    if key is None:
        if policy is not None:
            raise ConfigError("policy= gives the limits of the key= function's keys; pass key= too")
        return None
    if not callable(key):
        raise ConfigError(f"key must be a function of the ASGI scope, got {type(key).__name__}")
    if policy is None:
        raise ConfigError('key= needs policy= with its limits, e.g. policy="parallelism=2, rate=10, period=1m"')
    if isinstance(policy, str):
        try:
            return parse_flow_control_value(policy, defaults)
        except InvalidFlowControl as exc:
            raise ConfigError(f"policy: {exc.message}") from None
    if not isinstance(policy, Policy):
        raise ConfigError(f"policy must be a Policy or a flow-control value string, got {type(policy).__name__}")
    return policy


__all__ = ["SCOPE_KEY", "FlowControlMiddleware", "FlowGrant"]
