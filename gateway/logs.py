"""Log output: readable text lines or JSON lines (`--log-format json`), and the delivery log.

Every record becomes one line on stderr. In JSON each line is an object with `time` (ISO 8601, UTC), `level`,
`logger`, `pid`, `message`, the structured fields a record carries (see `DELIVERY_FIELDS`) and `exception` (the
formatted traceback) when there is one.

The delivery log (`flowgate.delivery`) has one line per rejected or failed delivery, with the key, the rule, the
reason and the HTTP status: rejections by the flow-control engine (429 waitlist_full / wait_timeout /
too_many_keys, 503 store_unavailable) at INFO or WARNING, upstream failures (502 / 504) at WARNING. It never
carries request headers, bodies or the admin token.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final

DELIVERY_LOGGER: Final = "flowgate.delivery"
#: Structured fields of a delivery record, copied into JSON lines (and into text lines as `name=value`).
DELIVERY_FIELDS: Final = ("event", "key", "rule", "reason", "status")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
#: Labels a delivery whose route has no rule name (flow-control headers, or a rule without `name`).
NO_RULE: Final = "-"

delivery_logger = logging.getLogger(DELIVERY_LOGGER)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (no newline inside: messages and tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in DELIVERY_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: int, log_format: str = "text") -> None:
    """Send every record at `level` and above to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def delivery(level: int, event: str, key: str | None, rule: str, reason: str, status: int) -> None:
    """Log one rejected or failed delivery (key, rule, reason, status) on the delivery logger.

    `key` is None when the request was refused before it had one (a malformed flow-control header, say)."""
    if not delivery_logger.isEnabledFor(level):
        return
    fields: dict[str, Any] = {"event": event, "key": key, "rule": rule or NO_RULE, "reason": reason, "status": status}
    delivery_logger.log(
        level,
        "delivery %s: key=%s rule=%s reason=%s status=%d",
        event,
        NO_RULE if key is None else json.dumps(key, ensure_ascii=False),  # quoted and escaped, on one line
        fields["rule"],
        reason,
        status,
        extra=fields,
    )


__all__ = ["DELIVERY_LOGGER", "NO_RULE", "JsonFormatter", "configure", "delivery"]
