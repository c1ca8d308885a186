"""Application assembly: ``make_app(config, engines)`` -> (Application, Hub), and
``make_server``. No I/O at import."""

from __future__ import annotations

import logging

import tornado.web
from tornado.httpserver import HTTPServer

from server.auth import TokenVerifier
from server.config import Config
from server.engines import Engines
from server.hub import Hub


def make_app(
    config: Config, engines: Engines, *, node_id: str = ""
) -> tuple[tornado.web.Application, Hub]:
    """Build the Tornado application and its hub (call ``await hub.start()`` before serving)."""
    from handlers.routes import routes  # handlers import server, not the other way round

    hub = Hub(
        config,
        engines.broker,
        engines.presence,
        engines.store,
        node_id=node_id,
        telemetry=engines.telemetry,
    )
    verifier = TokenVerifier(config.token)
    app = tornado.web.Application(
        routes(hub, verifier),
        websocket_ping_interval=None,  # the protocol has its own pings
        compress_response=False,
        log_function=log_request,
    )
    return app, hub


def make_server(app: tornado.web.Application, config: Config) -> HTTPServer:
    """The HTTP server for ``app`` (not listening yet)."""
    return HTTPServer(
        app,
        max_body_size=config.api.max_body_bytes,
        xheaders=config.server.trust_proxy_headers,
    )


access_log = logging.getLogger("tornado.access")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log with levels that mean something: a 503 from ``/ready`` (or while
    shutting down) is the service reporting its state, not Squall failing."""
    status = handler.get_status()
    if status < 400:
        level = logging.INFO
    elif status < 500 or status == 503:
        level = logging.WARNING
    else:
        level = logging.ERROR
    if not access_log.isEnabledFor(level):
        return  # e.g. the 101 of every WebSocket upgrade when running at WARNING
    request = handler.request
    access_log.log(
        level,
        "%d %s %.2fms",
        status,
        handler._request_summary(),  # Tornado's own "METHOD /uri (ip)" format
        1000.0 * request.request_time(),
    )
