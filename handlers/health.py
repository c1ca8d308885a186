"""Operational endpoints: ``/health`` (liveness), ``/ready`` (engines work), ``/metrics``."""

from __future__ import annotations

import asyncio
from typing import Any, Final

import orjson
import tornado.web

from handlers.reply import finish_reply
from server.errors import EngineError
from server.hub import Hub
from server.store import StoreStatus

READY_TIMEOUT: Final = 2.0  # seconds the broker probe may take (at least)
READY_MARGIN: Final = 0.5  # beyond redis.ping_timeout, so the broker's own timeout answers


class HealthHandler(tornado.web.RequestHandler):
    def initialize(self, hub: Hub) -> None:
        self.hub = hub

    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        await finish_reply(self, orjson.dumps({"status": "ok", "node": self.hub.node.name}))


class ReadyHandler(tornado.web.RequestHandler):
    """200 when the broker delivers end to end and both stores (publications, telemetry)
    accept writes; else 503 with the details."""

    def initialize(self, hub: Hub) -> None:
        self.hub = hub

    async def get(self) -> None:
        broker: dict[str, object] = {"ready": True}
        # redis.ping_timeout is how long the probe may take: a larger one must not be
        # cut short here (it was, at 2 s, as a bare "timeout").
        timeout = max(READY_TIMEOUT, self.hub.config.redis.ping_timeout + READY_MARGIN)
        try:
            await asyncio.wait_for(self.hub.broker.ping(), timeout)
        except (EngineError, TimeoutError) as exc:
            broker = {"ready": False, "error": str(exc) or "timeout"}
        store = _describe(self.hub.store.status())
        telemetry = _describe(self.hub.telemetry.status())
        ready = (
            bool(broker["ready"]) and store["ready"] and telemetry["ready"] and not self.hub.closing
        )
        self.set_status(200 if ready else 503)
        self.set_header("Content-Type", "application/json")
        await finish_reply(
            self,
            orjson.dumps(
                {
                    "ready": ready,
                    "broker": broker,
                    "store": store,
                    "telemetry": telemetry,
                    "shutting_down": self.hub.closing,
                }
            ),
        )


def _describe(status: StoreStatus) -> dict[str, Any]:
    return {
        "ready": status.ready,
        "queue_depth": status.queue_depth,
        "queue_limit": status.queue_limit,
        "last_write_latency": status.last_write_latency,
        **({"error": status.error} if status.error else {}),
        **status.extra,
    }


class MetricsHandler(tornado.web.RequestHandler):
    def initialize(self, hub: Hub) -> None:
        self.hub = hub

    async def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        await finish_reply(self, self.hub.metrics.render())
