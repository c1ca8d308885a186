"""``POST /api/<method>``: the Centrifugo-style server API (the ``cent`` library's target).

Auth: ``X-API-Key: KEY`` or ``Authorization: apikey KEY`` (constant-time
compare; 401 otherwise; every request refused while ``api.key`` is empty).
Replies are HTTP 200 with ``{"result": ...}`` or ``{"error": {code, message}}``
using the client error codes; malformed JSON is 400, unknown methods 404.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
import tornado.web

from handlers.body import BoundedBody
from handlers.reply import finish_reply
from server import codes
from server.broker import StreamPosition
from server.errors import ClientError
from server.hub import Hub
from server.protocol import pub_to_dict
from server.protocol.codec import encode_data, info_to_dict

log = logging.getLogger("squall.api")

ApiMethod = Callable[["Api", Mapping[str, Any]], Awaitable[dict[str, Any]]]


def _str(params: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = params.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str) or (required and not value):
        raise ClientError(codes.BAD_REQUEST, f"{key} required")
    return value


_ABSENT: Any = object()  # _json_param: the parameter was not given


def _json_param(params: Mapping[str, Any], key: str) -> Any:
    """``params[key]``, or Centrifugo's ``b64<key>`` (base64 of the payload; it wins) decoded.

    Squall's clients speak JSON only, so the decoded bytes must be JSON: they are
    parsed here and encoded again on one line, as ``data`` is.
    """
    b64 = params.get("b64" + key)
    if b64 is None or b64 == "":
        return params.get(key, _ABSENT)
    try:
        if not isinstance(b64, str):
            raise ValueError
        return orjson.loads(base64.b64decode(b64, validate=True))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        raise ClientError(codes.BAD_REQUEST, f"b64{key} must be base64 of JSON") from None


def _target(params: Mapping[str, Any]) -> tuple[str, str]:
    """``user`` and ``client`` of a user-targeted method (``""``: not given)."""
    if _str(params, "session", required=False):
        # Centrifugo can target one connection by its session id. Squall connections
        # have none, and ignoring the field would reach all of the user's connections.
        raise ClientError(codes.BAD_REQUEST, "session targets are not supported, use client")
    return _str(params, "user", required=False), _str(params, "client", required=False)


class Api:
    """The server API methods, independent of HTTP (also used by ``batch``)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def _channel(self, params: Mapping[str, Any]) -> tuple[str, Any]:
        channel = _str(params, "channel")
        if len(channel) > self.hub.config.client.max_channel_length:
            raise ClientError(codes.BAD_REQUEST, "channel name too long")
        opts = self.hub.config.channel_options(channel)
        if opts is None:
            raise ClientError(codes.UNKNOWN_CHANNEL)
        return channel, opts

    async def call(self, method: str, params: Any) -> dict[str, Any]:
        """Run one method; errors become ``{"error": ...}``."""
        fn = METHODS.get(method)
        if fn is None:
            return {"error": codes.METHOD_NOT_FOUND.to_dict()}
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return {"error": codes.BAD_REQUEST.to_dict("params must be an object")}
        try:
            return {"result": await fn(self, params)}
        except ClientError as exc:
            return {"error": exc.to_dict()}

    async def publish(self, p: Mapping[str, Any]) -> dict[str, Any]:
        channel, opts = self._channel(p)
        data = _json_param(p, "data")
        if data is _ABSENT:
            raise ClientError(codes.BAD_REQUEST, "data required")
        if opts.telemetry:
            # Telemetry is validated, rate-limited and stored per device; a plain
            # publish would skip all of it and put unchecked data in front of dashboards.
            raise ClientError(
                codes.BAD_REQUEST, "telemetry channels take points through POST /api/telemetry"
            )
        if p.get("skip_history"):
            opts = _without_history(opts)
        position = await self.hub.publish(
            channel,
            encode_data(data),
            opts,
            tags=_tags(p),
            idempotency_key=_str(p, "idempotency_key", required=False),
        )
        return {"offset": position.offset, "epoch": position.epoch}

    async def broadcast(self, p: Mapping[str, Any]) -> dict[str, Any]:
        channels = p.get("channels")
        if not isinstance(channels, list) or not channels:
            raise ClientError(codes.BAD_REQUEST, "channels required")
        data = _json_param(p, "data")  # decoded once for all channels
        if data is _ABSENT:
            raise ClientError(codes.BAD_REQUEST, "data required")
        responses = []
        for i, channel in enumerate(channels):
            if i and i % YIELD_EVERY == 0:
                # A publish to the memory broker never waits: without a turn for the
                # others here, a broadcast to 50 000 channels held the loop 0.6 s.
                await asyncio.sleep(0)
            one = {**p, "channel": channel, "data": data, "b64data": None}
            responses.append(await self.call("publish", one))
        return {"responses": responses}

    async def subscribe(self, p: Mapping[str, Any]) -> dict[str, Any]:
        user, client = _target(p)
        channel, _ = self._channel(p)
        for key in ("recover_since", "override"):
            # Centrifugo's recovery from a position and per-subscription overrides of
            # presence and join/leave: refused rather than ignored, since the caller
            # would take the missed publications as recovered, or the user as hidden.
            if p.get(key) is not None:
                raise ClientError(codes.BAD_REQUEST, f"{key} is not supported")
        # data: sent in the client's subscribe push; info: the subscription's channel
        # info (presence, join/leave, its publications). Both as raw JSON text.
        extra = {}
        for key in ("data", "info"):
            value = _json_param(p, key)
            if value is not _ABSENT and value is not None:
                extra[key] = encode_data(value, key).decode()
        await self.hub.control(
            "subscribe",
            user=user,
            channel=channel,
            client=client,
            **extra,
        )
        return {}

    async def unsubscribe(self, p: Mapping[str, Any]) -> dict[str, Any]:
        user, client = _target(p)
        channel, _ = self._channel(p)
        await self.hub.control("unsubscribe", user=user, channel=channel, client=client)
        return {}

    async def disconnect(self, p: Mapping[str, Any]) -> dict[str, Any]:
        user, client = _target(p)
        d = p.get("disconnect") or {}
        if not isinstance(d, dict):
            raise ClientError(codes.BAD_REQUEST, "disconnect must be an object")
        code = d.get("code") or codes.FORCE_DISCONNECT.code
        reason = d.get("reason") or codes.FORCE_DISCONNECT.reason
        if not isinstance(code, int) or not 3000 <= code < 5000 or not isinstance(reason, str):
            raise ClientError(codes.BAD_REQUEST, "disconnect code must be in 3000-4999")
        whitelist = p.get("whitelist") or []
        if not isinstance(whitelist, list) or not all(isinstance(c, str) for c in whitelist):
            raise ClientError(codes.BAD_REQUEST, "whitelist must be a list of client ids")
        await self.hub.control(
            "disconnect",
            user=user,
            client=client,
            code=code,
            reason=reason[:120],
            whitelist=whitelist,  # client ids to keep connected
        )
        return {}

    async def refresh(self, p: Mapping[str, Any]) -> dict[str, Any]:
        user, client = _target(p)
        expire_at = p.get("expire_at") or 0
        if not isinstance(expire_at, int) or isinstance(expire_at, bool) or expire_at < 0:
            raise ClientError(codes.BAD_REQUEST, "expire_at must be a non-negative integer")
        await self.hub.control(
            "refresh",
            user=user,
            client=client,
            expired=bool(p.get("expired")),
            expire_at=expire_at,
        )
        return {}

    async def send(self, p: Mapping[str, Any]) -> dict[str, Any]:
        """Squall extension: a ``message`` push to every connection of ``user``."""
        user, client = _target(p)
        if "data" not in p:
            raise ClientError(codes.BAD_REQUEST, "data required")
        await self.hub.control(
            "message",
            user=user,
            client=client,
            data=encode_data(p["data"]).decode(),
        )
        return {}

    async def presence(self, p: Mapping[str, Any]) -> dict[str, Any]:
        channel, opts = self._channel(p)
        if not opts.presence:
            raise ClientError(codes.NOT_AVAILABLE)
        entries = await self.hub.presence(channel)
        return {"presence": {cid: info_to_dict(info) for cid, info in entries.items()}}

    async def presence_stats(self, p: Mapping[str, Any]) -> dict[str, Any]:
        channel, opts = self._channel(p)
        if not opts.presence:
            raise ClientError(codes.NOT_AVAILABLE)
        num_clients, num_users = await self.hub.presence_stats(channel)
        return {"num_clients": num_clients, "num_users": num_users}

    async def history(self, p: Mapping[str, Any]) -> dict[str, Any]:
        channel, opts = self._channel(p)
        if not (opts.history_enabled or opts.persist):
            raise ClientError(codes.NOT_AVAILABLE)
        limit = p.get("limit") or 0
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise ClientError(codes.BAD_REQUEST, "limit must be an integer")
        since_raw = p.get("since")
        since = None
        if since_raw is not None:
            if not isinstance(since_raw, dict):
                raise ClientError(codes.BAD_REQUEST, "since must be an object")
            offset, epoch = since_raw.get("offset", 0), since_raw.get("epoch", "")
            if (
                not isinstance(offset, int)
                or isinstance(offset, bool)
                or not isinstance(epoch, str)
                or offset < 0
            ):
                raise ClientError(codes.BAD_REQUEST, "since needs offset and epoch")
            since = StreamPosition(offset, epoch)
        page = await self.hub.history(
            channel,
            opts,
            since=since,
            limit=None if limit < 0 else limit,
            reverse=bool(p.get("reverse")),
        )
        if since is not None and since.epoch and since.epoch != page.position.epoch:
            raise ClientError(codes.UNRECOVERABLE_POSITION)  # never an empty page for a gap
        return {
            "publications": [pub_to_dict(pub) for pub in page.publications],
            "offset": page.position.offset,
            "epoch": page.position.epoch,
        }

    async def history_remove(self, p: Mapping[str, Any]) -> dict[str, Any]:
        channel, opts = self._channel(p)
        if not (opts.history_enabled or opts.persist):
            raise ClientError(codes.NOT_AVAILABLE)
        await self.hub.remove_history(channel, opts)
        return {}

    async def channels(self, p: Mapping[str, Any]) -> dict[str, Any]:
        pattern = _str(p, "pattern", required=False)
        matcher = _channel_matcher(pattern) if pattern else None
        out = {}
        for name, chan in self.hub.channels.items():
            if matcher is not None and not matcher.match(name):
                continue
            out[name] = {"num_clients": len(chan.subs)}
        return {"channels": out}

    async def info(self, p: Mapping[str, Any]) -> dict[str, Any]:
        nodes = []
        for node in self.hub.nodes():
            nodes.append(
                {
                    "uid": node.uid,
                    "name": node.name,
                    "version": node.version,
                    "num_clients": node.num_clients,
                    "num_users": node.num_users,
                    "num_subs": node.num_subs,
                    "num_channels": node.num_channels,
                    "uptime": node.uptime,
                    **node.extra,
                }
            )
        return {"nodes": nodes}


def _tags(p: Mapping[str, Any]) -> dict[str, str] | None:
    tags = p.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise ClientError(codes.BAD_REQUEST, "tags must map strings to strings")
    return tags


MAX_PATTERN_ALTERNATIVES = 100
MAX_PATTERN_NESTING = 10
# Translating a pattern is quadratic in its length (fnmatch's own loop for [, ours
# for {...}): 50 000 characters of "[" block the IOLoop for minutes.
MAX_PATTERN_LENGTH = 1024


def _channel_matcher(pattern: str) -> re.Pattern[str]:
    """The ``channels`` pattern as one regex (fnmatch's translation of each alternative).

    Centrifugo (and cent's documentation) use gobwas/glob: ``*``, ``?`` and ``[...]``
    as in fnmatch, plus ``{a,b}`` alternatives (nested too) and ``\\`` escaping the
    next character. Those two are rewritten into plain fnmatch patterns here.
    """
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ClientError(codes.BAD_REQUEST, "pattern too long")
    alternatives, _ = _expand_pattern(pattern, 0, depth=0)
    return re.compile("|".join(fnmatch.translate(a) for a in alternatives))


def _expand_pattern(p: str, i: int, *, depth: int) -> tuple[list[str], int]:
    """``p[i:]`` up to its closing ``}`` (``depth`` > 0) as fnmatch patterns; the index after."""
    if depth > MAX_PATTERN_NESTING:
        raise ClientError(codes.BAD_REQUEST, "pattern nests {} too deep")
    done: list[str] = []  # alternatives ended by a ","
    current = [""]  # the alternative being read, multiplied by the {...} in it
    while i < len(p):
        ch = p[i]
        i += 1
        if ch == "\\":
            if i == len(p):
                break  # a trailing backslash escapes nothing
            ch = p[i]
            i += 1
            current = [c + (f"[{ch}]" if ch in "*?[" else ch) for c in current]
        elif ch == "[" and (end := p.find("]", i + 1)) != -1:
            current = [c + p[i - 1 : end + 1] for c in current]  # a class, as is
            i = end + 1
        elif ch == "[":
            current = [c + "[[]" for c in current]  # never closed: a literal [
        elif ch == "{":
            inner, i = _expand_pattern(p, i, depth=depth + 1)
            current = [c + alt for c in current for alt in inner]
        elif depth and ch == ",":
            done += current
            current = [""]
        elif depth and ch == "}":
            break
        else:
            current = [c + ch for c in current]
        if len(done) + len(current) > MAX_PATTERN_ALTERNATIVES:
            raise ClientError(codes.BAD_REQUEST, "pattern has too many {} alternatives")
    return done + current, i


def _without_history(opts: Any) -> Any:
    import dataclasses

    return dataclasses.replace(opts, history_size=0, history_ttl=0.0, persist=False)


METHODS: dict[str, ApiMethod] = {
    name: getattr(Api, name)
    for name in (
        "publish",
        "broadcast",
        "subscribe",
        "unsubscribe",
        "disconnect",
        "refresh",
        "send",
        "presence",
        "presence_stats",
        "history",
        "history_remove",
        "channels",
        "info",
    )
}
# Channels a broadcast publishes to, or commands a batch runs, before others get a turn.
# A batch has no count limit (api.max_body_bytes bounds it), as in Centrifugo.
YIELD_EVERY = 100


@tornado.web.stream_request_body
class ApiHandler(BoundedBody):
    """The body is streamed so that the key and the size are checked from the headers.

    An unauthorized request is answered (401) without reading its body. An
    oversize one is read and dropped before the 413 (``handlers.body``).
    """

    def initialize(self, hub: Hub) -> None:
        self.hub = hub
        self.api = Api(hub)

    def check_xsrf_cookie(self) -> None:
        return None

    def _authorized(self) -> bool:
        key = self.hub.config.api.key
        if not key:
            return False
        given = self.request.headers.get("X-API-Key", "")
        if not given:
            auth = self.request.headers.get("Authorization", "")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "apikey":
                given = value.strip()
        return bool(given) and hmac.compare_digest(given.encode(), key.encode())

    async def _reply(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        await finish_reply(self, orjson.dumps(body))

    async def prepare(self) -> None:
        if self.hub.closing:  # a request on a keep-alive connection after SIGTERM
            await self._shutting_down()
            return
        if not self._authorized():
            log.info(
                "api request refused: bad or missing API key remote=%s", self.request.remote_ip
            )
            await self._reply(401, {"error": codes.UNAUTHORIZED.to_dict()})
            return
        if not self.limit_body(self.hub.config.api.max_body_bytes):
            await self._too_large_reply()

    async def _too_large_reply(self) -> None:
        log.info(
            "api request refused: body over %d bytes remote=%s",
            self.hub.config.api.max_body_bytes,
            self.request.remote_ip,
        )
        await self._reply(413, {"error": codes.LIMIT_EXCEEDED.to_dict("request body too large")})

    async def _shutting_down(self) -> None:
        await self._reply(503, {"error": codes.INTERNAL.to_dict("shutting down")})

    async def post(self, method: str) -> None:
        if self.too_large:
            await self._too_large_reply()
            return
        if self.hub.closing:  # its body came in after SIGTERM: nothing done, say so
            await self._shutting_down()
            return
        body = self.body
        try:
            params = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            log.info("api request with invalid JSON method=%s", method)
            await self._reply(400, {"error": codes.BAD_REQUEST.to_dict("invalid JSON")})
            return
        if method == "batch":
            self.hub.metrics.api_requests[method] += 1  # once: not its commands
            await self._answer(self._batch(params))
            return
        if method not in METHODS:
            log.info("api unknown method %r", method)
            await self._reply(404, {"error": codes.METHOD_NOT_FOUND.to_dict()})
            return
        self.hub.metrics.api_requests[method] += 1  # once: not a broadcast's publishes
        await self._answer(self.api.call(method, params))

    async def _answer(self, call: Awaitable[dict[str, Any]]) -> None:
        """Run ``call``, reply 200; a graceful shutdown waits for both (``Hub.wait_api_idle``)."""
        self.hub.api_request_started()
        try:
            await self._reply(200, await call)
        finally:
            self.hub.api_request_done()

    async def _batch(self, params: Any) -> dict[str, Any]:
        commands = params.get("commands") if isinstance(params, dict) else None
        if not isinstance(commands, list):
            return {"error": codes.BAD_REQUEST.to_dict("commands must be a list")}
        replies: list[dict[str, Any]] = []
        for i, command in enumerate(commands):
            if i and i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if not isinstance(command, dict) or len(command) != 1:
                replies.append({"error": codes.BAD_REQUEST.to_dict("one method per command")})
                continue
            ((method, args),) = command.items()
            out = await self.api.call(method, args)
            replies.append({method: out["result"]} if "result" in out else out)
        return {"replies": replies}
