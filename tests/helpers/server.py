"""Run Squall inside the test's IOLoop, and talk raw protocol to it.

Why: protocol tests must go over a real WebSocket to the real app on an
ephemeral loopback port (STYLE.md 21), not call the client state machine.

* ``squall`` fixture: a factory ``await squall(**overrides)`` returning a
  ``RunningSquall``; every server and connection it made is closed at teardown.
  Overrides are dotted config keys: ``await squall(**{"client.max_channels": 2})``.
* ``RawClient``: a WebSocket speaking Centrifugo JSON by hand (``connect``,
  ``command``, ``next``/``next_push``), splitting newline-batched frames.

To extend: add namespaces to ``BASE_CONFIG`` rather than per-test configs when
more than one test needs them.
"""

from __future__ import annotations

import asyncio
import copy
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import tornado.httpclient
import tornado.websocket
from tornado.httpserver import HTTPServer

from server import codes
from server.app import make_app, make_server
from server.auth import make_token
from server.config import config_from_dict
from server.engines import make_engines
from server.hub import Hub
from tests.helpers.services import free_port

SECRET = "test-secret-0123456789-0123456789-abcdef"
API_KEY = "test-api-key-0123456789"
TIME_FACTOR = float(os.environ.get("SQUALL_TEST_TIME_FACTOR", "1"))

BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "gc_freeze": False, "shutdown_timeout": 5},
    "token": {"hmac_secret": SECRET},
    "api": {"key": API_KEY},
    "client": {"allowed_origins": ["http://allowed.example"]},
    "channel": {
        "allow_subscribe_for_client": True,
        "allow_publish_for_subscriber": True,
    },
    "namespaces": {
        "chat": {
            "allow_subscribe_for_client": True,
            "allow_publish_for_subscriber": True,
            "allow_presence_for_subscriber": True,
            "allow_history_for_subscriber": True,
            "presence": True,
            "join_leave": True,
            "force_push_join_leave": True,
            "history_size": 100,
            "history_ttl": 300,
        },
        "public": {
            "allow_subscribe_for_client": True,
            "allow_subscribe_for_anonymous": True,
            "allow_publish_for_client": True,
            "allow_publish_for_anonymous": True,
            "allow_history_for_client": True,
            "history_size": 10,
            "history_ttl": 60,
        },
        "private": {"private": True, "allow_publish_for_subscriber": True},
        "readonly": {"allow_subscribe_for_client": True},
        "persist": {
            "allow_subscribe_for_client": True,
            "allow_publish_for_subscriber": True,
            "allow_history_for_subscriber": True,
            "history_size": 5,
            "history_ttl": 300,
            "persist": True,
        },
        "telemetry": {
            "allow_publish_for_client": True,
            "publish_own_channel_only": True,
            "subscribe_claim": "devices",
            "telemetry": True,
        },
    },
}


def token(sub: str, **kw: Any) -> str:
    return make_token(SECRET, sub, **kw)


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


@dataclass
class RunningSquall:
    hub: Hub
    server: HTTPServer
    port: int
    clients: list[RawClient] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def raw(
        self, *, origin: str | None = None, connect: bool = False, **kw: Any
    ) -> RawClient:
        """Open a raw protocol connection (optionally send connect with ``token(sub)``)."""
        headers = {"Origin": origin} if origin else {}
        req = tornado.httpclient.HTTPRequest(self.ws_url, headers=headers)
        ws = await tornado.websocket.websocket_connect(req, max_message_size=64 * 1024 * 1024)
        client = RawClient(ws)
        self.clients.append(client)
        if connect:
            await client.connect(**kw)
        return client

    async def api(self, method: str, params: Any, *, key: str = API_KEY) -> Any:
        """Call the server API; returns the decoded JSON body (any status)."""
        http = tornado.httpclient.AsyncHTTPClient()
        resp = await http.fetch(
            f"{self.http_url}/api/{method}",
            method="POST",
            body=orjson.dumps(params),
            headers={"X-API-Key": key},
            raise_error=False,
        )
        return orjson.loads(resp.body) if resp.body else None


class RawClient:
    """One hand-driven Centrifugo JSON connection."""

    def __init__(self, ws: tornado.websocket.WebSocketClientConnection) -> None:
        self.ws = ws
        self.inbox: deque[dict[str, Any]] = deque()
        self.next_id = 1
        self.frames = 0

    async def send_raw(self, data: str | bytes, *, binary: bool = False) -> None:
        await self.ws.write_message(data, binary=binary)

    async def send(self, *commands: dict[str, Any]) -> None:
        """Send commands in one newline-batched frame."""
        await self.ws.write_message(b"\n".join(orjson.dumps(c) for c in commands).decode())

    async def next(self, within: float = 2.0) -> dict[str, Any]:
        """The next message (reply, push or ping), or ``{"closed": code, "reason": ...}``."""
        if self.inbox:
            return self.inbox.popleft()
        async with asyncio.timeout(within * TIME_FACTOR):
            frame = await self.ws.read_message()
        if frame is None:
            return {"closed": self.ws.close_code, "reason": self.ws.close_reason}
        self.frames += 1
        raw = frame.encode() if isinstance(frame, str) else frame
        for line in raw.split(b"\n"):
            if line.strip():
                self.inbox.append(orjson.loads(line))
        return self.inbox.popleft()

    async def next_non_ping(self, within: float = 2.0) -> dict[str, Any]:
        while True:
            msg = await self.next(within)
            if msg != {}:
                return msg

    async def next_push(self, within: float = 2.0) -> dict[str, Any]:
        """The next push (skipping pings)."""
        while True:
            msg = await self.next_non_ping(within)
            if "push" in msg or "closed" in msg:
                return msg

    async def closed(self, within: float = 2.0) -> tuple[int | None, str | None]:
        """Wait for the server to close; return (code, reason)."""
        while True:
            msg = await self.next(within)
            if "closed" in msg:
                return msg["closed"], msg["reason"]

    async def command(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command and return its reply (pushes that arrive first are kept)."""
        cmd_id = self.next_id
        self.next_id += 1
        await self.send({"id": cmd_id, method: params or {}})
        skipped: list[dict[str, Any]] = []
        try:
            while True:
                msg = await self.next()
                if msg.get("id") == cmd_id or "closed" in msg:
                    return msg
                if msg != {}:
                    skipped.append(msg)
        finally:
            self.inbox.extendleft(reversed(skipped))

    async def connect(self, sub: str = "alice", **params: Any) -> dict[str, Any]:
        if "token" not in params:
            params["token"] = token(sub)
        reply = await self.command("connect", params)
        assert "connect" in reply, reply
        return reply

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def squall(io_loop: Any) -> Iterator[Any]:
    """Factory: ``sq = await squall(**overrides)`` starts a server on a free port.

    Start-up is awaited inside the test (the loop is running there); teardown
    runs after the test through ``io_loop.run_sync``.
    """
    running: list[RunningSquall] = []

    async def factory(**overrides: Any) -> RunningSquall:
        raw = copy.deepcopy(BASE_CONFIG)
        port = free_port()
        set_dotted(raw, "server.port", port)
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        config = config_from_dict(raw)
        engines = make_engines(config, node_id="")
        app, hub = make_app(config, engines)
        await hub.start()
        server = make_server(app, config)
        server.listen(port, address="127.0.0.1")
        sq = RunningSquall(hub, server, port)
        running.append(sq)
        return sq

    yield factory

    async def teardown() -> None:
        for sq in running:
            for c in sq.clients:
                c.close()
            sq.server.stop()
            sq.hub.closing = True
            sq.hub.disconnect_all(codes.SHUTDOWN)
            await sq.server.close_all_connections()
            await sq.hub.close()

    io_loop.run_sync(teardown)
