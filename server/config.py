"""Configuration: frozen dataclasses, loaded once from YAML then environment.

Precedence (later wins): dataclass defaults, ``config.yaml``, ``SQUALL_*``
environment variables, command-line flags (applied by ``run.py``). Every value
is validated at load time; a bad one raises ``ConfigError`` whose message
starts with the dotted key, e.g. ``client.max_queue_bytes: expected a positive
integer, got '1MB'``. Unknown keys are errors too, so a typo never silently
falls back to a default.

Durations are float seconds, sizes are integer bytes. ``0`` disables a limit
or feature where the field comment says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

from server.errors import ConfigError

DEFAULT_CONFIG_PATH: Final = Path(__file__).resolve().parent.parent / "config.yaml"
NAMESPACE_RE: Final = re.compile(r"[A-Za-z0-9_.\-]+")  # fullmatch


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelOptions:
    """Rules for one namespace (or for channels without a namespace).

    Every permission defaults to off: a namespace allows only what it says.
    A valid channel token (claim ``channel``) always allows subscribing.
    """

    allow_subscribe_for_client: bool = False  # authenticated users may subscribe
    allow_subscribe_for_anonymous: bool = False  # anonymous connections may subscribe
    private: bool = False  # subscribing needs a channel token, whatever the above say
    allow_publish_for_subscriber: bool = False  # subscribers of the channel may publish
    allow_publish_for_client: bool = False  # any authenticated connection may publish
    allow_publish_for_anonymous: bool = False  # anonymous connections may publish too
    allow_presence_for_subscriber: bool = False  # subscribers may call presence/presence_stats
    allow_presence_for_client: bool = False  # any authenticated connection may
    allow_history_for_subscriber: bool = False  # subscribers may call history
    allow_history_for_client: bool = False  # any authenticated connection may
    presence: bool = False  # keep presence (who is subscribed)
    join_leave: bool = False  # announce joins/leaves to subscribers that ask for them
    force_push_join_leave: bool = False  # send join/leave pushes to every subscriber
    history_size: int = 0  # publications kept per channel; 0 = no history
    history_ttl: float = 0.0  # seconds a channel's history lives after its last publish
    allow_recovery: bool = True  # subscribers may recover missed publications from history
    force_recovery: bool = False  # every subscription is recoverable, even if not asked
    persist: bool = False  # also write publications to the durable store (MongoDB)
    persist_size: int = 0  # durable publications kept per channel; 0 = unlimited
    persist_ttl: float = 0.0  # seconds durable publications are kept; 0 = forever
    publish_own_channel_only: bool = False  # publish only where the name after "ns:" is own user
    subscribe_claim: str = ""  # token claim of globs; a match on the channel's name may subscribe
    telemetry: bool = False  # publications are validated telemetry, stored as buckets (devices)

    @property
    def history_enabled(self) -> bool:
        return self.history_size > 0 and self.history_ttl > 0

    @property
    def recoverable(self) -> bool:
        return self.allow_recovery and (self.history_enabled or self.persist)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"  # listen address; 0.0.0.0 for all interfaces
    port: int = 8000
    name: str = ""  # node name shown in info; empty = host:port
    shutdown_timeout: float = 30.0  # seconds to drain on SIGTERM/SIGINT before exiting
    gc_freeze: bool = True  # freeze start-up objects and raise GC thresholds (latency)
    access_log: bool = True  # every request at INFO; false: only 4xx/5xx (WARNING/ERROR)
    # Take the client's address from X-Real-IP / X-Forwarded-For (and the scheme from
    # X-Scheme / X-Forwarded-Proto): only behind a proxy that sets them, since any
    # client can send them.
    trust_proxy_headers: bool = False
    node_heartbeat_interval: float = 5.0  # seconds between this node's info broadcasts (`info`)
    node_expiry: float = 20.0  # seconds without a heartbeat before a node leaves `info`


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenConfig:
    """Which JWTs are accepted. Only the algorithms of configured keys are allowed."""

    hmac_secret: str = ""  # enables HS256
    rsa_public_key: str = ""  # PEM; enables RS256
    ecdsa_public_key: str = ""  # PEM; enables ES256
    audience: str = ""  # when set, tokens must carry this aud
    issuer: str = ""  # when set, tokens must carry this iss
    leeway: float = 0.0  # seconds of clock skew tolerated for exp/nbf
    cache_size: int = 10_000  # verified connection tokens remembered (LRU); 0 = verify every time


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Limits and timings of one WebSocket connection."""

    allowed_origins: tuple[str, ...] = ()  # browser Origins allowed; "*" = any; same-origin always
    allow_anonymous_connect: bool = False  # connect without token (or with empty sub)
    connect_timeout: float = 10.0  # seconds to send connect before being closed as stale
    ping_interval: float = 25.0  # seconds between server pings; 0 disables
    pong_timeout: float = 8.0  # seconds to answer a ping; 0 = pings but no pong check
    expired_close_delay: float = 25.0  # grace after token exp before 3005 unless refreshed
    max_frame_bytes: int = 64 * 1024  # inbound WebSocket message; bigger -> close 1009
    # Commands in one newline-batched frame. centrifuge-js sends connect and every
    # subscribe in one frame, so this must stay above max_channels (checked).
    max_commands_per_frame: int = 1000
    max_queue_bytes: int = 1024 * 1024  # outbound backlog per connection; over -> 3008 slow
    max_channels: int = 128  # subscriptions per connection
    max_channel_length: int = 255  # characters in a channel name
    command_rate: float = 100.0  # commands per second sustained; 0 = unlimited
    command_burst: int = 200  # commands allowed in a burst above the rate
    write_delay: float = 0.0  # seconds to wait to coalesce outgoing frames; 0 = next loop tick
    flush_share: float = 0.75  # at most this share of time goes to writing frames; 1 = no pacing
    compression: bool = False  # offer permessage-deflate (costs ~47 KiB RAM per connection)
    presence_interval: float = 25.0  # seconds between presence refreshes; below presence_ttl
    presence_ttl: float = 60.0  # seconds a presence entry lives without refresh


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    key: str = ""  # X-API-Key / "Authorization: apikey KEY"; empty disables the API; ASCII
    max_body_bytes: int = 1024 * 1024  # HTTP API request body
    body_timeout: float = 60.0  # seconds a request body may take to arrive (slow senders)


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisConfig:
    url: str = ""  # redis://host:port/db; empty = in-memory broker
    prefix: str = "squall"  # key prefix, to share one Redis between deployments
    socket_timeout: float = 1.0  # seconds to connect or await one reply; ops fail within 2x this
    max_connections: int = 64  # pooled command connections per node; more callers wait their turn
    ping_timeout: float = 1.0  # seconds ping() waits for its probe to come back via pub/sub
    history_meta_ttl: float = 30 * 24 * 3600.0  # seconds epoch+offset outlive the last publish
    idempotency_ttl: float = 300.0  # seconds a publish idempotency key lives without history
    reconnect_delay: float = 0.05  # seconds before the first pub/sub reconnect; doubles per try
    reconnect_max_delay: float = 5.0  # seconds; cap of the jittered reconnect backoff
    pubsub_ping_interval: float = 10.0  # seconds of pub/sub silence before a liveness PING; 0 = off


@dataclass(frozen=True, slots=True, kw_only=True)
class MongoConfig:
    url: str = ""  # mongodb://...; empty = in-memory store
    database: str = "squall"
    driver: str = "pymongo"  # "pymongo" (AsyncMongoClient) or "motor"
    collection: str = "publications"  # collection holding persisted publications
    timeout: float = 5.0  # seconds for server selection, connecting and each operation
    queue_size: int = 100_000  # publications accepted but not yet written; full -> StoreFullError
    batch_size: int = 500  # publications per insert_many
    flush_interval: float = 0.05  # seconds a partial batch waits for more before being written
    max_document_bytes: int = 16 * 1024 * 1024  # BSON size of one publication; over -> rejected
    retry_delay: float = 0.1  # seconds before the first retry of a failed write; doubles per try
    retry_max_delay: float = 5.0  # seconds; cap of the jittered write retry backoff
    ping_interval: float = 5.0  # seconds between health pings while nothing is queued; 0 = off
    retention_interval: float = 1.0  # seconds between background retention (size/ttl) passes
    retention_batch: int = 1000  # per pass: channels trimmed to size, expired documents deleted
    shutdown_flush_timeout: float = 5.0  # seconds close() spends writing what is still queued


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetryConfig:
    """Device telemetry (namespaces with ``telemetry: true``); see README "Telemetry".

    Storage is the telemetry store: MongoDB (``mongodb.url``/``database``/``driver``/
    ``timeout``) when configured, else memory. Rate limits are per device and per node.
    """

    namespace: str = "telemetry"  # where POST /api/telemetry publishes and dashboards read
    max_skew: float = 300.0  # seconds a point's ts may differ from server time (past or future)
    max_points_per_second: float = 100.0  # per device, sustained; over -> frame refused; 0 = off
    max_points_burst: int = 0  # points a device may send at once; 0 = max_points_per_frame
    max_points_per_frame: int = 1000  # points in one publish or POST
    max_metrics_per_point: int = 64  # metrics in one point's values
    bucket_seconds: float = 60.0  # time span of one storage bucket (one document per device)
    retention_days: float = 30.0  # older buckets and silent devices are deleted; 0 = keep all
    retention_interval: float = 60.0  # seconds between retention passes
    online_timeout: float = 30.0  # seconds since last_seen within which a device is "online"
    max_query_steps: int = 2000  # steps one telemetry query may return; more -> 400
    points_collection: str = "telemetry_points"  # MongoDB collection of point chunks
    collection: str = "telemetry_buckets"  # MongoDB collection of bucket summaries
    devices_collection: str = "devices"  # MongoDB collection of devices (last seen/values)
    queue_size: int = 100_000  # points accepted but not yet written; full -> error 1001 / 503
    batch_size: int = 2000  # points per insert (fewer after a write timed out)
    max_device_updates: int = 50  # device upserts per write (fewer after a write timed out)
    device_write_interval: float = 5.0  # seconds between writes of one device's document; 0 = each
    flush_interval: float = 0.2  # seconds a partial batch waits for more before being written


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    channel: ChannelOptions = field(default_factory=ChannelOptions)  # channels without ':'
    namespaces: Mapping[str, ChannelOptions] = field(default_factory=dict)
    redis: RedisConfig = field(default_factory=RedisConfig)
    mongodb: MongoConfig = field(default_factory=MongoConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def channel_options(self, channel: str) -> ChannelOptions | None:
        """Options for a channel, or None if its namespace does not exist.

        A leading ``$`` (a private channel, as in Centrifugo) is not part of the
        namespace: ``$chat:x`` follows namespace ``chat``.
        """
        ns, sep, _ = channel.removeprefix("$").partition(":")
        if not sep:
            return self.channel
        return self.namespaces.get(ns)

    @staticmethod
    def channel_name(channel: str) -> str:
        """The part after ``ns:`` (the whole channel, less a leading ``$``, without one)."""
        ns, sep, name = channel.removeprefix("$").partition(":")
        return name if sep else ns

    @property
    def node_name(self) -> str:
        return self.server.name or f"{self.server.host}:{self.server.port}"


ENV_OVERRIDES: Final[Mapping[str, str]] = {
    "SQUALL_HOST": "server.host",
    "SQUALL_PORT": "server.port",
    "SQUALL_NAME": "server.name",
    "SQUALL_TOKEN_HMAC_SECRET": "token.hmac_secret",
    "SQUALL_TOKEN_RSA_PUBLIC_KEY": "token.rsa_public_key",
    "SQUALL_TOKEN_ECDSA_PUBLIC_KEY": "token.ecdsa_public_key",
    "SQUALL_API_KEY": "api.key",
    "SQUALL_REDIS_URL": "redis.url",
    "SQUALL_MONGODB_URL": "mongodb.url",
    "SQUALL_MONGODB_DATABASE": "mongodb.database",
    "SQUALL_MONGODB_DRIVER": "mongodb.driver",
}


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load and validate the configuration.

    Args:
        path: YAML file; ``None`` means the shipped ``config.yaml``.
        environ: environment to read ``SQUALL_*`` from (default ``os.environ``).
        overrides: dotted keys set last, e.g. ``{"server.port": 8001}``.

    Raises:
        ConfigError: a key is unknown or a value invalid; the message names the key.
    """
    raw: dict[str, Any] = {}
    cfg_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {cfg_path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # Latin-1, or UTF-16 as some editors save
        raise ConfigError(
            f"config file {cfg_path}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        # PyYAML's str() spans several lines (context, a caret under the column):
        # one line here, as for every other configuration error.
        raise ConfigError(f"config file {cfg_path}: invalid YAML: {_yaml_problem(exc)}") from None
    if loaded is not None:
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {cfg_path}: expected a mapping at the top level")
        raw = loaded
    env = os.environ if environ is None else environ
    for var, key in ENV_OVERRIDES.items():
        if var in env:
            _set_dotted(raw, key, env[var], from_text=True)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value, from_text=False)
    return config_from_dict(raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping.

    PyYAML keeps the last one silently: a second ``client:`` section further down
    the file would drop every setting of the first without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *defaults" merges are meant to be overridden
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where (1-based line and column), on one line."""
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return str(problem)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build a validated ``Config`` from plain data (as parsed from YAML)."""
    cfg: Config = _build(Config, raw, "")
    _check(cfg)
    return cfg


# Values that come from environment variables are strings; mark them so the
# type checks parse them instead of rejecting them.
class _Text(str):
    pass


def _set_dotted(raw: dict[str, Any], key: str, value: Any, *, from_text: bool) -> None:
    section, _, name = key.partition(".")
    sub = raw.setdefault(section, {})
    if sub is None:  # an empty YAML section ("server:") means defaults, like a missing one
        sub = raw[section] = {}
    if not isinstance(sub, dict):
        raise ConfigError(f"{section}: expected a mapping")
    sub[name] = _Text(value) if from_text else value


def _build(cls: type[Any], data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key")
    kwargs = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key)
    if tp is bool:
        if isinstance(value, _Text) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, _Text) and value.lower() in ("0", "false", "no", "off", ""):
            return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, _Text):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {str(value)!r}") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}: expected a non-negative integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, _Text):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {str(value)!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{key}: expected a non-negative number of seconds, got {value!r}")
        return _finite(value, key)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if isinstance(value, _Text):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if origin in (Mapping, dict) or (isinstance(origin, type) and issubclass(origin, Mapping)):
        _, vtype = typing.get_args(tp)
        if value is None:
            return types.MappingProxyType({})
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        out = {}
        for name, sub in value.items():
            if not isinstance(name, str):
                # YAML reads an unquoted 2024 as a number, on/no/yes as booleans
                raise ConfigError(
                    f"{key}.{name}: YAML read this name as {type(name).__name__} {name!r}: quote it"
                )
            if not NAMESPACE_RE.fullmatch(name):
                raise ConfigError(f"{key}.{name}: invalid name (letters, digits, _ . -)")
            out[name] = _coerce(vtype, sub, f"{key}.{name}")
        return types.MappingProxyType(out)
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - programming error


def _finite(value: float, key: str) -> float:
    """``value`` as a finite float, for every float setting.

    YAML's ``.nan`` and ``.inf`` (and ``nan``/``inf`` from the environment) are
    floats: NaN passes every ``<``/``<=`` check and breaks requests later (an
    ``int(nan)`` per call), infinity overflows the first ``int()`` at start-up.
    An integer too large for a float overflows too. All refused here, by key.
    """
    try:
        number = float(value)
    except OverflowError:
        raise ConfigError(f"{key}: expected a finite number, got one too large") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return number


MAX_BSON_DOCUMENT_BYTES: Final = 16 * 1024 * 1024  # MongoDB's document size limit


def require_positive(values: Mapping[str, float]) -> None:
    """Raise ``ConfigError`` naming the first dotted key whose value is not above 0."""
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value}")


def check_redis(cfg: RedisConfig) -> None:
    """Values of the ``redis`` section (also checked by ``RedisBroker`` itself)."""
    split = urlsplit(cfg.url)
    if split.scheme in ("redis", "rediss") and not re.fullmatch(r"/?\d*", split.path):
        # redis-py reads "/l" (a typo for /1) or "/1x" as database 0, and "/2/3" as 23:
        # the data would share a database with whatever else uses it.
        raise ConfigError(
            f"redis.url: the path must be a database number (/0, /1, ...), got {split.path!r}"
        )
    require_positive(
        {
            f"redis.{name}": getattr(cfg, name)
            for name in (
                "socket_timeout",
                "ping_timeout",
                "reconnect_delay",
                "reconnect_max_delay",
                "max_connections",
            )
        }
    )


def check_mongo(cfg: MongoConfig) -> None:
    """Values of the ``mongodb`` section (also checked by ``MongoStore`` itself)."""
    require_positive(
        {
            f"mongodb.{name}": getattr(cfg, name)
            for name in (
                "queue_size",
                "batch_size",
                "max_document_bytes",
                "timeout",
                "retention_interval",
                "retention_batch",
                "retry_delay",
            )
        }
    )
    if cfg.max_document_bytes > MAX_BSON_DOCUMENT_BYTES:
        raise ConfigError(
            f"mongodb.max_document_bytes: at most {MAX_BSON_DOCUMENT_BYTES} (the BSON limit), "
            f"got {cfg.max_document_bytes}"
        )
    if not cfg.collection:
        raise ConfigError("mongodb.collection: must not be empty")
    if not cfg.database:
        # Else MongoDB refuses the name only when the store starts (exit 1, "cannot start"),
        # e.g. for SQUALL_MONGODB_DATABASE set to nothing.
        raise ConfigError("mongodb.database: must not be empty")
    if cfg.driver not in ("pymongo", "motor"):
        raise ConfigError(f"mongodb.driver: expected 'pymongo' or 'motor', got {cfg.driver!r}")


def _check(cfg: Config) -> None:
    if not 0 < cfg.server.port < 65536:
        raise ConfigError(f"server.port: expected 1-65535, got {cfg.server.port}")
    if not cfg.server.host:
        # An empty address binds every interface: "host:" left blank, or SQUALL_HOST=
        # set to nothing, must not publish a server meant for 127.0.0.1.
        raise ConfigError("server.host: must not be empty (0.0.0.0 listens on all interfaces)")
    positive = {
        "client.max_frame_bytes": cfg.client.max_frame_bytes,
        "client.max_queue_bytes": cfg.client.max_queue_bytes,
        "client.max_channels": cfg.client.max_channels,
        "client.max_channel_length": cfg.client.max_channel_length,
        "client.max_commands_per_frame": cfg.client.max_commands_per_frame,
        "client.connect_timeout": cfg.client.connect_timeout,
        "client.presence_interval": cfg.client.presence_interval,
        "client.presence_ttl": cfg.client.presence_ttl,
        "server.node_heartbeat_interval": cfg.server.node_heartbeat_interval,
        "server.node_expiry": cfg.server.node_expiry,
        "api.max_body_bytes": cfg.api.max_body_bytes,
        "api.body_timeout": cfg.api.body_timeout,
    }
    require_positive(positive)
    if cfg.server.node_expiry <= cfg.server.node_heartbeat_interval:
        raise ConfigError(
            f"server.node_expiry: must be longer than server.node_heartbeat_interval "
            f"({cfg.server.node_heartbeat_interval}), got {cfg.server.node_expiry}"
        )
    if not 0 < cfg.client.flush_share <= 1:
        raise ConfigError(
            f"client.flush_share: expected more than 0 and at most 1, got {cfg.client.flush_share}"
        )
    if cfg.client.command_rate > 0 and cfg.client.command_burst < 1:
        raise ConfigError("client.command_burst: must be at least 1 when command_rate is set")
    _check_client(cfg.client)
    _check_api_key(cfg.api.key)
    for origin in cfg.client.allowed_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f"client.allowed_origins: {origin!r} is not '*' or scheme://host[:port]"
            )
    _check_hmac_secret(cfg.token.hmac_secret)
    _check_public_key("token.rsa_public_key", cfg.token.rsa_public_key, "RS256")
    _check_public_key("token.ecdsa_public_key", cfg.token.ecdsa_public_key, "ES256")
    check_redis(cfg.redis)
    check_mongo(cfg.mongodb)
    for name, opts in [("channel", cfg.channel)] + [
        (f"namespaces.{n}", o) for n, o in cfg.namespaces.items()
    ]:
        if (opts.history_size > 0) != (opts.history_ttl > 0):
            raise ConfigError(
                f"{name}.history_size: history needs both history_size and history_ttl set"
            )
        if opts.force_recovery and not opts.recoverable:
            raise ConfigError(
                f"{name}.force_recovery: needs history (or persist) and allow_recovery"
            )
        if opts.join_leave and not opts.presence:
            raise ConfigError(f"{name}.join_leave: needs presence: true")
        if opts.force_push_join_leave and not opts.join_leave:
            raise ConfigError(f"{name}.force_push_join_leave: needs join_leave: true")
        if opts.telemetry and opts.persist:
            raise ConfigError(f"{name}.telemetry: telemetry is stored as buckets; drop persist")
        if opts.persist and not opts.history_enabled:
            # offsets come from the broker's history stream; without one nothing is stored
            raise ConfigError(f"{name}.persist: needs history_size and history_ttl set")
        if opts.persist and 0 < opts.persist_ttl < opts.history_ttl:
            # History reads the broker's window too, which keeps a stream's last
            # history_ttl seconds of activity: a shorter persist_ttl would make
            # that window drop what it holds (reads skip what is past persist_ttl).
            raise ConfigError(
                f"{name}.persist_ttl: must be 0 (forever) or at least history_ttl "
                f"({opts.history_ttl:g}s)"
            )
    _check_telemetry(cfg.telemetry)
    tele_ns = cfg.namespaces.get(cfg.telemetry.namespace)
    if tele_ns is not None and not tele_ns.telemetry:
        raise ConfigError(
            f"telemetry.namespace: namespace {cfg.telemetry.namespace!r} needs telemetry: true"
        )


def _check_client(c: ClientConfig) -> None:
    """Limits that depend on each other; each message says what would break."""
    if c.max_commands_per_frame <= c.max_channels:
        # centrifuge-js batches connect and every subscribe into one frame: a client
        # at max_channels would be closed with 3501 (no reconnect) on every connect.
        raise ConfigError(
            f"client.max_commands_per_frame: must be greater than client.max_channels "
            f"({c.max_channels}), since centrifuge-js sends connect and every subscribe "
            f"in one frame, got {c.max_commands_per_frame}"
        )
    if c.presence_interval >= c.presence_ttl:
        # The hub refreshes live subscribers' entries every presence_interval; entries
        # expire presence_ttl after the last refresh, so they would lapse in between.
        raise ConfigError(
            f"client.presence_interval: must be shorter than client.presence_ttl "
            f"({c.presence_ttl}), or presence entries expire between refreshes, "
            f"got {c.presence_interval}"
        )


def _check_api_key(key: str) -> None:
    """The key must be able to match a header: printable ASCII, no outer whitespace.

    Tornado decodes header values as latin-1 and strips them, and the API compares
    the key's UTF-8 bytes: any other key could never authenticate a request.
    """
    if key and not (key.isascii() and key.isprintable() and key == key.strip()):
        raise ConfigError(
            "api.key: must be printable ASCII without leading or trailing spaces "
            "(it is compared with an HTTP header)"
        )


def _check_public_key(key: str, pem: str, alg: str) -> None:
    """Parse a configured PEM now, so a bad key stops start-up instead of every connect."""
    if not pem:
        return
    import jwt  # only needed when an asymmetric key is configured

    try:
        parsed = jwt.get_algorithm_by_name(alg).prepare_key(pem)
    except (jwt.InvalidKeyError, ValueError, TypeError):
        raise ConfigError(f"{key}: not a usable {alg} public key in PEM format") from None
    if hasattr(parsed, "private_numbers"):
        # PyJWT takes a private key here, and RS256 then fails at every verification
        # (an internal error per connect); a server needs only the public half.
        raise ConfigError(
            f"{key}: a private key; give its public key (openssl pkey -pubout) and keep "
            "the private one with the token issuer"
        )


def _check_hmac_secret(secret: str) -> None:
    """A secret PyJWT would refuse at every verification stops start-up instead."""
    if not secret:
        return
    try:
        secret.encode("utf-8")
    except UnicodeEncodeError:  # bytes of no encoding in SQUALL_TOKEN_HMAC_SECRET
        raise ConfigError(
            "token.hmac_secret: not valid UTF-8 text (random bytes? use hex or base64)"
        ) from None
    import jwt

    try:
        jwt.get_algorithm_by_name("HS256").prepare_key(secret)
    except jwt.InvalidKeyError:
        raise ConfigError(
            "token.hmac_secret: looks like a PEM or SSH key, which PyJWT refuses as an "
            "HMAC secret (use a random string; keys go in rsa_public_key/ecdsa_public_key)"
        ) from None


def _check_telemetry(t: TelemetryConfig) -> None:
    positive: dict[str, float] = {
        "telemetry.max_points_per_frame": t.max_points_per_frame,
        "telemetry.max_metrics_per_point": t.max_metrics_per_point,
        "telemetry.bucket_seconds": t.bucket_seconds,
        "telemetry.retention_interval": t.retention_interval,
        "telemetry.online_timeout": t.online_timeout,
        "telemetry.max_query_steps": t.max_query_steps,
        "telemetry.queue_size": t.queue_size,
        "telemetry.batch_size": t.batch_size,
        "telemetry.max_device_updates": t.max_device_updates,
    }
    require_positive(positive)
    if not (t.bucket_seconds * 1000).is_integer():  # also false past the float range
        raise ConfigError(
            f"telemetry.bucket_seconds: must be whole milliseconds, got {t.bucket_seconds}"
        )
    names = {
        "points_collection": t.points_collection,
        "collection": t.collection,
        "devices_collection": t.devices_collection,
    }
    for key, name in names.items():
        if not name:
            raise ConfigError(f"telemetry.{key}: must not be empty")
    if len(set(names.values())) < len(names):
        raise ConfigError(
            "telemetry.points_collection, collection and devices_collection must differ"
        )
