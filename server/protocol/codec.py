"""JSON codec of the Centrifugo bidirectional protocol (v2).

Frames
    One WebSocket text message carries one or more JSON objects separated by
    ``\\n``. A *command* is ``{"id": N, "<method>": {params}}``; an empty object
    ``{}`` is the client's pong. A *reply* echoes the id with either the
    method's result or ``error``; a *push* is ``{"push": {"channel": ..., ...}}``.
    The server's ping is the empty object ``{}``.

Errors
    ``decode_frame`` raises ``ProtocolViolation`` (carrying the disconnect to
    send) for input that cannot be commands at all: invalid JSON, a line that
    is not an object, a non-integer id, too many commands. A well-formed
    command with no known method is returned with ``method == ""`` so that the
    client answers it with error 104 and keeps the connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from server import codes
from server.broker import ClientInfo, Publication
from server.errors import ClientError
from server.record import record


def compact(data: bytes) -> bytes:
    """``data`` copied into an allocation of its own size, for bytes that are kept.

    ``orjson.dumps`` writes into a buffer of at least 4 KiB and hands that
    allocation back whatever the output's length: every small JSON value kept
    for long (a publication in history, a token's ``info`` for a connection's
    life) held about 4 KiB of memory (100 000 ten-byte values: 400 MB).
    """
    return bytes(memoryview(data))


def encode_data(value: Any, what: str = "data") -> bytes:
    """A client's or the server API's JSON value (``data``, ``info``) as JSON again.

    Raises ``ClientError`` 107 for a value JSON decoding gave but orjson cannot
    encode: nesting deeper than 254 levels (it decodes 1024).
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise ClientError(codes.BAD_REQUEST, f"{what} cannot be encoded: {exc}") from None


METHODS: Final = (
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "presence",
    "presence_stats",
    "history",
    "ping",
    "send",
    "rpc",
    "refresh",
    "sub_refresh",
)
_METHOD_SET: Final = frozenset(METHODS)
MAX_COMMAND_ID: Final = 2**32 - 1


class ProtocolViolation(Exception):
    """The frame cannot be decoded into commands; the connection must close."""

    def __init__(self, detail: str, disconnect: codes.Disconnect = codes.BAD_REQUEST_DISCONNECT):
        super().__init__(detail)
        self.detail = detail
        self.disconnect = disconnect


@record
class Command:
    """One decoded command. ``method`` is ``""`` for an unknown one, ``"pong"`` for ``{}``."""

    id: int
    method: str
    params: Mapping[str, Any]


PONG: Final = Command(0, "pong", {})


def decode_frame(data: str | bytes, *, max_commands: int) -> list[Command]:
    """Split a frame into commands.

    Raises:
        ProtocolViolation: the frame is not newline-separated JSON command objects.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    commands: list[Command] = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        if len(commands) >= max_commands:
            raise ProtocolViolation(f"more than {max_commands} commands in one frame")
        commands.append(_decode_command(line))
    if not commands:
        raise ProtocolViolation("empty frame")
    return commands


def _decode_command(line: bytes) -> Command:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ProtocolViolation(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation("command is not a JSON object")
    if not obj:
        return PONG
    cmd_id = obj.get("id", 0)
    if isinstance(cmd_id, bool) or not isinstance(cmd_id, int) or not 0 <= cmd_id <= MAX_COMMAND_ID:
        raise ProtocolViolation("command id must be an unsigned 32-bit integer")
    method = ""
    params: Any = {}
    for key, value in obj.items():
        if key in _METHOD_SET:
            method = key
            params = value if value is not None else {}
            break
    if not isinstance(params, dict):
        raise ProtocolViolation(f"{method} params must be an object")
    if method == "" and cmd_id == 0:
        raise ProtocolViolation("command without id and without a known method")
    return Command(cmd_id, method, params)


def encode_reply(cmd_id: int, method: str, result: Mapping[str, Any] | None = None) -> bytes:
    """``{"id": N, "<method>": result}``."""
    return orjson.dumps({"id": cmd_id, method: result or {}})


def encode_error(cmd_id: int, error: Mapping[str, Any]) -> bytes:
    """``{"id": N, "error": {"code": ..., "message": ...}}``."""
    return orjson.dumps({"id": cmd_id, "error": error})


def encode_push(channel: str, kind: str, body: Mapping[str, Any]) -> bytes:
    """``{"push": {"channel": ch, "<kind>": body}}`` (kind: pub, join, leave, ...)."""
    if channel:
        return orjson.dumps({"push": {"channel": channel, kind: body}})
    return orjson.dumps({"push": {kind: body}})


def info_to_dict(info: ClientInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"user": info.user, "client": info.client}
    if info.conn_info is not None:
        out["conn_info"] = orjson.Fragment(info.conn_info)
    if info.chan_info is not None:
        out["chan_info"] = orjson.Fragment(info.chan_info)
    return out


def pub_to_dict(pub: Publication) -> dict[str, Any]:
    """A publication as the protocol's ``Publication`` object (data embedded raw)."""
    out: dict[str, Any] = {"data": orjson.Fragment(pub.data)}
    if pub.offset:
        out["offset"] = pub.offset
    if pub.info is not None:
        out["info"] = info_to_dict(pub.info)
    if pub.tags:
        out["tags"] = dict(pub.tags)
    return out
