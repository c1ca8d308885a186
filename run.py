#!/usr/bin/env python3
"""Squall command line.

    python run.py [--config PATH] [--host H] [--port N] [--log-level LEVEL]
    python run.py token --sub USER [--ttl SECONDS] [--channel CH] [--info JSON] [--channels A,B]
                        [--device] [--devices 'GLOB[,GLOB]']

Exit codes: 0 after a clean shutdown, 1 when an engine cannot start or the listen
address cannot be bound (a line on stderr says why), 2 for invalid configuration or
arguments, 3 when a shutdown did not finish: the process was still running
``EXIT_GRACE`` seconds after ``server.shutdown_timeout`` and ended itself (an ERROR
line names what was still running), 130 when interrupted (Ctrl-C) before the server
runs, or again during its shutdown (the first Ctrl-C, like SIGTERM, starts an orderly
shutdown; a second one ends the process at once; a repeated SIGTERM does not).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any

from server import codes
from server.config import Config, load_config
from server.errors import ConfigError, EngineError

log = logging.getLogger("squall")

DEV_SECRET = "squall-development-secret-change-me-please"  # noqa: S105 - detected and warned about
DEV_API_KEY = "squall-development-api-key-change-me"
LISTEN_BACKLOG = 4096
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EXIT_GRACE = 5.0  # seconds past server.shutdown_timeout before a stuck shutdown is cut short
EXIT_STUCK = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def log_level(text: str) -> str:
    """A ``--log-level`` value, case-insensitive; a typo is refused, not run at INFO."""
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def seconds(text: str) -> float:
    """A ``--ttl``: finite and not negative (``nan`` crashed signing, ``-5`` made an
    already expired token)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Squall realtime hub")
    parser.add_argument("--config", help="YAML config file (default: config.yaml beside run.py)")
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument("--name", help="node name shown in info (overrides server.name)")
    parser.add_argument(
        "--log-level", type=log_level, default="INFO", help="DEBUG, INFO, WARNING, ERROR"
    )
    sub = parser.add_subparsers(dest="command")
    tok = sub.add_parser("token", help="print a JWT signed with token.hmac_secret")
    tok.add_argument("--sub", required=True, help="user id (claim sub); '' for anonymous")
    tok.add_argument("--ttl", type=seconds, default=3600, help="seconds until exp; 0 = no exp")
    tok.add_argument("--channel", help="make a channel token for this channel")
    tok.add_argument("--info", help="JSON for the info claim")
    tok.add_argument("--channels", help="comma-separated server-side subscriptions (claim)")
    tok.add_argument(
        "--device", action="store_true", help='a telemetry device token (claim "device": true)'
    )
    tok.add_argument("--devices", help="comma-separated device-id globs a dashboard may read")
    return parser.parse_args(argv)


class OneLineFormatter(logging.Formatter):
    """One message, one line: messages carry clients' strings (channel names, token
    errors), and a newline in one would make the rest look like a log line of its
    own (a forged ERROR, say). A traceback, added after the message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before serve() takes SIGINT over (the imports and engine drivers
        # loaded first take a few tenths of a second): one line, not a traceback.
        print("squall: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=getattr(logging, args.log_level), handlers=[handler])
    overrides: dict[str, Any] = {}
    if args.host:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.name:
        overrides["server.name"] = args.name
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"squall: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "token":
        return print_token(config, args)
    # Import the server and its engines' drivers before the loop runs: inside it, the
    # imports (a few tenths of a second with redis-py or PyMongo) block the loop.
    import server.app  # noqa: F401
    from server.engines import preload

    preload(config)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # a value only an engine can check (e.g. a bad redis.url)
        print(f"squall: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:  # an engine refused to start (e.g. MongoDB unreachable)
        print(f"squall: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def arm_exit_watchdog(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    """End the process if it is still running ``EXIT_GRACE`` seconds after ``deadline``
    (``time.monotonic()`` seconds), the end of its shutdown.

    The drain and the engines' close are bounded by ``server.shutdown_timeout``;
    after them ``asyncio.run`` cancels the tasks still running and waits for them
    and for the default executor's threads, with no limit. A task that ignores its
    cancellation (a third-party driver's, say) or a thread stuck in a system call
    would keep the process from exiting until something SIGKILLs it. This timer
    thread then logs what is still running and exits with ``EXIT_STUCK``. A thread,
    so that a blocked event loop cannot hold it up either; a daemon never cancelled,
    so that it also covers the interpreter's exit, which joins worker threads
    (Motor's among them).
    """
    delay = max(0.0, deadline - time.monotonic()) + EXIT_GRACE

    def fire() -> None:
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        except RuntimeError:  # the loop's task set changed under us too often
            tasks = []
        names = sorted({_task_name(t) for t in tasks})
        log.error(
            "shutdown did not finish %.0fs after it began (%d tasks still running%s): "
            "exiting with code %d",
            delay,
            len(tasks),
            f": {', '.join(names[:10])}" if names else "",
            EXIT_STUCK,
        )
        logging.shutdown()  # flush the handlers: os._exit skips every cleanup
        os._exit(EXIT_STUCK)

    timer = threading.Timer(delay, fire)
    timer.daemon = True
    timer.name = "squall-exit-watchdog"
    timer.start()


def force_exit(hub: Any) -> None:
    """A second Ctrl-C during a shutdown: exit at once with ``EXIT_INTERRUPTED``,
    saying what the unfinished shutdown would still have written."""
    lost = ""
    try:
        publications = hub.store.status().queue_depth if hub else 0
        points = hub.telemetry.status().queue_depth if hub else 0
    except Exception:  # exit whatever the engines' state
        log.exception("could not count what is still queued")
        publications = points = 0
    if publications or points:
        lost = (
            f"; not written to the stores: {publications} publications, {points} telemetry points"
        )
    log.warning("interrupted again: exiting now, without finishing the shutdown%s", lost)
    logging.shutdown()  # flush the handlers: os._exit skips every cleanup
    os._exit(EXIT_INTERRUPTED)


def _task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or task.get_name()


def print_token(config: Config, args: argparse.Namespace) -> int:
    import orjson

    from server.auth import MAX_EXP, make_token

    if not config.token.hmac_secret:
        print("squall: token.hmac_secret is not set", file=sys.stderr)
        return 2
    if args.ttl and time.time() + args.ttl > MAX_EXP:
        print(f"squall: --ttl: exp would pass {MAX_EXP} (2^63 - 1)", file=sys.stderr)
        return 2
    extra: dict[str, Any] = {}
    if args.info:
        try:
            extra["info"] = json.loads(args.info)
        except ValueError:
            print("squall: --info must be JSON", file=sys.stderr)
            return 2
        try:  # what the server can send on: no integer past 64 bits, no deep nesting
            orjson.dumps(extra["info"])
        except orjson.JSONEncodeError as exc:
            print(f"squall: --info: the server would refuse it: {exc}", file=sys.stderr)
            return 2
    if args.channels:
        # Spaces after commas are dropped, as for --devices: " chat:lobby" would name
        # the unknown namespace " chat", and the server-side subscription be skipped.
        extra["channels"] = [c.strip() for c in args.channels.split(",") if c.strip()]
    if args.device:
        extra["device"] = True
    if args.devices:
        extra["devices"] = [g.strip() for g in args.devices.split(",") if g.strip()]
    print(
        make_token(
            config.token.hmac_secret, args.sub, ttl=args.ttl, channel=args.channel, extra=extra
        )
    )
    return 0


async def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT, then drain within ``server.shutdown_timeout`` (and
    exit at most ``EXIT_GRACE`` seconds after it, see ``arm_exit_watchdog``)."""
    from tornado.netutil import bind_sockets

    from server.app import make_app, make_server
    from server.engines import make_engines

    # Signals first: one that arrives while the engines start (MongoDB, Redis) asks
    # for the same orderly shutdown once they have started. Before, asyncio's own
    # SIGINT handler cancelled the start-up (a traceback, stores left open, or the
    # cancellation lost inside a driver and the server running on), and SIGTERM
    # killed the process outright.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    queued: list[Any] = []  # the hub, once made: what a forced exit would lose
    first: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            first.append(sig)
            stop.set()
        elif sig == signal.SIGINT:
            force_exit(queued[0] if queued else None)
        else:  # a supervisor repeating SIGTERM must not cost what is still queued
            log.info("%s during the shutdown: already shutting down", sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    # Bind before any engine starts: a port in use (or a host that does not resolve)
    # is one line and exit 1, with no store opened and left unclosed (a MongoDB
    # writer marker left open reads as a crash at the next start).
    try:
        sockets = bind_sockets(
            config.server.port, address=config.server.host, backlog=LISTEN_BACKLOG
        )
    except OSError as exc:
        raise EngineError(
            f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror or exc}"
        ) from None
    node_id = uuid.uuid4().hex
    engines = make_engines(config, node_id=node_id)
    app, hub = make_app(config, engines, node_id=node_id)
    queued.append(hub)
    if config.token.hmac_secret == DEV_SECRET:
        log.warning("token.hmac_secret is the development default: set SQUALL_TOKEN_HMAC_SECRET")
    if config.api.key == DEV_API_KEY:
        log.warning("api.key is the development default: set SQUALL_API_KEY")
    if not config.api.key:
        log.warning("api.key is empty: the server API refuses every request")
    token = config.token
    if not (token.hmac_secret or token.rsa_public_key or token.ecdsa_public_key):
        # Every connect with a token then ends in 3500 with nothing in the log to say
        # why: a config of one's own (--config) has no development secret to fall back on.
        log.warning(
            "no token key is set (token.hmac_secret, rsa_public_key, ecdsa_public_key): "
            "every token is refused"
        )
    await hub.start()
    server = make_server(app, config)
    # A deep accept backlog (bind_sockets above): reconnect storms (every client of a
    # stopped node at once) must not overflow it. The kernel caps it at
    # net.core.somaxconn.
    server.add_sockets(sockets)
    log.info(
        "listening on http://%s:%d (websocket /connection/websocket, api /api/<method>) node=%s",
        config.server.host,
        config.server.port,
        config.node_name,
    )
    if config.server.gc_freeze:
        # Start-up objects never die: keep them out of the cyclic GC's scans, and
        # collect less often; GC pauses were most of the fan-out latency tail.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)

    await stop.wait()

    deadline = time.monotonic() + config.server.shutdown_timeout
    arm_exit_watchdog(loop, deadline)
    log.info(
        "shutting down (%s): %d connections, deadline %.0fs%s",
        first[0].name if first else "stop",
        len(hub.clients),
        config.server.shutdown_timeout,
        "; Ctrl-C again to exit at once" if first and first[0] == signal.SIGINT else "",
    )
    hub.closing = True
    server.stop()
    hub.disconnect_all(codes.SHUTDOWN)
    try:
        await asyncio.wait_for(hub.wait_drained(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        log.warning("%d clients still connected at the shutdown deadline", len(hub.clients))
    try:
        # A server API request being answered (a publish perhaps already delivered)
        # gets its reply before its connection is closed.
        await asyncio.wait_for(hub.wait_api_idle(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        log.warning("%d server API requests unanswered at the shutdown deadline", hub.api_requests)
    try:
        await asyncio.wait_for(
            server.close_all_connections(), max(0.1, deadline - time.monotonic())
        )
    except TimeoutError:
        log.warning("some HTTP connections did not close before the deadline")
    try:
        await asyncio.wait_for(hub.close(), max(0.5, deadline - time.monotonic()))
    except TimeoutError:
        # The store's close, cut off here, would have said how many it could not write.
        log.error(
            "engines did not close before the shutdown deadline; %d accepted publications "
            "not written to the durable store",
            hub.store.status().queue_depth,
        )
    log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
