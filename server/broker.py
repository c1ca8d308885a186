"""Engine contracts for moving publications: ``Broker`` and ``PresenceManager``.

A *broker* carries publications between Squall nodes and keeps each channel's
bounded hot history; a *presence manager* knows who is subscribed where. The
in-memory engines (``broker_memory``) serve one process; ``broker_redis``
serves any number of processes sharing one Redis.

Stream positions
    Every channel with history is a stream. Each publication gets an
    ``offset`` one greater than the previous one; the ``epoch`` names one
    continuous life of the stream. When a stream is lost (history expired,
    the broker's storage was wiped) the next publish starts a new epoch, so a
    client holding an old position learns it cannot recover instead of
    silently missing publications. Channels without history still get
    offsets (always ``0``) so the push format stays uniform.

Values
    ``Publication.data`` and ``ClientInfo.conn_info/chan_info`` are raw JSON
    bytes: engines store and forward them without decoding, and the codec
    embeds them into frames as they are.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from server.record import record


@record
class ClientInfo:
    """Who published, joined or left: user id, client (connection) id, and info."""

    user: str
    client: str
    conn_info: bytes | None = None  # raw JSON from the connection token's "info"
    chan_info: bytes | None = None  # raw JSON from the channel token's "info"


@record
class StreamPosition:
    """A place in a channel's stream: the last offset and the stream's epoch."""

    offset: int
    epoch: str


@record
class Publication:
    """One message in a channel."""

    offset: int
    epoch: str
    data: bytes  # raw JSON
    info: ClientInfo | None = None
    time: int = 0  # unix milliseconds when the broker accepted it
    tags: Mapping[str, str] | None = None


@record(kw_only=True)
class PublishOptions:
    """How one publication is kept. Zero sizes mean no history."""

    history_size: int = 0
    history_ttl: float = 0.0  # seconds the channel history lives after this publish
    info: ClientInfo | None = None
    tags: Mapping[str, str] | None = None
    idempotency_key: str = ""  # same key within history_ttl -> same position, no new publication
    # The stream must have offsets already: if it has none (the broker lost it, or
    # it expired), raise ``StreamMissing`` instead of starting a new epoch.
    # Persistent channels use it: the hub then continues the stream from the store.
    require_stream: bool = False


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Publications (oldest first, unless asked reversed) and the stream's current top."""

    publications: list[Publication]
    position: StreamPosition


@dataclass(slots=True)
class NodeInfo:
    """One running Squall process, as reported in the server API ``info``."""

    uid: str
    name: str
    version: str
    num_clients: int = 0
    num_users: int = 0
    num_subs: int = 0
    num_channels: int = 0
    uptime: int = 0  # seconds
    extra: dict[str, object] = field(default_factory=dict)


class BrokerEvents(Protocol):
    """What an engine calls back into. Implemented by the hub.

    Every method is a plain function that only enqueues work: an engine's
    reader loop never awaits a slow client.
    """

    def on_publication(self, channel: str, pub: Publication) -> None:
        """A publication reached this node (from any node, including itself)."""

    def on_join(self, channel: str, info: ClientInfo) -> None:
        """A client subscribed to a join/leave channel somewhere in the cluster."""

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        """A client left a join/leave channel somewhere in the cluster."""

    def on_control(self, data: bytes) -> None:
        """A control message (disconnect user, node heartbeat, ...) from any node."""

    def on_gap(self, channels: Collection[str]) -> None:
        """Publications to these channels may have been lost on the way to this node.

        Called after the engine recovered from a fault (e.g. the pub/sub link
        dropped and was re-established). The hub tells recoverable subscribers
        to resubscribe with recovery, and others that their stream may be
        incomplete. It is never called for a gap the engine did not detect.
        """


class Broker(Protocol):
    """Moves publications between nodes and keeps bounded per-channel history.

    Ordering: publications to one channel reach every node in the order their
    offsets were assigned. Offsets are assigned atomically with the history
    append, so two publishers never get the same offset.

    Delivery: at most once per node. A node that may have missed publications
    learns it through ``BrokerEvents.on_gap`` (or by seeing an offset jump);
    the broker never hides a gap.

    Subscriptions: ``subscribe``/``unsubscribe`` are called by the hub for the
    first local subscriber of a channel and after the last one leaves; they are
    idempotent. ``publish`` delivers to every node subscribed to the channel,
    the publishing node included, through ``on_publication``.

    Failures: operations raise ``EngineError`` when the engine cannot be
    reached; they never block for longer than the engine's configured timeout.
    """

    async def start(self, events: BrokerEvents) -> None:
        """Connect and begin delivering events. Called once before anything else."""

    async def close(self) -> None:
        """Stop background tasks and release connections. Idempotent."""

    async def subscribe(self, channel: str) -> None:
        """Start receiving this channel's publications on this node."""

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving this channel's publications on this node."""

    async def publish(self, channel: str, data: bytes, opts: PublishOptions) -> StreamPosition:
        """Assign the next position, append to history (if enabled) and fan out.

        Returns the publication's position (offset 0 when history is off).
        """

    async def publish_join(self, channel: str, info: ClientInfo) -> None:
        """Tell every node subscribed to ``channel`` that ``info`` joined."""

    async def publish_leave(self, channel: str, info: ClientInfo) -> None:
        """Tell every node subscribed to ``channel`` that ``info`` left."""

    async def publish_control(self, data: bytes) -> None:
        """Send a control message to every node, this one included."""

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        """Read history.

        Args:
            since: only publications after this position (with ``reverse``:
                before it, so that a page's last offset asks for the next page).
                An empty epoch stands for the stream's own; if it names another
                epoch, the page is empty and ``position`` tells the caller the
                stream changed.
            limit: at most this many; ``0`` returns only the position; ``None``
                returns everything kept.
            reverse: newest first.
        """

    async def remove_history(self, channel: str) -> None:
        """Drop a channel's history; its position survives (offsets keep growing)."""

    async def restore_position(self, channel: str, position: StreamPosition) -> StreamPosition:
        """Continue a durable stream after a restart.

        If the broker has no live stream for ``channel`` (no offset assigned
        yet), start it at ``position`` so new offsets follow the ones already in
        the durable store. Returns the broker's current position either way.
        """

    async def ping(self) -> None:
        """Raise ``EngineError`` unless the engine works end to end right now."""


class PresenceManager(Protocol):
    """Who is subscribed to which channel, across all nodes.

    Entries expire ``ttl`` seconds after their last ``add_presence``; the hub
    refreshes its own entries every ``client.presence_interval`` seconds, so a
    crashed node's clients disappear on their own.
    """

    async def add_presence(self, channel: str, info: ClientInfo, ttl: float) -> None:
        """Add or refresh one client's entry."""

    async def remove_presence(self, channel: str, client_id: str) -> None:
        """Remove one client's entry (idempotent)."""

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        """Every live entry, keyed by client id."""

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        """(number of clients, number of distinct users)."""
