"""Telemetry over HTTP: device ingest and the dashboards' query API.

``POST /api/telemetry`` (device token: ``Authorization: Bearer <token>`` with
claim ``"device": true``)
    Body: one point or a list of points (``server.telemetry``). The points go
    through the same ingest as a WebSocket publish: live subscribers of
    ``<telemetry.namespace>:<sub>`` get them at once and they are stored.
    202 ``{"accepted": n, "rejected": [{"index": i, "reason": "..."}]}``.
    400 invalid JSON, an empty or oversized list, or no valid point (the
    body then still lists every ``rejected`` point); 401 missing, invalid or
    expired token; 403 not a device token; 404 the telemetry namespace is
    not configured; 413 body over ``api.max_body_bytes``; 429 over the
    device's rate (``Retry-After`` in seconds); 503 the store cannot take
    points now.

``GET /api/devices`` (dashboard token: the namespace's ``subscribe_claim``,
``devices`` by default, a list of device-id globs)
    ``{"devices": [{"id", "last_seen" (ms), "online", "last_values"}]}``,
    only devices the claim matches, sorted by id. ``online``: seen within
    ``telemetry.online_timeout``.

``GET /api/devices/<id>/telemetry?metric=M&from=MS&to=MS&step=MS``
    ``{"device", "metric", "from", "to", "step", "points": [{"t", "min",
    "max", "avg", "count"}]}``: ``metric`` downsampled over ``[from, to)`` in
    steps aligned to multiples of ``step`` since the epoch; only steps with
    points appear. Defaults: ``to`` now, ``from`` one hour before ``to`` (not before 0),
    ``step`` about 1/300 of the range (at least one second). 400 for a bad
    parameter or more than ``telemetry.max_query_steps`` steps; 403 when the
    claim does not match the device.

Error bodies are ``{"error": {"code", "message"}}`` with the client error
codes (101, 103, 107, 111, 1001, ...). Tokens are never logged.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, Final

import orjson
import tornado.web

from handlers.body import BoundedBody
from handlers.reply import finish_reply
from server import codes
from server.auth import Credentials, TokenError, TokenVerifier, claim_globs_match
from server.broker import ClientInfo
from server.config import ChannelOptions
from server.errors import ClientError, EngineError
from server.hub import Hub
from server.telemetry import (
    DEFAULT_DEVICES_CLAIM,
    METRIC_NAME_RE,
    InvalidFrame,
    RateLimited,
    is_device,
)
from server.telemetry_store import step_count

log = logging.getLogger("squall.api.telemetry")

DEFAULT_RANGE_MS: Final = 3_600_000  # a query without ``from`` covers the hour before ``to``
DEFAULT_STEPS: Final = 300  # a query without ``step`` asks for about this many steps
MIN_DEFAULT_STEP_MS: Final = 1000
# from/to/step: JavaScript's largest exact integer (Number.MAX_SAFE_INTEGER), so a
# dashboard reads back exactly what it sent; as a date, the year 287396.
MAX_QUERY_MS: Final = 2**53 - 1
INT_ARG_RE: Final = re.compile(r"-?[0-9]+")  # fullmatch; [0-9], not \d: ASCII digits only

STATUS_FOR_CODE: Final = {
    codes.UNAUTHORIZED.code: 401,
    codes.UNKNOWN_CHANNEL.code: 404,
    codes.PERMISSION_DENIED.code: 403,
    codes.BAD_REQUEST.code: 400,
    codes.LIMIT_EXCEEDED.code: 413,
    codes.TOO_MANY_REQUESTS.code: 429,
    codes.STORE_UNAVAILABLE.code: 503,
    codes.INTERNAL.code: 503,
}


class Refused(Exception):
    """Answer the request with this client error (status from ``STATUS_FOR_CODE``)."""

    def __init__(self, error: codes.ErrorCode, message: str | None = None) -> None:
        super().__init__(message or error.message)
        self.error = error
        self.message = message or error.message


class TelemetryHandler(tornado.web.RequestHandler):
    """Bearer-token auth and JSON replies shared by the telemetry endpoints."""

    def initialize(self, hub: Hub, verifier: TokenVerifier) -> None:
        self.hub = hub
        self.verifier = verifier

    def check_xsrf_cookie(self) -> None:
        return None

    async def reply(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        await finish_reply(self, orjson.dumps(body))

    async def refuse(self, exc: Refused | ClientError, **extra: Any) -> None:
        code = exc.error.code
        body = {"error": exc.error.to_dict(exc.message), **extra}
        await self.reply(STATUS_FOR_CODE.get(code, 400), body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = codes.INTERNAL if status_code >= 500 else codes.BAD_REQUEST
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if status_code < 500 and isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            # Tornado's own 4xx say what was wrong only there, e.g. "Invalid unicode
            # in from: b'\\xff'" for a query or path argument that is not UTF-8.
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.set_header("Content-Type", "application/json")
        _ = self.finish(orjson.dumps({"error": error.to_dict(message)}))

    def credentials(self) -> Credentials:
        """The verified bearer token. Raises ``Refused`` (401)."""
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(codes.UNAUTHORIZED, "bearer token required")
        try:
            return self.verifier.connection(token.strip())
        except TokenError as exc:
            log.info(
                "telemetry request with a bad token remote=%s: %s", self.request.remote_ip, exc
            )
            raise Refused(codes.UNAUTHORIZED, "token expired" if exc.expired else None) from None

    def namespace(self) -> tuple[str, ChannelOptions | None]:
        ns = self.hub.config.telemetry.namespace
        opts = self.hub.config.namespaces.get(ns)
        return ns, opts if opts is not None and opts.telemetry else None

    def reader(self) -> tuple[Credentials, str]:
        """A dashboard token and the name of its devices claim. Raises ``Refused`` (401/403)."""
        creds = self.credentials()
        _, opts = self.namespace()
        claim = (opts.subscribe_claim if opts is not None else "") or DEFAULT_DEVICES_CLAIM
        if not isinstance(creds.claims.get(claim), list):
            raise Refused(codes.PERMISSION_DENIED, f"token has no {claim!r} claim")
        return creds, claim


@tornado.web.stream_request_body
class TelemetryIngestHandler(BoundedBody, TelemetryHandler):
    """The token is checked from the headers, as the server API's key is: a request
    without a device token is answered (401/403/404) before its body is read, so
    that nobody without one can make the node hold ``api.max_body_bytes`` per
    connection for up to ``api.body_timeout``."""

    creds: Credentials
    opts: ChannelOptions

    async def prepare(self) -> None:
        if self.hub.closing:  # a request on a keep-alive connection after SIGTERM
            await self.refuse(Refused(codes.INTERNAL, "shutting down"))
            return
        try:
            self.creds, self.opts = self._device()
        except Refused as exc:
            await self.refuse(exc)
            return
        if not self.limit_body(self.hub.config.api.max_body_bytes):
            await self.refuse(Refused(codes.LIMIT_EXCEEDED, "request body too large"))

    def _device(self) -> tuple[Credentials, ChannelOptions]:
        """The device token and the telemetry namespace. Raises ``Refused``."""
        creds = self.credentials()
        if not is_device(creds.claims) or not creds.user:
            raise Refused(codes.PERMISSION_DENIED, "not a device token")
        ns, opts = self.namespace()
        if opts is None:
            raise Refused(codes.UNKNOWN_CHANNEL, f"telemetry namespace {ns!r} is not configured")
        return creds, opts

    async def post(self) -> None:
        if self.hub.closing:  # its body came in after SIGTERM: nothing done, say so
            await self.refuse(Refused(codes.INTERNAL, "shutting down"))
            return
        # Counted from here to the reply: a graceful shutdown waits for it
        # (Hub.wait_api_idle), so stored points get their 202.
        self.hub.api_request_started()
        try:
            await self._ingest()
        except Refused as exc:
            await self.refuse(exc)
        finally:
            self.hub.api_request_done()

    async def _ingest(self) -> None:
        creds, opts = self.creds, self.opts
        ns = self.hub.config.telemetry.namespace
        if self.too_large:
            raise Refused(codes.LIMIT_EXCEEDED, "request body too large")
        try:
            data = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise Refused(codes.BAD_REQUEST, "invalid JSON") from None
        channel = f"{ns}:{creds.user}"
        if len(channel) > self.hub.config.client.max_channel_length:
            raise Refused(codes.BAD_REQUEST, "device id too long for a channel name")
        info = ClientInfo(creds.user, "", creds.info)
        try:
            result = await self.hub.telemetry_ingest.ingest(
                creds.user, creds.claims, data, channel=channel, opts=opts, info=info
            )
        except RateLimited as exc:
            self.set_header("Retry-After", str(max(1, math.ceil(exc.retry_after))))
            await self.refuse(exc)
            return
        except InvalidFrame as exc:
            rejected = [r.to_dict() for r in exc.rejected]
            await self.refuse(exc, accepted=0, rejected=rejected)
            return
        except ClientError as exc:
            await self.refuse(exc)
            return
        await self.reply(
            202,
            {
                "accepted": len(result.accepted),
                "rejected": [r.to_dict() for r in result.rejected],
            },
        )


class DevicesHandler(TelemetryHandler):
    async def get(self) -> None:
        try:
            creds, claim = self.reader()
            try:
                devices = await self.hub.telemetry.devices()
            except EngineError as exc:
                log.warning("telemetry devices read failed: %s", exc)
                raise Refused(codes.STORE_UNAVAILABLE) from None
        except Refused as exc:
            await self.refuse(exc)
            return
        now = int(time.time() * 1000)
        timeout_ms = int(self.hub.config.telemetry.online_timeout * 1000)
        visible = sorted(
            (d for d in devices if claim_globs_match(creds.claims, claim, d.id)),
            key=lambda d: d.id,
        )
        await self.reply(
            200,
            {
                "devices": [
                    {
                        "id": d.id,
                        "last_seen": d.last_seen,
                        "online": now - d.last_seen <= timeout_ms,
                        "last_values": dict(d.last_values),
                    }
                    for d in visible
                ]
            },
        )


class DeviceTelemetryHandler(TelemetryHandler):
    async def get(self, device: str) -> None:
        try:
            body = await self._query(device)
        except Refused as exc:
            await self.refuse(exc)
            return
        await self.reply(200, body)

    async def _query(self, device: str) -> dict[str, Any]:
        creds, claim = self.reader()
        if not claim_globs_match(creds.claims, claim, device):
            raise Refused(codes.PERMISSION_DENIED, f"device not in the token's {claim!r} claim")
        metric = self.get_query_argument("metric", "")
        if not METRIC_NAME_RE.fullmatch(metric):
            raise Refused(codes.BAD_REQUEST, "metric: required, 1-64 of A-Z a-z 0-9 _ . -")
        end = self._int_arg("to", int(time.time() * 1000))
        # Not before the epoch: negative times are refused when a client sends them back.
        start = self._int_arg("from", max(0, end - DEFAULT_RANGE_MS))
        if start >= end:
            raise Refused(codes.BAD_REQUEST, "from must be before to")
        step = self._int_arg("step", max(MIN_DEFAULT_STEP_MS, -(-(end - start) // DEFAULT_STEPS)))
        if step < 1:
            raise Refused(codes.BAD_REQUEST, "step must be at least 1 ms")
        steps = step_count(start, end, step)
        limit = self.hub.config.telemetry.max_query_steps
        if steps > limit:
            raise Refused(
                codes.BAD_REQUEST, f"too many steps ({steps} > {limit}): use a larger step"
            )
        try:
            result = await self.hub.telemetry.query(device, metric, start, end, step)
        except EngineError as exc:
            log.warning("telemetry query failed device=%s: %s", device, exc)
            raise Refused(codes.STORE_UNAVAILABLE) from None
        return {
            "device": device,
            "metric": metric,
            "from": start,
            "to": end,
            "step": step,
            "points": [
                {"t": s.t, "min": s.min, "max": s.max, "avg": s.avg, "count": s.count}
                for s in result
            ],
        }

    def _int_arg(self, name: str, default: int) -> int:
        """A query parameter in ms: plain ASCII digits only, up to ``MAX_QUERY_MS``.

        ``int()`` alone (and Tornado's default strip) would take ``1_000``,
        ``" 1000"``, ``+5`` and non-ASCII digits, and any size: a value past 64
        bits cannot be encoded in the reply (a 500) nor sent in a MongoDB query.
        Refused: 400 naming the parameter.
        """
        raw = self.get_query_argument(name, None, strip=False)
        if raw is None or raw == "":
            return default
        if not INT_ARG_RE.fullmatch(raw):
            raise Refused(codes.BAD_REQUEST, f"{name}: expected integer milliseconds")
        digits = raw.removeprefix("-").lstrip("0") or "0"
        if raw.startswith("-") and digits != "0":
            raise Refused(codes.BAD_REQUEST, f"{name}: must not be negative")
        # Length first: int() of thousands of digits is slow, and refused past 4300.
        if len(digits) > len(str(MAX_QUERY_MS)) or int(digits) > MAX_QUERY_MS:
            raise Refused(codes.BAD_REQUEST, f"{name}: at most {MAX_QUERY_MS} ms")
        return int(digits)


def telemetry_routes(hub: Hub, verifier: TokenVerifier) -> list[tuple[str, type, dict[str, Any]]]:
    """Routes to put before the generic ``/api/<method>`` (which would match them too)."""
    deps = {"hub": hub, "verifier": verifier}
    return [
        (r"/api/telemetry", TelemetryIngestHandler, deps),
        (r"/api/devices", DevicesHandler, deps),
        (r"/api/devices/([^/]+)/telemetry", DeviceTelemetryHandler, deps),
    ]
