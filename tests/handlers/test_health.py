"""Operational endpoints: ``/health``, ``/ready`` and ``/metrics`` tell the truth about the node."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import tornado.httpclient

from server import codes
from tests.helpers.logs import expect_log, seen


async def get(sq: Any, path: str) -> tornado.httpclient.HTTPResponse:
    http = tornado.httpclient.AsyncHTTPClient()
    return await http.fetch(f"{sq.http_url}{path}", raise_error=False)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


async def metrics(sq: Any) -> dict[str, float]:
    resp = await get(sq, "/metrics")
    assert resp.code == 200
    return parse_metrics(resp.body.decode())


async def test_health_is_ok_with_the_node_name(squall):
    """/health answers 200 with status ok and the node's name while the process serves."""
    sq = await squall()
    resp = await get(sq, "/health")
    assert resp.code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert orjson.loads(resp.body) == {"status": "ok", "node": f"127.0.0.1:{sq.port}"}


async def test_health_uses_the_configured_node_name(squall):
    """server.name shows up in /health."""
    sq = await squall(**{"server.name": "edge-7"})
    assert orjson.loads((await get(sq, "/health")).body)["node"] == "edge-7"


async def test_ready_with_working_engines(squall):
    """/ready is 200 with broker and store ready when the engines work."""
    sq = await squall()
    resp = await get(sq, "/ready")
    assert resp.code == 200
    body = orjson.loads(resp.body)
    assert body["ready"] is True
    assert body["broker"] == {"ready": True}
    assert body["store"]["ready"] is True
    assert body["shutting_down"] is False


async def test_ready_is_503_while_shutting_down(squall):
    """Once shutdown begins /ready says 503 so load balancers stop sending clients."""
    sq = await squall()
    sq.hub.closing = True
    with expect_log("tornado.access", r"503 GET /ready"):
        resp = await get(sq, "/ready")
    assert resp.code == 503
    body = orjson.loads(resp.body)
    assert body["ready"] is False
    assert body["shutting_down"] is True
    assert (await get(sq, "/health")).code == 200  # still alive, just not ready


async def test_access_log_off_keeps_only_failed_requests(squall):
    """Every request is in the access log by default; with server.access_log false the
    successful ones (a WebSocket upgrade among them) are not, the failed ones still are."""
    quiet = await squall(**{"server.access_log": False})
    assert (await get(quiet, "/health")).code == 200
    await quiet.raw(connect=True)
    with expect_log("tornado.access", r"^404 GET /no-such-page "):
        assert (await get(quiet, "/no-such-page")).code == 404
    assert not seen("tornado.access", r"^(200|101) ")
    sq = await squall()
    with expect_log("tornado.access", r"^200 GET /health "):
        assert (await get(sq, "/health")).code == 200
    with expect_log("tornado.access", r"^101 GET /connection/websocket "):
        await sq.raw(connect=True)


async def test_metrics_is_prometheus_text(squall):
    """/metrics is Prometheus text with HELP/TYPE lines for every documented family."""
    sq = await squall()
    resp = await get(sq, "/metrics")
    assert resp.code == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = resp.body.decode()
    for family in (
        "squall_connections",
        "squall_users",
        "squall_channels",
        "squall_subscriptions",
        "squall_messages_in_total",
        "squall_messages_out_total",
        "squall_bytes_in_total",
        "squall_bytes_out_total",
        "squall_publications_total",
        "squall_deliveries_total",
        "squall_disconnects_total",
        "squall_api_requests_total",
        "squall_command_duration_seconds",
        "squall_store_queue_depth",
    ):
        assert f"# TYPE {family} " in text, family
    values = parse_metrics(text)
    assert values["squall_connections"] == 0
    assert values["squall_publications_total"] == 0


async def test_metrics_count_connections_users_and_subscriptions(squall):
    """Connection, user, channel and subscription gauges follow what clients do."""
    sq = await squall()
    a = await sq.raw(connect=True)
    a2 = await sq.raw(connect=True)
    b = await sq.raw(connect=True, sub="bob")
    for c, ch in ((a, "news"), (a2, "chat:x"), (b, "chat:x")):
        assert "subscribe" in await c.command("subscribe", {"channel": ch})
    m = await metrics(sq)
    assert m["squall_connections"] == 3
    assert m["squall_users"] == 2
    assert m["squall_channels"] == 2
    assert m["squall_subscriptions"] == 3
    b.close()
    while True:  # bob's leave is announced once the server has dropped his connection
        push = await a2.next_push()
        if "leave" in push["push"]:
            break
    m = await metrics(sq)
    assert m["squall_connections"] == 2
    assert m["squall_users"] == 1
    assert m["squall_channels"] == 2
    assert m["squall_subscriptions"] == 2
    assert m['squall_disconnects_total{code="3000"}'] == 1


async def test_metrics_count_disconnects_by_code(squall):
    """Every disconnect is counted under its close code."""
    sq = await squall(**{"client.max_frame_bytes": 256})
    for _ in range(2):
        bad = await sq.raw(connect=True)
        await bad.send_raw("{oops")
        assert (await bad.closed())[0] == 3501
    big = await sq.raw(connect=True)
    await big.send_raw("x" * 300)
    assert (await big.closed())[0] == 1009
    good = await sq.raw(connect=True)
    sq.hub.disconnect_all(codes.FORCE_RECONNECT)
    assert (await good.closed())[0] == 3011
    m = await metrics(sq)
    assert m['squall_disconnects_total{code="3501"}'] == 2
    assert m['squall_disconnects_total{code="1009"}'] == 1
    assert m['squall_disconnects_total{code="3011"}'] == 1
    assert m["squall_connections"] == 0


async def test_metrics_count_publications_deliveries_commands_and_api(squall):
    """Publications, deliveries, commands by method and API calls by method are counted."""
    sq = await squall()
    readers = [await sq.raw(connect=True) for _ in range(3)]
    for r in readers:
        assert "subscribe" in await r.command("subscribe", {"channel": "news"})
    for n in range(2):
        reply = await sq.api("publish", {"channel": "news", "data": n})
        assert "result" in reply
    for r in readers:
        for _ in range(2):
            assert "push" in await r.next_push()
    assert "publish" in await readers[0].command("publish", {"channel": "news", "data": 9})
    m = await metrics(sq)
    assert m["squall_publications_total"] == 3
    assert m["squall_deliveries_total"] == 9
    assert m['squall_api_requests_total{method="publish"}'] == 2
    # A request counts once, under its own method: not a broadcast's publishes, and a
    # batch as a batch.
    channels = ["news", "chat:a", "chat:b"]
    assert "result" in await sq.api("broadcast", {"channels": channels, "data": 1})
    commands = [{"publish": {"channel": "news", "data": 2}}, {"info": {}}]
    assert len((await sq.api("batch", {"commands": commands}))["replies"]) == 2
    m = await metrics(sq)
    assert m['squall_api_requests_total{method="publish"}'] == 2
    assert m['squall_api_requests_total{method="broadcast"}'] == 1
    assert m['squall_api_requests_total{method="batch"}'] == 1
    assert 'squall_api_requests_total{method="info"}' not in m
    assert m['squall_command_duration_seconds_count{method="connect"}'] == 3
    assert m['squall_command_duration_seconds_count{method="subscribe"}'] == 3
    assert m['squall_command_duration_seconds_count{method="publish"}'] == 1
    assert m['squall_command_duration_seconds_bucket{method="connect",le="+Inf"}'] == 3
    assert m["squall_messages_in_total"] >= 7
    assert m["squall_bytes_in_total"] > 0
    assert m["squall_bytes_out_total"] > 0


async def test_ready_is_503_while_the_telemetry_store_is_down(squall):
    """A node whose telemetry store cannot write reports not ready, naming the error."""
    from server.store import StoreStatus

    sq = await squall()
    sq.hub.telemetry.status = lambda: StoreStatus(ready=False, queue_depth=7, error="db down")
    with expect_log("tornado.access", r"503 GET /ready"):
        resp = await get(sq, "/ready")
    assert resp.code == 503
    body = orjson.loads(resp.body)
    assert body["ready"] is False
    assert body["store"]["ready"] is True
    assert body["telemetry"] == {
        "ready": False,
        "queue_depth": 7,
        "queue_limit": 0,
        "last_write_latency": 0.0,
        "error": "db down",
    }


async def test_a_peers_own_close_code_and_reason_are_not_counted_or_logged(squall):
    """A peer closing with any code is counted under 3000 (the peer went away), and its
    reason is not logged: any peer could add a /metrics series per code (up to 65 536)
    and forge log lines with a reason holding a newline."""
    sq = await squall()
    forged = "bye\n2026-01-01 00:00:00,000 ERROR squall forged"
    for code in (1, 4999, 65535):
        c = await sq.raw(connect=True)
        with expect_log("squall.client", rf"disconnect code=3000 .*detail=peer close code {code}$"):
            c.ws.close(code, forged)
            async with asyncio.timeout(2):
                while sq.hub.clients:
                    await asyncio.sleep(0.01)
    assert not seen("squall", "forged")
    m = await metrics(sq)
    assert m['squall_disconnects_total{code="3000"}'] == 3
    assert not [k for k in m if k.startswith("squall_disconnects_total") and "3000" not in k]


async def test_ready_waits_the_configured_redis_ping_timeout(squall, redis_url, unique_prefix):
    """/ready's probe may take redis.ping_timeout (README): with 5 s configured (and
    redis.socket_timeout, which bounds the probe's publish), a Redis that stalls 3 s
    still answers ready (it was cut at 2 s, 503 "timeout")."""
    import redis.asyncio as aredis

    sq = await squall(
        **{
            "redis.url": redis_url,
            "redis.prefix": unique_prefix,
            "redis.ping_timeout": 5,
            "redis.socket_timeout": 5,
        }
    )
    assert (await get(sq, "/ready")).code == 200
    admin = aredis.Redis.from_url(redis_url)
    try:
        await admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # type: ignore[no-untyped-call]
        resp = await get(sq, "/ready")
    finally:
        await admin.aclose()
    assert resp.code == 200, resp.body
    assert orjson.loads(resp.body)["broker"] == {"ready": True}
