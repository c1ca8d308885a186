"""Application assembly: ``make_app(config, engines)`` -> (Application, Hub). No I/O at import."""

from __future__ import annotations

import tornado.web

from server.auth import TokenVerifier
from server.config import Config
from server.engines import Engines
from server.hub import Hub


def make_app(
    config: Config, engines: Engines, *, node_id: str = ""
) -> tuple[tornado.web.Application, Hub]:
    """Build the Tornado application and its hub (call ``await hub.start()`` before serving)."""
    from handlers.routes import routes  # handlers import server, not the other way round

    hub = Hub(config, engines.broker, engines.presence, engines.store, node_id=node_id)
    verifier = TokenVerifier(config.token)
    app = tornado.web.Application(
        routes(hub, verifier),
        websocket_ping_interval=None,  # the protocol has its own pings
        compress_response=False,
    )
    return app, hub
