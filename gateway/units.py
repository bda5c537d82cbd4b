"""Durations (`500ms`, `1h30m`, bare integers are seconds) and sizes (`512KB`, `10MB`)."""

from __future__ import annotations

import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d)")  # ASCII digits only: "²".isdigit() and "\d" match "٣"
_SIZE = re.compile(r"([0-9]+)\s*(B|KB|KIB|MB|MIB|GB|GIB)?")
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
}
_MAX_DIGITS = 15  # keeps float conversion exact and refuses absurd values early


def parse_duration(text: str | int | float, field: str = "duration") -> float:
    """Seconds in `text`; raise ValueError naming `field` and the value when malformed.

    Accepts `500ms`, `10s`, `1m`, `1h`, `1d`, compounds such as `1h30m` (units in decreasing order, each at
    most once) and bare non-negative integers (seconds). Numbers given as int/float are seconds.
    """
    if isinstance(text, bool):
        raise ValueError(f"{field} must be a duration such as 10s or 1h30m, got {text!r}")
    if isinstance(text, int | float):
        if text < 0 or text != text or text == float("inf"):
            raise ValueError(f"{field} must be a non-negative duration, got {text!r}")
        return float(text)
    raw = text.strip()
    if raw.isascii() and raw.isdigit() and len(raw) <= _MAX_DIGITS:
        return float(raw)
    pos, total, last_scale = 0, 0.0, float("inf")
    for match in _DURATION_PART.finditer(raw):
        number, unit = match.groups()
        scale = _DURATION_UNITS[unit]
        if match.start() != pos or scale >= last_scale or len(number) > _MAX_DIGITS:
            break
        total += int(number) * scale
        pos, last_scale = match.end(), scale
    else:
        if pos == len(raw) and pos > 0:
            return total
    raise ValueError(f'{field} must be a duration such as 500ms, 10s or 1h30m, got "{text}"')


def parse_size(text: str | int, field: str = "size") -> int:
    """Bytes in `text` (`512KB`, `10MB`, `1MiB`, bare integers are bytes); ValueError naming `field` otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"{field} must be a size such as 512KB or 10MB, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{field} must be a non-negative size, got {text}")
        return text
    match = _SIZE.fullmatch(text.strip().upper())
    if match is None or len(match.group(1)) > _MAX_DIGITS:
        raise ValueError(f'{field} must be a size such as 512KB or 10MB, got "{text}"')
    number, unit = match.groups()
    return int(number) * _SIZE_UNITS[unit or "B"]
