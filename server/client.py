"""One connection's session: a transport-agnostic state machine.

States: CONNECTING (only ``connect`` is accepted; closed as stale after
``client.connect_timeout``) -> CONNECTED -> CLOSED. The client reads frames
handed to ``handle_frame`` and writes only through its ``Transport``; it never
imports Tornado.

Commands of one connection are handled in order (the transport awaits
``handle_frame``). Replies and pushes share one bounded outgoing queue, so a
reply is never overtaken by a push queued after it, and a subscription's
first publications always follow its subscribe reply.

Bad input never raises out of here. It becomes an error reply (the
connection stays) or a disconnect with a documented code, and one log line.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson

from server import __version__, codes
from server.auth import Credentials, TokenError, TokenVerifier, claim_globs_match
from server.broker import ClientInfo, Publication, StreamPosition
from server.config import ChannelOptions, Config
from server.errors import ClientError, DisconnectError
from server.protocol import (
    Command,
    ProtocolViolation,
    decode_frame,
    encode_error,
    encode_push,
    encode_reply,
    pub_to_dict,
)
from server.protocol.codec import encode_data, info_to_dict

if TYPE_CHECKING:
    from server.hub import Hub

log = logging.getLogger("squall.client")

PING_FRAME = b"{}"
MAX_TTL = 365 * 24 * 3600  # seconds: the longest ttl a reply gives (Centrifugo's cap)
Result = dict[str, Any] | tuple[dict[str, Any], Callable[[], None]] | None
FrameCache = dict[int, tuple[bytes, bytes]]


class TransportError(Exception):
    """The transport cannot take the write."""


class TransportBufferFull(TransportError):
    """The socket's write buffer is over the connection's byte limit (slow reader)."""


class Transport(Protocol):
    """What a client writes to: one implementation per server transport."""

    remote: str  # peer address, for logs

    def write(self, payload: bytes, frames: FrameCache) -> None:
        """Send ``payload`` as one text message.

        ``frames`` is a cache shared by every write of one flush: a transport
        that frames identical payloads identically may reuse the frame it
        built for the same payload object (key ``id(payload)``; the cached
        tuple keeps the payload alive so the id stays unique).

        Raises:
            TransportBufferFull: the peer is not reading fast enough.
            TransportError: the connection is gone.
        """

    def close(self, code: int, reason: str) -> None:
        """Close with this WebSocket close code and reason. Idempotent."""


class State(enum.IntEnum):
    CONNECTING = 0
    CONNECTED = 1
    CLOSED = 2


class Throttle:
    """Conflated delivery for one subscription: at most ``max_rate`` publications per second.

    Asked for with subscribe data ``{"max_rate": N}``. A publication after a
    quiet interval goes out at once; publications within the interval replace
    each other and the latest goes out when the interval ends. So a slow
    dashboard gets the newest value of each interval, never a backlog. One
    timer per throttled subscription, armed only while a publication waits;
    the hub routes only channels that have a throttled subscriber through
    this (``Hub._fan_out_throttled``).
    """

    __slots__ = ("_client", "_interval", "_last", "_latest", "_timer")

    def __init__(self, client: Client, max_rate: float) -> None:
        self._client = client
        self._interval = 1.0 / max_rate
        self._last = -math.inf  # loop time of the last delivery
        self._latest: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None

    def offer(self, frame: bytes) -> None:
        if self._timer is not None:
            self._latest = frame  # conflate: the waiting one is superseded
            return
        loop = self._client._loop
        now = loop.time()
        due = self._last + self._interval
        if now >= due:
            self._send(frame, now)
        else:
            self._latest = frame
            self._timer = loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        frame, self._latest = self._latest, None
        if frame is not None:
            self._send(frame, self._client._loop.time())

    def _send(self, frame: bytes, now: float) -> None:
        self._last = now
        self._client._hub.metrics.deliveries += 1
        self._client.enqueue(frame)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._latest = None


class Subscription:
    """One channel a client is subscribed to."""

    __slots__ = (
        "channel",
        "exp",
        "info",
        "join_leave",
        "live",
        "opts",
        "pending",
        "recoverable",
        "server_side",
        "throttle",
        "unsubscribed",
    )

    def __init__(
        self,
        channel: str,
        opts: ChannelOptions,
        info: ClientInfo,
        *,
        recoverable: bool,
        exp: int,
        server_side: bool,
        throttle: Throttle | None = None,
    ) -> None:
        self.channel = channel
        self.opts = opts
        self.info = info
        self.recoverable = recoverable
        self.exp = exp
        self.server_side = server_side
        self.throttle = throttle  # conflated delivery (subscribe data max_rate), else None
        self.join_leave = False  # receives join/leave pushes
        self.live = False  # the subscribe reply (or push) is queued
        # Publications that arrive before the subscribe reply is queued (and,
        # while the broker catches up to the position read, after: Hub.went_live).
        self.pending: list[Publication] | None = []
        # Set when the server ended the subscription before its reply was queued:
        # the unsubscribe push then follows the reply (Client.server_unsubscribe).
        self.unsubscribed: codes.Unsubscribe | None = None


def _bad_request(message: str) -> ClientError:
    return ClientError(codes.BAD_REQUEST, message)


class Client:
    """See the module docstring."""

    __slots__ = (
        "_allowance",
        "_allowance_at",
        "_busy",
        "_closed",
        "_expiry_timer",
        "_hub",
        "_loop",
        "_max_queue",
        "_ping_timer",
        "_pong_timer",
        "_queue",
        "_queued_bytes",
        "_refused",
        "_stale_timer",
        "_sub_timers",
        "_verifier",
        "claims",
        "exp",
        "id",
        "info",
        "meta",
        "server_op",
        "state",
        "subs",
        "transport",
        "user",
    )

    def __init__(self, hub: Hub, transport: Transport, verifier: TokenVerifier, client_id: str):
        self._hub = hub
        self._verifier = verifier
        self._loop = asyncio.get_running_loop()
        self.transport = transport
        self.id = client_id
        self.state = State.CONNECTING
        self.user = ""
        self.info: bytes | None = None
        self.meta: dict[str, Any] = {}
        self.claims: dict[str, Any] = {}  # every claim of the connection token
        self.exp = 0
        self.subs: dict[str, Subscription] = {}
        # The last server API subscribe for this connection still running (Hub.on_control
        # runs what comes after it once it is done: one connection's commands in order).
        self.server_op: asyncio.Future[Any] | None = None
        self._closed = False
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        cfg = hub.config.client
        self._max_queue = cfg.max_queue_bytes
        self._allowance = float(cfg.command_burst)
        self._allowance_at = time.monotonic()
        self._refused = 0  # commands refused with 111 since the last one allowed
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._busy = False  # a frame's commands are running (its later frames wait unread)
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._sub_timers: dict[str, asyncio.TimerHandle] = {}
        self._stale_timer: asyncio.TimerHandle | None = self._loop.call_later(
            cfg.connect_timeout, self._stale
        )
        hub.connecting.add(self)

    def __repr__(self) -> str:
        return f"<Client {self.id} user={self.user!r} {self.state.name}>"

    # ------------------------------------------------------------------ output

    def enqueue(self, data: bytes) -> None:
        """Queue one reply or push; the hub flushes it on the next tick."""
        if self._closed:
            return
        size = len(data)
        if self._queued_bytes + size > self._max_queue:
            self._over_limit()
            return
        if not self._queue:
            self._hub.schedule_flush(self)
        self._queue.append(data)
        self._queued_bytes += size

    def flush(self, frames: FrameCache) -> None:
        """Write everything queued as one newline-batched frame."""
        queue = self._queue
        if not queue or self._closed:
            return
        payload = queue[0] if len(queue) == 1 else b"\n".join(queue)
        metrics = self._hub.metrics
        metrics.messages_out += len(queue)
        metrics.bytes_out += len(payload)
        self._queue = []
        self._queued_bytes = 0
        try:
            self.transport.write(payload, frames)
        except TransportBufferFull:
            self._slow()
        except TransportError:
            self.on_transport_closed()

    def _over_limit(self) -> None:
        """The backlog would pass ``client.max_queue_bytes``: disconnect with 3008, soon.

        ``enqueue`` runs inside the hub's fan-out loops, which must not see a
        channel's subscribers change under them (the other subscribers would
        miss the publication): the disconnect waits for the next loop turn.
        Until then the queue is dropped and nothing more is taken
        (``_max_queue`` of -1 refuses every write).
        """
        if self._max_queue < 0:
            return
        self._max_queue = -1
        self._queue = []
        self._queued_bytes = 0
        self._loop.call_soon(self._slow)

    def on_transport_full(self) -> None:
        """A frame the transport wrote by itself (a pong) overflowed its buffer."""
        self._slow()

    def _slow(self) -> None:
        self._queue = []
        self._queued_bytes = 0
        limit = self._hub.config.client.max_queue_bytes
        self.disconnect(codes.SLOW, f"outgoing backlog over {limit} bytes")

    # ------------------------------------------------------------------ lifecycle

    def disconnect(self, d: codes.Disconnect, detail: str = "") -> None:
        """Close with ``d``: flush queued replies first (unless slow), log once."""
        if self._closed:
            return
        if d is not codes.SLOW and self._queue:
            self.flush({})
            if self.closed:  # the flush itself may have failed and closed us
                return
        self._finish(d.code, d.reason, detail)
        self.transport.close(d.code, d.reason)

    def abort(self) -> None:
        """End the connection after an unexpected failure of its own (the caller logs it)."""
        if self._closed:
            return
        d = codes.SERVER_ERROR
        self._finish(d.code, d.reason, "aborted")
        try:
            self.transport.close(d.code, d.reason)
        except Exception:  # the transport is what failed; it is gone either way
            log.debug("close after abort failed client=%s", self.id, exc_info=True)

    def on_transport_closed(
        self, code: int = 3000, reason: str = "connection closed", detail: str = ""
    ) -> None:
        """The peer went away (or the transport closed on its own)."""
        if not self._closed:
            self._finish(code, reason, detail)

    def _finish(self, code: int, reason: str, detail: str) -> None:
        self._closed = True
        self.state = State.CLOSED
        self._queue = []
        for timer in (self._stale_timer, self._ping_timer, self._pong_timer, self._expiry_timer):
            if timer is not None:
                timer.cancel()
        for timer in self._sub_timers.values():
            timer.cancel()
        self._sub_timers.clear()
        self._hub.metrics.disconnects[code] += 1
        log.info(
            "disconnect code=%d reason=%s client=%s user=%s remote=%s%s",
            code,
            reason,
            self.id,
            self.user,
            self.transport.remote,
            f" detail={detail}" if detail else "",
        )
        self._hub.connecting.discard(self)
        self._hub.remove_client(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> bool:
        """Past a successful connect, and not closed."""
        return self.state is State.CONNECTED and not self._closed

    # ------------------------------------------------------------------ input

    async def handle_frame(self, data: str | bytes) -> None:
        """Decode one inbound frame and run its commands in order."""
        if self._closed:
            return
        self._hub.metrics.bytes_in += len(data)
        try:
            commands = decode_frame(
                data, max_commands=self._hub.config.client.max_commands_per_frame
            )
        except ProtocolViolation as exc:
            self.disconnect(exc.disconnect, exc.detail)
            return
        self._busy = True
        try:
            for cmd in commands:
                if self.closed:  # an earlier command of this frame ended the connection
                    return
                if not self._take_allowance():
                    if not self._refuse(cmd):
                        return
                    continue
                self._refused = 0
                await self._dispatch(cmd)
        finally:
            self._busy = False

    def _refuse(self, cmd: Command) -> bool:
        """A command over the command rate: error 111 (temporary, as Centrifugo's rate
        limits answer), the connection kept. A client that goes on regardless
        (``command_burst`` refused in a row), or a command that gets no reply
        (``send``, a pong), is disconnected with 3013. False when disconnected.
        """
        burst = self._hub.config.client.command_burst
        if not cmd.id or self._refused >= burst:
            self.disconnect(codes.TOO_MANY_REQUESTS_DISCONNECT, "command rate exceeded")
            return False
        if not self._refused:
            log.info(
                "command rate exceeded: error 111 client=%s user=%s method=%s",
                self.id,
                self.user,
                cmd.method,
            )
        self._refused += 1
        self._hub.metrics.messages_in += 1
        self.enqueue(encode_error(cmd.id, codes.TOO_MANY_REQUESTS.to_dict()))
        return True

    def on_transport_ping(self) -> None:
        """The peer sent a transport-level ping (a WebSocket ping frame).

        It costs a pong write like a command costs a reply, so it counts
        against the command rate: a peer streaming pings is disconnected with
        3013 as a command flood is. Clients ping every few seconds at most.
        """
        if not self._closed and not self._take_allowance():
            self.disconnect(codes.TOO_MANY_REQUESTS_DISCONNECT, "websocket ping rate exceeded")

    def _reply_room(self) -> int:
        """Bytes a reply carrying publications (recovery, history) may take.

        A reply over the outgoing queue's limit ends the connection with 3008; half
        the queue, less what is queued already, leaves the live publications that
        follow the reply room too.
        """
        return self._hub.config.client.max_queue_bytes // 2 - self._queued_bytes

    def _take_allowance(self) -> bool:
        rate = self._hub.config.client.command_rate
        if rate <= 0:
            return True
        now = time.monotonic()
        burst = self._hub.config.client.command_burst
        self._allowance = min(burst, self._allowance + (now - self._allowance_at) * rate)
        self._allowance_at = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True

    async def _dispatch(self, cmd: Command) -> None:
        self._hub.metrics.messages_in += 1
        method = cmd.method
        if method == "pong":
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None
            return
        if self.state is State.CONNECTING and method != "connect":
            self.disconnect(codes.BAD_REQUEST_DISCONNECT, f"{method or 'unknown'} before connect")
            return
        if method == "connect" and self.state is State.CONNECTED:
            self.disconnect(codes.BAD_REQUEST_DISCONNECT, "connect on a connected client")
            return
        if cmd.id == 0 and method != "send":
            self.disconnect(codes.BAD_REQUEST_DISCONNECT, f"{method} without id")
            return
        if method == "":
            log.info("unknown method client=%s user=%s", self.id, self.user)
            self.enqueue(encode_error(cmd.id, codes.METHOD_NOT_FOUND.to_dict()))
            return
        started = time.perf_counter()
        try:
            result = await getattr(self, "_cmd_" + method)(cmd.params)
        except ClientError as exc:
            log.info(
                "command %s failed code=%d client=%s user=%s: %s",
                method,
                exc.error.code,
                self.id,
                self.user,
                exc.message,
            )
            if method != "send":  # one-way: never a reply (one with id 0 reads as a ping)
                self.enqueue(encode_error(cmd.id, exc.to_dict()))
        except DisconnectError as exc:
            self.disconnect(exc.disconnect, exc.detail)
        except Exception:
            log.exception("command %s crashed client=%s", method, self.id)
            if method != "send":
                self.enqueue(encode_error(cmd.id, codes.INTERNAL.to_dict()))
        else:
            if method == "send":
                pass
            elif isinstance(result, tuple):
                reply, after = result
                self.enqueue(encode_reply(cmd.id, method, reply))
                after()
            else:
                self.enqueue(encode_reply(cmd.id, method, result))
        self._hub.metrics.commands[method].observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ helpers

    def _channel(self, params: Mapping[str, Any]) -> tuple[str, ChannelOptions]:
        channel = params.get("channel")
        if not isinstance(channel, str) or not channel:
            raise _bad_request("channel required")
        if len(channel) > self._hub.config.client.max_channel_length:
            raise _bad_request("channel name too long")
        opts = self._hub.config.channel_options(channel)
        if opts is None:
            raise ClientError(codes.UNKNOWN_CHANNEL)
        return channel, opts

    def _allowed(self, channel: str, for_subscriber: bool, for_client: bool) -> bool:
        return (for_subscriber and channel in self.subs) or (for_client and self.user != "")

    def _ttl(self, exp: int) -> dict[str, Any]:
        if not exp:
            return {}
        # ttl is a uint32 in the protocol: a "never" token (exp 9999999999) gave a
        # value the protocol's own decoders refuse. Capped at a year, as Centrifugo
        # does: the SDK refreshes then, with the same token if it still holds.
        return {"expires": True, "ttl": min(MAX_TTL, max(0, int(exp - time.time())))}

    # ------------------------------------------------------------------ connect / refresh

    async def _cmd_connect(self, p: Mapping[str, Any]) -> Result:
        cfg = self._hub.config.client
        if self._hub.closing:
            raise DisconnectError(codes.SHUTDOWN, "connect during shutdown")
        token = p.get("token") or ""
        if not isinstance(token, str):
            raise DisconnectError(codes.BAD_REQUEST_DISCONNECT, "token must be a string")
        if token:
            try:
                creds = self._verifier.connection(token)
            except TokenError as exc:
                if exc.expired:
                    log.info("connect with expired token client=%s", self.id)
                    raise ClientError(codes.TOKEN_EXPIRED) from None
                raise DisconnectError(codes.INVALID_TOKEN, exc.reason) from None
        elif cfg.allow_anonymous_connect:
            creds = Credentials(user="")
        else:
            raise DisconnectError(codes.INVALID_TOKEN, "token required")
        if creds.user == "" and not cfg.allow_anonymous_connect:
            raise DisconnectError(codes.INVALID_TOKEN, "anonymous connections are not allowed")
        if self._closed:
            return None
        self.user, self.exp, self.info, self.meta = creds.user, creds.exp, creds.info, creds.meta
        self.claims = creds.claims
        self.state = State.CONNECTED
        if self._stale_timer is not None:
            self._stale_timer.cancel()
            self._stale_timer = None
        self._schedule_expiry()
        result: dict[str, Any] = {"client": self.id, "version": __version__}
        if cfg.ping_interval > 0:
            result["ping"] = max(1, round(cfg.ping_interval))
            result["pong"] = True
        result.update(self._ttl(self.exp))
        result["node"] = self._hub.node.uid
        wanted = p.get("subs")
        recover = wanted if isinstance(wanted, dict) else {}
        listed = len(set(creds.channels))
        if listed > cfg.max_channels:
            # As Centrifugo: the connection could subscribe to nothing else (106), and
            # client.max_channels bounds what one connection holds, a token's list too.
            raise DisconnectError(
                codes.CHANNEL_LIMIT,
                f"token lists {listed} channels, client.max_channels is {cfg.max_channels}",
            )
        gate: asyncio.Future[None] | None = None
        if creds.channels and self.server_op is None:
            # Server API commands for this user that arrive while the token's
            # channels are subscribed (engine calls) reach this connection too
            # (Hub._control_targets): a disconnect at once, the others once the
            # connect reply is out, waiting for this as for a server API subscribe.
            gate = self.server_op = self._loop.create_future()
        try:
            reply_and_activate = await self._token_channels(creds, recover)
        except BaseException:
            self._open_gate(gate)
            raise
        if reply_and_activate is None:
            self._open_gate(gate)
            return None
        subs, afters = reply_and_activate
        if subs:
            result["subs"] = subs
        # Only now can pushes (server API: subscribe, message, ...) reach this
        # client through the hub: none may come before the connect reply.
        self._hub.connecting.discard(self)
        self._hub.add_client(self)
        self._schedule_ping()

        def activate() -> None:
            for after in afters:
                after()
            self._open_gate(gate)

        return result, activate

    def _open_gate(self, gate: asyncio.Future[None] | None) -> None:
        """Let the server API commands that arrived during the connect run."""
        if gate is None:
            return
        if not gate.done():
            gate.set_result(None)
        if self.server_op is gate:
            self.server_op = None

    async def _token_channels(
        self,
        creds: Credentials,
        recover: Mapping[str, Any],
    ) -> tuple[dict[str, Any], list[Callable[[], None]]] | None:
        """Subscribe the token's ``channels``: their replies and activations, or
        ``None`` when the connection ended meanwhile."""
        subs: dict[str, Any] = {}
        afters: list[Callable[[], None]] = []
        recovered_bytes = 0
        for channel in creds.channels:
            opts = self._hub.config.channel_options(channel)
            if opts is None or channel in self.subs:
                log.warning("token channel %r skipped (unknown namespace or duplicate)", channel)
                continue
            req = recover.get(channel)
            try:
                reply, after = await self._subscribe(
                    channel,
                    opts,
                    req if isinstance(req, dict) else {},
                    None,
                    0,
                    server_side=True,
                    reserved=recovered_bytes,
                )
            except ClientError as exc:
                if self.closed:
                    return None
                log.warning("server-side subscribe %s failed: %s", channel, exc.message)
                if exc.error.temporary:
                    # Broker or store unavailable: fail the connect (temporary, the SDK
                    # reconnects with backoff), as Centrifugo does. Connected without
                    # the channel, the client would never be subscribed to it again.
                    self._undo_connect(list(subs))
                    raise
                continue
            if self.closed:  # ended while subscribing: nothing more to set up
                return None
            subs[channel] = reply
            afters.append(after)
            if "publications" in reply:  # a Fragment: dumps returns its bytes
                recovered_bytes += len(orjson.dumps(reply["publications"]))
        return subs, afters

    def _undo_connect(self, channels: list[str]) -> None:
        """Back to the state before ``connect``: its subscriptions and timers undone."""
        for channel in channels:
            self._hub.remove_subscription(self, channel)
        self.state = State.CONNECTING
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        self._stale_timer = self._loop.call_later(
            self._hub.config.client.connect_timeout, self._stale
        )

    async def _cmd_refresh(self, p: Mapping[str, Any]) -> Result:
        token = p.get("token")
        if not isinstance(token, str) or not token:
            raise _bad_request("token required")
        try:
            creds = self._verifier.connection(token)
        except TokenError as exc:
            if exc.expired:
                # Centrifugo's answer: the SDK reconnects and asks for a new token
                # (an error reply would end a centrifuge-js client for good).
                raise DisconnectError(codes.CONNECTION_EXPIRED, "refresh token expired") from None
            raise DisconnectError(codes.INVALID_TOKEN, exc.reason) from None
        if creds.user != self.user:
            raise DisconnectError(codes.INVALID_TOKEN, "refresh token is for another user")
        self.exp = creds.exp
        if creds.info is not None and creds.info != self.info:
            # As in Centrifugo: a token without info keeps the one the connection has;
            # new info shows in what the subscriptions publish from now on and in
            # presence at its next refresh.
            self.info = creds.info
            for sub in self.subs.values():
                sub.info = ClientInfo(self.user, self.id, creds.info, sub.info.chan_info)
        self.claims = creds.claims
        self._schedule_expiry()
        return {"client": self.id, "version": __version__, **self._ttl(self.exp)}

    def server_refresh(self, expired: bool, expire_at: int) -> None:
        """Server API ``refresh``: expire now, or move the expiry."""
        if expired or 0 < expire_at <= time.time():
            # An expiry already passed expires now, as in Centrifugo: no refresh push,
            # no expired_close_delay grace in which the connection still gets messages.
            self.disconnect(codes.CONNECTION_EXPIRED, "expired by server API")
            return
        self.exp = expire_at
        self._schedule_expiry()
        self.enqueue(encode_push("", "refresh", self._ttl(self.exp)))

    # ------------------------------------------------------------------ timers

    def _stale(self) -> None:
        self._stale_timer = None
        if self.state is State.CONNECTING:
            self.disconnect(codes.STALE, "no connect command in time")

    def _schedule_ping(self) -> None:
        interval = self._hub.config.client.ping_interval
        if interval > 0:
            self._ping_timer = self._loop.call_later(interval, self._ping)

    def _ping(self) -> None:
        if self._closed:
            return
        self.enqueue(PING_FRAME)
        timeout = self._hub.config.client.pong_timeout
        if timeout > 0 and self._pong_timer is None:
            self._pong_timer = self._loop.call_later(timeout, self._no_pong)
        self._schedule_ping()

    def _no_pong(self) -> None:
        self._pong_timer = None
        if self._busy and not self._closed:
            # The transport reads a connection's frames one after another: while a
            # command of this client waits on an engine (a slow store, a recovery),
            # its pong, if it sent one, is unread. Wait another pong_timeout.
            self._pong_timer = self._loop.call_later(
                self._hub.config.client.pong_timeout, self._no_pong
            )
            return
        self.disconnect(codes.NO_PONG, "no pong to the server ping in time")

    def _schedule_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self.exp:
            delay = max(0.0, self.exp - time.time()) + self._hub.config.client.expired_close_delay
            self._expiry_timer = self._loop.call_later(delay, self._check_expiry)

    def _check_expiry(self) -> None:
        self._expiry_timer = None
        if self.exp and self.exp <= time.time():
            self.disconnect(codes.CONNECTION_EXPIRED, "token expired and was not refreshed")
        else:
            self._schedule_expiry()

    def _schedule_sub_expiry(self, sub: Subscription) -> None:
        old = self._sub_timers.pop(sub.channel, None)
        if old is not None:
            old.cancel()
        if sub.exp:
            delay = max(0.0, sub.exp - time.time()) + self._hub.config.client.expired_close_delay
            self._sub_timers[sub.channel] = self._loop.call_later(
                delay, self._check_sub_expiry, sub
            )

    def _check_sub_expiry(self, sub: Subscription) -> None:
        self._sub_timers.pop(sub.channel, None)
        if self.subs.get(sub.channel) is not sub:
            return
        if sub.exp <= time.time():
            self.server_unsubscribe(sub.channel, codes.UNSUBSCRIBE_EXPIRED)
        else:
            self._schedule_sub_expiry(sub)

    # ------------------------------------------------------------------ subscriptions

    async def _cmd_subscribe(self, p: Mapping[str, Any]) -> Result:
        channel, opts = self._channel(p)
        if channel in self.subs:
            raise ClientError(codes.ALREADY_SUBSCRIBED)
        if len(self.subs) >= self._hub.config.client.max_channels:
            raise ClientError(codes.LIMIT_EXCEEDED, "too many subscriptions")
        kind = p.get("type", 0)
        if not isinstance(kind, int) or isinstance(kind, bool):
            raise _bad_request("type must be an integer")
        if kind != 0:
            # Map (1-3) and shared-poll (4) subscriptions of newer protocol versions keep
            # channel state Squall does not have: a stream reply would leave the SDK
            # waiting for state that never comes. Centrifugo's codes for a channel
            # without them: 108 for shared poll, 103 for the others.
            code = codes.NOT_AVAILABLE if kind == 4 else codes.PERMISSION_DENIED
            raise ClientError(code, "only stream subscriptions (type 0) are supported")
        token = p.get("token") or ""
        chan_info: bytes | None = None
        exp = 0
        if token:
            if not isinstance(token, str):
                raise _bad_request("token must be a string")
            try:
                creds = self._verifier.channel(token, user=self.user, channel=channel)
            except TokenError as exc:
                log.info("channel token rejected client=%s channel=%s: %s", self.id, channel, exc)
                if exc.expired:
                    raise ClientError(codes.TOKEN_EXPIRED) from None
                raise ClientError(codes.PERMISSION_DENIED) from None
            chan_info, exp = creds.info, creds.exp
        elif opts.private or channel.startswith("$"):
            # "$" marks a private channel whatever its namespace allows, as in
            # Centrifugo: an app moving over keeps its "$" channels closed.
            raise ClientError(codes.PERMISSION_DENIED, "channel token required")
        elif not (
            (
                opts.allow_subscribe_for_anonymous
                if self.user == ""
                else opts.allow_subscribe_for_client
            )
            or claim_globs_match(self.claims, opts.subscribe_claim, Config.channel_name(channel))
        ):
            raise ClientError(codes.PERMISSION_DENIED)
        if p.get("tf") is not None:
            # A tags filter (the SDKs' tagsFilter / tags_filter) asks for fewer
            # publications; Squall cannot filter, and ignoring it would hand the app
            # every publication. Refused as Centrifugo refuses it in a namespace
            # without allow_tags_filter.
            raise _bad_request("publication tags filter is not supported")
        return await self._subscribe(channel, opts, p, chan_info, exp, server_side=False)

    async def _subscribe(
        self,
        channel: str,
        opts: ChannelOptions,
        req: Mapping[str, Any],
        chan_info: bytes | None,
        exp: int,
        *,
        server_side: bool,
        reserved: int = 0,
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Subscribe; ``reserved``: bytes of recovered publications already in the reply
        this one joins (a connect reply's earlier server-side subscriptions)."""
        recoverable = opts.recoverable and (
            server_side
            or opts.force_recovery
            or bool(req.get("recoverable"))
            or bool(req.get("recover"))
        )
        info = ClientInfo(self.user, self.id, self.info, chan_info)
        max_rate = _max_rate(req)
        if max_rate is not None and recoverable:
            raise _bad_request("max_rate cannot be combined with recovery")
        sub = Subscription(
            channel,
            opts,
            info,
            recoverable=recoverable,
            exp=exp,
            server_side=server_side,
            throttle=None if max_rate is None else Throttle(self, max_rate),
        )
        # Join/leave pushes go to subscribers that ask (the SDKs' join_leave
        # option) unless the namespace forces them, as in Centrifugo: a server-side
        # subscription cannot ask, so it gets them only when forced.
        sub.join_leave = opts.join_leave and (
            opts.force_push_join_leave or (not server_side and bool(req.get("join_leave")))
        )
        self.subs[channel] = sub
        result: dict[str, Any] = {}
        position: StreamPosition | None = None
        reply_offset: int | None = None  # the reply's offset when not position's
        try:
            await self._hub.add_subscription(self, sub)
            if recoverable:
                if req.get("recover"):
                    since = _position(req)
                    pubs, position, recovered = await self._hub.recover(channel, opts, since)
                    encoded = b""
                    if pubs:
                        encoded = orjson.dumps([pub_to_dict(pub) for pub in pubs])
                        if len(encoded) > self._reply_room() - reserved:
                            # The SDK, resubscribing from the same position after
                            # the 3008, would never get back online.
                            pubs, recovered = [], False
                    if not recovered and _flags(req) & SUB_FLAG_REJECT_UNRECOVERED:
                        # The SDK asked for 112 instead of recovered=false: it reloads
                        # its state (get_state) and resubscribes from the new position.
                        raise ClientError(codes.UNRECOVERABLE_POSITION)
                    result["was_recovering"] = True
                    result["recovered"] = recovered
                    if pubs:
                        result["publications"] = orjson.Fragment(encoded)
                        # The position recovered from, as Centrifugo replies: the SDKs
                        # take it, then move it with each recovered publication the
                        # app handled. The stream's top would mark the publications
                        # handled before they are, and a handler failing or a
                        # connection lost meanwhile would skip them on the next recovery.
                        reply_offset = since.offset
                else:
                    position = await self._hub.position(channel, opts)
                result["recoverable"] = True
            elif req.get("positioned") and (opts.history_enabled or opts.persist):
                position = await self._hub.position(channel, opts)
            if opts.presence:
                # Before the reply, so a presence call right after sees this client.
                await self._hub.add_presence(sub)
        except BaseException:
            if self.subs.get(channel) is sub:
                self._hub.remove_subscription(self, channel)
            raise
        if self.subs.get(channel) is not sub and opts.presence:
            # Ended meanwhile (connection closed, server unsubscribe): the presence
            # entry may have been added after its removal.
            self._hub.remove_presence_later(channel, self.id)
        if position is not None:
            offset = position.offset if reply_offset is None else reply_offset
            result.update(positioned=True, epoch=position.epoch, offset=offset)
        result.update(self._ttl(exp))

        def activate() -> None:
            if self._closed:
                return
            if self.subs.get(channel) is not sub:
                if sub.unsubscribed is not None:  # ended by the server before this reply
                    u = sub.unsubscribed
                    push = {"code": u.code, "reason": u.reason}
                    self.enqueue(encode_push(channel, "unsubscribe", push))
                return
            pending, sub.pending = sub.pending or [], None
            sub.live = True
            last = position.offset if position is not None else 0
            for pub in pending:
                if pub.offset and position is not None and pub.epoch != position.epoch:
                    self.server_unsubscribe(channel, codes.UNSUBSCRIBE_INSUFFICIENT)
                    return
                if not pub.offset or pub.offset > last:
                    frame = encode_push(channel, "pub", pub_to_dict(pub))
                    if sub.throttle is not None:
                        sub.throttle.offer(frame)
                    else:
                        self.enqueue(frame)
            self._hub.went_live(self, sub, position)
            if sub.exp:
                self._schedule_sub_expiry(sub)

        return result, activate

    async def server_subscribe(
        self, channel: str, *, data: str | None = None, info: str | None = None
    ) -> None:
        """Server API ``subscribe``: subscribe this connection and push ``subscribe``.

        ``data`` (JSON text) goes into the push; ``info`` (JSON text) is the channel info.
        """
        opts = self._hub.config.channel_options(channel)
        if opts is None or channel in self.subs or self._closed:
            return
        limit = self._hub.config.client.max_channels
        if len(self.subs) >= limit:
            log.warning(
                "server subscribe %s skipped client=%s user=%s: client.max_channels (%d) reached",
                channel,
                self.id,
                self.user,
                limit,
            )
            return
        chan_info = None if info is None else info.encode()
        reply, after = await self._subscribe(channel, opts, {}, chan_info, 0, server_side=True)
        push = {
            k: v for k, v in reply.items() if k in ("recoverable", "epoch", "offset", "positioned")
        }
        if data is not None:
            push["data"] = orjson.Fragment(data.encode())
        self.enqueue(encode_push(channel, "subscribe", push))
        after()

    def server_unsubscribe(self, channel: str, u: codes.Unsubscribe) -> None:
        """Remove a subscription and tell the client why (resubscribe if code >= 2500).

        A server-side subscription that must be resubscribed ends the connection
        with 3010 instead: only a reconnect brings it back.

        A subscription whose reply is not queued yet (its subscribe is still
        reading history) gets the unsubscribe push right after that reply: the
        SDKs ignore an unsubscribe for a channel they are still subscribing to.
        """
        sub = self._hub.remove_subscription(self, channel)
        if sub is None:
            return
        timer = self._sub_timers.pop(channel, None)
        if timer is not None:
            timer.cancel()
        log.info(
            "unsubscribe code=%d reason=%s client=%s channel=%s", u.code, u.reason, self.id, channel
        )
        if sub.server_side and u.code >= 2500:
            # The SDKs cannot resubscribe a server-side subscription (an unsubscribe
            # push just drops it): reconnect them instead, and their connect
            # recovers it, as Centrifugo does (disconnect 3010).
            self.disconnect(codes.INSUFFICIENT_STATE, f"server-side channel {channel}")
            return
        if not sub.live:
            sub.unsubscribed = u
            return
        self.enqueue(encode_push(channel, "unsubscribe", {"code": u.code, "reason": u.reason}))

    async def _cmd_unsubscribe(self, p: Mapping[str, Any]) -> Result:
        channel = p.get("channel")
        if not isinstance(channel, str) or not channel:
            raise _bad_request("channel required")
        self._hub.remove_subscription(self, channel)
        timer = self._sub_timers.pop(channel, None)
        if timer is not None:
            timer.cancel()
        return {}

    async def _cmd_sub_refresh(self, p: Mapping[str, Any]) -> Result:
        channel, _ = self._channel(p)
        sub = self.subs.get(channel)
        if sub is None:
            raise ClientError(codes.PERMISSION_DENIED, "not subscribed")
        token = p.get("token")
        if not isinstance(token, str) or not token:
            raise _bad_request("token required")
        try:
            creds = self._verifier.channel(token, user=self.user, channel=channel)
        except TokenError as exc:
            if exc.expired:
                # Temporary: the SDK asks for a new token and tries again (a
                # permanent error would end the subscription for good).
                raise ClientError(codes.TOKEN_EXPIRED_RETRY) from None
            raise ClientError(codes.PERMISSION_DENIED) from None
        sub.exp = creds.exp
        sub.info = ClientInfo(self.user, self.id, sub.info.conn_info, creds.info)  # as Centrifugo
        self._schedule_sub_expiry(sub)
        return self._ttl(sub.exp)

    # ------------------------------------------------------------------ publish / read

    async def _cmd_publish(self, p: Mapping[str, Any]) -> Result:
        channel, opts = self._channel(p)
        if "data" not in p:
            raise _bad_request("data required")
        sub = self.subs.get(channel)
        if self.user == "":
            allowed = opts.allow_publish_for_anonymous or (
                sub is not None and opts.allow_publish_for_subscriber
            )
        else:
            allowed = self._allowed(
                channel, opts.allow_publish_for_subscriber, opts.allow_publish_for_client
            )
        if not allowed:
            raise ClientError(codes.PERMISSION_DENIED)
        if opts.publish_own_channel_only and (
            self.user == "" or Config.channel_name(channel) != self.user
        ):
            raise ClientError(codes.PERMISSION_DENIED, "may publish only to its own channel")
        info = sub.info if sub is not None else ClientInfo(self.user, self.id, self.info)
        if opts.telemetry:
            if channel.startswith("$"):
                # The points would be stored under the device, but published on a
                # channel no dashboard follows (they subscribe without the "$").
                raise ClientError(
                    codes.PERMISSION_DENIED, "telemetry goes to the device's channel, without '$'"
                )
            await self._hub.telemetry_ingest.ingest(
                Config.channel_name(channel),
                self.claims,
                p["data"],
                channel=channel,
                opts=opts,
                info=info,
            )
            return {}
        await self._hub.publish(channel, encode_data(p["data"]), opts, info=info)
        return {}

    async def _cmd_presence(self, p: Mapping[str, Any]) -> Result:
        channel, _ = self._check_read(p, "presence")
        entries = await self._hub.presence(channel)
        return {"presence": {cid: info_to_dict(info) for cid, info in entries.items()}}

    async def _cmd_presence_stats(self, p: Mapping[str, Any]) -> Result:
        channel, _ = self._check_read(p, "presence")
        num_clients, num_users = await self._hub.presence_stats(channel)
        return {"num_clients": num_clients, "num_users": num_users}

    async def _cmd_history(self, p: Mapping[str, Any]) -> Result:
        channel, opts = self._check_read(p, "history")
        limit = p.get("limit", 0)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise _bad_request("limit must be an integer")
        since = p.get("since")
        if since is not None and not isinstance(since, dict):
            raise _bad_request("since must be an object")
        position = _position(since) if since else None
        page = await self._hub.history(
            channel,
            opts,
            since=position,
            limit=None if limit < 0 else limit,
            reverse=bool(p.get("reverse")),
        )
        if position is not None and position.epoch and position.epoch != page.position.epoch:
            # Centrifugo's answer: an empty page would look like "nothing missed".
            raise ClientError(codes.UNRECOVERABLE_POSITION)
        # An application loading history on every subscribe would never stay
        # connected after a 3008: the page is cut at _reply_room, as Centrifugo cuts
        # one at history_max_publication_limit, and the client pages on from its last
        # offset.
        budget = self._reply_room()
        pubs: list[orjson.Fragment] = []
        for pub in page.publications:
            encoded = orjson.dumps(pub_to_dict(pub))
            budget -= len(encoded) + 1
            if budget < 0 and pubs:  # at least one, so that paging goes on
                break
            pubs.append(orjson.Fragment(encoded))
        return {
            "publications": pubs,
            "epoch": page.position.epoch,
            "offset": page.position.offset,
        }

    def _check_read(self, p: Mapping[str, Any], what: str) -> tuple[str, ChannelOptions]:
        channel, opts = self._channel(p)
        if what == "presence":
            enabled = opts.presence
            allowed = self._allowed(
                channel, opts.allow_presence_for_subscriber, opts.allow_presence_for_client
            )
        else:
            enabled = opts.history_enabled or opts.persist
            allowed = self._allowed(
                channel, opts.allow_history_for_subscriber, opts.allow_history_for_client
            )
        if not enabled:
            raise ClientError(codes.NOT_AVAILABLE, f"{what} is not enabled for this channel")
        if not allowed:
            raise ClientError(codes.PERMISSION_DENIED)
        return channel, opts

    # ------------------------------------------------------------------ rpc / send / ping

    async def _cmd_rpc(self, p: Mapping[str, Any]) -> Result:
        method = p.get("method", "")
        if not isinstance(method, str):
            raise _bad_request("method must be a string")
        handler = self._hub.rpc_handlers.get(method)
        if handler is None:
            raise ClientError(codes.METHOD_NOT_FOUND, f"rpc method {method!r} not found")
        data = encode_data(p.get("data"))
        out = await handler(self, data)
        return {"data": orjson.Fragment(out)}

    async def _cmd_send(self, p: Mapping[str, Any]) -> Result:
        self._hub.on_client_message(self, encode_data(p.get("data")))
        return None

    async def _cmd_ping(self, p: Mapping[str, Any]) -> Result:
        return {}


def _position(req: Mapping[str, Any]) -> StreamPosition:
    offset = req.get("offset", 0)
    epoch = req.get("epoch", "")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise _bad_request("offset must be a non-negative integer")
    if not isinstance(epoch, str):
        raise _bad_request("epoch must be a string")
    return StreamPosition(offset, epoch)


# SubscribeRequest.flag bits (client.proto): 1 asks for channel compaction (not
# supported: ignored, pushes keep the channel name); 2 asks for error 112
# instead of a reply with recovered=false (centrifuge SDKs' get_state).
SUB_FLAG_REJECT_UNRECOVERED: Final = 2


def _flags(req: Mapping[str, Any]) -> int:
    flag = req.get("flag", 0)
    return flag if isinstance(flag, int) and not isinstance(flag, bool) else 0


MAX_RATE_LIMIT: Final = 1000.0  # largest max_rate a subscription may ask for (per second)


def _max_rate(req: Mapping[str, Any]) -> float | None:
    """``max_rate`` from the subscribe request's ``data`` object, if it asks for one."""
    data = req.get("data")
    if not isinstance(data, dict) or "max_rate" not in data:
        return None
    rate = data["max_rate"]
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or not 0 < rate <= MAX_RATE_LIMIT
    ):
        raise _bad_request(f"max_rate must be a number in (0, {MAX_RATE_LIMIT:g}]")
    return float(rate)
