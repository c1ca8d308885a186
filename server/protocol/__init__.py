"""Sans-I/O Centrifugo protocol (JSON format).

Frames in, commands out; replies and pushes in, frames out.

Nothing here imports Tornado, redis or pymongo; the tests feed plain strings.
"""

from server.protocol.codec import (
    METHODS,
    Command,
    ProtocolViolation,
    compact,
    decode_frame,
    encode_error,
    encode_push,
    encode_reply,
    pub_to_dict,
)

__all__ = [
    "METHODS",
    "Command",
    "ProtocolViolation",
    "compact",
    "decode_frame",
    "encode_error",
    "encode_push",
    "encode_reply",
    "pub_to_dict",
]
