"""What an open WebSocket connection keeps after its handshake, and how its
reading ends.

An idle connection's memory is what limits how many a process holds (the
benchmark's connections scenario measures it). After the 101 response the
connection needs its stream, its protocol object, its ``Client`` and one
reading task; Tornado's HTTP request machinery (the HTTP connection objects,
the handler's suspended coroutines and their tasks) must not stay alive with
it, with or without permessage-deflate.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import tornado.http1connection
import tornado.websocket

import handlers.websocket
import server.auth
from server import codes
from tests.handlers.test_bad_input import server_and_bystander
from tests.helpers.logs import expect_log
from tests.helpers.server import RawClient, RunningSquall, token


def http_leftovers() -> tuple[int, int]:
    """(HTTP/1 server connections alive, request handler coroutines still running)."""
    gc.collect()
    servers = sum(
        1 for o in gc.get_objects() if isinstance(o, tornado.http1connection.HTTP1ServerConnection)
    )
    running = sum(
        1
        for t in asyncio.all_tasks()
        if "RequestHandler._execute" in getattr(t.get_coro(), "__qualname__", "")
    )
    return servers, running


async def deflate_client(sq: RunningSquall) -> RawClient:
    ws = await tornado.websocket.websocket_connect(sq.ws_url, compression_options={})
    client = RawClient(ws)
    sq.clients.append(client)
    return client


async def test_open_connections_keep_no_http_request_machinery(squall):
    """Twenty connected, subscribed clients: no HTTP server connection object and
    no request handler coroutine is left alive for any of them, and they all
    still receive publications."""
    sq = await squall()
    assert http_leftovers() == (0, 0)
    clients = []
    for i in range(20):
        c = await sq.raw(connect=True, sub=f"user{i}")
        assert "subscribe" in await c.command("subscribe", {"channel": "news"})
        clients.append(c)
    assert len(sq.hub.clients) == 20
    assert http_leftovers() == (0, 0)
    assert "result" in await sq.api("publish", {"channel": "news", "data": {"n": 1}})
    for c in clients:
        push = await c.next_push()
        assert push["push"]["pub"]["data"] == {"n": 1}, push


async def test_permessage_deflate_round_trip_and_lifetime(squall):
    """With ``client.compression`` on, a client that offers permessage-deflate gets
    it, and connect, subscribe, publications and the server's close code all work
    over compressed frames; the handshake's HTTP objects are released here too,
    and closing the connection removes the client from the hub."""
    sq = await squall(**{"client.compression": True})
    c = await deflate_client(sq)
    assert "permessage-deflate" in c.ws.headers.get("Sec-WebSocket-Extensions", "")
    await c.connect("zipped")
    assert "subscribe" in await c.command("subscribe", {"channel": "news"})
    assert http_leftovers() == (0, 0)
    data = {"text": "z" * 4000}
    assert "result" in await sq.api("publish", {"channel": "news", "data": data})
    push = await c.next_push()
    assert push["push"]["pub"]["data"] == data
    reply = await sq.api("disconnect", {"user": "zipped"})
    assert reply == {"result": {}}, reply
    code, reason = await c.closed()
    assert (code, reason) == (codes.FORCE_DISCONNECT.code, codes.FORCE_DISCONNECT.reason)
    for _ in range(100):
        if not sq.hub.clients:
            break
        await asyncio.sleep(0.02)
    assert not sq.hub.clients


async def test_a_failing_reader_ends_only_its_connection(squall, monkeypatch):
    """An unexpected error inside one connection's frame reader (a bug, not bad
    input: nothing a client sends reaches here) is logged, ends that connection
    and removes its client, and the other clients carry on."""
    sq, ok = await server_and_bystander(squall)
    victim = await sq.raw(connect=True, sub="victim")
    assert len(sq.hub.clients) == 2
    unmask = handlers.websocket._websocket_mask

    def broken(mask: bytes, data: bytes) -> Any:
        if b"boom" in unmask(mask, data):
            raise RuntimeError("reader bug")
        return unmask(mask, data)

    monkeypatch.setattr(handlers.websocket, "_websocket_mask", broken)
    with expect_log("squall.client", "websocket reader failed"):
        await victim.send({"id": 9, "publish": {"channel": "lobby", "data": "boom"}})
        msg = await victim.next_non_ping()
        assert "closed" in msg, msg
        for _ in range(100):
            if len(sq.hub.clients) == 1:
                break
            await asyncio.sleep(0.02)
    assert len(sq.hub.clients) == 1
    await ok.still_works()


async def test_a_token_info_claim_costs_a_connection_only_its_own_bytes(squall):
    """The ``info`` claim a connection keeps for its life (shown in presence, join
    and publications) holds its few bytes of JSON, not the 4 KiB buffer orjson
    wrote them into (that was a third more memory per idle connection)."""
    sq = await squall()
    in_auth = [tracemalloc.Filter(True, server.auth.__file__)]
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.take_snapshot().filter_traces(in_auth)
        for i in range(100):
            info = {"name": f"user {i}"}
            await sq.raw(connect=True, sub=f"u{i}", token=token(f"u{i}", extra={"info": info}))
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(in_auth)
    finally:
        tracemalloc.stop()
    assert len(sq.hub.clients) == 100
    assert sq.hub.clients[next(iter(sq.hub.clients))].info == b'{"name":"user 0"}'
    kept = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert kept / 100 < 1024, f"{kept / 100:.0f} bytes kept per connection"


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def test_a_closed_connection_is_freed_without_the_cycle_collector(squall):
    """Once a connection has ended, its handler, protocol and ``Client`` go with their
    last reference, without waiting for the cyclic GC. With ``server.gc_freeze`` (the
    default) a connection that lived through one collection is scanned again only after
    about a hundred more: a handler and its protocol (or its client and transport)
    pointing at each other kept every closed long-lived connection in memory, and a node
    whose clients reconnected grew by megabytes per thousand."""
    from server.client import Client

    sq = await squall()
    gc.collect()
    gc.disable()
    try:
        base = (_alive(handlers.websocket.CentrifugoWebSocket), _alive(Client))
        for i in range(10):
            c = await sq.raw(connect=True, sub=f"user{i}")
            reply = await c.command("subscribe", {"channel": "news", "data": {"max_rate": 5}})
            assert "subscribe" in reply, reply
            reply = await c.command("subscribe", {"channel": f"chat:r{i}", "recoverable": True})
            assert "subscribe" in reply, reply
            c.close()  # the peer goes away
        deflated = await deflate_client(sq)
        await deflated.connect(sub="deflated")
        deflated.close()
        server_closed = await sq.raw(connect=True, sub="kicked")
        assert "result" in await sq.api("disconnect", {"user": "kicked"})
        assert (await server_closed.closed())[0] == 3503
        for _ in range(200):
            if not sq.hub.clients:
                break
            await asyncio.sleep(0.01)
        assert not sq.hub.clients
        await asyncio.sleep(0.1)  # the readers' tasks finish
        left = (_alive(handlers.websocket.CentrifugoWebSocket), _alive(Client))
        assert left == base
    finally:
        gc.enable()
