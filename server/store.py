"""Engine contract for durable storage: ``Store``.

The broker's history is hot and bounded; the store is what must last. In
namespaces with ``persist: true`` every publication accepted by the broker is
also handed to the store, and history reads and recovery that reach beyond
the broker's window (or across a restart) are served from it. After a
restart the hub continues a channel's offsets from ``latest``.

Durability
    ``append`` returns once the publication is *accepted* for durable
    writing: an implementation may queue it (write-behind) but must then
    keep it until written, across engine outages, and flush it on ``close``
    within its deadline. When it cannot accept more it raises
    ``StoreFullError`` and the publish is refused: nothing acknowledged is
    ever silently dropped by a running process. Accepted is not
    crash-durable: a process that crashes (SIGKILL, OOM, power) loses what
    is still queued. ``close`` past its deadline logs the number of accepted
    publications it could not write at ERROR.

Idempotency
    Publications are keyed by ``(channel, epoch, offset)``. Writing the same
    key twice (a retry after a lost acknowledgement) stores it once.

Ordering and positions
    ``read_since`` returns publications in offset order (ascending unless
    ``reverse``) within one epoch: the epoch of ``since`` when given (that
    epoch's publications, even if a later epoch exists), else the epoch of
    ``latest``. ``latest`` is the highest offset within the epoch of the
    channel's last *accepted* publication (queued or written). Publications
    may be appended out of offset order (concurrent publishes complete in
    any order), so ``latest`` is not simply the last one appended: it must
    never go below an accepted offset of its epoch, or a restarted node would
    hand out a taken offset.

Retention
    ``PersistOptions.size`` keeps at most that many publications per channel,
    the newest: the highest offsets of the current epoch (``latest``'s), then,
    while those are fewer, the most recently accepted of older epochs.
    ``ttl`` drops those older than that many seconds; the implementation
    enforces both itself (TTL indexes are not available on every
    MongoDB-compatible server). Reads never return a publication older than
    its ``ttl``; ``size`` may be exceeded briefly (trimming runs in the
    background), so a read may return a few more than ``size``.

Errors
    ``append`` raises ``StoreRejectedError`` for a publication it can never
    keep (too large, unencodable: not worth retrying) and ``StoreFullError``
    when its queue is full (retry later). Reads (``read_since``, ``latest``)
    and ``remove`` raise ``EngineError`` while the backing server is
    unreachable; ``append`` does not, it queues. ``remove`` drops the
    channel's queued publications too, even when it then fails to reach the
    server for the stored ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from server.broker import Publication, StreamPosition


def removed_by(epoch: str, offset: int, through: StreamPosition | None) -> bool:
    """Whether ``Store.remove(..., through=through)`` drops the publication at (epoch, offset)."""
    return through is None or epoch != through.epoch or offset <= through.offset


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


def page_bounds(since: StreamPosition | None, reverse: bool) -> tuple[int, int | None]:
    """The offsets (exclusive; ``None``: no upper bound) a ``read_since`` page lies between."""
    if since is None:
        return 0, None
    return (0, since.offset) if reverse else (since.offset, None)


class Store(Protocol):
    """Durable per-channel publication storage; see the module docstring."""

    async def start(self) -> None:
        """Connect, create indexes (idempotently) and start background writers."""

    async def close(self) -> None:
        """Flush what is queued (within the configured deadline), then disconnect.

        What is still queued at the deadline is lost; the count is logged at ERROR.
        """

    async def append(self, channel: str, pub: Publication, opts: PersistOptions) -> None:
        """Accept one publication for durable storage.

        Raises:
            StoreRejectedError: it can never be stored (too large, unencodable).
            StoreFullError: the write-behind queue is full; retry later.
            EngineError: the store is not running.
        """

    async def read_since(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Publication]:
        """Publications after ``since`` (all kept when ``None``), in the stream's latest epoch
        unless ``since`` names one. With ``reverse``, newest first, and ``since``
        selects those *before* its offset (the next page back). ``limit=None``
        means no limit."""

    async def latest(self, channel: str) -> StreamPosition | None:
        """The highest offset in the epoch of the channel's last accepted publication
        (queued or written), or ``None`` if it has none. Raises ``EngineError``."""

    async def resume(self, channel: str) -> StreamPosition | None:
        """Where a restored stream continues: ``latest``, or past it when a process
        was killed with publications it had handed offsets to still unwritten (those
        offsets were delivered: giving them again would hide the new publications
        from clients that saw the lost ones). Raises ``EngineError``."""

    async def remove(self, channel: str, *, through: StreamPosition | None = None) -> None:
        """Delete a channel's publications, queued and stored. Raises ``EngineError``.

        With ``through``, only those up to that position: every publication of
        another epoch, and those of its epoch up to its offset (what the stream
        had when another node removed the history; later ones stay).
        """

    def status(self) -> StoreStatus:
        """Current health; must not do I/O."""
