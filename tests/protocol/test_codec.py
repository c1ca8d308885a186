"""Unit tests of the sans-I/O JSON codec (``server.protocol.codec``): plain strings in and out."""

from __future__ import annotations

import orjson
import pytest

from server import codes
from server.broker import ClientInfo, Publication
from server.protocol import (
    Command,
    ProtocolViolation,
    decode_frame,
    encode_error,
    encode_push,
    encode_reply,
    pub_to_dict,
)
from server.protocol.codec import MAX_COMMAND_ID, METHODS

MAX = 100


def decode(data: str | bytes, max_commands: int = MAX) -> list[Command]:
    return decode_frame(data, max_commands=max_commands)


def violation(data: str | bytes, max_commands: int = MAX) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        decode(data, max_commands)
    return info.value


# ---------------------------------------------------------------------- decoding


def test_single_command_decodes_to_id_method_params():
    """A subscribe command comes out with its id, method and params."""
    (cmd,) = decode('{"id": 7, "subscribe": {"channel": "chat:a"}}')
    assert cmd == Command(7, "subscribe", {"channel": "chat:a"})


@pytest.mark.parametrize("method", METHODS)
def test_every_protocol_method_is_recognised(method):
    """Every method of client.proto's Command is decoded by its JSON name."""
    (cmd,) = decode(orjson.dumps({"id": 1, method: {}}))
    assert cmd.method == method


def test_newline_batched_frame_yields_commands_in_order():
    """Several commands in one frame are returned in the order they were sent."""
    frame = "\n".join(
        orjson.dumps({"id": i, "rpc": {"method": str(i)}}).decode() for i in (3, 1, 2)
    )
    cmds = decode(frame)
    assert [c.id for c in cmds] == [3, 1, 2]
    assert [c.params["method"] for c in cmds] == ["3", "1", "2"]


def test_empty_and_whitespace_lines_are_skipped():
    """Blank lines, a trailing newline and CRLF line ends do not count as commands."""
    cmds = decode('\n{"id": 1, "ping": {}}\r\n\n   \n{"id": 2, "ping": {}}\n')
    assert [c.id for c in cmds] == [1, 2]


def test_bytes_frame_is_accepted():
    """A binary frame holding UTF-8 JSON decodes like a text frame."""
    (cmd,) = decode('{"id": 1, "publish": {"channel": "c", "data": "héllo ☃"}}'.encode())
    assert cmd.params["data"] == "héllo ☃"


@pytest.mark.parametrize("frame", ["", "\n", "\n\n  \n"])
def test_frame_without_commands_is_a_violation(frame):
    """A frame with no command at all closes the connection with 3501."""
    exc = violation(frame)
    assert exc.disconnect == codes.BAD_REQUEST_DISCONNECT


@pytest.mark.parametrize(
    "frame",
    [
        "{not json",
        '{"id": 1, "ping": {}',
        '{"id": 1}{"id": 2}',
        "{'id': 1}",
        '{"id": 1, "ping": {}}\n{broken',
        b"\xff\xfe\x00garbage",
        "\ud800",  # a lone surrogate is not UTF-8
    ],
)
def test_invalid_json_is_a_bad_request_violation(frame):
    """Anything that is not JSON closes the connection with 3501 (bad request)."""
    exc = violation(frame)
    assert exc.disconnect.code == 3501
    assert exc.disconnect.reason == "bad request"


@pytest.mark.parametrize("line", ["[]", "[1, 2]", "1", '"connect"', "null", "true"])
def test_non_object_command_is_a_violation(line):
    """A JSON value that is not an object is not a command: 3501."""
    assert violation(line).disconnect == codes.BAD_REQUEST_DISCONNECT


@pytest.mark.parametrize(
    "cmd_id",
    ['"1"', "1.5", "1.0", "-1", "true", "false", "null", "[]", "{}", str(MAX_COMMAND_ID + 1)],
)
def test_bad_command_id_is_a_violation(cmd_id):
    """An id that is not an unsigned 32-bit integer closes the connection with 3501."""
    exc = violation(f'{{"id": {cmd_id}, "ping": {{}}}}')
    assert exc.disconnect == codes.BAD_REQUEST_DISCONNECT


def test_largest_command_id_is_accepted():
    """Ids up to 2**32-1 are valid (uint32 in client.proto)."""
    (cmd,) = decode(f'{{"id": {MAX_COMMAND_ID}, "ping": {{}}}}')
    assert cmd.id == MAX_COMMAND_ID


def test_unknown_method_decodes_with_empty_method():
    """An unknown method is not a violation: the command comes out with method ''."""
    (cmd,) = decode('{"id": 9, "frobnicate": {"x": 1}}')
    assert cmd == Command(9, "", {})


def test_id_only_command_decodes_with_empty_method():
    """A command with an id but no method is answered later (104), not dropped."""
    (cmd,) = decode('{"id": 4}')
    assert cmd.id == 4
    assert cmd.method == ""


def test_empty_object_is_a_pong():
    """``{}`` is the client's answer to a server ping."""
    (cmd,) = decode("{}")
    assert cmd.method == "pong"


def test_pongs_mix_with_commands_in_one_frame():
    """A pong batched with commands keeps its place among them."""
    cmds = decode('{"id": 1, "ping": {}}\n{}\n{"id": 2, "ping": {}}')
    assert [c.method for c in cmds] == ["ping", "pong", "ping"]


def test_command_without_id_keeps_id_zero():
    """``send`` is fire-and-forget: without an id it decodes with id 0."""
    (cmd,) = decode('{"send": {"data": {"a": 1}}}')
    assert cmd == Command(0, "send", {"data": {"a": 1}})


def test_unknown_method_without_id_is_a_violation():
    """A command with neither an id nor a known method is rejected with 3501."""
    assert violation('{"bogus": {}}').disconnect == codes.BAD_REQUEST_DISCONNECT


def test_null_params_mean_empty_params():
    """``{"id": 1, "ping": null}`` is a ping with no params."""
    (cmd,) = decode('{"id": 1, "ping": null}')
    assert cmd.params == {}


@pytest.mark.parametrize("params", ["[]", '"x"', "1", "true"])
def test_non_object_params_are_a_violation(params):
    """Params of a known method must be an object, else 3501."""
    assert violation(f'{{"id": 1, "subscribe": {params}}}').disconnect.code == 3501


def test_exactly_max_commands_are_accepted():
    """A frame with the configured maximum of commands is fine."""
    frame = "\n".join(f'{{"id": {i}, "ping": {{}}}}' for i in range(1, 6))
    assert len(decode(frame, max_commands=5)) == 5


def test_too_many_commands_is_a_violation():
    """One command over ``client.max_commands_per_frame`` closes the connection with 3501."""
    frame = "\n".join(f'{{"id": {i}, "ping": {{}}}}' for i in range(1, 7))
    exc = violation(frame, max_commands=5)
    assert exc.disconnect == codes.BAD_REQUEST_DISCONNECT
    assert "5" in exc.detail


def test_blank_lines_do_not_count_towards_max_commands():
    """Empty lines between commands are not commands, so they do not hit the limit."""
    frame = '{"id": 1, "ping": {}}\n\n\n\n{"id": 2, "ping": {}}'
    assert len(decode(frame, max_commands=2)) == 2


def test_violation_detail_is_for_logs():
    """The violation says why (for the log line) while the disconnect reason stays fixed."""
    exc = violation("[1]")
    assert "object" in exc.detail
    assert exc.disconnect.reason == "bad request"


# ---------------------------------------------------------------------- encoding


def test_encode_reply_echoes_id_and_method():
    """A reply is ``{"id": N, "<method>": result}``."""
    assert orjson.loads(encode_reply(5, "publish")) == {"id": 5, "publish": {}}
    assert orjson.loads(encode_reply(6, "history", {"offset": 3})) == {
        "id": 6,
        "history": {"offset": 3},
    }


def test_encode_error_uses_the_error_code_dict():
    """An error reply carries code and message (and temporary where Centrifugo sets it)."""
    assert orjson.loads(encode_error(3, codes.PERMISSION_DENIED.to_dict())) == {
        "id": 3,
        "error": {"code": 103, "message": "permission denied"},
    }
    assert orjson.loads(encode_error(4, codes.INTERNAL.to_dict())) == {
        "id": 4,
        "error": {"code": 100, "message": "internal server error", "temporary": True},
    }


def test_encode_push_with_and_without_channel():
    """A channel push names the channel; a connection-level push has none."""
    assert orjson.loads(encode_push("chat:a", "join", {"info": {}})) == {
        "push": {"channel": "chat:a", "join": {"info": {}}}
    }
    assert orjson.loads(encode_push("", "message", {"data": 1})) == {
        "push": {"message": {"data": 1}}
    }


def test_publication_data_is_embedded_raw():
    """Publication data is the publisher's JSON, embedded without re-encoding."""
    pub = Publication(7, "ep", b'{"b":2,"a":[1,2]}')
    frame = encode_push("c", "pub", pub_to_dict(pub))
    assert b'"data":{"b":2,"a":[1,2]}' in frame
    assert orjson.loads(frame)["push"]["pub"] == {"data": {"b": 2, "a": [1, 2]}, "offset": 7}


def test_publication_without_offset_omits_it():
    """Channels without history send publications without an offset field."""
    assert pub_to_dict(Publication(0, "", b"1")).keys() == {"data"}


def test_publication_info_and_tags():
    """Publisher info (with raw conn_info/chan_info) and tags appear in the publication."""
    info = ClientInfo("alice", "c1", b'{"name":"A"}', b'{"role":"mod"}')
    pub = Publication(1, "ep", b'"hi"', info, 0, {"k": "v"})
    out = orjson.loads(orjson.dumps(pub_to_dict(pub)))
    assert out == {
        "data": "hi",
        "offset": 1,
        "info": {
            "user": "alice",
            "client": "c1",
            "conn_info": {"name": "A"},
            "chan_info": {"role": "mod"},
        },
        "tags": {"k": "v"},
    }


def test_encoded_frames_round_trip_as_one_line():
    """Encoded replies contain no newline, so batching them never splits a message."""
    pub = Publication(1, "e", orjson.dumps({"text": "line1\nline2"}))
    frame = encode_push("c", "pub", pub_to_dict(pub))
    assert b"\n" not in frame
