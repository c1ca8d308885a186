"""Squall's exception tree.

::

    SquallError
    ├── ConfigError          a bad config value; names the dotted key
    ├── ClientError          one command failed: becomes an ``error`` reply
    ├── DisconnectError      the connection must end with a ``Disconnect`` code
    └── EngineError          a broker or store failed (connection lost, timeout)
        ├── StoreFullError   the durable write queue is full; retry later
        └── StoreRejectedError  the store can never keep this publication (too
                             large, unencodable); retrying will not help

Driver exceptions (redis-py, PyMongo) are mapped to ``EngineError`` at the
engine boundary, so the hub and handlers never import a driver.
"""

from __future__ import annotations

from server import codes


class SquallError(Exception):
    """Root of every exception Squall raises on purpose."""


class ConfigError(SquallError):
    """Invalid configuration. The message starts with the dotted key."""


class ClientError(SquallError):
    """A command failed with a client error code; the connection stays open."""

    def __init__(self, error: codes.ErrorCode, message: str | None = None) -> None:
        super().__init__(message or error.message)
        self.error = error
        self.message = message or error.message

    def to_dict(self) -> dict[str, object]:
        return self.error.to_dict(self.message)


class DisconnectError(SquallError):
    """The connection must be closed with this disconnect code."""

    def __init__(self, disconnect: codes.Disconnect, detail: str = "") -> None:
        super().__init__(f"{disconnect.code} {disconnect.reason}{': ' + detail if detail else ''}")
        self.disconnect = disconnect
        self.detail = detail


class EngineError(SquallError):
    """A broker or store operation failed (unreachable, timed out, rejected)."""


class StreamMissing(EngineError):
    """A publish with ``require_stream`` found no stream position: nothing was published."""


class StoreFullError(EngineError):
    """The durable write-behind queue is full; the publish was not accepted."""


class StoreRejectedError(EngineError):
    """The store refuses this publication for good (too large or not encodable).

    Not an outage: the same publication would be refused again. The hub maps it
    to client error 107 (bad request) with this message.
    """
