"""Multi-instance tests: several ``python run.py`` processes sharing one Redis.

Why: what a deployment of several instances promises (cross-instance
delivery and order, cluster-wide presence, server API control of users on
other instances, ``info`` from heartbeats, recovery on another instance, and
staying up when Redis fails) only exists between real processes, so these
tests start them with ``tests.helpers.process.SquallCluster`` and drive them
with the real centrifuge-python SDK and the HTTP API.

Helpers here, shared by ``test_cluster.py`` and ``test_redis_faults.py``:

* ``api(node, method, params)``: the node's server API, bounded in time.
* ``status(node, path)``: HTTP status of ``GET path`` (None when nothing answers).
* ``until(condition)``: bounded polling for a condition no event reports.
* ``take(events, n)``: the next ``n`` publications an SDK subscription receives.
* ``Balancer``: a loopback TCP load balancer (round-robin, skips refusing
  nodes, no stickiness), standing in for nginx in front of the instances.

SDK event recording (``ClientEvents``, ``SubEvents``, ``Sdk``) is the one the
single-instance SDK tests use. To extend: add a helper here when both modules
need it; keep every wait bounded (``WITHIN`` scaled by ``TIME_FACTOR``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import tornado.httpclient

from tests.helpers.process import SquallProcess
from tests.helpers.server import API_KEY, TIME_FACTOR
from tests.sdk.test_centrifuge_python import (
    WITHIN,
    ClientEvents,
    Sdk,
    SubEvents,
    subscribed,
)

__all__ = [
    "WITHIN",
    "Balancer",
    "ClientEvents",
    "Sdk",
    "SubEvents",
    "api",
    "api_ok",
    "status",
    "subscribed",
    "take",
    "until",
]


async def api(node: SquallProcess, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Call ``POST /api/<method>`` on ``node``; the decoded reply (``result`` or ``error``)."""
    http = tornado.httpclient.AsyncHTTPClient()
    resp = await http.fetch(
        f"{node.http_url}/api/{method}",
        method="POST",
        body=orjson.dumps(params),
        headers={"X-API-Key": API_KEY},
        raise_error=False,
        request_timeout=WITHIN * TIME_FACTOR,
    )
    assert resp.code == 200, (resp.code, resp.body)
    reply: dict[str, Any] = orjson.loads(resp.body)
    return reply


async def api_ok(node: SquallProcess, method: str, params: dict[str, Any]) -> dict[str, Any]:
    reply = await api(node, method, params)
    assert "result" in reply, reply
    result: dict[str, Any] = reply["result"]
    return result


async def status(node: SquallProcess, path: str) -> int | None:
    """HTTP status of ``GET path`` on ``node``, or None when nothing answers."""
    http = tornado.httpclient.AsyncHTTPClient()
    try:
        resp = await http.fetch(
            f"{node.http_url}{path}", raise_error=False, request_timeout=3.0 * TIME_FACTOR
        )
    except OSError:
        return None
    return None if resp.code == 599 else resp.code


async def until(
    condition: Callable[[], Awaitable[bool]], within: float = WITHIN, what: str = ""
) -> None:
    """Poll an async condition (bounded) that no event reports, e.g. an HTTP status."""
    try:
        async with asyncio.timeout(within * TIME_FACTOR):
            while not await condition():
                await asyncio.sleep(0.05)  # polling a condition with a deadline
    except TimeoutError:
        raise AssertionError(f"not within {within}s: {what or condition}") from None


async def take(events: Any, n: int, within: float = WITHIN) -> list[Any]:
    """The next ``n`` publications of a subscription (``SubEvents``), each bounded in time."""
    return [(await events.next("publication", within)).pub for _ in range(n)]


class Balancer:
    """A loopback TCP load balancer in front of several nodes, as nginx would be.

    Each new connection goes to the next node in round-robin order; a node that
    refuses the connection is skipped (nginx's ``proxy_next_upstream error``).
    No stickiness: a client that reconnects may land on any node. ``routed``
    lists the port each accepted connection went to.
    """

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.routed: list[int] = []
        self._next = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> Balancer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            upstream = None
            for _ in range(len(self.ports)):
                port = self.ports[self._next % len(self.ports)]
                self._next += 1
                try:
                    upstream = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    continue
                self.routed.append(port)
                break
            if upstream is None:
                return
            up_reader, up_writer = upstream
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=WITHIN)
        if self._server is not None:
            await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass  # either side went away: close both
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
