"""Engine contract for durable storage: ``Store``.

The broker's history is hot and bounded; the store is what must last. In
namespaces with ``persist: true`` every publication accepted by the broker is
also handed to the store, and history reads and recovery that reach beyond
the broker's window (or across a restart) are served from it.

Durability
    ``append`` returns once the publication is *accepted* for durable
    writing: an implementation may queue it (write-behind) but must then
    keep it until written, across engine outages, and flush it on ``close``
    within its deadline. When it cannot accept more it raises
    ``StoreFullError`` and the publish is refused: nothing acknowledged is
    ever silently dropped.

Idempotency
    Publications are keyed by ``(channel, epoch, offset)``. Writing the same
    key twice (a retry after a lost acknowledgement) stores it once.

Ordering
    ``read_since`` returns publications in offset order (ascending unless
    ``reverse``) within one epoch.

Retention
    ``PersistOptions.size`` keeps at most that many publications per channel,
    ``ttl`` drops those older than that many seconds; the implementation
    enforces both itself (TTL indexes are not available on every
    MongoDB-compatible server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from server.broker import Publication, StreamPosition


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistOptions:
    size: int = 0  # publications kept per channel; 0 = unlimited
    ttl: float = 0.0  # seconds kept; 0 = forever


@dataclass(slots=True, kw_only=True)
class StoreStatus:
    """Health and load, reported by ``/ready`` and the server API ``info``."""

    ready: bool
    queue_depth: int = 0  # publications accepted but not yet written
    queue_limit: int = 0
    last_write_latency: float = 0.0  # seconds, of the last batch
    error: str = ""  # last error, while not ready
    extra: dict[str, object] = field(default_factory=dict)


class Store(Protocol):
    """Durable per-channel publication storage; see the module docstring."""

    async def start(self) -> None:
        """Connect, create indexes (idempotently) and start background writers."""

    async def close(self) -> None:
        """Flush what is queued (within the configured deadline), then disconnect."""

    async def append(self, channel: str, pub: Publication, opts: PersistOptions) -> None:
        """Accept one publication for durable storage. Raises ``StoreFullError``."""

    async def read_since(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Publication]:
        """Publications after ``since`` (all kept when ``None``), in the stream's latest epoch
        unless ``since`` names one. ``limit=None`` means no limit."""

    async def latest(self, channel: str) -> StreamPosition | None:
        """The last stored (or accepted) position of a channel, or ``None`` if none."""

    async def remove(self, channel: str) -> None:
        """Delete a channel's stored publications."""

    def status(self) -> StoreStatus:
        """Current health; must not do I/O."""
