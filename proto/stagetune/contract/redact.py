"""Secrets out of everything the service writes: logs, MLflow tags and artifacts, error
messages. Credentials in URLs (``postgresql://user:PASSWORD@host``), ``token=...`` /
``password: ...`` style assignments, ``Bearer ...`` authorization values and Hugging Face
tokens are replaced by ``***``."""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["redact_text", "redact", "RedactingFilter", "SECRET_KEY"]

#: Mapping keys whose values are secrets, whatever they hold.
SECRET_KEY = re.compile(
    r"(token|secret|password|passwd|api[_-]?key|access[_-]?key|credential)", re.IGNORECASE
)
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/\s@]*:)([^@\s/]+)(@)")
_ASSIGNED = re.compile(
    r"((?:token|secret|password|passwd|api[_-]?key|access[_-]?key)\"?'?\s*[=:]\s*\"?'?)"
    r"([^\s\"',;&]+)",
    re.IGNORECASE,
)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
_BEARER = re.compile(r"(\bBearer\s+)(\S+)", re.IGNORECASE)
_MASK = "***"


def redact_text(text: str) -> str:
    """``text`` with every recognisable secret replaced by ``***``."""
    text = _URL_PASSWORD.sub(rf"\g<1>{_MASK}\g<3>", text)
    text = _ASSIGNED.sub(rf"\g<1>{_MASK}", text)
    text = _BEARER.sub(rf"\g<1>{_MASK}", text)
    return _HF_TOKEN.sub(f"hf_{_MASK}", text)


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with secret-named keys masked and strings redacted."""
    if isinstance(value, dict):
        return {
            k: (_MASK if isinstance(k, str) and SECRET_KEY.search(k) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (and its traceback text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        if record.exc_info:
            import traceback

            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
        return True
