"""python-socketio on aiohttp, a peer for the benchmark suite.

Clients connect over Engine.IO v4 / Socket.IO v5 (WebSocket transport) and
send an HS256 JWT in the connect auth payload (``{"token": ...}``). The event
``subscribe`` with ``{"channel": name}`` enters the room of that name and is
acknowledged. ``POST /api/publish`` (``{"channel", "data"}``) and
``POST /api/broadcast`` (``{"channels", "data"}``), authorised by the
``X-API-Key`` header like Centrifugo's, emit the event ``pub`` with
``{"channel", "data"}`` to the room: python-socketio's own room fan-out.

Usage: python bench/peers/socketio_server.py --port 8002 --secret S --api-key K
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import jwt
import socketio
from aiohttp import web


def build(secret: str, api_key: str) -> web.Application:
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        cors_allowed_origins="*",
        transports=["websocket"],
        logger=False,
        engineio_logger=False,
    )
    app = web.Application()
    sio.attach(app)

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None) -> bool:
        token = (auth or {}).get("token", "")
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            return False
        await sio.save_session(sid, {"user": claims.get("sub", "")})
        return True

    @sio.event
    async def subscribe(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        await sio.enter_room(sid, data["channel"])
        return {}

    async def api(request: web.Request) -> web.Response:
        if request.headers.get("X-API-Key") != api_key:
            return web.Response(status=401)
        body = await request.json()
        method = request.match_info["method"]
        if method == "publish":
            targets = [body["channel"]]
        elif method == "broadcast":
            targets = body["channels"]
        else:
            return web.Response(status=404)
        for ch in targets:
            await sio.emit("pub", {"channel": ch, "data": body["data"]}, room=ch)
        return web.json_response({"result": {}})

    app.router.add_post("/api/{method}", api)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--api-key", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    web.run_app(
        build(args.secret, args.api_key),
        host="127.0.0.1",
        port=args.port,
        backlog=4096,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
