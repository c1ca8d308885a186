"""Application assembly: ``make_app(config, engines)`` -> (Application, Hub), and
``make_server``. No I/O at import."""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any, Final

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

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
        log_function=functools.partial(log_request, successes=config.server.access_log),
    )
    return app, hub


def make_server(app: tornado.web.Application, config: Config) -> HTTPServer:
    """The HTTP server for ``app`` (not listening yet).

    A connection has ``client.connect_timeout`` to send its request headers
    (the WebSocket upgrade included), and an idle keep-alive connection is
    closed after as long; a request body has ``api.body_timeout``. Tornado's
    defaults (an hour for headers, no bound on a body) let connections that
    never finish their request (slowloris) pile up until the process ran out
    of file descriptors.

    No route takes a body but the two that stream theirs (the server API and
    ``POST /api/telemetry``), which raise the limit to ``api.max_body_bytes`` for
    their request once its key or token passed (``handlers.body``). Elsewhere a
    body (a GET declaring one) drops the connection: with the API's limit here,
    anyone could make the node buffer that much per connection, on any path.
    """
    return _Server(
        app,
        max_body_size=0,
        xheaders=config.server.trust_proxy_headers,
        idle_connection_timeout=config.client.connect_timeout,
        body_timeout=config.api.body_timeout,
    )


ACCEPT_PAUSE: Final = 1.0  # seconds accepting pauses when the process is out of descriptors
ACCEPT_BATCH: Final = 128  # connections accepted per readiness event (Tornado's number)
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Server(HTTPServer):
    """Tornado's HTTP server with an accept loop that survives running out of descriptors."""

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = add_accept_handler(sock, self._handle_connection)


def add_accept_handler(
    sock: socket.socket, callback: Callable[[socket.socket, Any], None]
) -> Callable[[], None]:
    """``tornado.netutil.add_accept_handler``, pausing when ``accept`` runs out of resources.

    Tornado's lets EMFILE (too many open files) escape: the listening socket
    stays readable, so the loop calls the handler again at once and asyncio
    logs a traceback each time, tens of thousands a second with a core busy,
    until a descriptor frees up. Here accepting pauses for ``ACCEPT_PAUSE``
    instead (as asyncio's own servers do), with one warning until a
    connection is accepted again; waiting connections stay in the backlog.
    Returns the function that stops accepting.
    """
    io_loop = IOLoop.current()
    removed = False
    warned = False  # the out-of-resources warning is out; cleared by the next accept
    paused: object | None = None  # the timeout that resumes accepting

    def resume() -> None:
        nonlocal paused
        paused = None
        if not removed:
            io_loop.add_handler(sock, accept_handler, IOLoop.READ)

    def accept_handler(fd: Any, events: int) -> None:
        nonlocal warned, paused
        for _ in range(ACCEPT_BATCH):
            if removed or paused is not None:
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                if not warned:
                    warned = True
                    log.warning(
                        "cannot accept connections (%s); pausing accept for %gs at a time",
                        exc.strerror,
                        ACCEPT_PAUSE,
                    )
                io_loop.remove_handler(sock)
                paused = io_loop.call_later(ACCEPT_PAUSE, resume)
                return
            if warned:
                warned = False
                log.warning("accepting connections again")
            callback(connection, address)

    def remove_handler() -> None:
        nonlocal removed, paused
        removed = True
        if paused is not None:
            io_loop.remove_timeout(paused)
            paused = None
        else:
            io_loop.remove_handler(sock)

    io_loop.add_handler(sock, accept_handler, IOLoop.READ)
    return remove_handler


log = logging.getLogger("squall.server")
access_log = logging.getLogger("tornado.access")


def log_request(handler: tornado.web.RequestHandler, *, successes: bool = True) -> None:
    """Access log with levels that mean something: a 503 from ``/ready`` (or while
    shutting down) is the service reporting its state, not Squall failing.
    Without ``successes`` (``server.access_log: false``) only 4xx and 5xx are logged."""
    status = handler.get_status()
    if status < 400:
        if not successes:
            return
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
