"""Telemetry over the wire: permissions, WebSocket and HTTP ingest, rate limits, query API.

Devices and dashboards are real connections to an in-process Squall: raw
protocol clients, Tornado's HTTP client, and centrifuge-python for the SDK
path. The end-to-end tests run once on the memory store and once on MongoDB
(FerretDB unless ``SQUALL_MONGODB_URL`` says otherwise); with Mongo they wait
until the write-behind queue is empty so the query answers from the
collection.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
import tornado.httpclient
from centrifuge import Client as SdkClient
from centrifuge import ReplyError

from tests.engines import eventually
from tests.helpers import logs
from tests.helpers.server import token

MINUTE = 60_000


def device_token(device: str, **kw: Any) -> str:
    return token(device, extra={"device": True}, **kw)


def dashboard_token(*globs: str, user: str = "ops") -> str:
    return token(user, extra={"devices": list(globs or ("*",))})


def base_ts() -> int:
    """A minute boundary two minutes ago: inside the default skew, whole buckets after it."""
    return int(time.time() * 1000) // MINUTE * MINUTE - 2 * MINUTE


async def http(
    sq: Any,
    method: str,
    path: str,
    *,
    tok: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """One HTTP request; (status, decoded JSON body or None, response headers)."""
    hdrs = dict(headers or {})
    if tok is not None:
        hdrs["Authorization"] = f"Bearer {tok}"
    payload = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    resp = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"{sq.http_url}{path}",
        method=method,
        body=payload,
        headers=hdrs,
        raise_error=False,
        allow_nonstandard_methods=True,
    )
    data = orjson.loads(resp.body) if resp.body else None
    return resp.code, data, resp.headers


async def post_points(sq: Any, device: str, body: Any) -> tuple[int, Any, Any]:
    return await http(sq, "POST", "/api/telemetry", tok=device_token(device), body=body)


async def query(sq: Any, device: str, tok: str | None = None, **params: Any) -> tuple[int, Any]:
    qs = urlencode({k.rstrip("_"): v for k, v in params.items()})
    code, body, _ = await http(
        sq, "GET", f"/api/devices/{device}/telemetry?{qs}", tok=tok or dashboard_token()
    )
    return code, body


async def written(sq: Any) -> None:
    """Wait until the telemetry store has written everything it accepted."""

    async def drained() -> bool:
        return sq.hub.telemetry.status().queue_depth == 0

    await eventually(drained, within=5.0)


async def subscribed_dashboard(sq: Any, *channels: str, globs: tuple[str, ...] = ("*",)) -> Any:
    dash = await sq.raw(connect=True, token=dashboard_token(*globs))
    for channel in channels:
        reply = await dash.command("subscribe", {"channel": channel})
        assert "subscribe" in reply, reply
    return dash


async def next_points(client: Any) -> list[dict[str, Any]]:
    push = await client.next_push()
    return push["push"]["pub"]["data"]["points"]


@pytest.fixture(params=["memory", "mongo"])
def backend(request: pytest.FixtureRequest, unique_prefix: str) -> dict[str, Any]:
    """Config overrides selecting the telemetry store (memory, or Mongo on a fresh database)."""
    if request.param == "memory":
        return {}
    url = request.getfixturevalue("mongo_url")
    return {"mongodb.url": url, "mongodb.database": unique_prefix, "telemetry.flush_interval": 0.02}


# --------------------------------------------------------------------- permissions


async def test_device_cannot_publish_to_another_devices_channel(squall):
    """A device token publishing to telemetry:<someone else> gets 103; its own channel works."""
    sq = await squall()
    dev = await sq.raw(connect=True, token=device_token("pump-1"))
    point = {"values": {"v": 1}}
    reply = await dev.command("publish", {"channel": "telemetry:pump-2", "data": point})
    assert reply["error"]["code"] == 103
    reply = await dev.command("publish", {"channel": "telemetry:pump-1", "data": point})
    assert reply == {"id": 3, "publish": {}}


async def test_device_publishing_to_its_channel_with_a_dollar_gets_103(squall):
    """$telemetry:<own id> was accepted: the points were stored, but published on a
    channel no dashboard follows (dashboards subscribe to telemetry:<id>), so the live
    view missed them while the device saw success. Now 103, and nothing stored."""
    sq = await squall()
    dev = await sq.raw(connect=True, token=device_token("pump-1"))
    point = {"values": {"v": 1}}
    with logs.expect_log("squall.client", r"command publish failed code=103 .*without '\$'"):
        reply = await dev.command("publish", {"channel": "$telemetry:pump-1", "data": point})
    assert reply["error"]["code"] == 103, reply
    assert await sq.hub.telemetry.devices() == []


async def test_device_ids_dot_and_dot_dot_are_refused(squall):
    """A device "." or "..": browsers resolve those path segments (%2E too), so the
    dashboard's /api/devices/../telemetry read another endpoint, whose 403 signed the
    user out. Such ids are refused at ingest, over HTTP and WebSocket."""
    sq = await squall()
    for device in (".", ".."):
        code, body, _ = await post_points(sq, device, [{"values": {"v": 1}}])
        assert (code, body["error"]["code"]) == (400, 107), body
        assert "cannot be used" in body["error"]["message"]
        dev = await sq.raw(connect=True, token=device_token(device))
        reply = await dev.command(
            "publish", {"channel": f"telemetry:{device}", "data": {"values": {"v": 1}}}
        )
        assert reply["error"]["code"] == 107, reply
    assert await sq.hub.telemetry.devices() == []


async def test_device_cannot_subscribe_to_other_devices(squall):
    """A device token has no devices claim: subscribing to a device channel is 103."""
    sq = await squall()
    dev = await sq.raw(connect=True, token=device_token("pump-1"))
    reply = await dev.command("subscribe", {"channel": "telemetry:pump-2"})
    assert reply["error"]["code"] == 103


async def test_dashboard_subscribes_only_to_devices_its_claim_matches(squall):
    """devices: ["pump-*"] may subscribe to telemetry:pump-7, not to telemetry:fan-1."""
    sq = await squall()
    dash = await sq.raw(connect=True, token=dashboard_token("pump-*", "fan-2"))
    assert "subscribe" in await dash.command("subscribe", {"channel": "telemetry:pump-7"})
    assert "subscribe" in await dash.command("subscribe", {"channel": "telemetry:fan-2"})
    reply = await dash.command("subscribe", {"channel": "telemetry:fan-1"})
    assert reply["error"]["code"] == 103
    plain = await sq.raw(connect=True)  # a user without any devices claim
    reply = await plain.command("subscribe", {"channel": "telemetry:pump-7"})
    assert reply["error"]["code"] == 103


async def test_non_device_token_cannot_publish_telemetry(squall):
    """A dashboard token publishing to telemetry:<its own sub> is refused: only devices ingest."""
    sq = await squall()
    dash = await sq.raw(connect=True, token=dashboard_token(user="ops"))
    reply = await dash.command(
        "publish", {"channel": "telemetry:ops", "data": {"values": {"v": 1}}}
    )
    assert reply["error"]["code"] == 103
    assert await sq.hub.telemetry.devices() == []


# --------------------------------------------------------------------- WebSocket ingest


async def test_ws_publish_delivers_normalised_points_to_dashboards(squall):
    """Subscribers get {"points": [...]} with float values; a point without ts gets server time."""
    sq = await squall()
    dash = await subscribed_dashboard(sq, "telemetry:d1")
    dev = await sq.raw(connect=True, token=device_token("d1"))
    ts = base_ts()
    before = int(time.time() * 1000)
    reply = await dev.command(
        "publish",
        {
            "channel": "telemetry:d1",
            "data": [{"ts": ts, "values": {"temp": 21, "rssi": -60.5}}, {"values": {"temp": 22}}],
        },
    )
    assert "publish" in reply, reply
    first, second = await next_points(dash)
    assert first == {"ts": ts, "values": {"temp": 21.0, "rssi": -60.5}}
    assert before <= second["ts"] <= int(time.time() * 1000)
    assert second["values"] == {"temp": 22.0}


async def test_ws_frame_with_some_invalid_points_accepts_the_valid_ones(squall):
    """The publish succeeds; only valid points are published and stored."""
    sq = await squall()
    dash = await subscribed_dashboard(sq, "telemetry:d1")
    dev = await sq.raw(connect=True, token=device_token("d1"))
    ts = base_ts()
    frame = [
        {"ts": ts, "values": {"v": 1}},
        {"ts": ts + 1, "values": {"v": "oops"}},
        {"ts": ts + 2, "values": {"v": 3}},
    ]
    reply = await dev.command("publish", {"channel": "telemetry:d1", "data": frame})
    assert "publish" in reply, reply
    assert [p["ts"] for p in await next_points(dash)] == [ts, ts + 2]
    code, body = await query(sq, "d1", metric="v", from_=ts, to=ts + MINUTE, step=MINUTE)
    assert code == 200
    assert body["points"] == [{"t": ts, "min": 1.0, "max": 3.0, "avg": 2.0, "count": 2}]


async def test_ws_frame_without_valid_points_is_107_listing_reasons(squall):
    """Error 107 names each point's problem; nothing is published or stored."""
    sq = await squall()
    dash = await subscribed_dashboard(sq, "telemetry:d1")
    dev = await sq.raw(connect=True, token=device_token("d1"))
    frame = [{"values": {"v": True}}, "x", {"values": {}}]
    with logs.expect_log("squall.telemetry", r"telemetry frame refused device=d1 points=3"):
        reply = await dev.command("publish", {"channel": "telemetry:d1", "data": frame})
    assert reply["error"]["code"] == 107
    message = reply["error"]["message"]
    assert message.startswith("no valid points: #0: metric 'v' is a boolean")
    assert "#1: not an object" in message
    assert "#2: values is empty" in message
    assert await sq.hub.telemetry.devices() == []
    # The next valid frame is the first publication the dashboard sees.
    await dev.command("publish", {"channel": "telemetry:d1", "data": {"values": {"ok": 1}}})
    assert (await next_points(dash))[0]["values"] == {"ok": 1.0}


async def test_rate_limit_is_111_on_websocket_and_429_over_http_per_device(squall):
    """Over max_points_per_second the whole frame is refused: 111 (temporary) / HTTP 429."""
    sq = await squall(**{"telemetry.max_points_per_second": 1, "telemetry.max_points_burst": 5})
    dev = await sq.raw(connect=True, token=device_token("d1"))
    ts = base_ts()
    five = [{"ts": ts + i, "values": {"v": i}} for i in range(5)]
    assert "publish" in await dev.command("publish", {"channel": "telemetry:d1", "data": five})
    more = [{"ts": ts + 10 + i, "values": {"v": i}} for i in range(3)]
    with logs.expect_log("squall.telemetry", r"telemetry rate limited device=d1 points=3"):
        reply = await dev.command("publish", {"channel": "telemetry:d1", "data": more})
    assert reply["error"] == {"code": 111, "message": "too many requests", "temporary": True}
    code, body, headers = await post_points(sq, "d1", more)  # the same device over HTTP
    assert code == 429
    assert body["error"]["code"] == 111
    assert 1 <= int(headers["Retry-After"]) <= 3
    code, _, _ = await post_points(sq, "d2", more)  # another device has its own budget
    assert code == 202
    # More than the burst can never pass: refused for good (107 / 400), not 111, whose
    # "temporary" made devices send the same frame again and again.
    six = [{"ts": ts + 20 + i, "values": {"v": i}} for i in range(6)]
    code, body, headers = await post_points(sq, "d3", six)
    assert code == 400
    assert body["error"]["code"] == 107
    assert "max_points_burst allows (6 > 5)" in body["error"]["message"]
    assert "Retry-After" not in headers
    ws = await sq.raw(connect=True, token=device_token("d4"))
    reply = await ws.command("publish", {"channel": "telemetry:d4", "data": six})
    assert reply["error"]["code"] == 107, reply
    assert "max_points_burst allows (6 > 5)" in reply["error"]["message"]
    assert "temporary" not in reply["error"]
    code, body = await query(sq, "d1", metric="v", from_=ts, to=ts + MINUTE, step=MINUTE)
    assert body["points"][0]["count"] == 5  # nothing of the refused frames was stored


# --------------------------------------------------------------------- HTTP ingest


async def test_http_ingest_reports_each_rejected_point(squall):
    """202 with accepted count and per-point index and reason; rejected points are not stored."""
    sq = await squall()
    ts = base_ts()
    far = int(time.time() * 1000) + 3_600_000
    batch = [
        {"ts": ts, "values": {"temp": 20.5}},
        {"ts": ts + 1, "values": {"temp": "warm"}},
        {"ts": ts + 2, "values": {"temp": False}},
        {"ts": ts + 3, "values": {f"m{i}": i for i in range(65)}},
        {"ts": ts + 4, "values": {"x" * 65: 1}},
        {"ts": ts + 5, "values": {"bad name": 1}},
        {"ts": far, "values": {"temp": 1}},
        7,
        {"ts": ts + 6, "values": {}},
        {"ts": ts + 7},
        {"ts": ts, "values": {"temp": 99}},
        {"ts": ts + 8, "values": {"temp": 21.5}},
    ]
    code, body, _ = await post_points(sq, "d1", batch)
    assert code == 202
    assert body["accepted"] == 2
    reasons = {r["index"]: r["reason"] for r in body["rejected"]}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert reasons[1] == "metric 'temp' is not a number"
    assert reasons[2] == "metric 'temp' is a boolean, not a number"
    assert reasons[3] == "too many metrics (65 > 64)"
    assert reasons[4].startswith("invalid metric name 'xxx")
    assert reasons[5].startswith("invalid metric name 'bad name'")
    assert "away from server time" in reasons[6]
    assert reasons[7] == "not an object"
    assert reasons[8] == "values is empty"
    assert reasons[9] == "values missing"
    assert reasons[10] == f"duplicate ts {ts} in this frame"
    code, q = await query(sq, "d1", metric="temp", from_=ts, to=ts + MINUTE, step=MINUTE)
    assert q["points"] == [{"t": ts, "min": 20.5, "max": 21.5, "avg": 21.0, "count": 2}]


async def test_http_ingest_single_point_and_live_delivery(squall):
    """One point as the body is a frame of one, delivered live on telemetry:<sub>."""
    sq = await squall()
    dash = await subscribed_dashboard(sq, "telemetry:d1")
    code, body, _ = await post_points(sq, "d1", {"values": {"v": 4}})
    assert (code, body) == (202, {"accepted": 1, "rejected": []})
    [point] = await next_points(dash)
    assert point["values"] == {"v": 4.0}


async def test_http_ingest_auth_errors(squall):
    """No, malformed or expired token is 401; a non-device token is 403."""
    sq = await squall()
    point = {"values": {"v": 1}}
    code, body, _ = await http(sq, "POST", "/api/telemetry", body=point)
    assert (code, body["error"]["code"]) == (401, 101)
    with logs.expect_log("squall.api.telemetry", r"telemetry request with a bad token"):
        code, _, _ = await http(sq, "POST", "/api/telemetry", tok="not.a.jwt", body=point)
    assert code == 401
    expired = token("d1", extra={"device": True, "exp": int(time.time()) - 60}, ttl=None)
    code, body, _ = await http(sq, "POST", "/api/telemetry", tok=expired, body=point)
    assert (code, body["error"]["message"]) == (401, "token expired")
    code, _, _ = await http(
        sq,
        "POST",
        "/api/telemetry",
        body=point,
        headers={"Authorization": f"Basic {device_token('d1')}"},
    )
    assert code == 401
    code, body, _ = await http(sq, "POST", "/api/telemetry", tok=dashboard_token(), body=point)
    assert (code, body["error"]["code"]) == (403, 103)
    # A signed info claim that cannot be encoded again (was a 500 and an ERROR traceback).
    odd = token("d1", extra={"device": True, "info": 2**70})
    with logs.expect_log("squall.api.telemetry", r"bad token .*info claim cannot be encoded"):
        code, body, _ = await http(sq, "POST", "/api/telemetry", tok=odd, body=point)
    assert (code, body["error"]["code"]) == (401, 101)


@pytest.mark.parametrize(
    "auth",
    ["", "Authorization: Bearer not.a.jwt\r\n", f"Authorization: Bearer {dashboard_token()}\r\n"],
    ids=["no token", "bad token", "not a device token"],
)
async def test_http_ingest_refuses_a_bad_token_before_reading_the_body(squall, auth):
    """401/403 as soon as the headers arrive, as the server API's key check does. The
    body was read first: anyone without a token could make the node hold
    api.max_body_bytes per connection for up to api.body_timeout."""
    sq = await squall()
    reader, writer = await asyncio.open_connection("127.0.0.1", sq.port)
    try:
        head = f"POST /api/telemetry HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000000\r\n\r\n"
        writer.write(head.encode())  # and no body
        with logs.expect_log("squall.api.telemetry", "bad token", required="not.a" in auth):
            async with asyncio.timeout(2):
                status = await reader.readline()
        assert status.split()[1] in (b"401", b"403"), status
    finally:
        writer.close()
    code, _, _ = await post_points(sq, "d1", {"values": {"v": 1}})
    assert code == 202


async def test_http_ingest_refuses_a_device_id_that_is_not_valid_unicode(squall):
    """A sub with a lone surrogate (valid JSON, so a signed token) is an invalid token,
    401: stored, it made GET /api/devices a 500 for every dashboard that may see it."""
    sq = await squall()
    code, body, _ = await http(
        sq, "POST", "/api/telemetry", tok=device_token("pump-\ud800"), body={"values": {"v": 1}}
    )
    assert code == 401, body
    code, body, _ = await http(
        sq, "POST", "/api/telemetry", tok=device_token("pump-\u00e9"), body={"values": {"v": 1}}
    )
    assert code == 202
    code, body, _ = await http(sq, "GET", "/api/devices", tok=dashboard_token())
    assert (code, [d["id"] for d in body["devices"]]) == (200, ["pump-\u00e9"])


async def test_http_ingest_bad_bodies(squall):
    """Invalid JSON (NaN included), an empty list and an all-invalid batch are 400."""
    sq = await squall(**{"telemetry.max_points_per_frame": 3})
    tok = device_token("d1")
    for raw in (b"{not json", b'{"values": {"v": NaN}}', b""):
        code, body, _ = await http(sq, "POST", "/api/telemetry", tok=tok, raw=raw)
        assert (code, body["error"]["message"]) == (400, "invalid JSON"), raw
    code, body, _ = await post_points(sq, "d1", [])
    assert (code, body["error"]["message"]) == (400, "no points")
    code, body, _ = await post_points(sq, "d1", [{"values": {"v": 1}}] * 4)
    assert code == 400
    assert body["error"]["message"] == "too many points in one frame (4 > 3)"
    with logs.expect_log("squall.telemetry", r"telemetry frame refused"):
        code, body, _ = await post_points(sq, "d1", [{"values": {"v": "x"}}, {"values": 1}])
    assert code == 400
    assert body["accepted"] == 0
    assert body["rejected"] == [
        {"index": 0, "reason": "metric 'v' is not a number"},
        {"index": 1, "reason": "values must be an object"},
    ]
    assert body["error"]["code"] == 107


async def test_http_ingest_body_limit_and_missing_namespace(squall):
    """A body over api.max_body_bytes is 413; without the telemetry namespace ingest is 404."""
    sq = await squall(**{"api.max_body_bytes": 200})
    code, body, _ = await post_points(sq, "d1", [{"values": {"v": i}} for i in range(30)])
    assert (code, body["error"]["code"]) == (413, 106)

    async def chunks(write: Any) -> None:  # no Content-Length: the size shows while reading
        await write(b"[")
        for i in range(30):
            await write(orjson.dumps({"values": {"v": i}}) + b",")
        await write(b'{"values": {"v": 0}}]')

    resp = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"{sq.http_url}/api/telemetry",
        method="POST",
        body_producer=chunks,
        headers={"Authorization": f"Bearer {device_token('d1')}"},
        raise_error=False,
    )
    assert (resp.code, orjson.loads(resp.body)["error"]["code"]) == (413, 106)
    code, body, _ = await post_points(sq, "d1", {"values": {"v": 1}})  # a small one still goes in
    assert (code, body) == (202, {"accepted": 1, "rejected": []})
    other = await squall(**{"telemetry.namespace": "nope"})
    code, body, _ = await post_points(other, "d1", {"values": {"v": 1}})
    assert (code, body["error"]["code"]) == (404, 102)


# --------------------------------------------------------------------- idempotency


async def test_retried_batches_are_stored_once(squall, backend):
    """The same batch twice over HTTP and the same frame twice over WS: counts do not change."""
    sq = await squall(**backend)
    ts = base_ts()
    batch = [{"ts": ts + i * 1000, "values": {"v": float(i)}} for i in range(20)]
    for _ in range(2):
        code, body, _ = await post_points(sq, "d1", batch)
        assert (code, body) == (202, {"accepted": 20, "rejected": []})
    dev = await sq.raw(connect=True, token=device_token("d2"))
    for _ in range(2):
        reply = await dev.command("publish", {"channel": "telemetry:d2", "data": batch[:10]})
        assert "publish" in reply
    await written(sq)
    for _ in range(2):
        _, q1 = await query(sq, "d1", metric="v", from_=ts, to=ts + MINUTE, step=MINUTE)
        _, q2 = await query(sq, "d2", metric="v", from_=ts, to=ts + MINUTE, step=MINUTE)
        assert q1["points"] == [{"t": ts, "min": 0.0, "max": 19.0, "avg": 9.5, "count": 20}]
        assert q2["points"] == [{"t": ts, "min": 0.0, "max": 9.0, "avg": 4.5, "count": 10}]
        await post_points(sq, "d1", batch[5:15])  # a partial retry after the write
        await written(sq)


# --------------------------------------------------------------------- query API


async def test_query_api_auth(squall):
    """Query endpoints need a token with a devices claim matching the device."""
    sq = await squall()
    for path in ("/api/devices", "/api/devices/d1/telemetry?metric=v"):
        code, body, _ = await http(sq, "GET", path)
        assert (code, body["error"]["code"]) == (401, 101)
        code, body, _ = await http(sq, "GET", path, tok=device_token("d1"))
        assert (code, body["error"]["code"]) == (403, 103)
    code, body = await query(sq, "d1", tok=dashboard_token("d2", "x*"), metric="v")
    assert (code, body["error"]["code"]) == (403, 103)


async def test_query_api_validates_parameters(squall):
    """Bad metric, range or step, and too many steps, are 400 with a message."""
    sq = await squall(**{"telemetry.max_query_steps": 10})
    cases = [
        ({}, "metric: required"),
        ({"metric": "bad name"}, "metric: required"),
        ({"metric": "v", "from_": 10, "to": 10}, "from must be before to"),
        ({"metric": "v", "from_": "yesterday"}, "from: expected integer milliseconds"),
        ({"metric": "v", "to": -5}, "to: must not be negative"),
        ({"metric": "v", "from_": 0, "to": 10, "step": 0}, "step must be at least 1 ms"),
        ({"metric": "v", "from_": 0, "to": 1000, "step": 10}, "too many steps (100 > 10)"),
    ]
    for params, message in cases:
        code, body = await query(sq, "d1", **params)
        assert code == 400, params
        assert message in body["error"]["message"], (params, body)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"to": "100000000000000000000000000000"}, "to: at most 9007199254740991 ms"),
        ({"from_": "9" * 5000}, "from: at most 9007199254740991 ms"),
        ({"from_": 0, "to": 10**12, "step": 10**25}, "step: at most 9007199254740991 ms"),
        ({"to": 2**53}, "to: at most 9007199254740991 ms"),
        ({"to": "-" + "9" * 30}, "to: must not be negative"),
        ({"to": "1_000"}, "to: expected integer milliseconds"),
        ({"to": " 1000"}, "to: expected integer milliseconds"),
        ({"to": "1000 "}, "to: expected integer milliseconds"),
        ({"to": "+1000"}, "to: expected integer milliseconds"),
        ({"to": "\u0661\u0660\u0660\u0660"}, "to: expected integer milliseconds"),  # Arabic-Indic
        ({"step": "\uff11\uff10"}, "step: expected integer milliseconds"),  # fullwidth 10
    ],
)
async def test_query_api_refuses_huge_or_odd_integers_with_400(squall, params, message):
    """A time or step past 2**53 ms, or not plain ASCII digits, is a 400 naming the
    parameter (never a 500 because the reply cannot be encoded)."""
    sq = await squall()
    code, body = await query(sq, "d1", metric="v", **params)
    assert (code, body["error"]["code"]) == (400, 107), body
    assert body["error"]["message"] == message


async def test_arguments_that_are_not_utf8_are_a_400_naming_them(squall):
    """A query or path argument that is not UTF-8 is refused by Tornado: the 400 said
    only "Bad Request"; it names the argument now."""
    sq = await squall()
    path = "/api/devices/d1/telemetry?metric=v&from=%FF"
    code, body, _ = await http(sq, "GET", path, tok=dashboard_token())
    assert (code, body["error"]["code"]) == (400, 107), body
    assert body["error"]["message"].startswith("Invalid unicode in from:"), body
    code, body, _ = await http(sq, "GET", "/api/devices/%FF/telemetry", tok=dashboard_token())
    assert (code, body["error"]["code"]) == (400, 107), body
    assert body["error"]["message"].startswith("Invalid unicode in "), body


async def test_query_api_accepts_the_largest_times_and_leading_zeros(squall):
    """2**53 - 1 ms is the largest time a query takes; leading zeros and "-0" are plain numbers."""
    sq = await squall()
    top = 2**53 - 1
    code, body = await query(sq, "d1", metric="v", from_=top - MINUTE, to=top, step=MINUTE)
    assert code == 200, body
    assert (body["from"], body["to"], body["step"]) == (top - MINUTE, top, MINUTE)
    code, body = await query(sq, "d1", metric="v", from_="-0", to="000120000", step="0060000")
    assert code == 200, body
    assert (body["from"], body["to"], body["step"]) == (0, 120_000, 60_000)


async def test_query_defaults_cover_the_last_hour(squall):
    """Without from/to/step: the hour before now, in steps of about 1/300 of it."""
    sq = await squall()
    before = int(time.time() * 1000)
    code, body = await query(sq, "d1", metric="v")
    assert code == 200
    assert body["to"] - body["from"] == 3_600_000
    assert before <= body["to"] <= int(time.time() * 1000)
    assert body["step"] == 12_000
    assert (body["device"], body["metric"], body["points"]) == ("d1", "v", [])


async def test_query_default_from_is_never_negative(squall):
    """With a "to" less than an hour after the epoch, the default "from" is 0: the reply
    said from -3599000, a time the API itself refuses (400) when sent back."""
    sq = await squall()
    code, body = await query(sq, "d1", metric="v", to=1000)
    assert code == 200, body
    assert (body["from"], body["to"], body["step"]) == (0, 1000, 1000)
    code, body = await query(sq, "d1", metric="v", from_=body["from"], to=body["to"])
    assert code == 200, body


async def test_device_ids_with_slashes_and_colons_are_addressable(squall):
    """A device id is URL-escaped in the path and comes back exactly."""
    sq = await squall()
    code, _, _ = await post_points(sq, "site:a/pump 1", {"values": {"v": 2}})
    assert code == 202
    code, body = await query(sq, "site%3Aa%2Fpump%201", metric="v")
    assert code == 200
    assert body["device"] == "site:a/pump 1"
    assert body["points"][0]["count"] == 1


async def test_devices_lists_matching_devices_with_online_and_last_values(squall):
    """Only devices the claim matches are listed; online turns false after online_timeout."""
    sq = await squall(**{"telemetry.online_timeout": 0.3})
    ts = base_ts()
    await post_points(sq, "pump-1", [{"ts": ts + 1000, "values": {"p": 2.0, "t": 40.0}}])
    await post_points(sq, "pump-1", {"ts": ts, "values": {"p": 1.0, "rpm": 900}})  # older
    await post_points(sq, "fan-1", {"values": {"rpm": 1200}})
    before = int(time.time() * 1000)
    code, body, _ = await http(sq, "GET", "/api/devices", tok=dashboard_token("pump-*"))
    assert code == 200
    [pump] = body["devices"]
    assert pump["id"] == "pump-1"
    assert pump["online"] is True
    assert before - 5000 <= pump["last_seen"] <= before
    assert pump["last_values"] == {"p": 2.0, "t": 40.0, "rpm": 900.0}
    code, body, _ = await http(sq, "GET", "/api/devices", tok=dashboard_token())
    assert [d["id"] for d in body["devices"]] == ["fan-1", "pump-1"]

    async def offline() -> bool:
        _, now, _ = await http(sq, "GET", "/api/devices", tok=dashboard_token("pump-*"))
        return now["devices"][0]["online"] is False

    await eventually(offline, within=3.0)


# --------------------------------------------------------------------- end to end


async def test_ingest_to_storage_to_query_through_both_paths(squall, backend):
    """SDK WebSocket publishes and HTTP posts arrive live, are stored, and query back exactly."""
    sq = await squall(**backend)
    dash = await subscribed_dashboard(sq, "telemetry:ws-dev", "telemetry:http-dev")
    ts = base_ts()
    # Two minutes of points at 1 Hz with known values: v = i % 7, w = -i.
    frames = [
        [{"ts": ts + i * 1000, "values": {"v": i % 7, "w": -i}} for i in range(k, k + 20)]
        for k in range(0, 120, 20)
    ]
    sdk = SdkClient(sq.ws_url, token=device_token("ws-dev"))
    await sdk.connect()
    try:
        for frame in frames:
            await sdk.publish("telemetry:ws-dev", frame)
        with pytest.raises(ReplyError) as refused:
            await sdk.publish("telemetry:http-dev", frames[0])
        assert refused.value.code == 103
    finally:
        await sdk.disconnect()
    for frame in frames:
        code, body, _ = await post_points(sq, "http-dev", frame)
        assert (code, body["accepted"]) == (202, 20)
    seen: dict[str, int] = {"telemetry:ws-dev": 0, "telemetry:http-dev": 0}
    while sum(seen.values()) < 240:
        push = (await dash.next_push())["push"]
        seen[push["channel"]] += len(push["pub"]["data"]["points"])
    assert seen == {"telemetry:ws-dev": 120, "telemetry:http-dev": 120}
    await written(sq)
    values = {ts + i * 1000: (float(i % 7), float(-i)) for i in range(120)}
    for device in ("ws-dev", "http-dev"):
        for step in (MINUTE, 30_000, 7_000):
            code, body = await query(
                sq, device, metric="v", from_=ts + 5000, to=ts + 115_000, step=step
            )
            assert code == 200
            want: dict[int, list[float]] = {}
            for t, (v, _) in values.items():
                if ts + 5000 <= t < ts + 115_000:
                    want.setdefault(t // step * step, []).append(v)
            assert [(p["t"], p["min"], p["max"], p["count"]) for p in body["points"]] == [
                (t, min(vs), max(vs), len(vs)) for t, vs in sorted(want.items())
            ]
            for p, (_, vs) in zip(body["points"], sorted(want.items()), strict=True):
                assert p["avg"] == pytest.approx(sum(vs) / len(vs))
    code, body, _ = await http(sq, "GET", "/api/devices", tok=dashboard_token())
    assert {d["id"]: d["last_values"] for d in body["devices"]} == {
        "http-dev": {"v": 119.0 % 7, "w": -119.0},
        "ws-dev": {"v": 119.0 % 7, "w": -119.0},
    }
    assert all(d["online"] for d in body["devices"])


async def test_negative_zero_is_stored_and_delivered_as_zero_in_every_store(squall, backend):
    """-0.0 comes back as 0.0 live, from queries and in last values: FerretDB stored it
    as 0.0 while the memory store (and the live publication) kept -0.0."""
    sq = await squall(**backend)
    dash = await subscribed_dashboard(sq, "telemetry:z")
    ts = base_ts()
    code, body, _ = await post_points(sq, "z", {"ts": ts, "values": {"v": -0.0}})
    assert (code, body["accepted"]) == (202, 1)
    [live] = await next_points(dash)
    await written(sq)
    code, body = await query(sq, "z", metric="v", from_=ts, to=ts + 1, step=1)
    [point] = body["points"]
    code, devices, _ = await http(sq, "GET", "/api/devices", tok=dashboard_token())
    [device] = devices["devices"]
    for value in (live["values"]["v"], point["min"], point["max"], device["last_values"]["v"]):
        assert math.copysign(1.0, value) == 1.0


async def test_server_api_publish_to_a_telemetry_channel_is_refused(squall):
    """The plain server API cannot bypass telemetry validation and storage (107 with a hint)."""
    sq = await squall()
    reply = await sq.api("publish", {"channel": "telemetry:dev1", "data": {"values": "junk"}})
    assert reply["error"]["code"] == 107
    assert "POST /api/telemetry" in reply["error"]["message"]
    reply = await sq.api("broadcast", {"channels": ["telemetry:dev1"], "data": {}})
    assert reply["result"]["responses"][0]["error"]["code"] == 107


# --------------------------------------------------------------------- shutdown


async def test_requests_after_the_shutdown_began_get_503_and_change_nothing(squall):
    """After SIGTERM the listener closes, but a keep-alive connection can still send
    requests: they were carried out (published, stored) while the shutdown closed
    their connections, often before the reply. They get 503 and do nothing."""
    sq = await squall()
    sq.hub.closing = True  # what serve() sets first on SIGTERM
    try:
        code, body, _ = await post_points(sq, "d1", [{"values": {"v": 1}}])
        assert (code, body["error"]["message"]) == (503, "shutting down"), body
        reply = await sq.api("publish", {"channel": "chat:x", "data": 1})
        assert reply["error"]["message"] == "shutting down", reply
    finally:
        sq.hub.closing = False
    assert await sq.hub.telemetry.devices() == []
    history = await sq.api("history", {"channel": "chat:x", "limit": -1})
    assert history["result"].get("publications", []) == [], history


async def test_a_shutdown_waits_for_a_telemetry_post_in_progress(squall, monkeypatch):
    """POST /api/telemetry was not counted among the requests a shutdown waits for: its
    connection was closed before the 202 of points already stored, and a device that
    retried sent them again. The drain waits for it now."""
    sq = await squall()
    gate = asyncio.Event()
    add = sq.hub.telemetry.add

    async def slow_add(*args: Any, **kw: Any) -> None:  # a store that takes its time
        await gate.wait()
        await add(*args, **kw)

    monkeypatch.setattr(sq.hub.telemetry, "add", slow_add)
    post = asyncio.ensure_future(post_points(sq, "d1", [{"values": {"v": 1}}]))

    async def in_progress() -> bool:
        return sq.hub.api_requests == 1

    await eventually(in_progress, within=5.0)
    idle = asyncio.ensure_future(sq.hub.wait_api_idle())
    await asyncio.sleep(0.1)
    assert not idle.done()  # the drain waits for it
    gate.set()
    code, body, _ = await post
    assert code == 202, body
    await asyncio.wait_for(idle, 5)
