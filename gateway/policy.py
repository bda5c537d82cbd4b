"""A key's flow-control policy, QStash's `Flow-Control-Value` grammar, and key validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import limits

from .errors import InvalidFlowControl
from .units import parse_duration

MAX_PERIOD = 7 * 86400.0
MAX_KEY_LENGTH = 256
DEFAULT_PERIOD = 1.0
DEFAULT_MAX_WAITING = 10_000
DEFAULT_MAX_WAIT = 30.0


@dataclass(frozen=True, slots=True)
class Policy:
    """Limits of one key. `None` means unlimited; `rate=0` pauses admissions."""

    parallelism: int | None = None
    rate: int | None = None
    period: float = DEFAULT_PERIOD
    max_waiting: int = DEFAULT_MAX_WAITING
    max_wait: float = DEFAULT_MAX_WAIT

    def __post_init__(self) -> None:
        if self.parallelism is not None and (_not_int(self.parallelism) or self.parallelism < 1):
            raise InvalidFlowControl(f"parallelism must be a positive integer, got {self.parallelism!r}")
        if self.rate is not None and (_not_int(self.rate) or self.rate < 0):
            raise InvalidFlowControl(f"rate must be a non-negative integer, got {self.rate!r}")
        if not 0 < self.period <= MAX_PERIOD:
            raise InvalidFlowControl(f"period must be between 1ms and 7d, got {self.period!r}s")
        if _not_int(self.max_waiting) or self.max_waiting < 0:
            raise InvalidFlowControl(f"max_waiting must be a non-negative integer, got {self.max_waiting!r}")
        if not 0 <= self.max_wait <= MAX_PERIOD:
            raise InvalidFlowControl(f"max_wait must be between 0s and 7d, got {self.max_wait!r}s")

    @property
    def period_ms(self) -> int:
        return max(1, round(self.period * 1000))

    def replace(self, **changes: object) -> Policy:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


_VALUE_FIELDS = ("parallelism", "rate", "period")


def parse_flow_control_value(value: str, base: Policy | None = None) -> Policy:
    """Parse `parallelism=3, rate=10, period=1s` (QStash's grammar) on top of `base`.

    Pairs come in any order with optional spaces; `parallelism` and `rate` are positive integers and at least
    one of them is present; `period` is a duration (default 1s, at most 7d). Raises InvalidFlowControl naming
    the field and the value.
    """
    base = base or Policy()
    if not value.strip():
        raise InvalidFlowControl("flow-control value is empty; expected e.g. parallelism=3, rate=10, period=1s")
    fields: dict[str, str] = {}
    for pair in value.split(","):
        name, sep, raw = (part.strip() for part in pair.partition("="))
        if not sep or not name:
            raise InvalidFlowControl(f'flow-control value must be name=value pairs, got "{pair.strip()}"')
        name = name.lower()
        if name not in _VALUE_FIELDS:
            raise InvalidFlowControl(f'unknown flow-control field "{name}"; expected parallelism, rate or period')
        if name in fields:
            raise InvalidFlowControl(f"flow-control field {name} is given twice")
        fields[name] = raw
    changes: dict[str, object] = {}
    if "period" in fields:  # checked first, so `period=10x` alone names its bad value
        changes["period"] = _period(fields["period"])
    if "parallelism" not in fields and "rate" not in fields:
        raise InvalidFlowControl("flow-control value needs parallelism or rate (or both), not only period")
    for name in ("parallelism", "rate"):
        if name in fields:
            changes[name] = _positive_int(name, fields[name])
    return base.replace(**changes)


def _positive_int(name: str, raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1 or len(raw) > 12:
        raise InvalidFlowControl(f'{name} must be a positive integer, got "{raw}"')
    return int(raw)


def _period(raw: str) -> float:
    try:
        seconds = parse_duration(raw, "period")
    except ValueError as exc:
        raise InvalidFlowControl(str(exc)) from None
    if not 0 < seconds <= MAX_PERIOD:
        raise InvalidFlowControl(f'period must be between 1ms and 7d, got "{raw}"')
    return seconds


def parse_rate(text: str) -> tuple[int, float]:
    """`10/second`, `100 per minute`, `5/2 hours` (the `limits` notation) as (rate, period seconds)."""
    try:
        item = limits.parse(text)
    except ValueError as exc:
        raise InvalidFlowControl(f'rate must look like "10/second" or "100/minute", got "{text}"') from exc
    return item.amount, float(item.get_expiry())


def validate_key(key: str) -> str:
    """Return `key` if it is 1-256 printable characters; raise InvalidFlowControl otherwise."""
    if not key:
        raise InvalidFlowControl("flow-control key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidFlowControl(f"flow-control key is {len(key)} characters long; at most {MAX_KEY_LENGTH}")
    if not key.isprintable():
        raise InvalidFlowControl(f"flow-control key {key!r} contains control characters")
    return key
