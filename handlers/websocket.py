"""``/connection/websocket``: a thin adapter from Tornado to ``server.client.Client``.

Frames are written straight to the connection's ``IOStream``: a server
frame is unmasked, so the frame for one payload is the same bytes for every
recipient, and it is built once per flush and shared (see
``Transport.write``). Writing through ``write_message`` would cost a task and
a frame per recipient. When permessage-deflate is negotiated (opt-in,
``client.compression``), frames go through ``write_message`` instead.

The stream's ``max_write_buffer_size`` is set to ``client.max_queue_bytes``: a
peer that stops reading makes the next write raise ``StreamBufferFullError``,
which the client turns into disconnect 3008 (slow).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
import uuid
import zlib
from typing import Any
from urllib.parse import urlsplit

import tornado.httputil
import tornado.iostream
import tornado.websocket
from tornado.util import _websocket_mask

from server.auth import TokenVerifier
from server.client import Client, FrameCache, TransportBufferFull, TransportError
from server.hub import Hub

log = logging.getLogger("squall.client")


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented WebSocket text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class WebSocketTransport:
    """``server.client.Transport`` over one Tornado WebSocket connection."""

    __slots__ = ("_direct", "_handler", "_raw", "_stream", "remote")

    def __init__(self, handler: CentrifugoWebSocket, raw: bool) -> None:
        self._handler = handler
        conn = handler.ws_connection
        # WebSocketProtocol13 keeps the detached IOStream as ``stream``.
        self._stream: tornado.iostream.IOStream | None = getattr(conn, "stream", None)
        self._raw = raw and self._stream is not None
        # Direct socket sends only on plain TCP streams (TLS goes through the stream).
        self._direct = type(self._stream) is tornado.iostream.IOStream
        self.remote = handler.request.remote_ip or ""

    def write(self, payload: bytes, frames: FrameCache) -> None:
        if not self._raw:
            try:
                _ = self._handler.write_message(payload)  # flow control: the stream's buffer limit
            except tornado.websocket.WebSocketClosedError:
                raise TransportError("closed") from None
            except tornado.iostream.StreamBufferFullError:  # write_message lets it through
                raise TransportBufferFull("write buffer full") from None
            return
        entry = frames.get(id(payload))
        if entry is not None and entry[0] is payload:
            frame = entry[1]
        else:
            frame = text_frame(payload)
            frames[id(payload)] = (payload, frame)
        stream = self._stream
        if stream is None:  # pragma: no cover - _raw implies a stream
            raise TransportError("no stream")
        if self._direct and not stream.writing():
            # Nothing queued in the stream: send now. IOStream.write would also
            # make a Future and schedule its callback for every frame, which is
            # most of the per-recipient cost of a broadcast.
            sock = stream.socket
            if sock is None:  # closed by Tornado; the reader has not noticed yet
                raise TransportError("closed")
            try:
                sent = sock.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                stream.close()
                raise TransportError("closed") from None
            if sent == len(frame):
                return
            frame = frame[sent:]  # the rest goes through the stream, in order
        try:
            _ = stream.write(frame)  # not awaited: the buffer limit is the flow control
        except tornado.iostream.StreamBufferFullError:
            raise TransportBufferFull("write buffer full") from None
        except tornado.iostream.StreamClosedError:
            raise TransportError("closed") from None

    def close(self, code: int, reason: str) -> None:
        # A close frame carries at most 123 bytes of reason (RFC 6455 5.5); for a
        # longer one Tornado raises and the connection would stay open. Cut it
        # on a character boundary.
        reason = reason.encode()[:123].decode(errors="ignore")
        stream = self._stream
        if stream is not None:
            # The close frame must get out even when the buffer limit is what
            # ended the connection (3008 slow).
            stream.max_write_buffer_size = None
        try:
            self._handler.close(code, reason)
        except (tornado.iostream.StreamClosedError, tornado.iostream.StreamBufferFullError):
            if stream is not None:
                stream.close()


SWITCHING_PROTOCOLS = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: "
)
READ_CHUNK = 65536  # bytes asked of the stream per read (it returns what it has)
YIELD_EVERY = 256 * 1024  # input handled before other connections get a turn
FRAME_COST = 1024  # each frame (data or control) counts this much more towards YIELD_EVERY


# The reading task of every open connection (the event loop keeps only weak
# references to tasks).
_readers: set[asyncio.Future[None]] = set()


class _Protocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's RFC 6455 protocol with a cheaper frame reader, and a record of
    the closes Tornado starts by itself.

    Reading: Tornado's reader awaits the stream two to four times per frame
    (header, length, mask, payload) and runs ``on_message`` through a task and
    two futures per message; at thousands of small frames a second that is
    about a third of the process's CPU. ``_receive_frame_loop`` below reads
    whatever the socket has (up to ``READ_CHUNK``), parses every complete frame
    in it, and awaits ``on_message`` in the reading task itself, so a
    connection's commands still run one after another in arrival order. The
    rules are Tornado's: reserved bits, fragmented or long control frames, a
    continuation without a start or a new message inside a fragmented one
    abort the connection; a message over ``max_message_size`` (declared
    lengths count, before any payload is read) closes it with 1009; text must
    be UTF-8; control frames go to Tornado's ``_handle_message``. Stricter
    than Tornado: a frame that is not masked closes the connection with 1002
    (RFC 6455 5.1). With permessage-deflate (opt-in) a message whose first
    frame has RSV1 set is inflated whole by Tornado's decompressor (1009 when
    it inflates past ``max_message_size``).

    ``own_close``: by the time ``on_close`` runs, every kind of ending looks the
    same on the protocol object (both sides marked terminated), so the code of
    a close Tornado started (an oversize frame: 1009) is kept here.
    """

    own_close: tuple[int, str] | None = None

    async def _accept_connection(self, handler: tornado.websocket.WebSocketHandler) -> None:
        # Tornado answers the upgrade through the request handler's ``finish``:
        # response headers (Date, Server, Content-Type) built and then checked
        # line by line, the HTTP connection's finish (with a second
        # TCP_NODELAY call), about a tenth of the CPU of accepting a
        # connection. Without a subprotocol or an extension to negotiate, the
        # 101 response is fixed but for its accept value: it is written here,
        # after the same checks (``get`` and ``accept_connection`` ran them).
        headers = handler.request.headers
        if self._compression_options is not None or "Sec-WebSocket-Protocol" in headers:
            await super()._accept_connection(handler)
            return
        accept = self._challenge_response(handler)
        handler.set_status(101)  # for the access log line
        stream = self.stream = handler.detach()  # the stream of a finished request
        _ = stream.write(SWITCHING_PROTOCOLS + accept.encode() + b"\r\n\r\n")
        handler.application.log_request(handler)
        self.start_pinging()
        try:
            result = handler.open(*handler.open_args, **handler.open_kwargs)
            if result is not None:
                await result
        except Exception:
            handler.log_exception(*sys.exc_info())
            self._abort()
            return
        await self._receive_frame_loop()

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if not (self.client_terminated or self.server_terminated):
            self.own_close = (code or 1000, reason or "")
        super().close(code, reason)

    async def _receive_frame_loop(self) -> None:
        # Tornado awaits this at the end of the handshake, inside the request
        # handler's coroutines: awaiting the whole connection here would keep
        # those suspended (their frames, the HTTP connection objects and two
        # tasks, about 3 KiB per connection). The frames are read in a task of
        # their own instead, and the handshake finishes.
        reader = asyncio.ensure_future(self._read_loop())
        _readers.add(reader)
        reader.add_done_callback(_readers.discard)

    async def _read_loop(self) -> None:
        try:
            await self._read_frames()
        except tornado.iostream.StreamClosedError:
            self._abort()
        except Exception:
            log.exception("websocket reader failed")
            self._abort()
        finally:
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)

    def _ended(self) -> bool:  # a call, so that type checkers see it change across awaits
        return self.client_terminated

    async def _read_frames(self) -> None:
        stream = self.stream
        handler = self.handler
        max_size = self.params.max_message_size
        decompressor = self._decompressor  # permessage-deflate negotiated (opt-in)
        fragments: bytearray | None = None  # a fragmented message being gathered
        fragments_opcode = 0
        compressed = False  # RSV1 on the data message's first frame
        data = b""  # bytes read and not parsed yet
        want = 0  # > 0: bytes the incomplete frame at the start of data still needs
        work = 0
        while not self._ended():
            if want:
                more = await stream.read_bytes(want)
            else:
                more = await stream.read_bytes(READ_CHUNK, partial=True)
            self._wire_bytes_in += len(more)
            data = data + more if data else more
            n = len(data)
            i = 0
            want = 0
            while n - i >= 2:
                b0 = data[i]
                b1 = data[i + 1]
                opcode = b0 & 0x0F
                length = b1 & 0x7F
                rsv = b0 & 0x70
                # Reserved bits: only RSV1 (compressed), only with permessage-deflate
                # and only on a data message's first frame (RFC 7692 6).
                bad_rsv = rsv and (rsv != 0x40 or decompressor is None or not 0 < opcode < 8)
                if bad_rsv or (opcode & 0x8 and length >= 126):
                    self._abort()  # or a long control frame
                    return
                head = i + 2
                if length == 126:
                    if n - i < 4:
                        break
                    length = int.from_bytes(data[head : head + 2], "big")
                    head += 2
                elif length == 127:
                    if n - i < 10:
                        break
                    length = int.from_bytes(data[head : head + 8], "big")
                    head += 8
                if length + (len(fragments) if fragments is not None else 0) > max_size:
                    self.close(1009, "message too big")
                    self._abort()
                    return
                if not b1 & 0x80:
                    # RFC 6455 5.1: a client masks every frame, and the server closes
                    # the connection on one that is not (masking keeps a hostile
                    # page from writing bytes of its choosing through proxies).
                    log.info("unmasked client frame: connection closed with 1002")
                    self.close(1002, "client frames must be masked")
                    self._abort()
                    return
                mask = data[head : head + 4]
                head += 4
                end = head + length
                if end > n:
                    if head <= n:
                        want = end - n  # the header is complete: read just the rest
                    break
                payload = data[head:end]
                i = end
                # Every frame counts, control frames and fragments too, and the
                # turn is given between frames, not only between reads: one
                # read of tiny frames (64 KiB of pings, each answered with a
                # pong write) would otherwise hold the loop for half a second.
                work += FRAME_COST + length
                if work >= YIELD_EVERY:
                    work = 0
                    await asyncio.sleep(0)  # a busy connection lets the others in
                    if self._ended():
                        return
                payload = _websocket_mask(mask, payload)
                final = b0 & 0x80
                if opcode & 0x8:
                    if not final:
                        self._abort()  # control frames are never fragmented
                        return
                    try:
                        handled = self._handle_message(opcode, payload)
                    except UnicodeDecodeError:  # a close frame's reason must be UTF-8
                        log.info("close frame with a reason that is not UTF-8: connection aborted")
                        self._abort()
                        return
                    except tornado.iostream.StreamBufferFullError:
                        # The pong (or the echoed close) does not fit in what is left
                        # of the write buffer: a peer that does not read, as for a push.
                        client: Client | None = getattr(handler, "client", None)
                        if client is not None:
                            client.on_transport_full()
                        else:  # pragma: no cover - open() makes the client
                            self._abort()
                        return
                    if handled is not None:
                        await handled
                    if self._ended():
                        return
                    continue
                if opcode == 0:
                    if fragments is None:
                        self._abort()  # nothing to continue
                        return
                    fragments += payload
                    if not final:
                        continue
                    opcode, payload, fragments = fragments_opcode, bytes(fragments), None
                elif fragments is not None:
                    self._abort()  # a new message inside a fragmented one
                    return
                else:
                    compressed = bool(rsv)
                    if not final:
                        fragments, fragments_opcode = bytearray(payload), opcode
                        continue
                if compressed and decompressor is not None:
                    try:
                        payload = decompressor.decompress(payload)
                    except tornado.websocket._DecompressTooLargeError:
                        self.close(1009, "message too big after decompression")
                        self._abort()
                        return
                    except zlib.error as exc:
                        log.info("compressed message that does not inflate (%s): aborted", exc)
                        self._abort()
                        return
                message: str | bytes
                if opcode == 0x1:
                    try:
                        message = payload.decode("utf-8")
                    except UnicodeDecodeError:
                        self._abort()
                        return
                elif opcode == 0x2:
                    message = payload
                else:
                    self._abort()  # an unknown data opcode
                    return
                self._message_bytes_in += len(payload)
                try:
                    result = handler.on_message(message)
                    if result is not None:
                        await result
                except (Exception, asyncio.CancelledError):
                    handler.log_exception(*sys.exc_info())
                    self._abort()
                    return
                if self._ended():
                    return
            data = data[i:] if i else data


class CentrifugoWebSocket(tornado.websocket.WebSocketHandler):
    """One WebSocket connection speaking the Centrifugo JSON protocol."""

    def initialize(self, hub: Hub, verifier: TokenVerifier) -> None:
        self.hub = hub
        self.verifier = verifier
        self.client: Client | None = None
        self._protocol: _Protocol | None = None

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        proto = super().get_websocket_protocol()
        if type(proto) is tornado.websocket.WebSocketProtocol13:
            self._protocol = _Protocol(self, False, proto.params)
            return self._protocol
        return proto

    @property
    def max_message_size(self) -> int:  # from config, not the application settings
        return self.hub.config.client.max_frame_bytes

    def check_origin(self, origin: str) -> bool:
        allowed = self.hub.config.client.allowed_origins
        if "*" in allowed:
            return True
        parts = urlsplit(origin)
        if parts.netloc.lower() == (self.request.host or "").lower():
            return True
        if origin.lower().rstrip("/") in {o.lower() for o in allowed}:
            return True
        log.info(
            "websocket refused: origin %s not allowed remote=%s", origin, self.request.remote_ip
        )
        return False

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.hub.config.client.compression else None

    def prepare(self) -> None:
        # Refused before Tornado's ``get`` starts the handshake.
        if self.hub.closing:
            self.set_status(503)
            _ = self.finish("shutting down")  # a Future; nothing to wait for

    def _detach_stream(self) -> tornado.iostream.IOStream:
        # Tornado's version also replaces seven HTTP response methods (write,
        # finish, ...) with ones that raise, as instance attributes: that grows
        # every connection's instance dict by about 1.5 KiB. Nothing calls them
        # after the upgrade (the 101 response is already finished).
        return self.detach()

    def open(self, *args: str, **kwargs: str) -> None:
        transport = WebSocketTransport(self, raw=not self.hub.config.client.compression)
        # The handshake is over and the stream detached: the request headers
        # (about 2 KiB per connection) are not read again (the transport kept
        # the remote address), and the request's HTTP connection objects (about
        # 3 KiB with what they hold) are not used again. The request itself
        # stays for log_exception's summary (method, URI, remote address).
        self.request.headers = tornado.httputil.HTTPHeaders()  # clear() pops one by one
        self.request.connection = None
        self.request.server_connection = None
        stream = getattr(self.ws_connection, "stream", None)
        if stream is not None:
            stream.max_write_buffer_size = self.hub.config.client.max_queue_bytes
        self.set_nodelay(True)
        self.client = Client(self.hub, transport, self.verifier, str(uuid.uuid4()))

    async def on_message(self, message: str | bytes) -> None:
        # Awaited by Tornado before the next frame is read: commands stay in order.
        if self.client is not None:
            await self.client.handle_frame(message)

    def on_ping(self, data: bytes) -> None:
        if self.client is not None:
            self.client.on_transport_ping()

    def on_close(self) -> None:
        client, proto = self.client, self._protocol
        # Nothing calls back into this handler any more: without these references
        # it goes with its last one, and so do its protocol and client. With them
        # (the protocol and the transport point back here) only the cyclic GC could
        # free a closed connection, and with server.gc_freeze it scans long-lived
        # objects rarely: every closed long-lived connection stayed in memory.
        self.client = None
        self._protocol = None
        if client is None or client.closed:
            return
        if proto is not None and proto.own_close is not None:
            # Tornado closed on its own: the only such case is an oversize frame.
            client.on_transport_closed(*proto.own_close)
        else:
            # The peer went away: 3000 (README), whatever close code and reason it
            # sent. Both are the peer's choice: counted by code, any peer could add
            # up to 65 536 series to /metrics; logged as sent, its reason could
            # forge log lines. Its code (a number) goes in the log line's detail.
            peer = f"peer close code {self.close_code}" if self.close_code else ""
            client.on_transport_closed(detail=peer)
