"""Log records as text or as one JSON object a line, behind one switch (`--log-format`,
FEEDLOOP_LOG_FORMAT), for the server and the trainer alike.

Stdlib logging throughout: code logs with `extra={...}` naming what the line is about, and in
JSON those become fields a log pipeline can join on: `generation_ids` (a request's candidates,
and a feedback event's subjects), `event_id`, `request_id`, `version` (a model version) and
`round` (a training round). A request, its generations, their feedback, the round that trained
on them and the version it published are then one query apart.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal

LogFormat = Literal["text", "json"]
# The `extra` keys that become JSON fields; any other extra stays out of the line (records
# carry many attributes of logging's own).
FIELDS = ("generation_ids", "event_id", "request_id", "version", "round", "outcome", "method")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, FIELDS present on
    the record, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(
    level: str,
    log_format: LogFormat,
    *,
    stream: IO[str] | None = None,
    text_format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s",
) -> logging.Handler:
    """Send the root logger's records at level and above to stream (stderr) in log_format;
    returns the handler (replacing any the root had)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(text_format)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
