"""Flowgate: a flow-control gateway for HTTP. Deliveries over a key's limits are held, not rejected."""

from . import metrics
from .engine import FlowController, Lease
from .errors import ConfigError, DeliveryError, FlowgateError, InvalidFlowControl, Rejected, StoreUnavailable
from .metrics import Metrics
from .middleware import FlowControlMiddleware
from .policy import Policy, parse_flow_control_value
from .rules import Rule
from .stores import Store, open_store

__version__ = "0.1.0"
#: "compiled" when the hot-path modules are C extensions (hatch_build.py, FLOWGATE_COMPILE=1), else "pure Python".
BUILD = "pure Python" if metrics.__file__.endswith(".py") else "compiled"

__all__ = [
    "BUILD",
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
