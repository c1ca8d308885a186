"""Request bodies bounded by ``api.max_body_bytes``, answered with 413 when over it.

The HTTP server's own limit is 0 (``server.app.make_server``: no other route
takes a body), and Tornado enforces it by dropping the connection without an
answer. The handlers that take a body stream it (``tornado.web.stream_request_body``)
and raise the limit for their request, once they have checked who is asking, to
``api.max_body_bytes``; an oversize body is read and dropped, up
to ``MAX_DISCARD_BYTES``, so that the client gets a 413 rather than a reset
while it is still sending. A declared length over ``MAX_DISCARD_BYTES`` is
refused at once; a chunked body past it (and past ``api.max_body_bytes``) still
loses its connection.

Either way a body within ``api.max_body_bytes`` is accepted, however large that
is configured: ``MAX_DISCARD_BYTES`` only bounds what is read of a body that is
refused anyway, never what is accepted.
"""

from __future__ import annotations

from typing import Final

import tornado.web
from tornado.http1connection import HTTP1Connection

MAX_DISCARD_BYTES: Final = 64 * 1024 * 1024  # oversize bodies up to this are read and dropped


class BoundedBody(tornado.web.RequestHandler):
    """Collects the body in ``body`` up to ``max_body``; ``too_large`` tells when it was over.

    Subclasses are decorated with ``tornado.web.stream_request_body``, call
    ``limit_body`` from ``prepare`` and check ``too_large`` before using ``body``.
    """

    max_body = 0  # set by limit_body
    too_large = False
    _body: bytearray | None = None

    def limit_body(self, max_body: int) -> bool:
        """Start counting the body against ``max_body``. False: a declared length over
        ``MAX_DISCARD_BYTES``, which the caller refuses now without reading it."""
        self.max_body = max_body
        self._body = bytearray()
        length = self.request.headers.get("Content-Length", "")
        connection = self.request.connection
        if length.isdigit() and int(length) > max_body:
            self.too_large = True
            if int(length) > MAX_DISCARD_BYTES or not isinstance(connection, HTTP1Connection):
                return False
            connection.set_max_body_size(int(length))  # read, and dropped in data_received
        elif not length and isinstance(connection, HTTP1Connection):
            # A chunked body: counted in data_received, past the server's limit. The
            # connection takes at least max_body, as with a Content-Length: a bigger
            # configured limit must not be cut at MAX_DISCARD_BYTES.
            connection.set_max_body_size(max(max_body, MAX_DISCARD_BYTES))
        elif isinstance(connection, HTTP1Connection):
            connection.set_max_body_size(max_body)  # the server's own limit is 0
        return True

    def data_received(self, chunk: bytes) -> None:
        body = self._body
        if self.too_large or body is None:
            return
        if len(body) + len(chunk) > self.max_body:
            self.too_large = True
            body.clear()
        else:
            body += chunk

    @property
    def body(self) -> bytes:
        return bytes(self._body or b"")
