"""One log adapter for everything that acts on behalf of a session; credentials
redacted from every log record."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any


class SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every record with the session id (and keeps it in ``extra``), so one
    session's story can be grepped across the server, modes and providers."""

    def __init__(self, logger: logging.Logger, session_id: str, tenant: str | None = None) -> None:
        super().__init__(logger, {"session_id": session_id, "tenant": tenant})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra.get('session_id')}] {msg}", kwargs


#: Credentials as they appear in URLs, headers and subprotocols. Group 1 is kept, the
#: rest of the match becomes ``***``.
_CREDENTIALS = re.compile(
    r"(?i)"
    r"([?&;](?:token|access_token|api_key|apikey|key|auth|password|secret)=)[^&\s\"'#;]+"
    r"|((?:authorization|proxy-authorization|x-api-key|api-key|x-goog-api-key)"
    r"[\"']?\s*[:=,]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)[^\s\"',;)}\]]+"
    r"|(\bbearer\s+)[^\s\"',;)}\]]+"
    r"|(openai-insecure-api-key\.)[^\s\"',;)}\]]+"
)


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``***`` (tokens in query strings,
    Authorization-style headers, bearer tokens, the OpenAI browser subprotocol)."""
    if not _MAYBE.search(text):
        return text
    return _CREDENTIALS.sub(lambda m: (m.group(m.lastindex or 0) or "") + "***", text)


#: Cheap pre-check: most log lines hold none of the words above.
_MAYBE = re.compile(r"(?i)token|key|auth|password|secret|bearer")


def _redact_arg(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (int, float, bool)):
        return value
    text = str(value)  # a URL object, a dict of headers...
    redacted = redact(text)
    return value if redacted == text else redacted


def install_redaction() -> None:
    """Redact credentials from every log record of the process, whichever logger
    (uvicorn's access log included) and handler: at record creation, so no handler
    or formatter configured later can miss it. Idempotent."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "duplex_redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    factory.duplex_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


#: Record attributes a JSON line carries when set (``extra=`` of a log call, SessionLog).
JSON_FIELDS = ("session_id", "tenant", "turn_id", "response_id", "finish_reason", "elapsed_ms")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the ids in JSON_FIELDS that
    the record has, and the traceback if any. Credentials are already gone from the
    record (`install_redaction`); the traceback is redacted here as well."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in JSON_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = record.exc_text or redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure_logging(level: str, log_format: str) -> None:
    """The root handler of ``duplex serve``: text (as before) or JSON lines on stderr."""
    install_redaction()
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    else:
        logging.basicConfig(
            level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
