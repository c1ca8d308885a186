"""The floor: a naive Tornado broadcast server for the benchmark suite.

It speaks just enough of the Centrifugo client protocol v2 (JSON) for the load
generator: the connect reply (after checking an HS256 JWT), the subscribe
reply, publication pushes, and an HTTP API with ``/api/publish`` and
``/api/broadcast`` shaped like Centrifugo's. A publication is encoded once and
then written with ``WebSocketHandler.write_message`` to each subscriber in
turn: no batching, no queues, no backpressure. Anything a real server should do
better than this shows up as a ratio above 1 in RESULTS.md.

Usage: python bench/peers/naive_tornado.py --port 8001 --secret S --api-key K
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import uuid
from typing import Any

import jwt
import tornado.web
import tornado.websocket

log = logging.getLogger("naive")

channels: dict[str, set[ClientHandler]] = {}


class ClientHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, secret: str) -> None:
        self.secret = secret
        self.authed = False
        self.subs: set[str] = set()

    def check_origin(self, origin: str) -> bool:
        return True

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            message = message.decode()
        replies = []
        for line in message.split("\n"):
            if not line.strip():
                continue
            cmd = json.loads(line)
            if not cmd:  # pong
                continue
            replies.append(self.handle(cmd))
        if replies:
            self.write_message("\n".join(json.dumps(r) for r in replies))

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        cid = cmd.get("id", 0)
        if "connect" in cmd:
            try:
                jwt.decode(cmd["connect"].get("token", ""), self.secret, algorithms=["HS256"])
            except jwt.PyJWTError:
                self.close(3500, "invalid token")
                return {"id": cid, "error": {"code": 109, "message": "token expired"}}
            self.authed = True
            return {"id": cid, "connect": {"client": str(uuid.uuid4()), "version": "naive"}}
        if not self.authed:
            return {"id": cid, "error": {"code": 101, "message": "unauthorized"}}
        if "subscribe" in cmd:
            ch = cmd["subscribe"]["channel"]
            channels.setdefault(ch, set()).add(self)
            self.subs.add(ch)
            return {"id": cid, "subscribe": {}}
        return {"id": cid, "error": {"code": 108, "message": "not available"}}

    def on_close(self) -> None:
        for ch in self.subs:
            subs = channels.get(ch)
            if subs is not None:
                subs.discard(self)
                if not subs:
                    del channels[ch]


def publish(channel: str, data: Any) -> None:
    frame = json.dumps({"push": {"channel": channel, "pub": {"data": data}}})
    for client in list(channels.get(channel, ())):
        try:
            client.write_message(frame)
        except tornado.websocket.WebSocketClosedError:
            pass


class ApiHandler(tornado.web.RequestHandler):
    def initialize(self, api_key: str) -> None:
        self.api_key = api_key

    def post(self, method: str) -> None:
        if self.request.headers.get("X-API-Key") != self.api_key:
            self.set_status(401)
            return
        body = json.loads(self.request.body)
        if method == "publish":
            publish(body["channel"], body["data"])
        elif method == "broadcast":
            for ch in body["channels"]:
                publish(ch, body["data"])
        else:
            self.set_status(404)
            return
        self.set_header("Content-Type", "application/json")
        self.write(b'{"result":{}}')


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--api-key", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app = tornado.web.Application(
        [
            (r"/connection/websocket", ClientHandler, {"secret": args.secret}),
            (r"/api/(publish|broadcast)", ApiHandler, {"api_key": args.api_key}),
        ]
    )
    app.listen(args.port, address="127.0.0.1", backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
