"""structlog setup: events on stderr, JSON lines unless a human is watching.

Under systemd, stderr is the journal: each line then starts with its syslog
priority (``<3>`` for an error), which journald strips and keeps as the
entry's PRIORITY, so ``journalctl -u commsync -p err`` finds the errors.
Tracebacks never carry frame local variables: a local may hold a secret.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_SECRET_KEYS = ("password", "secret", "token", "authorization")

# syslog priorities (sd-daemon(3)) by structlog method name.
_PRIORITY = {"debug": 7, "info": 6, "msg": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2, "fatal": 2}


def _redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    # Belt and braces: no call site should log a secret, but if one does, mask it.
    for key in event:
        if any(s in key.lower() for s in _SECRET_KEYS):
            event[key] = "***"
    return event


def _journal_priority(_logger: Any, name: str, line: str) -> str:
    # Runs after the renderer: the line is text by now.
    return f"<{_PRIORITY.get(name, 6)}>{line}"


class _Stderr:
    """Whatever sys.stderr is at write time (tests and daemons swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def stderr_is_journal() -> bool:
    """True when stderr is systemd's journal stream: ``$JOURNAL_STREAM`` names its device and inode.

    A child whose stderr was redirected keeps the variable, hence the check.
    """
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # no stderr, or one without a descriptor
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Send structured events to stderr; stdout stays free for command output."""
    if json is None:
        json = not sys.stderr.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    if json:
        # dict_tracebacks would keep every frame's locals (show_locals defaults to True).
        processors += [
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ]
    else:
        # rich's traceback, as by default, but without the locals it prints by default.
        formatter = structlog.dev.RichTracebackFormatter(show_locals=False)
        processors += [structlog.dev.set_exc_info, structlog.dev.ConsoleRenderer(exception_formatter=formatter)]
    if stderr_is_journal():
        processors.append(_journal_priority)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),
        cache_logger_on_first_use=False,
    )
