"""End to end: ``python run.py`` processes on a real MongoDB wire-protocol server.

Why: what ``persist: true`` promises (history and recovery across a restart,
offsets that continue, a graceful shutdown that loses nothing, publishing
through a database outage) exists only across real processes and a real
database, so these tests start Squall with ``tests.helpers.process`` on
FerretDB (or ``SQUALL_MONGODB_URL``), drive it with the HTTP API, the
centrifuge-python SDK and raw protocol, and check the stored documents with
their own PyMongo client, never through Squall.

Helpers (SDK recording, ``api``, ``status``, ``until``, ``take``) are the
cluster tests'; the ones here are about the store. To extend: keep each wait
bounded and scaled by ``TIME_FACTOR``; read the database only while it is up.
"""

from __future__ import annotations

from typing import Any

import orjson
import tornado.httpclient
import tornado.websocket
from pymongo import AsyncMongoClient

from tests.helpers.process import SquallProcess
from tests.helpers.server import TIME_FACTOR, RawClient

# Write-behind settings small enough that a test sees writes, outages and
# recovery within a second or two.
FAST_STORE: dict[str, Any] = {
    "mongodb.flush_interval": 0.01,
    "mongodb.timeout": 1.0,
    "mongodb.ping_interval": 0.2,
    "mongodb.retry_delay": 0.05,
    "mongodb.retry_max_delay": 0.3,
    "mongodb.retention_interval": 0.2,
    "mongodb.shutdown_flush_timeout": 5.0,
}


def store_overrides(url: str, database: str, **extra: Any) -> dict[str, Any]:
    """Config overrides for a process on ``url``/``database`` with ``FAST_STORE`` timings."""
    return {"mongodb.url": url, "mongodb.database": database, **FAST_STORE, **extra}


async def stored(url: str, database: str, channel: str) -> list[dict[str, Any]]:
    """The channel's documents as stored (offset order, duplicates kept): offset, epoch, data."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        url, serverSelectionTimeoutMS=int(5000 * TIME_FACTOR)
    )
    try:
        coll = client[database]["publications"]
        docs = await coll.find(
            {"channel": channel}, {"_id": 0, "offset": 1, "epoch": 1, "data": 1}
        ).to_list(None)
    finally:
        await client.close()
    out = [
        {"offset": int(d["offset"]), "epoch": d["epoch"], "data": bytes(d["data"])} for d in docs
    ]
    return sorted(out, key=lambda d: d["offset"])


async def ready(proc: SquallProcess) -> tuple[int, dict[str, Any]]:
    """``GET /ready``: (status, decoded body); (599, {}) when nothing answers."""
    http = tornado.httpclient.AsyncHTTPClient()
    resp = await http.fetch(
        f"{proc.http_url}/ready", raise_error=False, request_timeout=3.0 * TIME_FACTOR
    )
    return resp.code, orjson.loads(resp.body) if resp.code in (200, 503) else {}


async def raw_client(proc: SquallProcess, user: str = "alice") -> RawClient:
    """A connected raw-protocol client of ``proc`` (close it with ``close()``)."""
    ws = await tornado.websocket.websocket_connect(proc.ws_url)
    client = RawClient(ws)
    await client.connect(user)
    return client
