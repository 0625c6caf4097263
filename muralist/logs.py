"""Log set-up of ``muralist serve`` and ``muralist worker``: human-readable text by default, or one
JSON object per line (``--log-format json``) for log collectors. uvicorn's loggers, access log
included, go through the same handler, and API keys or tokens are masked in every line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Secrets that could reach a message (a URL with a query, an echoed header, an exception text):
# muralist API keys, Hugging Face / Civitai style tokens, "Bearer ...", a password in a URL.
_SECRETS = [
    (re.compile(r"mur_[A-Za-z0-9_\-]{8,}"), "mur_***"),
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_***"),
    (re.compile(r"(?i)(bearer\s+)[^\s\"']+"), r"\1***"),
    (re.compile(r"(?i)((?:token|key|password|secret)=)[^\s&\"']+"), r"\1***"),
    (re.compile(r"(//[^:/@\s]*):[^@/\s]*@"), r"\1:***@"),
]


def redact(text: str) -> str:
    for pattern, repl in _SECRETS:
        text = pattern.sub(repl, text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC ISO 8601), level, logger, message, and job/user when the
    record concerns a job (``extra={"job": ..., "user": ...}``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in ("job", "user", "worker"):
            if (value := getattr(record, name, None)) is not None:
                out[name] = str(value)
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Route every logger (muralist's, uvicorn's, Ray's client) to one stderr handler in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else RedactingFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's own loggers may carry handlers from an earlier configuration: make them propagate
    # to ours instead (uvicorn.run(log_config=None) then leaves them alone).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True


def job_extra(job_id: str, owner: str | None = None) -> dict[str, Any]:
    """``extra=`` for a log call about a job: JSON lines carry it as the job and user fields."""
    return {"job": job_id, "user": owner}
