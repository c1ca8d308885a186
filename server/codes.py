"""Wire codes of the Centrifugo protocol, in one place.

Three families, numbered exactly as Centrifugo numbers them so that every
official SDK reacts the way its documentation says:

* **Client errors** (``ErrorCode``): the ``error`` of a reply to one command.
  The connection stays open. ``temporary`` tells the SDK it may retry.
* **Disconnects** (``Disconnect``): sent as the WebSocket close code and
  reason. Codes 3000-3499 and 4000-4499 make an SDK reconnect; 3500-3999 and
  4500-4999 are terminal (the SDK stays disconnected).
* **Unsubscribes** (``Unsubscribe``): sent in an ``unsubscribe`` push for one
  channel. Codes >= 2500 make the SDK resubscribe (with recovery), lower
  codes are final for that subscription.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """A client error: ``{"code": ..., "message": ..., "temporary": ...}`` in a reply."""

    code: int
    message: str
    temporary: bool = False

    def to_dict(self, message: str | None = None) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "message": message or self.message}
        if self.temporary:
            out["temporary"] = True
        return out


INTERNAL: Final = ErrorCode(100, "internal server error", temporary=True)
UNAUTHORIZED: Final = ErrorCode(101, "unauthorized")
UNKNOWN_CHANNEL: Final = ErrorCode(102, "unknown channel")
PERMISSION_DENIED: Final = ErrorCode(103, "permission denied")
METHOD_NOT_FOUND: Final = ErrorCode(104, "method not found")
ALREADY_SUBSCRIBED: Final = ErrorCode(105, "already subscribed")
LIMIT_EXCEEDED: Final = ErrorCode(106, "limit exceeded")
BAD_REQUEST: Final = ErrorCode(107, "bad request")
NOT_AVAILABLE: Final = ErrorCode(108, "not available")
TOKEN_EXPIRED: Final = ErrorCode(109, "token expired")
# sub_refresh with an expired token: the SDKs retry a temporary refresh error.
TOKEN_EXPIRED_RETRY: Final = ErrorCode(109, "token expired", temporary=True)
EXPIRED: Final = ErrorCode(110, "expired")
TOO_MANY_REQUESTS: Final = ErrorCode(111, "too many requests", temporary=True)
UNRECOVERABLE_POSITION: Final = ErrorCode(112, "unrecoverable position")
# Squall's own, in the application range: a durable store cannot take more writes now.
STORE_UNAVAILABLE: Final = ErrorCode(1001, "store unavailable", temporary=True)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A disconnect: WebSocket close code and a short reason (< 123 bytes)."""

    code: int
    reason: str

    @property
    def reconnect(self) -> bool:
        """Whether an SDK reconnects after this code (Centrifugo's ranges)."""
        return not (3500 <= self.code < 4000 or 4500 <= self.code < 5000)


CONNECTION_CLOSED: Final = Disconnect(3000, "connection closed")
SHUTDOWN: Final = Disconnect(3001, "shutdown")
SERVER_ERROR: Final = Disconnect(3004, "internal server error")
CONNECTION_EXPIRED: Final = Disconnect(3005, "connection expired")
SUBSCRIPTION_EXPIRED: Final = Disconnect(3006, "subscription expired")
SLOW: Final = Disconnect(3008, "slow")
WRITE_ERROR: Final = Disconnect(3009, "write error")
INSUFFICIENT_STATE: Final = Disconnect(3010, "insufficient state")
FORCE_RECONNECT: Final = Disconnect(3011, "force reconnect")
NO_PONG: Final = Disconnect(3012, "no pong")
TOO_MANY_REQUESTS_DISCONNECT: Final = Disconnect(3013, "too many requests")
INVALID_TOKEN: Final = Disconnect(3500, "invalid token")
BAD_REQUEST_DISCONNECT: Final = Disconnect(3501, "bad request")
STALE: Final = Disconnect(3502, "stale")
FORCE_DISCONNECT: Final = Disconnect(3503, "force disconnect")
CONNECTION_LIMIT: Final = Disconnect(3504, "connection limit")
CHANNEL_LIMIT: Final = Disconnect(3505, "channel limit")
PERMISSION_DENIED_DISCONNECT: Final = Disconnect(3507, "permission denied")
MESSAGE_SIZE_LIMIT: Final = Disconnect(1009, "message too big")


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """An unsubscribe push: ``{"code": ..., "reason": ...}`` for one channel."""

    code: int
    reason: str

    @property
    def resubscribe(self) -> bool:
        return self.code >= 2500


UNSUBSCRIBE_SERVER: Final = Unsubscribe(2000, "server unsubscribe")
UNSUBSCRIBE_INSUFFICIENT: Final = Unsubscribe(2500, "insufficient state")
UNSUBSCRIBE_EXPIRED: Final = Unsubscribe(2501, "subscription expired")
