"""Flowgate: a flow-control gateway for HTTP. Deliveries over a key's limits are held, not rejected."""

from .engine import FlowController, Lease
from .errors import ConfigError, DeliveryError, FlowgateError, InvalidFlowControl, Rejected, StoreUnavailable
from .metrics import Metrics
from .middleware import FlowControlMiddleware
from .policy import Policy, parse_flow_control_value
from .rules import Rule
from .stores import Store, open_store

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DeliveryError",
    "FlowControlMiddleware",
    "FlowController",
    "FlowgateError",
    "InvalidFlowControl",
    "Lease",
    "Metrics",
    "Policy",
    "Rejected",
    "Rule",
    "Store",
    "StoreUnavailable",
    "__version__",
    "open_store",
    "parse_flow_control_value",
]
