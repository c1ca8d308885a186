"""RFC 6455 framing as the server reads it, driven over a plain TCP socket.

The server parses client frames itself (``handlers.websocket._Protocol``), so
these tests send what a WebSocket library never would on its own: frames cut at
every byte, many frames in one segment, fragmented messages with control
frames between the fragments, every length encoding, and the malformed frames
that must end the connection without harming a bystander.
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import os
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import tornado.websocket

from tests.handlers.test_bad_input import Bystander, server_and_bystander
from tests.helpers.logs import expect_log
from tests.helpers.process import ProcessGroup
from tests.helpers.server import TIME_FACTOR, RawClient, RunningSquall, token

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length_bytes: int | None = None,
) -> bytes:
    """One client frame; ``length_bytes`` forces the 0/2/8-byte extended length form."""
    n = len(payload)
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n <= 0xFFFF else 8
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    mbit = 0x80 if mask else 0
    if length_bytes == 0:
        head += bytes([mbit | n])
    elif length_bytes == 2:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


DEFLATE_TAIL = b"\x00\x00\xff\xff"  # every compressed message ends so; sent without it


def deflated(data: bytes) -> bytes:
    """``data`` compressed as one permessage-deflate message (RFC 7692 7.2.1)."""
    z = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(DEFLATE_TAIL)
    return out[: -len(DEFLATE_TAIL)]


def command(cmd_id: int, method: str, params: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"id": cmd_id, method: params or {}})


class TcpClient:
    """A WebSocket client over a raw socket: sends any bytes, reads server frames."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.head = head  # the server's 101 response, status line and headers
        # permessage-deflate accepted: the server's compressed frames are inflated
        # (one context for the whole connection, as the server keeps its own).
        deflate = "permessage-deflate" in self.headers().get("sec-websocket-extensions", "")
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflate else None

    @classmethod
    async def open(cls, sq: RunningSquall, *, key: str = "", extra: str = "") -> TcpClient:
        """Handshake with ``key`` (random by default) and ``extra`` header lines."""
        reader, writer = await asyncio.open_connection("127.0.0.1", sq.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = key or base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                "GET /connection/websocket HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{sq.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer, head)

    def headers(self) -> dict[str, str]:
        """The 101 response's headers, names lower-cased."""
        lines = self.head.decode().split("\r\n")[1:]
        return {k.lower(): v for k, _, v in (line.partition(": ") for line in lines if line)}

    async def send(self, data: bytes, *, pieces: int = 1) -> None:
        """Write ``data`` in ``pieces`` separate segments (1 = one write)."""
        size = max(1, -(-len(data) // pieces))
        for start in range(0, len(data), size):
            self.writer.write(data[start : start + size])
            await self.writer.drain()
            if pieces > 1:
                await asyncio.sleep(0.002)  # let each piece arrive on its own

    async def next_frame(self, within: float = 3.0) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame; (-1, b"") at end of stream."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(2), within)
        except asyncio.IncompleteReadError:
            return -1, b""
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        payload = await asyncio.wait_for(self.reader.readexactly(n), within)
        if head[0] & 0x40 and self.inflater is not None:
            payload = self.inflater.decompress(payload + DEFLATE_TAIL)
        return head[0] & 0x0F, payload

    async def replies(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` protocol replies (newline-batched frames split, pushes
        of the client's own subscription skipped)."""
        out: list[dict[str, Any]] = []
        while len(out) < count:
            opcode, payload = await self.next_frame()
            assert opcode == TEXT, (opcode, payload)
            lines = (orjson.loads(line) for line in payload.split(b"\n") if line)
            out.extend(r for r in lines if "id" in r)
        return out

    async def connect(self, sub: str = "framer", pieces: int = 1, deflate: bool = False) -> None:
        """Connect (compressed: ``deflate``), then subscribe to the bystander's channel
        (publishing there needs it)."""
        connect = command(1, "connect", {"token": token(sub)})
        if deflate:
            await self.send(frame(TEXT, deflated(connect), rsv=0x40), pieces=pieces)
        else:
            await self.send(frame(TEXT, connect), pieces=pieces)
        await self.send(frame(TEXT, command(1_000, "subscribe", {"channel": "lobby"})))
        connected, subscribed = await self.replies(2)
        assert connected["connect"]["client"], connected
        assert "subscribe" in subscribed, subscribed

    async def ended(self, within: float = 3.0) -> tuple[int | None, bool]:
        """Read to the end: (close code of the server's close frame or None, stream ended)."""
        code = None
        while True:
            try:
                opcode, payload = await self.next_frame(within)
            except (TimeoutError, ConnectionError):
                return code, False
            if opcode == -1:
                return code, True
            if opcode == CLOSE and len(payload) >= 2:
                code = struct.unpack("!H", payload[:2])[0]

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


@pytest.fixture
def tcp(io_loop: Any) -> Iterator[Any]:
    """``c = await tcp(sq)`` opens a ``TcpClient``; every one is closed after the test."""
    opened: list[TcpClient] = []

    async def factory(sq: RunningSquall, **handshake: str) -> TcpClient:
        c = await TcpClient.open(sq, **handshake)
        opened.append(c)
        return c

    yield factory

    async def close_all() -> None:
        for c in opened:
            await c.close()

    io_loop.run_sync(close_all)


async def delivered(ok: Bystander, data: Any) -> None:
    """The bystander received ``data`` on its channel, and still works."""
    push = await ok.client.next_push()
    assert push["push"]["pub"]["data"] == data
    await ok.still_works()


async def dropped_without_reply(c: TcpClient, data: bytes, name: str) -> None:
    """Sending ``data`` ends the connection (a disconnect logged) with no reply frame."""
    with expect_log("squall.client", r"disconnect code=\d+ .*"):
        await c.send(data)
        got: list[tuple[int, bytes]] = []
        while True:
            opcode, payload = await c.next_frame()
            if opcode == -1:
                break
            got.append((opcode, payload))
    assert all(op != TEXT for op, _ in got), (name, got)


async def test_handshake_answer_is_the_one_rfc6455_asks_for(squall, tcp):
    """The 101 answer carries the upgrade headers and the accept value derived from the
    client's key (RFC 6455 section 1.3's own example), no subprotocol or extension
    nobody offered, and the upgrade is in the access log."""
    sq, ok = await server_and_bystander(squall)
    with expect_log("tornado.access", r"^101 GET /connection/websocket "):
        c = await tcp(sq, key="dGhlIHNhbXBsZSBub25jZQ==")
    assert c.head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), c.head
    headers = c.headers()
    assert headers["upgrade"].lower() == "websocket"
    assert headers["connection"].lower() == "upgrade"
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert "sec-websocket-protocol" not in headers
    assert "sec-websocket-extensions" not in headers
    await c.connect()
    await ok.still_works()


async def test_handshake_offering_subprotocols_connects_without_one(squall, tcp):
    """Subprotocols offered by a client (the JSON protocol names none) are not selected,
    and the connection speaks the protocol as usual."""
    sq = await squall()
    c = await tcp(sq, extra="Sec-WebSocket-Protocol: centrifuge-json, chat\r\n")
    headers = c.headers()
    assert "sec-websocket-protocol" not in headers
    assert headers["sec-websocket-accept"]
    await c.connect()


async def test_frames_cut_at_every_byte_are_reassembled(squall, tcp):
    """A connect and a publish arriving one byte per segment are answered normally,
    whatever the length encoding."""
    sq, ok = await server_and_bystander(squall)
    c = await tcp(sq)
    await c.connect("slow", pieces=10_000)
    data = {"text": "y" * 300}  # a 16-bit length
    await c.send(frame(TEXT, command(2, "publish", {"channel": "lobby", "data": data})), pieces=400)
    assert await c.replies(1) == [{"id": 2, "publish": {}}]
    await delivered(ok, data)


async def test_many_frames_in_one_segment_are_answered_in_order(squall, tcp):
    """Fifty commands written at once, plus a ping frame, all get their reply in order."""
    sq, ok = await server_and_bystander(squall)
    c = await tcp(sq)
    await c.connect()
    burst = b"".join(frame(TEXT, command(i, "ping")) for i in range(2, 27))
    burst += frame(PING, b"are you there")
    burst += b"".join(frame(TEXT, command(i, "ping")) for i in range(27, 52))
    await c.send(burst)
    got: list[dict[str, Any]] = []
    pong = None
    while len(got) < 50:
        opcode, payload = await c.next_frame()
        if opcode == PONG:
            pong = payload
            continue
        assert opcode == TEXT, (opcode, payload)
        got.extend(orjson.loads(line) for line in payload.split(b"\n") if line)
    assert [r["id"] for r in got] == list(range(2, 52))
    assert pong == b"are you there"
    await ok.still_works()


async def test_every_length_encoding_is_read(squall, tcp):
    """7-bit, 16-bit and 64-bit lengths, even a small payload in the long forms, all
    carry a command."""
    sq, ok = await server_and_bystander(squall, **{"client.max_frame_bytes": 1 << 20})
    c = await tcp(sq)
    await c.connect()
    big = {"blob": "z" * 70_000}  # needs the 64-bit form
    await c.send(frame(TEXT, command(2, "publish", {"channel": "lobby", "data": big})))
    await c.send(frame(TEXT, command(3, "ping"), length_bytes=2))
    await c.send(frame(TEXT, command(4, "ping"), length_bytes=8))
    replies = await c.replies(3)
    assert [r["id"] for r in replies] == [2, 3, 4], replies
    await delivered(ok, big)


async def test_an_unmasked_frame_closes_1002(squall, tcp):
    """RFC 6455 5.1: a client masks every frame, and the server closes the connection on
    one that is not (Tornado accepted it), without running the command it carried."""
    sq, ok = await server_and_bystander(squall)
    c = await tcp(sq)
    await c.connect()
    with expect_log("squall.client", r"unmasked client frame"):
        await c.send(frame(TEXT, command(2, "publish", {"channel": "lobby"}), mask=False))
        code, ended = await c.ended()
    assert (code, ended) == (1002, True)
    await ok.still_works()  # its first push is its own: the publish was not run


async def test_compressed_messages_are_inflated_whole(squall, tcp):
    """With permessage-deflate (client.compression), compressed messages are read by the
    same reader: one frame, or fragments with a ping between them, and an uncompressed
    message between compressed ones; every command runs once, in order."""
    sq, ok = await server_and_bystander(squall, **{"client.compression": True})
    c = await tcp(sq, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n")
    assert c.inflater is not None, c.head
    await c.send(frame(TEXT, deflated(command(1, "connect", {"token": token("zip")})), rsv=0x40))
    await c.send(frame(TEXT, command(2, "subscribe", {"channel": "lobby"})))
    body = deflated(command(3, "publish", {"channel": "lobby", "data": {"z": "z" * 5000}}))
    a, b, rest = body[:7], body[7:20], body[20:]
    await c.send(frame(TEXT, a, fin=False, rsv=0x40))
    await c.send(frame(PING, b"mid"))
    await c.send(frame(CONTINUATION, b, fin=False) + frame(CONTINUATION, rest), pieces=4)
    got: list[Any] = []
    while len([r for r in got if isinstance(r, dict) and "id" in r]) < 3:
        opcode, payload = await c.next_frame()
        if opcode == PONG:
            got.append(payload)
            continue
        assert opcode == TEXT, (opcode, payload)
        got.extend(orjson.loads(line) for line in payload.split(b"\n") if line)
    assert b"mid" in got
    replies = [r for r in got if isinstance(r, dict) and "id" in r]
    assert [r["id"] for r in replies] == [1, 2, 3], got
    assert replies[0]["connect"]["client"]
    await delivered(ok, {"z": "z" * 5000})


async def test_a_message_that_inflates_past_the_limit_closes_1009(squall, tcp):
    """A few hundred bytes on the wire that inflate to 1 MiB (limit 64 KiB): 1009."""
    sq, ok = await server_and_bystander(
        squall, **{"client.compression": True, "client.max_frame_bytes": 65536}
    )
    c = await tcp(sq, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n")
    await c.connect(deflate=True)
    bomb = deflated(command(2, "publish", {"channel": "lobby", "data": "x" * (1 << 20)}))
    assert len(bomb) < 4096
    with expect_log("squall.client", r"disconnect code=1009"):
        await c.send(frame(TEXT, bomb, rsv=0x40))
        code, ended = await c.ended()
    assert (code, ended) == (1009, True)
    await ok.still_works()


async def test_misplaced_compression_bits_and_corrupt_data_drop_only_their_connection(squall, tcp):
    """With permessage-deflate: RSV1 on a continuation or a control frame, another
    reserved bit, or a compressed message that does not inflate ends that connection."""
    sq, ok = await server_and_bystander(squall, **{"client.compression": True})
    broken = {
        "RSV1 on a continuation": frame(TEXT, deflated(b'{"id": 2,'), fin=False, rsv=0x40)
        + frame(CONTINUATION, deflated(b'"ping": {}}'), rsv=0x40),
        "RSV1 on a ping": frame(PING, deflated(b"x"), rsv=0x40),
        "RSV2": frame(TEXT, command(2, "ping"), rsv=0x20),
        "data that does not inflate": frame(TEXT, b"\xff" * 40, rsv=0x40),
    }
    for name, data in broken.items():
        c = await tcp(sq, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n")
        await c.connect(sub="broken", deflate=True)
        await dropped_without_reply(c, data, name)
        await ok.still_works()


async def test_fragmented_message_with_control_frames_between_fragments(squall, tcp):
    """A command in three fragments, with a ping between two of them, is run once whole."""
    sq, ok = await server_and_bystander(squall)
    c = await tcp(sq)
    await c.connect()
    body = command(2, "publish", {"channel": "lobby", "data": {"parts": 3}})
    a, b, rest = body[:10], body[10:25], body[25:]
    await c.send(frame(TEXT, a, fin=False))
    await c.send(frame(PING, b"mid"))
    await c.send(frame(CONTINUATION, b, fin=False), pieces=3)
    await c.send(frame(CONTINUATION, rest))
    opcode, payload = await c.next_frame()
    assert (opcode, payload) == (PONG, b"mid")
    assert await c.replies(1) == [{"id": 2, "publish": {}}]
    await delivered(ok, {"parts": 3})


async def test_declared_length_over_the_limit_closes_1009_before_the_payload(squall, tcp):
    """A header announcing 10 MiB (limit 64 KiB) closes with 1009 at once: the server
    does not wait for, or buffer, the payload."""
    sq, ok = await server_and_bystander(squall, **{"client.max_frame_bytes": 65536})
    c = await tcp(sq)
    await c.connect()
    with expect_log("squall.client", r"disconnect code=1009"):
        await c.send(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 10 << 20) + os.urandom(4))
        code, ended = await c.ended()
    assert (code, ended) == (1009, True)
    await ok.still_works()


async def test_fragments_adding_up_over_the_limit_close_1009(squall, tcp):
    """Each fragment is small, their sum is not: 1009 on the fragment that crosses it."""
    sq, ok = await server_and_bystander(squall, **{"client.max_frame_bytes": 4096})
    c = await tcp(sq)
    await c.connect()
    with expect_log("squall.client", r"disconnect code=1009"):
        await c.send(frame(TEXT, b"x" * 3000, fin=False))
        await c.send(frame(CONTINUATION, b"x" * 3000, fin=False))
        code, ended = await c.ended()
    assert (code, ended) == (1009, True)
    await ok.still_works()


async def test_client_close_frame_is_echoed(squall, tcp):
    """The client's close code comes back in the server's close frame, then the stream ends."""
    sq, ok = await server_and_bystander(squall)
    c = await tcp(sq)
    await c.connect()
    await c.send(frame(CLOSE, struct.pack("!H", 4000) + b"bye"))
    assert await c.ended() == (4000, True)
    await ok.still_works()


BROKEN = {
    "reserved bits without an extension": frame(TEXT, command(2, "ping"), rsv=0x40),
    "a continuation with nothing to continue": frame(CONTINUATION, command(2, "ping")),
    "a fragmented control frame": frame(PING, b"x", fin=False),
    "a control frame over 125 bytes": frame(PING, b"x" * 126),
    "invalid UTF-8 in a text frame": frame(TEXT, b'{"id": 2, "ping": {"x": "\xff\xfe"}}'),
    "an unknown opcode": frame(0x3, command(2, "ping")),
    "a close frame whose reason is not UTF-8": frame(CLOSE, struct.pack("!H", 4000) + b"\xff\xfe"),
    "a new message inside a fragmented one": frame(TEXT, b'{"id": 2,', fin=False)
    + frame(TEXT, command(3, "ping")),
}


async def test_broken_frames_drop_only_their_connection(squall, tcp):
    """Each protocol violation of RFC 6455 ends that connection (no reply to the command
    it carried) and leaves a bystander working."""
    sq, ok = await server_and_bystander(squall)
    for name, data in BROKEN.items():
        c = await tcp(sq)
        await c.connect(sub="broken")
        await dropped_without_reply(c, data, name)
        await ok.still_works()


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    """Squall processes started with ``python run.py``; stopped by pid at teardown."""
    group = ProcessGroup()
    yield group
    group.close()


def flood_frames(port: int, data: bytes, seconds: float) -> None:
    """In a child process: handshake, then send ``data`` over and over for ``seconds``
    without reading (the server's answers pile up unread).

    A process, not a thread: a thread of the test's own process would compete for
    the GIL with the server under test, and every syscall of the server's loop could
    wait out a switch interval (the loop then looks stalled whatever the server does).
    The socket blocks, so a send never stops mid-frame.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            (
                f"GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        s.settimeout(None)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                s.sendall(data)
            except OSError:
                return


async def test_a_ping_flood_does_not_hold_the_loop(procs):
    """A peer streaming WebSocket pings as fast as its socket takes them (each one
    answered with a pong write: one 64 KiB read holds about 10 000) gets turns like
    any other connection: a bystander keeps publishing and receiving meanwhile,
    each round trip quick (without the turns it waited for the whole flood).

    The server is a ``run.py`` process, so the check sees what a deployment sees,
    not the test process's asyncio debug mode and garbage collector.
    """
    # Without asyncio's debug mode (CI sets it for the test runner), which slows
    # every callback of the server several times over.
    proc = procs(overrides={"client.command_rate": 0}, env={"PYTHONASYNCIODEBUG": ""}).start()
    await proc.wait_ready_async()
    ws = await tornado.websocket.websocket_connect(proc.ws_url)
    ok = Bystander(RawClient(ws), "lobby")
    flooder = multiprocessing.get_context("spawn").Process(
        target=flood_frames, args=(proc.port, frame(PING, b"") * 20_000, 2.5), daemon=True
    )
    try:
        await ok.client.connect(sub="bystander")
        assert "subscribe" in await ok.client.command("subscribe", {"channel": "lobby"})
        flooder.start()
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.5)  # the flood is under way
        round_trips: list[float] = []
        deadline = loop.time() + 1.5
        while loop.time() < deadline:
            before = loop.time()
            await ok.still_works()
            round_trips.append(loop.time() - before)
    finally:
        ws.close()
        await asyncio.to_thread(flooder.join, 3)
        if flooder.is_alive():  # blocked in a send the server no longer reads: stop it
            flooder.terminate()
            await asyncio.to_thread(flooder.join)
    assert len(round_trips) > 3
    # About 0.03 s here; without the turns a round trip waited for the whole 2.5 s
    # flood. 1 s leaves room for a busy host (one full-suite run saw 0.46 s).
    assert max(round_trips) < 1.0 * TIME_FACTOR, f"a round trip took {max(round_trips):.2f}s"
    assert proc.error_lines() == []
