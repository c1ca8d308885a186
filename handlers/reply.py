"""Finishing a reply to an HTTP client that may have gone away meanwhile.

A client that closes its connection while its request is being answered (a
publisher that timed out, a probe that gave up) makes ``RequestHandler.finish``
raise ``StreamClosedError``; uncaught, Tornado logs it as an ERROR traceback.
Nothing is wrong on the server's side, so it is one INFO line instead.
"""

from __future__ import annotations

import logging

import tornado.iostream
import tornado.web

log = logging.getLogger("squall.http")


async def finish_reply(
    handler: tornado.web.RequestHandler, chunk: str | bytes | None = None
) -> None:
    """``handler.finish(chunk)``, logging at INFO when the client has already gone."""
    try:
        await handler.finish(chunk)
    except tornado.iostream.StreamClosedError:
        request = handler.request
        log.info(
            "http client went away before its reply status=%d path=%s remote=%s",
            handler.get_status(),
            request.path,
            request.remote_ip,
        )
