"""``run.py`` as a user runs it: start-up, health, SIGTERM drain, bad config, CLI tokens, env."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import orjson
import pytest
import tornado.websocket
import yaml
from pymongo import MongoClient

import run
from tests.helpers.process import ProcessGroup, SquallProcess, clean_env, http_get, run_cli
from tests.helpers.server import SECRET, RawClient, token
from tests.helpers.services import REPO, free_port

EXIT_DEADLINE = 5.0  # seconds beyond server.shutdown_timeout that an exit may take


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Factory of ``SquallProcess``es; every one still running is stopped at teardown."""
    group = ProcessGroup(tmp_path)
    yield group
    group.close()


async def raw_connect(proc: SquallProcess, **params: object) -> RawClient:
    ws = await tornado.websocket.websocket_connect(proc.ws_url)
    client = RawClient(ws)
    await client.connect(**params)
    return client


def test_run_py_starts_and_is_healthy_and_ready(procs):
    """`python run.py --config X --port N` serves /health and /ready with 200, and exits 0."""
    proc = procs().start()
    proc.wait_ready()
    assert proc.health("/health") == 200
    status, body = http_get(f"{proc.http_url}/ready")
    assert status == 200, body
    assert orjson.loads(body)["ready"] is True
    assert proc.stop(timeout=10) == 0
    assert f"listening on http://127.0.0.1:{proc.port}" in proc.log_text()


async def test_sigterm_closes_clients_with_3001_and_exits_0(procs):
    """On SIGTERM a connected client is closed with 3001 and the process exits 0 in time."""
    proc = procs(overrides={"server.shutdown_timeout": 5}).start()
    await proc.wait_ready_async()
    client = await raw_connect(proc, token=token("alice"))
    reply = await client.command("subscribe", {"channel": "chat:a"})
    assert "subscribe" in reply, reply

    started = time.monotonic()
    proc.terminate()
    try:
        code, reason = await client.closed(within=5)
    finally:
        client.close()
    assert (code, reason) == (3001, "shutdown")
    exit_code = await proc.wait_async(5 + EXIT_DEADLINE)
    assert exit_code == 0, proc.log_tail()
    assert time.monotonic() - started < 5 + EXIT_DEADLINE
    log = proc.log_text()
    assert "shutting down (SIGTERM): 1 connections" in log
    assert "Ctrl-C" not in log  # a supervisor's SIGTERM: no hint meant for a terminal
    assert "stopped" in log


# Runs ``run.main`` (argv[1:]) with a task that swallows every cancellation, started
# once the hub has: ``asyncio.run`` waits for it for ever after ``serve`` returns.
_STUBBORN_TASK = """
import asyncio, sys
import run
from server.hub import Hub

async def stubborn_task():
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass

hub_start = Hub.start
async def start(self):
    await hub_start(self)
    self.stubborn = asyncio.get_running_loop().create_task(stubborn_task())
Hub.start = start
sys.exit(run.main(sys.argv[1:]))
"""


async def test_a_shutdown_that_cannot_finish_is_cut_short_after_the_deadline(procs):
    """A task that ignores its cancellation (a driver's, say) kept the process alive
    for ever after SIGTERM, 'stopped' logged and the port closed: now it exits with
    code 3 five seconds after server.shutdown_timeout, with an ERROR naming the task."""
    proc = procs(overrides={"server.shutdown_timeout": 1})
    assert proc.argv[1].endswith("run.py")
    proc.argv = [sys.executable, "-c", _STUBBORN_TASK, *proc.argv[2:]]
    proc.start()
    await proc.wait_ready_async()
    started = time.monotonic()
    proc.terminate()
    code = await proc.wait_async(1 + run.EXIT_GRACE + EXIT_DEADLINE)
    elapsed = time.monotonic() - started
    log = proc.log_text()
    assert code == run.EXIT_STUCK, log
    assert elapsed >= 1 + run.EXIT_GRACE - 0.5, elapsed  # the drain had its full time
    assert "stopped" in log  # serve() finished; asyncio.run's clean-up did not
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log
    assert "shutdown did not finish" in errors[0]
    assert "stubborn_task" in errors[0]
    assert f"exiting with code {run.EXIT_STUCK}" in errors[0]


async def test_a_second_ctrl_c_during_the_shutdown_exits_at_once(procs):
    """A shutdown that takes its time (here a task that ignores its cancellation, so it
    would run to the watchdog): Ctrl-C starts it and says how to cut it short, a SIGTERM
    then leaves it running, a second Ctrl-C ends the process at once with 130 and a
    WARNING line."""
    proc = procs(overrides={"server.shutdown_timeout": 1})
    proc.argv = [sys.executable, "-c", _STUBBORN_TASK, *proc.argv[2:]]
    proc.start()
    await proc.wait_ready_async()
    proc.signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    while "stopped" not in proc.log_text():
        assert time.monotonic() < deadline, proc.log_tail()
        await asyncio.sleep(0.05)
    assert "shutting down (SIGINT): 0 connections" in proc.log_text()
    assert "Ctrl-C again to exit at once" in proc.log_text()
    proc.terminate()
    while "already shutting down" not in proc.log_text():
        assert time.monotonic() < deadline, proc.log_tail()
        await asyncio.sleep(0.05)
    assert proc.running, proc.log_tail()
    interrupted = time.monotonic()
    proc.signal(signal.SIGINT)
    code = await proc.wait_async(run.EXIT_GRACE)
    log = proc.log_text()
    assert code == run.EXIT_INTERRUPTED, log
    assert time.monotonic() - interrupted < 2, log  # not the watchdog's exit
    assert "interrupted again: exiting now" in log
    assert "shutdown did not finish" not in log
    assert "Traceback" not in log


# Runs ``run.main`` (argv[1:]) with the engine drivers' preload made 30 s long: the
# window before serve() takes SIGINT over, wide enough to hit. SIGINT starts at
# Python's default handler, as for a process started from a terminal: a suite run in
# the background of a non-interactive shell (as CI may run it) hands its children
# SIGINT ignored, and Python then leaves it ignored.
_SLOW_PRELOAD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import run
import server.engines

def slow_preload(config):
    print("preloading", file=sys.stderr, flush=True)
    time.sleep(30)
server.engines.preload = slow_preload
sys.exit(run.main(sys.argv[1:]))
"""


def test_ctrl_c_before_the_server_runs_exits_130_without_a_traceback(procs):
    """Ctrl-C while run.py still imports the server and its drivers printed a
    KeyboardInterrupt traceback: now one line and exit code 130."""
    proc = procs()
    proc.argv = [sys.executable, "-c", _SLOW_PRELOAD, *proc.argv[2:]]
    proc.start()
    deadline = time.monotonic() + 20
    while "preloading" not in proc.log_text():
        assert proc.running, proc.log_tail()
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.01)
    proc.signal(signal.SIGINT)
    code = proc.wait(5)
    log = proc.log_text()
    assert code == run.EXIT_INTERRUPTED, log
    assert "Traceback" not in log
    assert log.rstrip().endswith("squall: interrupted"), log


def test_invalid_config_exits_2_with_one_line_naming_the_key(tmp_path):
    """A config with client.max_queue_bytes: "1MB" makes run.py exit 2 with one line naming it."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"client": {"max_queue_bytes": "1MB"}}), encoding="utf-8")
    result = run_cli(["--config", str(path), "--port", str(free_port())], timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "client.max_queue_bytes" in lines[0]
    assert "1MB" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("telemetry: {bucket_seconds: .inf}\n", {}, "telemetry.bucket_seconds"),
        ("telemetry: {online_timeout: .nan}\n", {}, "telemetry.online_timeout"),
        ("client: {presence_interval: 60, presence_ttl: 60}\n", {}, "client.presence_interval"),
        (
            "client: {max_channels: 100, max_commands_per_frame: 100}\n",
            {},
            "client.max_commands_per_frame",
        ),
        ("api: {key: schlüssel}\n", {}, "api.key"),
        ("", {"SQUALL_API_KEY": "schlüssel"}, "api.key"),
        ("", {"SQUALL_MONGODB_DATABASE": ""}, "mongodb.database"),
    ],
)
def test_unusable_values_exit_2_with_one_line_naming_the_key(tmp_path, text, env, key):
    """Non-finite numbers, presence refreshed no faster than it expires, a per-frame limit
    a full JS connect cannot fit, and an API key no header can match: each stops run.py
    with exit 2 and one line naming the key (not a traceback, not a server that fails
    later)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli(["--config", str(path), "--port", str(free_port())], env=env, timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"squall: invalid configuration: {key}"), lines[0]
    assert "schlüssel" not in lines[0]
    assert result.stdout == ""


def test_no_token_key_is_logged_at_start_up(procs):
    """A config without any token key (one's own --config, where README's quick start
    has the shipped development secret) refuses every token with 3500: the start-up
    log says so, as it does for an empty api.key, instead of nothing at all."""
    proc = procs(overrides={"token.hmac_secret": ""}).start()
    proc.wait_ready()
    assert proc.stop(timeout=10) == 0
    assert "WARNING squall no token key is set" in proc.log_text()
    keyed = procs().start()
    keyed.wait_ready()
    assert keyed.stop(timeout=10) == 0
    assert "no token key is set" not in keyed.log_text()


async def test_token_command_prints_tokens_the_server_accepts(procs):
    """`run.py token --sub alice --ttl 60` (and `--channel`) print JWTs the server accepts."""
    proc = procs().start()
    await proc.wait_ready_async()
    env = {"SQUALL_TOKEN_HMAC_SECRET": SECRET}

    # As in the README: the default config, the secret from the environment.
    result = await asyncio.to_thread(run_cli, ["token", "--sub", "alice", "--ttl", "60"], env=env)
    assert result.returncode == 0, result.stderr
    conn_token = result.stdout.strip()
    assert len(result.stdout.splitlines()) == 1
    claims = jwt.decode(conn_token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert 50 <= claims["exp"] - time.time() <= 61

    # With the server's own config file.
    args = [
        "--config",
        str(proc.config_path),
        "token",
        "--sub",
        "alice",
        "--channel",
        "private:room",
    ]
    result = await asyncio.to_thread(run_cli, args)
    assert result.returncode == 0, result.stderr
    chan_token = result.stdout.strip()

    client = await raw_connect(proc, token=conn_token)
    try:
        reply = await client.command("presence_stats", {"channel": "chat:x"})
        assert reply["error"]["code"] == 103  # connected as alice, not subscribed
        reply = await client.command("subscribe", {"channel": "private:room", "token": chan_token})
        assert "subscribe" in reply, reply
        reply = await client.command("subscribe", {"channel": "private:other", "token": chan_token})
        assert reply["error"]["code"] == 103
    finally:
        client.close()


@pytest.mark.parametrize(
    ("option", "value", "claim"),
    [("--channels", "news, chat:lobby", "channels"), ("--devices", "pump-*, fan-2", "devices")],
)
def test_token_command_lists_ignore_spaces_after_commas(tmp_path, option, value, claim):
    """`--channels 'news, chat:lobby'` subscribes to chat:lobby, as `--devices` already
    took 'pump-*, fan-2': " chat:lobby" named an unknown namespace, and the connect
    reply left it out without a word."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"token": {"hmac_secret": SECRET}}), encoding="utf-8")
    result = run_cli(["--config", str(path), "token", "--sub", "alice", option, value])
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims[claim] == [v.strip() for v in value.split(",")]


def test_token_command_with_a_ttl_under_a_second_is_not_already_expired(tmp_path):
    """`--ttl 0.5` printed a token whose exp (truncated) was already past."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"token": {"hmac_secret": SECRET}}), encoding="utf-8")
    result = run_cli(["--config", str(path), "token", "--sub", "alice", "--ttl", "0.5"])
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])  # not expired
    assert claims["exp"] >= time.time()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ttl", "1e20"], "--ttl: exp would pass"),
        (["--info", "100000000000000000000"], "--info: the server would refuse it"),
    ],
)
def test_token_command_refuses_tokens_the_server_would_refuse(tmp_path, args, message):
    """An exp past 2^63 - 1 or an info integer past 64 bits made a token every connect
    refuses with 3500: one line and exit 2 instead."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"token": {"hmac_secret": SECRET}}), encoding="utf-8")
    result = run_cli(["--config", str(path), "token", "--sub", "alice", *args])
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("squall: " + message), result.stderr
    assert result.stdout == ""


def test_squall_port_env_overrides_the_config_port(procs):
    """SQUALL_PORT wins over server.port from the config file."""
    env_port, file_port = free_port(), free_port()
    proc = procs(
        port=env_port,
        port_flag=False,
        overrides={"server.port": file_port},
        env={"SQUALL_PORT": str(env_port)},
    ).start()
    proc.wait_ready()
    assert proc.health() == 200
    assert http_get(f"http://127.0.0.1:{file_port}/health")[0] is None
    status, body = http_get(f"{proc.http_url}/health")
    assert status == 200
    assert orjson.loads(body)["status"] == "ok"
    assert proc.stop() == 0


def test_engine_that_cannot_start_exits_1_with_one_line_saying_why(tmp_path, mongo_url):
    """A telemetry points collection of the old one-document-per-point layout stops the
    start-up with exit 1 and one line saying what to change, not a traceback."""
    database = f"legacy{int(time.time() * 1000)}"
    client: MongoClient[dict[str, object]] = MongoClient(mongo_url)
    try:
        old = {"_id": "pump-1/1717000020123", "d": "pump-1", "t": 1717000020123, "v": {"p": 1.0}}
        client[database]["telemetry_points"].insert_one(old)
        path = tmp_path / "mongo.yaml"
        path.write_text(
            yaml.safe_dump({"mongodb": {"url": mongo_url, "database": database}}),
            encoding="utf-8",
        )
        result = run_cli(["--config", str(path), "--port", str(free_port())], timeout=60)
    finally:
        client.drop_database(database)
        client.close()
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("squall: cannot start: telemetry store: collection 'telemetry_points'")
    assert "telemetry.points_collection" in last
    assert "Traceback" not in result.stderr


def test_redis_password_in_the_url_query_is_not_logged(procs, redis_url):
    """redis-py takes the password as a query option too (`?password=`, the usual form for
    unix sockets): the start-up line naming the broker hides it as it does `:pw@`."""
    secret = "hunter2-query-secret"
    url = redis_url.split("?")[0] + f"?password={secret}"
    proc = procs(overrides={"redis.url": url}).start()
    proc.wait_ready()
    assert proc.stop(timeout=10) == 0
    text = proc.log_text()
    assert "broker: redis " in text
    assert "password=***" in text
    assert secret not in text


def test_port_in_use_exits_1_with_one_line_saying_why(tmp_path):
    """A listen port that is taken (the commonest start-up mistake) stops run.py with
    exit 1 and one line naming the address, not a traceback."""
    path = tmp_path / "c.yaml"
    path.write_text("", encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["--config", str(path), "--port", str(port)], timeout=20)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"squall: cannot start: cannot listen on 127.0.0.1:{port}: "), last


@pytest.mark.parametrize(
    ("section", "url"),
    [
        ("redis", "http://127.0.0.1:6379"),
        ("mongodb", "http://127.0.0.1:27017"),
        ("mongodb", "mongodb://user:pw@127.0.0.1:27x17"),
    ],
)
def test_engine_url_of_the_wrong_form_exits_2_with_one_line_naming_the_key(tmp_path, section, url):
    """An engine URL its driver cannot parse is a bad configuration value like any other:
    exit 2 and one error line naming the key, before any engine starts (it was a
    traceback and exit 1 for Redis, and "cannot start", exit 1, for MongoDB)."""
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}: {{url: '{url}'}}\n", encoding="utf-8")
    result = run_cli(["--config", str(path), "--port", str(free_port())], timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if " INFO " not in line] == lines[-1:], result.stderr
    assert lines[-1].startswith(f"squall: invalid configuration: {section}.url: "), lines[-1]
    assert "pw" not in result.stderr


# Runs ``run.main`` with ``asyncio.run`` replaced: prints which of the modules
# named in argv[1] (comma-separated) were imported by the time the loop would start.
_IMPORTED_BEFORE_LOOP = """
import asyncio, json, sys
import run
wanted = sys.argv[1].split(",")
def fake_run(coro):
    coro.close()
    print(json.dumps({m: m in sys.modules for m in wanted}))
asyncio.run = fake_run
sys.exit(run.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("yaml_text", "modules"),
    [
        ("redis: {url: 'redis://127.0.0.1:1'}", ["server.app", "server.broker_redis", "redis"]),
        (
            "mongodb: {url: 'mongodb://127.0.0.1:1'}",
            ["server.app", "server.store_mongo", "server.telemetry_mongo", "pymongo"],
        ),
        ("mongodb: {url: 'mongodb://127.0.0.1:1', driver: motor}", ["motor.motor_asyncio"]),
    ],
)
def test_server_and_engine_drivers_are_imported_before_the_event_loop_starts(
    tmp_path, yaml_text, modules
):
    """Imported inside the loop, redis-py or PyMongo (a few tenths of a second) blocked
    it at start-up, and asyncio's debug mode (on in CI) logged a slow callback: the
    one-line errors of a bad engine URL became two lines."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text + "\n", encoding="utf-8")
    args = ["--config", str(path), "--port", str(free_port())]
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTED_BEFORE_LOOP, ",".join(modules), *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert imported == dict.fromkeys(modules, True), result.stderr


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--log-level", "verbose"], "--log-level"),
        (["token", "--sub", "alice", "--ttl", "nan"], "--ttl"),
        (["token", "--sub", "alice", "--ttl", "-60"], "--ttl"),
    ],
)
def test_bad_command_line_values_exit_2(tmp_path, args, option):
    """A mistyped --log-level is refused (it ran at INFO without a word), and a --ttl
    that is not a finite number >= 0 too (nan was a traceback, -60 an expired token)."""
    path = tmp_path / "c.yaml"
    path.write_text("", encoding="utf-8")
    result = run_cli(["--config", str(path), "--port", str(free_port()), *args], timeout=20)
    assert result.returncode == 2, result.stderr
    assert f"error: argument {option}: " in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_the_engines_start_shuts_down_cleanly(procs, sig):
    """Ctrl-C (or SIGTERM) while the engines are still starting (here a Redis that
    accepts connections and never answers: the start waits redis.socket_timeout) is
    the same orderly shutdown as later: exit 0, 'stopped', no traceback. It was a
    KeyboardInterrupt traceback (SIGINT) or an instant kill (SIGTERM) with the engines
    left open, and with MongoDB a SIGINT lost inside the driver left the server running."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        proc = procs(overrides={"redis.url": url, "redis.socket_timeout": 3}).start()
        deadline = time.monotonic() + 20
        while "broker: redis" not in proc.log_text():  # serve() runs: the engines start
            assert proc.running, proc.log_tail()
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.01)
        proc.signal(sig)
        code = proc.wait(3 + EXIT_DEADLINE)
    assert code == 0, proc.log_tail()
    log = proc.log_text()
    assert "stopped" in log
    assert "Traceback" not in log


def test_redis_outage_logs_failing_heartbeats_once(procs):
    """With Redis down, the heartbeat sent every server.node_heartbeat_interval fails
    each time: one warning says so, not one per beat (720 an hour by default)."""
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proc = procs(
        overrides={
            "redis.url": url,
            "server.node_heartbeat_interval": 0.1,
            "server.node_expiry": 1,
        }
    ).start()
    proc.wait_ready()
    time.sleep(1.5)  # about 15 beats, every one failing
    assert proc.stop() == 0
    hub_warnings = [line for line in proc.log_text().splitlines() if " WARNING squall.hub " in line]
    assert len(hub_warnings) == 1, hub_warnings
    assert "node heartbeats failing" in hub_warnings[0]
