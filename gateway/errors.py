"""Flowgate's exceptions.

Every error a client can see maps to one JSON response (`{"error": code, "message": ...}`)::

    FlowgateError                      base; never raised itself
    ├── ConfigError                    bad settings, config file or store URI (exit 2 at start)
    └── DeliveryError                  answered to the client with `status` and `code`
        ├── InvalidFlowControl         400 invalid_flow_control (bad policy value or key)
        ├── MissingKeyPart             400 missing_key_part
        ├── BadRequest                 400 bad_request (framing the gateway will not forward)
        ├── MethodNotAllowed           405 method_not_allowed (CONNECT, absolute-form targets)
        ├── BodyTimeout                408 body_timeout
        ├── NotImplementedUpgrade      501 not_implemented (WebSocket and other upgrades)
        ├── BodyTooLarge               413 body_too_large
        ├── Rejected                   429 waitlist_full / wait_timeout / too_many_keys, with retry_after
        ├── UpstreamUnreachable        502 upstream_unreachable
        ├── StoreUnavailable           503 store_unavailable, with retry_after
        └── UpstreamTimeout            504 upstream_timeout

Foreign errors (redis, aiohttp, OS) are translated at the boundary with `raise ... from exc`.
"""

from __future__ import annotations


class FlowgateError(Exception):
    """Base class of every Flowgate error."""


class ConfigError(FlowgateError):
    """Settings, a config file or a store URI are wrong; the message names the problem."""


class DeliveryError(FlowgateError):
    """An error answered to the client; `status` and `code` pick the response."""

    status = 500
    code = "internal_error"
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidFlowControl(DeliveryError, ValueError):
    """A flow-control value or key is malformed; the message names the field and the value."""

    status = 400
    code = "invalid_flow_control"


class MissingKeyPart(DeliveryError):
    status = 400
    code = "missing_key_part"


class BadRequest(DeliveryError):
    """400 bad_request: a request the gateway will not forward (framing it cannot trust)."""

    status = 400
    code = "bad_request"


class MethodNotAllowed(DeliveryError):
    """405 method_not_allowed: CONNECT and absolute-form targets; this is a reverse proxy, not a forward one."""

    status = 405
    code = "method_not_allowed"


class BodyTimeout(DeliveryError):
    """408 body_timeout: the client kept the gateway waiting for its request body longer than `body_timeout`."""

    status = 408
    code = "body_timeout"


class NotImplementedUpgrade(DeliveryError):
    """501 not_implemented: protocol upgrades such as WebSocket are not proxied."""

    status = 501
    code = "not_implemented"


class BodyTooLarge(DeliveryError):
    status = 413
    code = "body_too_large"


class Rejected(DeliveryError):
    """The engine refused a delivery: `code` is the reason (waitlist_full, wait_timeout, too_many_keys)."""

    status = 429

    def __init__(self, reason: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.code = reason
        self.retry_after = retry_after


class UpstreamUnreachable(DeliveryError):
    status = 502
    code = "upstream_unreachable"


class StoreUnavailable(DeliveryError):
    status = 503
    code = "store_unavailable"
    retry_after = 1.0


class UpstreamTimeout(DeliveryError):
    status = 504
    code = "upstream_timeout"
