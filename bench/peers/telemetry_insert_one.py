"""The telemetry persistence baseline: one ``insert_one`` per point, awaited.

It offers the part of Squall's ``POST /api/telemetry`` contract the load
generator uses: an HS256 device token (``Authorization: Bearer``, claims
``sub`` and ``"device": true``, the same secret as every other server), a body
of one point or a list of up to 1000 points ``{"ts": ms, "values": {metric:
number}}`` checked with Squall's rules, and ``202 {"accepted": n, "rejected":
[{"index", "reason"}]}``. Every valid point is written with its own awaited
``insert_one`` (PyMongo's ``AsyncMongoClient``, acknowledged writes) before the
reply: the straightforward way to persist telemetry, which Squall's batched
write-behind path is compared with. No publication, no rate limit, no
idempotency, no summaries.

``GET /stats`` returns ``{"inserted": n, "failed": m}``: points whose
``insert_one`` MongoDB acknowledged, for bench/run.py to time persistence
without counting the collection.

Usage: python bench/peers/telemetry_insert_one.py --port 8004 --secret S
       [--mongodb-url URL] [--database DB]
(defaults: $SQUALL_MONGODB_URL, $SQUALL_MONGODB_DATABASE or "squall_bench")
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any

import jwt
import tornado.web
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

log = logging.getLogger("insert_one")

MAX_POINTS = 1000  # Squall's telemetry.max_points_per_frame default
MAX_METRICS = 64
MAX_SKEW_MS = 300_000
METRIC_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
COLLECTION = "points"

stats = {"inserted": 0, "failed": 0}


def check_point(raw: Any, now: int) -> tuple[int, dict[str, float]] | str:
    """(ts, values) of a valid point, or why it is not one (Squall's rules)."""
    if not isinstance(raw, dict):
        return "not an object"
    if set(raw) - {"ts", "values"}:
        return "unknown field"
    ts_raw = raw.get("ts", now)
    if isinstance(ts_raw, bool) or not isinstance(ts_raw, int | float):
        return "ts must be a number (milliseconds since the epoch)"
    if not math.isfinite(ts_raw):
        return "ts must be finite"
    ts = int(ts_raw)
    if abs(ts - now) > MAX_SKEW_MS:
        return f"ts {ts} is more than {MAX_SKEW_MS // 1000}s away from server time"
    values = raw.get("values")
    if not isinstance(values, dict) or not values:
        return "values must be a non-empty object"
    if len(values) > MAX_METRICS:
        return "too many metrics"
    out: dict[str, float] = {}
    for name, value in values.items():
        if not isinstance(name, str) or not METRIC_NAME.match(name):
            return "invalid metric name"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric {name!r} is not a number"
        if not math.isfinite(value):
            return f"metric {name!r} is not finite"
        out[name] = float(value)
    return ts, out


class TelemetryHandler(tornado.web.RequestHandler):
    def initialize(self, secret: str, collection: Any) -> None:
        self.secret = secret
        self.collection = collection

    def check_xsrf_cookie(self) -> None:
        return None

    def reply(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        _ = self.finish(json.dumps(body))

    def error(self, status: int, code: int, message: str, **extra: Any) -> None:
        self.reply(status, {"error": {"code": code, "message": message}, **extra})

    async def post(self) -> None:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        try:
            claims = jwt.decode(token.strip(), self.secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            self.error(401, 101, "unauthorized")
            return
        device = claims.get("sub")
        if scheme.lower() != "bearer" or claims.get("device") is not True or not device:
            self.error(403, 103, "not a device token")
            return
        try:
            body = json.loads(self.request.body)
        except ValueError:
            self.error(400, 107, "invalid JSON")
            return
        raw_points = body if isinstance(body, list) else [body]
        if not raw_points or len(raw_points) > MAX_POINTS:
            self.error(400, 107, "empty or oversized frame")
            return
        now = int(time.time() * 1000)
        rejected: list[dict[str, Any]] = []
        valid: list[tuple[int, dict[str, float]]] = []
        seen: set[int] = set()
        for index, raw in enumerate(raw_points):
            result = check_point(raw, now)
            if isinstance(result, str):
                rejected.append({"index": index, "reason": result})
            elif result[0] in seen:
                rejected.append({"index": index, "reason": f"duplicate ts {result[0]}"})
            else:
                seen.add(result[0])
                valid.append(result)
        if not valid:
            self.error(400, 107, "no valid points", accepted=0, rejected=rejected)
            return
        for ts, values in valid:
            try:
                await self.collection.insert_one(
                    {"device": device, "ts": ts, "values": values, "received": now}
                )
            except PyMongoError as exc:
                stats["failed"] += 1
                log.warning("insert_one failed: %s", type(exc).__name__)
                self.error(503, 1001, "store unavailable")
                return
            stats["inserted"] += 1
        self.reply(202, {"accepted": len(valid), "rejected": rejected})


class StatsHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        _ = self.finish(json.dumps(stats))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8004)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--mongodb-url", default=os.environ.get("SQUALL_MONGODB_URL", ""))
    ap.add_argument(
        "--database", default=os.environ.get("SQUALL_MONGODB_DATABASE") or "squall_bench"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.mongodb_url:
        sys.exit("telemetry_insert_one: --mongodb-url (or $SQUALL_MONGODB_URL) is required")
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        args.mongodb_url, serverSelectionTimeoutMS=5000
    )
    collection = client[args.database][COLLECTION]
    await client.admin.command("ping")  # fail at start, not on the first request
    app = tornado.web.Application(
        [
            (
                r"/api/telemetry",
                TelemetryHandler,
                {"secret": args.secret, "collection": collection},
            ),
            (r"/stats", StatsHandler),
        ]
    )
    app.listen(args.port, address="127.0.0.1", backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
