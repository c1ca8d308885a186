"""Pick engines from the config; drivers are imported only when configured."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Final

from server.broker import Broker, PresenceManager
from server.config import Config
from server.store import Store
from server.telemetry_store import TelemetryStore

log = logging.getLogger("squall.engines")

# scheme://user:password@ - the password runs from the user's ':' to the *last* '@'
# before the path ('/', '?' or '#'), as urllib reads it: RFC 3986 wants '@' in a
# password percent-encoded, but redis-py accepts ``redis://:pa@ss@host`` (password
# "pa@ss"), and stopping at the first '@' logged the rest of the password. No host
# parsing: multi-host MongoDB URLs (``mongodb://u:p@h1:27017,h2:27018/db``) are not
# valid for ``urlsplit().port``.
_USERINFO_PASSWORD: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/?#]*):[^/?#]*@")
# redis-py also takes the password as a query option (``redis://h:6379/0?password=p``,
# the usual form for ``unix://`` sockets), so it is hidden there too.
_QUERY_PASSWORD: Final = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Engines:
    broker: Broker
    presence: PresenceManager
    store: Store
    telemetry: TelemetryStore


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``, for logs; never raises."""
    url = _USERINFO_PASSWORD.sub(r"\1:***@", url, count=1)
    return _QUERY_PASSWORD.sub(r"\1***", url)


def preload(config: Config) -> None:
    """Import the modules (and drivers) ``make_engines`` will use for ``config``.

    Call before the event loop starts: importing redis-py or PyMongo takes a
    tenth of a second or more, and done inside the loop it blocks it (asyncio's
    debug mode reports it as a slow callback).
    """
    if config.redis.url:
        import server.broker_redis
    if config.mongodb.url:
        import server.store_mongo
        import server.telemetry_mongo  # noqa: F401

        if config.mongodb.driver == "motor":
            import motor.motor_asyncio  # noqa: F401
        else:
            import pymongo  # noqa: F401


def make_engines(config: Config, *, node_id: str) -> Engines:
    broker: Broker
    presence: PresenceManager
    store: Store
    telemetry: TelemetryStore
    if config.redis.url:
        from server.broker_redis import RedisBroker  # optional engine, imported on demand

        redis_broker = RedisBroker(config.redis, node_id=node_id)
        broker, presence = redis_broker, redis_broker
        log.info("broker: redis %s", redact(config.redis.url))
    else:
        from server.broker_memory import MemoryBroker, MemoryPresenceManager

        broker, presence = MemoryBroker(), MemoryPresenceManager()
        log.info("broker: memory (single process)")
    if config.mongodb.url:
        from server.store_mongo import MongoStore  # optional engine, imported on demand
        from server.telemetry_mongo import MongoTelemetryStore

        store = MongoStore(config.mongodb, node=config.node_name)
        telemetry = MongoTelemetryStore(config.mongodb, config.telemetry)
        log.info(
            "store: mongodb %s database=%s driver=%s",
            redact(config.mongodb.url),
            config.mongodb.database,
            config.mongodb.driver,
        )
    else:
        from server.store_memory import MemoryStore
        from server.telemetry_memory import MemoryTelemetryStore

        store = MemoryStore()
        telemetry = MemoryTelemetryStore(config.telemetry)
        log.info("store: memory (not durable)")
    return Engines(broker, presence, store, telemetry)
