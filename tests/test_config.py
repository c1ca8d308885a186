"""``load_config``: defaults, YAML, ``SQUALL_*`` overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.config import (
    DEFAULT_CONFIG_PATH,
    ChannelOptions,
    ClientConfig,
    Config,
    config_from_dict,
    load_config,
)
from server.errors import ConfigError


def public_pem(private_key: Any) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(private_key: Any) -> str:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "squall.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str = "", environ: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), environ=environ or {})


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, environ)
    return str(info.value)


# ---------------------------------------------------------------------- defaults and sources


def test_empty_file_gives_documented_defaults(tmp_path):
    """An empty config file starts Squall with the README's defaults."""
    cfg = load(tmp_path)
    assert cfg.server.host == "127.0.0.1"
    assert cfg.server.port == 8000
    assert cfg.server.shutdown_timeout == 30.0
    assert cfg.client.ping_interval == 25.0
    assert cfg.client.pong_timeout == 8.0
    assert cfg.client.max_frame_bytes == 65536
    assert cfg.client.max_queue_bytes == 1048576
    assert cfg.client.max_channels == 128
    assert cfg.client.max_channel_length == 255
    assert cfg.client.command_rate == 100.0
    assert cfg.client.command_burst == 200
    assert cfg.client.allow_anonymous_connect is False
    assert cfg.client.allowed_origins == ()
    assert cfg.api.key == ""
    assert cfg.api.max_body_bytes == 1048576
    assert cfg.api.body_timeout == 60.0
    assert cfg.redis.url == ""
    assert cfg.mongodb.url == ""
    assert cfg.mongodb.driver == "pymongo"
    assert dict(cfg.namespaces) == {}
    assert cfg.token.hmac_secret == ""


def test_every_channel_permission_defaults_to_off(tmp_path):
    """A namespace allows only what it says: an empty namespace allows nothing."""
    cfg = load(tmp_path, "namespaces:\n  bare: {}\n")
    opts = cfg.namespaces["bare"]
    allows = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    assert not any(v for k, v in allows.items() if k.startswith("allow_") and k != "allow_recovery")
    assert opts.private is False
    assert opts.presence is False
    assert opts.history_enabled is False
    assert opts.recoverable is False


def test_yaml_values_are_loaded(tmp_path):
    """Values from the YAML file replace the defaults, with durations as float seconds."""
    cfg = load(
        tmp_path,
        """
        server: {host: 0.0.0.0, port: 9100, name: node-a}
        token: {hmac_secret: s3cret, audience: app, issuer: auth, leeway: 2}
        client:
          allowed_origins: ["https://app.example.com", "*"]
          ping_interval: 5
          max_queue_bytes: 2000
          allow_anonymous_connect: true
        api: {key: k}
        """,
    )
    assert (cfg.server.host, cfg.server.port, cfg.node_name) == ("0.0.0.0", 9100, "node-a")
    assert cfg.token.audience == "app"
    assert cfg.token.leeway == 2.0
    assert cfg.client.allowed_origins == ("https://app.example.com", "*")
    assert cfg.client.ping_interval == 5.0
    assert isinstance(cfg.client.ping_interval, float)
    assert cfg.client.max_queue_bytes == 2000
    assert cfg.client.allow_anonymous_connect is True
    assert cfg.api.key == "k"


def test_node_name_defaults_to_host_and_port(tmp_path):
    """Without server.name the node is called host:port."""
    assert load(tmp_path, "server: {port: 8123}").node_name == "127.0.0.1:8123"


@pytest.mark.parametrize(
    ("var", "value", "read", "expected"),
    [
        ("SQUALL_PORT", "9001", lambda c: c.server.port, 9001),
        ("SQUALL_HOST", "0.0.0.0", lambda c: c.server.host, "0.0.0.0"),
        ("SQUALL_NAME", "edge-1", lambda c: c.server.name, "edge-1"),
        ("SQUALL_TOKEN_HMAC_SECRET", "from-env", lambda c: c.token.hmac_secret, "from-env"),
        ("SQUALL_API_KEY", "env-key", lambda c: c.api.key, "env-key"),
        (
            "SQUALL_REDIS_URL",
            "redis://127.0.0.1:1/0",
            lambda c: c.redis.url,
            "redis://127.0.0.1:1/0",
        ),
        (
            "SQUALL_MONGODB_URL",
            "mongodb://127.0.0.1:1",
            lambda c: c.mongodb.url,
            "mongodb://127.0.0.1:1",
        ),
        ("SQUALL_MONGODB_DATABASE", "other", lambda c: c.mongodb.database, "other"),
        ("SQUALL_MONGODB_DRIVER", "motor", lambda c: c.mongodb.driver, "motor"),
    ],
)
def test_environment_overrides_yaml(tmp_path, var, value, read, expected):
    """Each documented SQUALL_* variable wins over config.yaml."""
    text = """
        server: {host: 127.0.0.1, port: 8000, name: yaml}
        token: {hmac_secret: yaml}
        api: {key: yaml}
        mongodb: {database: yaml}
        """
    assert read(load(tmp_path, text, {var: value})) == expected


def test_environment_override_into_an_empty_section(tmp_path):
    """``server:`` left empty in YAML still takes SQUALL_PORT from the environment."""
    cfg = load(
        tmp_path, "server:\ntoken:\n", {"SQUALL_PORT": "9002", "SQUALL_TOKEN_HMAC_SECRET": "x"}
    )
    assert cfg.server.port == 9002
    assert cfg.token.hmac_secret == "x"


def test_public_keys_from_environment(tmp_path):
    """PEM public keys come from SQUALL_TOKEN_RSA_PUBLIC_KEY / SQUALL_TOKEN_ECDSA_PUBLIC_KEY."""
    rsa_pem = public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ec_pem = public_pem(ec.generate_private_key(ec.SECP256R1()))
    env = {"SQUALL_TOKEN_RSA_PUBLIC_KEY": rsa_pem, "SQUALL_TOKEN_ECDSA_PUBLIC_KEY": ec_pem}
    cfg = load(tmp_path, "", env)
    assert cfg.token.rsa_public_key == rsa_pem
    assert cfg.token.ecdsa_public_key == ec_pem


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("token.rsa_public_key", "not a pem"),
        ("token.ecdsa_public_key", "not a pem"),
        ("token.rsa_public_key", "EC"),  # an ECDSA key where RSA is expected
        ("token.ecdsa_public_key", "RSA"),
        ("token.ecdsa_public_key", "P-384"),  # ES256 needs the P-256 curve
        # A private key pasted by mistake: PyJWT took it, then RS256 failed every check
        ("token.rsa_public_key", "RSA private"),
        ("token.ecdsa_public_key", "EC private"),
    ],
)
def test_unusable_public_key_is_refused_at_load(tmp_path, key, value):
    """A public key that cannot verify tokens stops start-up, instead of failing every connect."""
    pem = {
        "EC": lambda: public_pem(ec.generate_private_key(ec.SECP256R1())),
        "P-384": lambda: public_pem(ec.generate_private_key(ec.SECP384R1())),
        "RSA": lambda: public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "RSA private": lambda: private_pem(
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ),
        "EC private": lambda: private_pem(ec.generate_private_key(ec.SECP256R1())),
    }.get(value, lambda: value)()
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), environ={}, overrides={key: pem})
    assert str(info.value).startswith(key + ":"), info.value


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("ssh-rsa AAAAB3NzaC1yc2E-my-secret", "looks like a PEM or SSH key"),
        ("-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----", "looks like a PEM"),
        # random bytes in the environment: Python hands them over as lone surrogates
        ("ab\udcff\udcfecd-0123456789abcdef", "not valid UTF-8 text"),
    ],
)
def test_hmac_secret_pyjwt_would_refuse_stops_start_up(tmp_path, secret, message):
    """A secret PyJWT refuses at every verification (it looks like a key, or it is not
    text) started a server where every connect got error 100: now one line at load."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), environ={"SQUALL_TOKEN_HMAC_SECRET": secret})
    assert str(info.value).startswith("token.hmac_secret: " + message), info.value


@pytest.mark.parametrize("path", ["/l", "/1x", "/2/3", "/db"])
def test_redis_url_path_must_be_a_database_number(tmp_path, path):
    """redis-py reads /l (for /1) or /1x as database 0 and /2/3 as 23: refused."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "", {"SQUALL_REDIS_URL": f"redis://127.0.0.1:6379{path}"})
    assert str(info.value).startswith("redis.url: the path must be a database number")


@pytest.mark.parametrize("path", ["", "/", "/0", "/15"])
def test_redis_url_with_a_database_number_or_none_loads(tmp_path, path):
    url = f"redis://127.0.0.1:6379{path}"
    assert load(tmp_path, "", {"SQUALL_REDIS_URL": url}).redis.url == url


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    """A Latin-1 (or UTF-16) file gave a UnicodeDecodeError traceback and exit 1."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("server:\n  name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte \d+\)"):
        load_config(path, environ={})


def test_unrelated_environment_is_ignored(tmp_path):
    """Variables that are not documented overrides change nothing."""
    cfg = load(tmp_path, "", {"SQUALL_CLIENT_MAX_CHANNELS": "1", "PORT": "1"})
    assert cfg.client.max_channels == 128
    assert cfg.server.port == 8000


def test_overrides_win_over_environment(tmp_path):
    """Command-line overrides (dotted keys) win over the environment."""
    cfg = load_config(
        write(tmp_path, "server: {port: 8000}"),
        environ={"SQUALL_PORT": "9001"},
        overrides={"server.port": 9003},
    )
    assert cfg.server.port == 9003


def test_default_path_is_the_shipped_config():
    """Without a path, load_config reads the config.yaml beside run.py."""
    assert DEFAULT_CONFIG_PATH.name == "config.yaml"
    assert load_config(environ={}) == load_config(DEFAULT_CONFIG_PATH, environ={})


# ---------------------------------------------------------------------- the shipped config.yaml


def test_shipped_config_loads_with_chat_namespace_as_documented():
    """The shipped config.yaml defines `chat` exactly as the README describes it."""
    cfg = load_config(DEFAULT_CONFIG_PATH, environ={})
    chat = cfg.namespaces["chat"]
    assert chat.allow_subscribe_for_client
    assert chat.allow_publish_for_subscriber
    assert not chat.allow_publish_for_client
    assert chat.presence
    assert chat.join_leave
    assert chat.history_size == 100
    assert chat.history_ttl == 300.0
    assert chat.allow_recovery
    assert chat.recoverable
    assert cfg.channel_options("chat:lobby") is chat
    assert cfg.channel.allow_subscribe_for_client
    assert cfg.client.allow_anonymous_connect is False
    assert cfg.client.allowed_origins == ()
    assert cfg.server.port == 8000


def test_channel_options_by_namespace(tmp_path):
    """`ns:name` follows namespace ns, a name without ':' the channel section, else None."""
    cfg = load(
        tmp_path,
        "channel: {presence: true}\nnamespaces:\n  chat: {history_size: 1, history_ttl: 1}\n",
    )
    assert cfg.channel_options("news") is cfg.channel
    assert cfg.channel_options("chat:a:b") is cfg.namespaces["chat"]
    assert cfg.channel_options("nope:a") is None
    assert cfg.channel_options(":a") is None


def test_config_is_immutable(tmp_path):
    """Config is frozen: nothing can change it after load."""
    cfg = load(tmp_path, "namespaces:\n  chat: {}\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.namespaces["other"] = cfg.channel  # type: ignore[index]


# ---------------------------------------------------------------------- errors name the key


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("client: {max_queue_bytes: 1MB}", "client.max_queue_bytes"),
        ("client: {max_queue_bytes: -1}", "client.max_queue_bytes"),
        ("client: {max_queue_bytes: 0}", "client.max_queue_bytes"),
        ("client: {max_frame_bytes: 0}", "client.max_frame_bytes"),
        ("client: {max_channels: 2.5}", "client.max_channels"),
        ("client: {max_channels: true}", "client.max_channels"),
        ("client: {max_channel_length: 0}", "client.max_channel_length"),
        ("client: {max_commands_per_frame: 0}", "client.max_commands_per_frame"),
        ("client: {connect_timeout: 0}", "client.connect_timeout"),
        ("client: {ping_interval: fast}", "client.ping_interval"),
        ("client: {pong_timeout: -1}", "client.pong_timeout"),
        ("client: {allow_anonymous_connect: maybe}", "client.allow_anonymous_connect"),
        ("client: {allow_anonymous_connect: 1}", "client.allow_anonymous_connect"),
        ("client: {allowed_origins: '*'}", "client.allowed_origins"),
        ("client: {allowed_origins: [1]}", "client.allowed_origins"),
        ("client: {allowed_origins: ['app.example.com']}", "client.allowed_origins"),
        ("client: {allowed_origins: ['https://a.example/path']}", "client.allowed_origins"),
        ('client: {allowed_origins: ["https://a.example\\n"]}', "client.allowed_origins"),
        ("client: {command_rate: 10, command_burst: 0}", "client.command_burst"),
        ("client: {presence_ttl: 0}", "client.presence_ttl"),
        ("client: {flush_share: 0}", "client.flush_share"),
        ("client: {flush_share: 1.5}", "client.flush_share"),
        ("server: {port: 0}", "server.port"),
        ("server: {port: 70000}", "server.port"),
        ("server: {port: '8000'}", "server.port"),
        ("server: {host: [a]}", "server.host"),
        ("server: {host: }", "server.host"),  # empty would bind every interface
        ("server: {host: ''}", "server.host"),
        ("api: {key: 12345}", "api.key"),
        ("api: {max_body_bytes: 0}", "api.max_body_bytes"),
        ("api: {body_timeout: 0}", "api.body_timeout"),
        ("mongodb: {driver: mongoose}", "mongodb.driver"),
        ("token: {leeway: soon}", "token.leeway"),
        ("client: 5", "client"),
        ("namespaces: [chat]", "namespaces"),
    ],
)
def test_bad_value_raises_config_error_naming_the_key(tmp_path, text, key):
    """A bad value stops start-up with one message that starts with the dotted key."""
    message = config_error(tmp_path, text)
    assert message.startswith(key + ":"), message


def test_bad_value_message_shows_the_value(tmp_path):
    """The message repeats the offending value so the operator can find it."""
    message = config_error(tmp_path, "client: {max_queue_bytes: 1MB}")
    assert "'1MB'" in message


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"SQUALL_PORT": "eighty"}, "server.port"),
        ({"SQUALL_PORT": "70000"}, "server.port"),
        ({"SQUALL_PORT": "-5"}, "server.port"),
        ({"SQUALL_PORT": ""}, "server.port"),
        ({"SQUALL_HOST": ""}, "server.host"),
    ],
)
def test_bad_environment_value_names_the_key(tmp_path, environ, key):
    """A bad SQUALL_* value is reported under the key it overrides."""
    message = config_error(tmp_path, "", environ)
    assert message.startswith(key + ":"), message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("serverr: {}", "serverr"),
        ("client: {max_queue: 10}", "client.max_queue"),
        ("namespaces:\n  chat: {allow_publish: true}", "namespaces.chat.allow_publish"),
        ("channel: {historysize: 1}", "channel.historysize"),
    ],
)
def test_unknown_key_is_an_error(tmp_path, text, key):
    """A typo never silently falls back to a default: the unknown key is named."""
    message = config_error(tmp_path, text)
    assert message == f"{key}: unknown key"


@pytest.mark.parametrize(("name", "read"), [("2024", "int 2024"), ("on", "bool True")])
def test_namespace_name_yaml_reads_as_a_number_or_boolean_says_to_quote_it(tmp_path, name, read):
    """An unquoted 2024 or on is not a string to YAML: 'invalid name' did not say why."""
    message = config_error(tmp_path, f"namespaces:\n  {name}: {{}}\n")
    assert message.endswith(f"YAML read this name as {read}: quote it"), message


@pytest.mark.parametrize("name", ["bad name", "a:b", "ü", "x/y", "news\n"])
def test_invalid_namespace_name(tmp_path, name):
    """Namespace names are letters, digits, _ . - only (':' would make them unreachable)."""
    quoted = name.replace("\n", "\\n")  # a YAML double-quoted escape
    message = config_error(tmp_path, f'namespaces:\n  "{quoted}": {{}}\n')
    assert message.startswith(f"namespaces.{name}:"), message


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ("{history_size: 10}", "namespaces.ns.history_size"),
        ("{history_ttl: 10}", "namespaces.ns.history_size"),
        ("{force_recovery: true}", "namespaces.ns.force_recovery"),
        (
            "{history_size: 10, history_ttl: 10, allow_recovery: false, force_recovery: true}",
            "namespaces.ns.force_recovery",
        ),
        ("{join_leave: true}", "namespaces.ns.join_leave"),
        ("{persist: true}", "namespaces.ns.persist"),
        (
            "{persist: true, history_size: 10, history_ttl: 300, persist_ttl: 60}",
            "namespaces.ns.persist_ttl",
        ),
        ("{history_size: -1, history_ttl: 1}", "namespaces.ns.history_size"),
        ("{presence: yes please}", "namespaces.ns.presence"),
    ],
)
def test_inconsistent_namespace_options(tmp_path, options, key):
    """Options that cannot work together are refused at load, naming the namespace option."""
    message = config_error(tmp_path, f"namespaces:\n  ns: {options}\n")
    assert message.startswith(key + ":"), message


def test_top_level_channel_section_is_validated_too(tmp_path):
    """The `channel` section (channels without a namespace) follows the same rules."""
    message = config_error(tmp_path, "channel: {join_leave: true}")
    assert message.startswith("channel.join_leave:"), message


def test_valid_namespace_combinations_load(tmp_path):
    """History, recovery, presence and persistence load when their requirements are met."""
    cfg = load(
        tmp_path,
        """
        namespaces:
          a-b.c_d:
            presence: true
            join_leave: true
            history_size: 10
            history_ttl: 60
            force_recovery: true
            persist: true
        """,
    )
    opts = cfg.namespaces["a-b.c_d"]
    assert opts.recoverable
    assert opts.force_recovery
    assert opts.persist


def test_missing_file_is_a_config_error(tmp_path):
    """A config path that does not exist is reported as a configuration error."""
    with pytest.raises(ConfigError, match="config file"):
        load_config(tmp_path / "nope.yaml", environ={})


@pytest.mark.parametrize("text", ["server: [", "- a\n- b\n", "just a string"])
def test_unparsable_or_non_mapping_yaml(tmp_path, text):
    """Broken YAML or a top level that is not a mapping is a configuration error."""
    with pytest.raises(ConfigError, match="config file"):
        load(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("server: [\n", "at line 2, column 1"),
        ("a: : b\n", "at line 1, column 4"),
        ("client: {\n  max_channels: 5,\n  max_channels: 6}\n", "at line 3, column 3"),
    ],
)
def test_yaml_errors_are_one_line_saying_where(tmp_path, text, where):
    """A YAML error is one line (run.py prints one line per configuration error) with
    the line and column; PyYAML's own message spans three, a caret under the column."""
    message = config_error(tmp_path, text)
    assert "\n" not in message, message
    assert message.endswith(where), message


def test_a_key_given_twice_is_an_error(tmp_path):
    """A second ``client:`` section would silently drop every setting of the first
    (PyYAML keeps the last): it is refused, naming the key and where it repeats."""
    message = config_error(
        tmp_path,
        """\
        client:
          max_channels: 10
        server:
          port: 8001
        client:
          allowed_origins: ["*"]
        """,
    )
    assert "key 'client' appears twice at line 5, column 1" in message, message


def test_yaml_merge_keys_still_override(tmp_path):
    """``<<: *anchor`` merges are not duplicates: a key set beside one wins."""
    cfg = load(
        tmp_path,
        """\
        namespaces:
          a: &base {allow_subscribe_for_client: true, presence: true}
          b:
            <<: *base
            presence: false
        """,
    )
    assert cfg.namespaces["b"].allow_subscribe_for_client
    assert not cfg.namespaces["b"].presence


def test_config_from_dict_validates_like_load_config():
    """Building from plain data applies the same validation."""
    with pytest.raises(ConfigError, match=r"^client\.max_channels:"):
        config_from_dict({"client": {"max_channels": 0}})
    assert config_from_dict({}).client == ClientConfig()


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("mongodb", "batch_size", 0),
        ("mongodb", "timeout", 0),
        ("redis", "socket_timeout", 0),
        ("redis", "max_connections", 0),
    ],
)
def test_engine_settings_are_checked_when_the_config_loads(section, key, value):
    """A bad Redis or MongoDB setting stops start-up at load (exit 2), not at engine start."""
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: must be greater than 0"):
        config_from_dict({section: {key: value}})


# ---------------------------------------------------------------------- numbers and limits


def float_settings() -> list[str]:
    """Every float setting as a dotted key (namespaces through namespace ``ns``)."""
    keys = []
    for section, tp in typing.get_type_hints(Config).items():
        if section == "namespaces":
            tp, section = ChannelOptions, "namespaces.ns"
        keys += [f"{section}.{name}" for name, t in typing.get_type_hints(tp).items() if t is float]
    return keys


FLOAT_SETTINGS = float_settings()


def test_float_settings_are_all_found():
    """The generic checks below cover durations of every section (the list is not empty)."""
    for key in (
        "telemetry.online_timeout",
        "telemetry.bucket_seconds",
        "client.presence_interval",
        "namespaces.ns.history_ttl",
    ):
        assert key in FLOAT_SETTINGS
    assert len(FLOAT_SETTINGS) > 30


@pytest.mark.parametrize("key", FLOAT_SETTINGS)
@pytest.mark.parametrize("text", [".nan", ".inf", ".NaN", ".Inf"])
def test_non_finite_number_is_refused_for_every_float_setting(tmp_path, key, text):
    """YAML's .nan/.inf stop start-up with one message naming the key, for every float
    setting (NaN used to load and break requests later, .inf to crash start-up)."""
    *parents, name = key.split(".")
    yaml_text = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents))
    yaml_text += f"{'  ' * len(parents)}{name}: {text}\n"
    message = config_error(tmp_path, yaml_text)
    assert message.startswith(key + ": expected a finite number, got "), message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 10**400])
def test_non_finite_or_overflowing_number_is_refused_from_plain_data(value):
    """Overrides and config_from_dict get the same check; an integer too big for a float
    is refused too, instead of an OverflowError."""
    with pytest.raises(ConfigError, match=r"^telemetry\.bucket_seconds: expected a finite"):
        config_from_dict({"telemetry": {"bucket_seconds": value}})


def test_huge_bucket_seconds_is_a_config_error_not_a_crash():
    """A finite bucket_seconds whose milliseconds overflow is refused, not a traceback."""
    with pytest.raises(ConfigError, match=r"^telemetry\.bucket_seconds:"):
        config_from_dict({"telemetry": {"bucket_seconds": 1e306}})


@pytest.mark.parametrize(
    ("client", "message"),
    [
        ({"presence_interval": 0}, "client.presence_interval: must be greater than 0"),
        ({"presence_interval": 60}, "client.presence_interval: must be shorter than"),
        ({"presence_interval": 90}, "client.presence_interval: must be shorter than"),
        ({"presence_ttl": 20}, "client.presence_interval: must be shorter than"),
    ],
)
def test_presence_interval_must_be_positive_and_shorter_than_ttl(client, message):
    """Live subscribers' presence entries are refreshed every presence_interval and expire
    presence_ttl after the last refresh: an interval of 0 (no refresh) or not below the
    ttl would make them vanish while the clients are still subscribed."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"client": client})
    assert str(info.value).startswith(message), info.value
    assert "\n" not in str(info.value)


def test_presence_interval_below_ttl_loads():
    cfg = config_from_dict({"client": {"presence_interval": 5, "presence_ttl": 5.5}})
    assert (cfg.client.presence_interval, cfg.client.presence_ttl) == (5.0, 5.5)


def test_default_commands_per_frame_fit_a_full_centrifuge_js_connect():
    """centrifuge-js sends connect and every subscribe in one frame: by default a client
    with max_channels subscriptions is far from the per-frame limit."""
    client = config_from_dict({}).client
    assert client.max_commands_per_frame == 1000
    assert client.max_commands_per_frame > client.max_channels + 1


@pytest.mark.parametrize(
    "client",
    [
        {"max_commands_per_frame": 100},  # the old default, below max_channels 128
        {"max_commands_per_frame": 128},
        {"max_channels": 1000},
        {"max_channels": 5000, "max_commands_per_frame": 4000},
    ],
)
def test_commands_per_frame_must_exceed_max_channels(client):
    """A per-frame limit at or below max_channels would close such a JS client with 3501 on
    every connect: refused at load, with one line saying why."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"client": client})
    message = str(info.value)
    assert message.startswith("client.max_commands_per_frame: must be greater than"), message
    assert "client.max_channels" in message
    assert "centrifuge-js" in message
    assert "\n" not in message


def test_commands_per_frame_above_max_channels_loads():
    cfg = config_from_dict({"client": {"max_channels": 2000, "max_commands_per_frame": 2001}})
    assert (cfg.client.max_channels, cfg.client.max_commands_per_frame) == (2000, 2001)


@pytest.mark.parametrize(
    "key", ["schlüssel", "ключ", "key\u00a0x", "key\tx", " key", "key ", "key\n", "\u2003"]
)
def test_api_key_that_no_header_can_match_is_refused(tmp_path, key):
    """Tornado reads header values as latin-1 and strips them, the API compares UTF-8: a
    non-ASCII key (or one with outer spaces or control characters) could never match.
    Refused at load (from YAML or SQUALL_API_KEY), naming the setting but not showing it."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"api": {"key": key}})
    message = config_error(tmp_path, "", {"SQUALL_API_KEY": key})
    assert message == str(info.value)
    assert message.startswith("api.key: must be printable ASCII"), message
    assert repr(key) not in message
    assert "\n" not in message


@pytest.mark.parametrize("key", ["k", "a b", "!#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~"])
def test_printable_ascii_api_keys_load(key):
    assert config_from_dict({"api": {"key": key}}).api.key == key
