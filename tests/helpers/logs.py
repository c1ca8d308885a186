"""Logs are part of the oracle (STYLE.md 24).

``ErrorLogGuard`` (installed by an autouse fixture in ``conftest.py``) fails a
test that logs at ERROR or above, unless the test declared the line with
``expect_log``. ``expect_log`` also works for lower levels: tests of
misbehaving clients assert the INFO line they expect, so a silent swallow is
as visible as a crash.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager


class RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.expected: list[tuple[str, re.Pattern[str]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def unexpected_errors(self) -> list[str]:
        out = []
        for rec in self.records:
            if rec.levelno < logging.ERROR:
                continue
            msg = rec.getMessage()
            if any(rec.name.startswith(lg) and pat.search(msg) for lg, pat in self.expected):
                continue
            out.append(f"{rec.name} {rec.levelname}: {msg}")
        return out


_handler: RecordingHandler | None = None


def install() -> RecordingHandler:
    global _handler
    _handler = RecordingHandler()
    root = logging.getLogger()
    root.addHandler(_handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return _handler


def uninstall() -> None:
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
    _handler = None


@contextmanager
def expect_log(logger: str, pattern: str, *, required: bool = True) -> Iterator[None]:
    """Declare a log line matching ``pattern`` from ``logger`` (or a child).

    With ``required`` the block must produce it; a matching ERROR line is then
    not counted as unexpected.
    """
    assert _handler is not None, "the log guard fixture is not active"
    regex = re.compile(pattern)
    _handler.expected.append((logger, regex))
    start = len(_handler.records)
    yield
    if required:
        found = any(
            rec.name.startswith(logger) and regex.search(rec.getMessage())
            for rec in _handler.records[start:]
        )
        assert found, f"expected a log line from {logger} matching {pattern!r}"


def seen(logger: str, pattern: str) -> bool:
    """Whether a matching line was logged so far in this test."""
    assert _handler is not None
    regex = re.compile(pattern)
    return any(
        rec.name.startswith(logger) and regex.search(rec.getMessage()) for rec in _handler.records
    )
