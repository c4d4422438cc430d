"""Logging set-up: readable lines on a terminal, one JSON object per line in pods."""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per record, the shape log collectors expect."""

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as one JSON line: UTC time, level, logger, message and any traceback."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
                 f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        facts = getattr(record, "facts", None)
        if isinstance(facts, dict):  # a progress line's numbers, as fields a collector can chart
            entry.update(facts)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str | None = None, *, json_format: bool | None = None) -> None:
    """Configure the root logger once: ``DFK8S_LOG_LEVEL`` and ``DFK8S_LOG_FORMAT=json`` override."""
    level = (level or os.environ.get("DFK8S_LOG_LEVEL") or "WARNING").upper()
    if json_format is None:
        json_format = os.environ.get("DFK8S_LOG_FORMAT", "").lower() == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The HTTP stacks log every request at INFO; that is noise at our volumes (and could carry URLs).
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "botocore", "boto3", "urllib3",
                  "google_genai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
