"""URL table: every handler and what it is given."""

from __future__ import annotations

from typing import Any

from handlers.api import ApiHandler
from handlers.dashboard import dashboard_routes
from handlers.health import HealthHandler, MetricsHandler, ReadyHandler
from handlers.telemetry import telemetry_routes
from handlers.websocket import CentrifugoWebSocket
from server.auth import TokenVerifier
from server.hub import Hub


def routes(hub: Hub, verifier: TokenVerifier) -> list[tuple[str, type, dict[str, Any]]]:
    return [
        (r"/connection/websocket", CentrifugoWebSocket, {"hub": hub, "verifier": verifier}),
        *telemetry_routes(hub, verifier),  # before /api/<method>, which matches them too
        (r"/api/([a-z_]+)", ApiHandler, {"hub": hub}),
        (r"/health", HealthHandler, {"hub": hub}),
        (r"/ready", ReadyHandler, {"hub": hub}),
        (r"/metrics", MetricsHandler, {"hub": hub}),
        *dashboard_routes(),
    ]
