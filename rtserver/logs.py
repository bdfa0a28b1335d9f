"""Structured logging: one JSON object a line on stderr.

Modules log with `logger.info("message", extra={"fields": {...}})`; the fields become members of
the JSON object. Nothing here ever receives a token: callers pass subjects and ids only.
"""

from __future__ import annotations

import logging
import sys
import time

import msgspec

_encode = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return _encode(out).decode()
        except TypeError:
            return _encode({k: str(v) for k, v in out.items()}).decode()


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # picows logs every connection at INFO; that is noise at our fan-out.
    logging.getLogger("picows").setLevel(logging.WARNING)
    # aiokafka logs an ERROR every few seconds while a broker is down; the audit reports
    # delivery trouble itself on rtserver.audit.kafka.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
