"""Redis ``Broker`` and ``PresenceManager``: any number of Squall nodes share one Redis.

Keys (``P`` is ``redis.prefix``, ``C`` the Squall channel)::

    P:c:C    pub/sub channel: publications, joins and leaves of C
    P:control  pub/sub channel every node subscribes to: control messages, probes
    P:m:C    hash, stream meta: e = epoch, o = top offset (TTL history_meta_ttl)
    P:s:C    stream, history: entry id "<offset>-0", field d = payload (TTL history_ttl)
    P:i:N:C:K  hash, idempotent publish result (o, e) for key K; N = len(C)
    P:pd:C   hash, presence: client id -> encoded ClientInfo
    P:pe:C   sorted set, presence: client id -> expiry (unix ms, Redis clock)

The Lua scripts in ``redis_lua/`` make each step atomic: ``publish.lua``
increments the offset, appends to the bounded history and PUBLISHes the
payload in one go, so every node sees the same offsets in the same order;
``history.lua`` reads the position and the items together.

Pub/sub payloads (the first byte says what follows; decoding is a few
``bytes.index`` calls and one small ``orjson.loads``)::

    p<offset> <len(epoch)> <epoch><meta JSON>\\n<data>   publication; the same bytes are the
                                                      history entry. meta JSON =
                                                      [time, tags, user, client, conn_info,
                                                      chan_info] (info fields omitted if none)
    j<info JSON> / l<info JSON>   join / leave; info JSON = [user, client, conn_info, chan_info]
    c<data>                       control message (on P:control)
    ?<token>                      ping() probe (on P:control)

One pub/sub connection per instance carries the control channel and every
channel the hub subscribed. It is a bare redis-py ``Connection`` rather than
``PubSub``, because ``PubSub`` reconnects and resubscribes silently, and a
silent reconnect is exactly the gap the hub must hear about. The listener
task owns reading; ``subscribe``/``unsubscribe`` write under a FIFO lock, so
commands for one channel reach Redis in call order, and each reply pops the
oldest pending request of its channel. When the link drops, the listener
reconnects with capped, jittered exponential backoff, resubscribes every
channel, and then calls ``BrokerEvents.on_gap`` with them. It resubscribes
in batches of ``_SUBSCRIBE_BATCH`` channels, each batch bounded on its own,
so a node with any number of channels can come back; publications that
arrive before the last batch is confirmed are dropped (``on_gap`` covers
them), control messages are not. The backoff starts over only once a link
has stayed up for ``max(reconnect_max_delay, _STABLE_LINK)`` seconds, so a
link Redis drops right after accepting it (``client-output-buffer-limit
pubsub``, ``CLIENT KILL`` in a loop) is retried ever more slowly, not many
times a second, each time with a gap. While the link is down (or being
resubscribed), ``subscribe`` and ``ping`` raise ``EngineError`` at once, and
``unsubscribe`` just forgets the channel. Every event, the publishing node's
own included, arrives through the listener (never directly), so once per
subscribed node, possibly after ``publish`` has returned.

Commands use a bounded pool (``redis.max_connections``; callers wait for a
free connection) without retries: a publish that timed out may have been
applied, and retrying it would publish twice. Every redis-py
exception is mapped to ``EngineError`` here; each operation (and each step of
setting up the pub/sub link: connecting, one SUBSCRIBE batch) is bounded by
``2 * redis.socket_timeout``.

Needs Redis >= 6.2 (exclusive XRANGE bounds); not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar
from uuid import uuid4

import orjson
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from server.backoff import Backoff, raise_if_cancelling
from server.broker import (
    Broker,
    BrokerEvents,
    ClientInfo,
    HistoryPage,
    PresenceManager,
    Publication,
    PublishOptions,
    StreamPosition,
)
from server.config import RedisConfig, check_redis
from server.errors import ConfigError, EngineError, StreamMissing

log = logging.getLogger("squall.broker.redis")

T = TypeVar("T")

_LUA_DIR: Final = Path(__file__).resolve().parent / "redis_lua"
_PUB, _JOIN, _LEAVE, _CONTROL, _PROBE = b"p"[0], b"j"[0], b"l"[0], b"c"[0], b"?"[0]
_ERRORS: Final = (RedisError, OSError)  # OSError covers TimeoutError and socket errors
_SUBSCRIBE_BATCH: Final = 1000  # channels per SUBSCRIBE while (re)connecting the pub/sub link
_STABLE_LINK: Final = 2.0  # seconds up (at least; or reconnect_max_delay) to reset the backoff


def _lua(name: str) -> str:
    return (_LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _new_epoch() -> str:
    return secrets.token_hex(4)


def _encode_info(info: ClientInfo) -> list[str | None]:
    fields: list[str | None] = [info.user, info.client]
    if info.conn_info is not None or info.chan_info is not None:
        fields.append(None if info.conn_info is None else info.conn_info.decode())
        fields.append(None if info.chan_info is None else info.chan_info.decode())
    return fields


def _decode_info(fields: list[Any]) -> ClientInfo:
    conn = fields[2] if len(fields) > 2 else None
    chan = fields[3] if len(fields) > 3 else None
    return ClientInfo(
        user=fields[0],
        client=fields[1],
        conn_info=None if conn is None else conn.encode(),
        chan_info=None if chan is None else chan.encode(),
    )


def _encode_body(data: bytes, opts: PublishOptions, now_ms: int) -> bytes:
    """The part of a publication payload known before Redis assigns the position."""
    meta: list[object] = [now_ms, None if opts.tags is None else dict(opts.tags)]
    if opts.info is not None:
        meta.extend(_encode_info(opts.info))
    return orjson.dumps(meta) + b"\n" + data


def _decode_publication(payload: bytes) -> Publication:
    sp1 = payload.index(b" ", 1)
    sp2 = payload.index(b" ", sp1 + 1)
    start = sp2 + 1 + int(payload[sp1 + 1 : sp2])
    nl = payload.index(b"\n", start)
    meta = orjson.loads(payload[start:nl])
    return Publication(
        offset=int(payload[1:sp1]),
        epoch=payload[sp2 + 1 : start].decode(),
        data=payload[nl + 1 :],
        info=_decode_info(meta[2:]) if len(meta) > 2 else None,
        time=meta[0],
        tags=meta[1],
    )


def _position(reply: Any) -> StreamPosition:
    return StreamPosition(int(reply[0]), reply[1].decode())


class _NotSent(EngineError):
    """A pub/sub command that timed out before it was written: Redis never saw it."""


class RedisBroker:
    """Broker and presence over one shared Redis; see the module docstring."""

    def __init__(self, cfg: RedisConfig, *, node_id: str) -> None:
        check_redis(cfg)
        try:
            pool = BlockingConnectionPool.from_url(
                cfg.url,
                max_connections=cfg.max_connections,
                timeout=None,  # waiting for a free connection: bounded by _call's timeout
                protocol=2,
                socket_timeout=cfg.socket_timeout,
                socket_connect_timeout=cfg.socket_timeout,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise ConfigError(f"redis.url: {exc}") from None
        self._redis = Redis.from_pool(pool)
        kw = self._redis.connection_pool.connection_kwargs
        # For log lines: never the URL itself, which may carry a password.
        self._where = (
            f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}/{kw.get('db', 0)}"
        )
        self._cfg = cfg
        self.node_id = node_id
        self._op_timeout = 2 * cfg.socket_timeout
        self._p = cfg.prefix
        self._control_key = f"{self._p}:control".encode()
        self._publish_script = self._redis.register_script(_lua("publish"))
        self._history_script = self._redis.register_script(_lua("history"))
        self._restore_script = self._redis.register_script(_lua("restore"))
        self._presence_add_script = self._redis.register_script(_lua("presence_add"))
        self._presence_get_script = self._redis.register_script(_lua("presence_get"))
        self._presence_remove_script = self._redis.register_script(_lua("presence_remove"))
        self._scripts = (
            self._publish_script,
            self._history_script,
            self._restore_script,
            self._presence_add_script,
            self._presence_get_script,
            self._presence_remove_script,
        )

        self._events: BrokerEvents | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        # Pub/sub state. _conn is set only while the link is up with every channel subscribed.
        self._conn: AbstractConnection | None = None
        self._send_lock = asyncio.Lock()
        self._wanted: dict[bytes, str] = {}  # pub/sub key -> channel, as the hub asked
        self._intent: dict[bytes, int] = {}  # pub/sub key -> sequence of its latest subscribe
        self._seq = 0
        self._pending: dict[bytes, deque[asyncio.Future[None] | None]] = {}
        self._probes: dict[bytes, asyncio.Future[None]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self, events: BrokerEvents) -> None:
        """Connect the pub/sub link and start the listener.

        If Redis is unreachable the broker still starts: the listener keeps
        reconnecting, and until then operations raise ``EngineError``.
        """
        self._events = events
        conn: AbstractConnection | None = None
        try:
            conn, _ = await self._connect_link()
        except _ERRORS as exc:
            log.warning("redis pubsub link to %s down (%s); retrying", self._where, exc)
        else:
            # Load the scripts now, so a first burst of calls does not hit NOSCRIPT
            # (redis-py reloads them by itself anyway, e.g. after a Redis restart).
            for script in self._scripts:
                try:
                    await self._call("script load", partial(self._redis.script_load, script.script))
                except EngineError as exc:
                    log.debug("preloading scripts failed: %s", exc)
                    break
        self._listener = asyncio.create_task(self._listen_forever(conn))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            # Cancel until it ends: on Python 3.11 redis-py's asyncio.wait_for can
            # swallow a cancellation (CPython gh-86296), and the listener would go on.
            while not self._listener.done():
                self._listener.cancel()
                await asyncio.wait({self._listener}, timeout=0.1)
            if not self._listener.cancelled() and self._listener.exception() is not None:
                log.error("redis listener had failed", exc_info=self._listener.exception())
            self._listener = None
        conn, self._conn = self._conn, None
        self._fail_waiters("redis broker closed")
        if conn is not None:
            await self._disconnect(conn)
        await self._redis.aclose()

    def is_connected(self) -> bool:
        """Whether the pub/sub link is up with every channel subscribed (no I/O)."""
        return self._conn is not None and self._conn.is_connected

    # ------------------------------------------------------------------ subscriptions

    def _chan_key(self, channel: str) -> bytes:
        return f"{self._p}:c:{channel}".encode()

    async def subscribe(self, channel: str) -> None:
        key = self._chan_key(channel)
        if self._conn is None:
            raise EngineError("redis pubsub link is down")
        self._wanted[key] = channel
        self._seq += 1
        seq = self._intent[key] = self._seq
        try:
            await self._send_pubsub(b"SUBSCRIBE", key, wait=True)
        except EngineError as exc:
            if self._intent.get(key) == seq:  # no later subscribe/unsubscribe of this channel
                del self._intent[key]
                self._wanted.pop(key, None)
                if not isinstance(exc, _NotSent):
                    # The SUBSCRIBE may have gone out with only its reply late (Redis
                    # slow or paused): take it back, or Redis would send this channel
                    # here for the rest of the link's life with nobody to take it.
                    try:
                        await self._send_pubsub(b"UNSUBSCRIBE", key, wait=False)
                    except EngineError:
                        pass  # the link is down: the next one will not subscribe it
            raise

    async def unsubscribe(self, channel: str) -> None:
        key = self._chan_key(channel)
        self._wanted.pop(key, None)  # deliveries stop now; the listener drops unwanted keys
        self._intent.pop(key, None)
        try:
            await self._send_pubsub(b"UNSUBSCRIBE", key, wait=False)
        except EngineError:
            pass  # the link is down: the next link will not subscribe this channel

    async def _send_pubsub(self, command: bytes, key: bytes, *, wait: bool) -> None:
        fut: asyncio.Future[None] | None = None
        maybe_sent = False  # from the moment the write starts, Redis may see the command
        try:
            async with asyncio.timeout(self._op_timeout):
                async with self._send_lock:  # FIFO: per-channel commands keep call order
                    conn = self._conn
                    if conn is None or not conn.is_connected:
                        raise EngineError("redis pubsub link is down")
                    if wait:
                        fut = asyncio.get_running_loop().create_future()
                    self._pending.setdefault(key, deque()).append(fut)
                    maybe_sent = True
                    await conn.send_command(command, key, check_health=False)
                if fut is not None:
                    await fut
        except TimeoutError:
            error = EngineError if maybe_sent else _NotSent
            raise error(f"redis {command.decode()} timed out") from None
        except RedisError as exc:
            raise EngineError(f"redis {command.decode()} failed: {exc}") from exc

    # ------------------------------------------------------------------ publishing

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation, bounded, with driver errors mapped to EngineError."""
        if self._closed:
            raise EngineError("redis broker closed")
        try:
            async with asyncio.timeout(self._op_timeout):
                return await op()
        except TimeoutError:
            raise EngineError(f"redis {what} timed out") from None
        except _ERRORS as exc:
            raise EngineError(f"redis {what} failed: {exc}") from exc

    async def publish(self, channel: str, data: bytes, opts: PublishOptions) -> StreamPosition:
        body = _encode_body(data, opts, int(time.time() * 1000))
        history = opts.history_size > 0 and opts.history_ttl > 0
        if not history and not opts.idempotency_key:
            await self._call(
                "publish", lambda: self._redis.publish(self._chan_key(channel), b"p0 0 " + body)
            )
            return StreamPosition(0, "")
        keys = [f"{self._p}:m:{channel}", f"{self._p}:s:{channel}"]
        if opts.idempotency_key:
            keys.append(f"{self._p}:i:{len(channel)}:{channel}:{opts.idempotency_key}")
        meta_ttl = max(self._cfg.history_meta_ttl, opts.history_ttl)
        args: list[bytes | str | int] = [
            self._chan_key(channel),
            body,
            opts.history_size if history else 0,
            _ms(opts.history_ttl),
            _ms(meta_ttl),
            _new_epoch(),
            _ms(opts.history_ttl if history else self._cfg.idempotency_ttl),
            "1" if opts.require_stream else "0",
        ]
        reply = await self._call("publish", lambda: self._publish_script(keys=keys, args=args))
        position = _position(reply)
        if position.offset < 0:
            raise StreamMissing(f"stream of {channel!r} has no position in redis")
        return position

    async def publish_join(self, channel: str, info: ClientInfo) -> None:
        payload = b"j" + orjson.dumps(_encode_info(info))
        await self._call("publish", lambda: self._redis.publish(self._chan_key(channel), payload))

    async def publish_leave(self, channel: str, info: ClientInfo) -> None:
        payload = b"l" + orjson.dumps(_encode_info(info))
        await self._call("publish", lambda: self._redis.publish(self._chan_key(channel), payload))

    async def publish_control(self, data: bytes) -> None:
        await self._call("publish", lambda: self._redis.publish(self._control_key, b"c" + data))

    # ------------------------------------------------------------------ history

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        args: list[str | int] = [
            _new_epoch(),
            _ms(self._cfg.history_meta_ttl),
            "1" if since is not None else "0",
            since.offset if since is not None else 0,
            since.epoch if since is not None else "",
            -1 if limit is None else max(limit, 0),
            "1" if reverse else "0",
        ]
        keys = [f"{self._p}:m:{channel}", f"{self._p}:s:{channel}"]
        reply = await self._call("history", lambda: self._history_script(keys=keys, args=args))
        try:
            pubs = [_decode_publication(p) for p in reply[2]]
        except (ValueError, IndexError, TypeError) as exc:
            raise EngineError(f"malformed history entry in {channel!r}: {exc}") from None
        return HistoryPage(pubs, _position(reply))

    async def remove_history(self, channel: str) -> None:
        await self._call("remove_history", lambda: self._redis.delete(f"{self._p}:s:{channel}"))

    async def restore_position(self, channel: str, position: StreamPosition) -> StreamPosition:
        keys = [f"{self._p}:m:{channel}", f"{self._p}:s:{channel}"]
        args: list[str | int] = [position.offset, position.epoch, _ms(self._cfg.history_meta_ttl)]
        reply = await self._call(
            "restore_position", lambda: self._restore_script(keys=keys, args=args)
        )
        return _position(reply)

    async def ping(self) -> None:
        """Publish a probe on the control channel and wait for our listener to get it back."""
        if self._conn is None:
            raise EngineError("redis pubsub link is down")
        token = uuid4().hex.encode()
        fut = self._probes[token] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self._cfg.ping_timeout):
                await self._redis.publish(self._control_key, b"?" + token)
                await fut
        except TimeoutError:
            raise EngineError("redis ping: probe did not come back in time") from None
        except _ERRORS as exc:
            raise EngineError(f"redis ping failed: {exc}") from exc
        finally:
            self._probes.pop(token, None)

    # ------------------------------------------------------------------ presence

    def _presence_keys(self, channel: str) -> list[str]:
        return [f"{self._p}:pd:{channel}", f"{self._p}:pe:{channel}"]

    async def add_presence(self, channel: str, info: ClientInfo, ttl: float) -> None:
        args: list[bytes | str | int] = [info.client, orjson.dumps(_encode_info(info)), _ms(ttl)]
        keys = self._presence_keys(channel)
        await self._call("add_presence", lambda: self._presence_add_script(keys=keys, args=args))

    async def remove_presence(self, channel: str, client_id: str) -> None:
        keys = self._presence_keys(channel)
        await self._call(
            "remove_presence", lambda: self._presence_remove_script(keys=keys, args=[client_id])
        )

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        keys = self._presence_keys(channel)
        flat = await self._call(
            "presence", lambda: self._presence_get_script(keys=keys, args=["all"])
        )
        return {
            flat[i].decode(): _decode_info(orjson.loads(flat[i + 1]))
            for i in range(0, len(flat), 2)
        }

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        keys = self._presence_keys(channel)
        values = await self._call(
            "presence_stats", lambda: self._presence_get_script(keys=keys, args=["values"])
        )
        return len(values), len({orjson.loads(v)[0] for v in values})

    # ------------------------------------------------------------------ the listener

    async def _connect_link(self) -> tuple[AbstractConnection, list[str]]:
        """Open a pub/sub connection subscribed to control + every wanted channel.

        Channels go out in batches of ``_SUBSCRIBE_BATCH``; the connect and each
        batch (send it, read its replies) are bounded by ``2 * socket_timeout``
        apiece, so any number of channels fits, and the loop gets a turn
        between batches. ``_conn`` stays ``None`` meanwhile: ``subscribe``
        refuses and ``unsubscribe`` only forgets, so nothing else writes to the
        new connection. Returns the link and the channels it resubscribed.
        """
        pool = self._redis.connection_pool
        conn = pool.connection_class(**pool.connection_kwargs)
        try:
            async with asyncio.timeout(self._op_timeout):
                # redis-py leaves connect() unannotated.
                await conn.connect()  # type: ignore[no-untyped-call]
            # Nothing adds to _wanted while _conn is None, so this snapshot is complete.
            sent = dict(self._wanted)
            keys = list(sent)
            await self._subscribe_batch(conn, [self._control_key, *keys[:_SUBSCRIBE_BATCH]])
            for i in range(_SUBSCRIBE_BATCH, len(keys), _SUBSCRIBE_BATCH):
                await asyncio.sleep(0)  # a turn for the loop (our own batch reads need none)
                # Skip what was unsubscribed meanwhile (forgotten, as the link was down).
                batch = [k for k in keys[i : i + _SUBSCRIBE_BATCH] if k in self._wanted]
                if batch:
                    await self._subscribe_batch(conn, batch)
            async with self._send_lock:
                channels: list[str] = []
                stale: list[bytes] = []
                for key in sent:
                    channel = self._wanted.get(key)
                    if channel is None:
                        stale.append(key)
                    else:
                        channels.append(channel)
                self._pending.clear()
                if stale:  # unsubscribed after its batch went out: drop it on the new link
                    for key in stale:
                        self._pending.setdefault(key, deque()).append(None)
                    async with asyncio.timeout(self._op_timeout):
                        await conn.send_command(b"UNSUBSCRIBE", *stale, check_health=False)
                self._conn = conn
        except BaseException:
            await self._disconnect(conn)
            raise
        return conn, channels

    async def _subscribe_batch(self, conn: AbstractConnection, keys: list[bytes]) -> None:
        """SUBSCRIBE ``keys`` on a link being set up and read every reply, bounded.

        Publications that arrive meanwhile (on keys of earlier batches) are
        dropped: ``on_gap`` reports those channels once the link is up, and
        the hub hears nothing of them before that. Control messages and
        probes are dispatched as usual.
        """
        async with asyncio.timeout(self._op_timeout):
            await conn.send_command(b"SUBSCRIBE", *keys, check_health=False)
            left = len(keys)
            while left:
                reply = await conn.read_response(timeout=math.inf)  # the batch is bounded
                kind = reply[0] if isinstance(reply, list) and reply else None
                if kind == b"subscribe":
                    left -= 1
                elif kind == b"message":
                    if reply[1] == self._control_key:
                        self._on_message(reply[1], reply[2])
                else:
                    raise RedisError(f"unexpected reply to SUBSCRIBE: {reply!r:.80}")

    async def _listen_forever(self, conn: AbstractConnection | None) -> None:
        backoff = Backoff(self._cfg.reconnect_delay, self._cfg.reconnect_max_delay)
        # A link must stay up this long before the next reconnect starts from the
        # first delay again: a link Redis accepts and then drops at once (output
        # buffer limit, CLIENT KILL in a loop) keeps backing off instead of
        # reconnecting, and reporting a gap, many times a second.
        stable_after = max(self._cfg.reconnect_max_delay, _STABLE_LINK)
        up_since = time.monotonic()
        while True:
            raise_if_cancelling()
            if conn is None:
                conn, channels = await self._reconnect(backoff)
                up_since = time.monotonic()
                log.info(
                    "redis pubsub link to %s restored; resubscribed %d channels",
                    self._where,
                    len(channels),
                )
                if channels and self._events is not None:
                    self._deliver(b"<gap>", self._events.on_gap, channels)
            try:
                await self._read_link(conn)
            except _ERRORS as exc:
                self._link_lost(exc)
                log.warning("redis pubsub link to %s lost (%s); reconnecting", self._where, exc)
            except Exception as exc:  # a bug here must not end delivery for good
                self._link_lost(exc)
                log.exception("redis pubsub listener failed; reconnecting")
            await self._disconnect(conn)
            conn = None
            if time.monotonic() - up_since >= stable_after:
                backoff.reset()

    def _link_lost(self, exc: Exception) -> None:
        self._conn = None
        self._fail_waiters(f"redis pubsub link lost: {exc}")

    async def _reconnect(self, backoff: Backoff) -> tuple[AbstractConnection, list[str]]:
        while True:
            await asyncio.sleep(backoff.next())
            raise_if_cancelling()
            try:
                return await self._connect_link()
            except _ERRORS as exc:
                log.debug("redis pubsub reconnect to %s failed: %s", self._where, exc)
            except Exception:
                log.exception("redis pubsub reconnect failed")

    async def _read_link(self, conn: AbstractConnection) -> None:
        """Dispatch pub/sub messages until the link fails (raises)."""
        interval = self._cfg.pubsub_ping_interval or math.inf
        pinged = False
        while True:
            reply = await conn.read_response(
                timeout=self._cfg.socket_timeout if pinged else interval
            )
            if reply is None:  # silence: prove the link is alive
                if pinged:
                    raise RedisError("no reply to PING")
                if not conn.is_connected:  # closed under us; never let send_command reconnect it
                    raise RedisError("connection closed")
                async with self._send_lock:
                    await conn.send_command(b"PING", check_health=False)
                pinged = True
                continue
            pinged = False
            kind = reply[0]
            if kind == b"message":
                self._on_message(reply[1], reply[2])
            elif kind in (b"subscribe", b"unsubscribe"):
                queue = self._pending.get(reply[1])
                if queue:
                    fut = queue.popleft()
                    if not queue:
                        del self._pending[reply[1]]
                    if fut is not None and not fut.done():
                        fut.set_result(None)

    def _on_message(self, key: bytes, payload: bytes) -> None:
        events = self._events
        if events is None or not payload:
            return
        kind = payload[0]
        if key == self._control_key:
            if kind == _CONTROL:
                self._deliver(key, events.on_control, payload[1:])
            elif kind == _PROBE:
                fut = self._probes.get(payload[1:])
                if fut is not None and not fut.done():
                    fut.set_result(None)
            return
        channel = self._wanted.get(key)
        if channel is None:
            return  # unsubscribed meanwhile: the hub has nobody to give it to
        try:
            if kind == _PUB:
                pub = _decode_publication(payload)
            elif kind in (_JOIN, _LEAVE):
                info = _decode_info(orjson.loads(payload[1:]))
            else:
                raise ValueError(f"unknown kind {payload[:1]!r}")
        except (ValueError, IndexError, TypeError, AttributeError) as exc:
            log.warning("malformed pubsub message on %r ignored: %s", key, exc)
            return
        if kind == _PUB:
            self._deliver(key, events.on_publication, channel, pub)
        else:
            self._deliver(key, events.on_join if kind == _JOIN else events.on_leave, channel, info)

    def _deliver(self, where: bytes, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception(
                "broker event handler %s failed for %r", getattr(callback, "__name__", "?"), where
            )

    def _fail_waiters(self, reason: str) -> None:
        """Fail every subscribe and ping waiting on the link that just went away."""
        waiters = [f for queue in self._pending.values() for f in queue if f is not None]
        for fut in [*waiters, *self._probes.values()]:
            if not fut.done():
                fut.set_exception(EngineError(reason))
        self._pending.clear()

    async def _disconnect(self, conn: AbstractConnection) -> None:
        try:
            await conn.disconnect(nowait=True)
        except _ERRORS as exc:
            log.debug("closing redis pubsub connection: %s", exc)


def _conforms(b: RedisBroker) -> tuple[Broker, PresenceManager]:
    return b, b
