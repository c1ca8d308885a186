"""Reconnect and retry pacing shared by the engines, and their up/down bookkeeping."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Final

MAX_STEPS: Final = 30  # 2**30 * base is far past any cap; avoids float overflow


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` in a task that is being cancelled.

    A driver may catch the cancellation delivered inside its call and raise an error
    of its own instead: a background loop that retries on errors would then go on
    for good, and the process would never exit (``asyncio.run`` waits for every
    task it cancelled). Such loops call this before each retry.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Backoff:
    """Capped exponential backoff with jitter (each delay in [ceiling/2, ceiling])."""

    def __init__(self, base: float, cap: float) -> None:
        self._base = base
        self._cap = cap
        self._steps = 0

    def next(self) -> float:
        ceiling = min(self._cap, self._base * 2 ** min(self._steps, MAX_STEPS))
        self._steps += 1
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security

    def reset(self) -> None:
        self._steps = 0


class Availability:
    """Whether an engine link works, logging each transition once (WARNING down, INFO up).

    ``what`` names the engine and what it keeps queued, e.g. ``"mongo store"`` and
    ``"publications"``; the queue depth at the transition goes into the line.
    """

    def __init__(self, log: logging.Logger, what: str, queued: str) -> None:
        self._log = log
        self._what = what
        self._queued = queued
        self.ready = False
        self.error = "not started"
        self._down_since = 0.0

    def down(self, error: str, queue_depth: int) -> None:
        self.error = error
        if self.ready:
            self.ready = False
            self._down_since = time.monotonic()
            self._log.warning(
                "%s unavailable; %s stay queued queue_depth=%d error=%s",
                self._what,
                self._queued,
                queue_depth,
                error,
            )

    def up(self, queue_depth: int) -> None:
        if not self.ready:
            self.ready = True
            if self._down_since:
                self._log.info(
                    "%s recovered after %.1fs queue_depth=%d",
                    self._what,
                    time.monotonic() - self._down_since,
                    queue_depth,
                )
            self._down_since = 0.0
        self.error = ""
