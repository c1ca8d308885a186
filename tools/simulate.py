"""Telemetry simulator: N devices pushing realistic points to a running Squall.

    python -m tools.simulate --url http://127.0.0.1:8000 --devices 10 --hz 5 \\
        [--duration 60] [--transport ws|http] [--batch 1] \\
        [--secret S | --token-cmd '.venv/bin/python run.py token --sub {device} --device'] \\
        [--config config.yaml] [--prefix sim-] [--bad-rate 0.01] [--gap-rate 0.002] [--seed N]

Each device sends ``--hz`` points per second (``--batch`` points per frame)
with four metrics, each a sine wave plus noise: ``temperature`` (°C),
``humidity`` (%), ``voltage`` (V, slowly draining) and ``signal.rssi`` (dBm).
Now and then a device falls silent for a few seconds (``--gap-rate`` per
tick) and now and then a point is bad on purpose (``--bad-rate``: a string
value, a boolean, a bad metric name, a ts far in the future, empty values),
so the server's rejections show up in the summary.

Transports: ``ws`` publishes to ``telemetry:<device>`` with centrifuge-python
(one connection per device); ``http`` posts to ``/api/telemetry``.

Tokens: device tokens (claim ``"device": true``) are minted with the HMAC
secret from ``--secret``, else from the config (``--config``, else
``$SQUALL_CONFIG``, else the shipped ``config.yaml``; ``SQUALL_TOKEN_HMAC_SECRET``
overrides it as for ``run.py``). ``--token-cmd`` instead runs a command per
device (``{device}`` is replaced) and uses its output.

Runs for ``--duration`` seconds (until Ctrl-C / SIGTERM without it), then
prints a summary line and, last, the same summary as one JSON object.
Exit code 0, or 1 when a connection or request failed outright (refused
points and rate limits are expected outcomes, not failures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from server.errors import SquallError

NAMESPACE: Final = "telemetry"
TOKEN_TTL: Final = 24 * 3600.0  # seconds minted device tokens live
BAD_KINDS: Final = ("string", "boolean", "metric_name", "future_ts", "empty")

log = logging.getLogger("squall.simulate")


@dataclass
class Options:
    url: str
    devices: int = 1
    hz: float = 1.0
    duration: float | None = None
    transport: str = "ws"
    batch: int = 1
    secret: str = ""
    token_cmd: str = ""
    config: str = ""
    prefix: str = "sim-"
    bad_rate: float = 0.01
    gap_rate: float = 0.002
    seed: int | None = None


@dataclass
class Summary:
    transport: str
    devices: int
    seconds: float = 0.0
    frames: int = 0
    frames_ok: int = 0
    frames_refused: int = 0  # every point invalid (107 / HTTP 400)
    rate_limited: int = 0  # 111 / HTTP 429
    errors: int = 0  # anything else: connection lost, 5xx, timeouts
    points_sent: int = 0
    points_accepted: int = 0  # exact over HTTP; sent minus bad ones over WebSocket
    points_rejected: int = 0
    bad_points_sent: int = 0
    gaps: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:200])


class SimDevice:
    """One device: its own phases and drift, so devices do not move in lockstep."""

    def __init__(self, device_id: str, rng: random.Random) -> None:
        self.id = device_id
        self.rng = rng
        self.phase = rng.uniform(0, 2 * math.pi)
        self.temp_base = rng.uniform(18.0, 24.0)
        self.hum_base = rng.uniform(35.0, 55.0)
        self.rssi_base = rng.uniform(-75.0, -55.0)
        self.silent_until = 0.0

    def values(self, t: float, elapsed: float) -> dict[str, float]:
        rng, ph = self.rng, self.phase
        return {
            "temperature": round(
                self.temp_base + 3 * math.sin(2 * math.pi * t / 120 + ph) + rng.gauss(0, 0.15), 3
            ),
            "humidity": round(
                self.hum_base + 8 * math.sin(2 * math.pi * t / 300 + ph) + rng.gauss(0, 0.4), 2
            ),
            "voltage": round(
                3.9
                - 0.0002 * elapsed
                + 0.05 * math.sin(2 * math.pi * t / 600 + ph)
                + rng.gauss(0, 0.005),
                4,
            ),
            "signal.rssi": round(
                self.rssi_base + 4 * math.sin(2 * math.pi * t / 45 + ph) + rng.gauss(0, 1.5), 1
            ),
        }

    def point(self, now: float, elapsed: float) -> dict[str, Any]:
        return {"ts": int(now * 1000), "values": self.values(now, elapsed)}

    def bad_point(self, now: float, elapsed: float) -> dict[str, Any]:
        kind = self.rng.choice(BAD_KINDS)
        point = self.point(now, elapsed)
        if kind == "string":
            point["values"]["temperature"] = "hot"
        elif kind == "boolean":
            point["values"]["voltage"] = True
        elif kind == "metric_name":
            point["values"]["bad metric!"] = 1.0
        elif kind == "future_ts":
            point["ts"] = int((now + 86_400) * 1000)
        else:
            point["values"] = {}
        return point


def http_to_ws(url: str) -> str:
    parts = urlsplit(url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, "/connection/websocket", "", ""))


def token_factory(opts: Options) -> Callable[[str], str]:
    """A function minting (or fetching) the token of one device."""
    if opts.token_cmd:
        template = opts.token_cmd

        def from_command(device: str) -> str:
            argv = shlex.split(template.replace("{device}", device))
            out = subprocess.run(  # noqa: S603 - the operator's own command
                argv, capture_output=True, text=True, timeout=30, check=True
            )
            return out.stdout.strip()

        return from_command
    secret = opts.secret
    if not secret:
        from server.config import load_config

        config = load_config(opts.config or os.environ.get("SQUALL_CONFIG") or None)
        secret = config.token.hmac_secret
    if not secret:
        raise SystemExit("simulate: no token secret (--secret, token.hmac_secret, --token-cmd)")
    from server.auth import make_token

    return lambda device: make_token(secret, device, ttl=TOKEN_TTL, extra={"device": True})


class Runner:
    def __init__(self, opts: Options, summary: Summary, stop: asyncio.Event) -> None:
        self.opts = opts
        self.summary = summary
        self.stop = stop
        self.started = time.monotonic()

    def frame(self, dev: SimDevice) -> tuple[list[dict[str, Any]], int] | None:
        """The next frame of ``dev`` and how many bad points it holds; None while silent."""
        now_mono = time.monotonic()
        if now_mono < dev.silent_until:
            return None
        if dev.rng.random() < self.opts.gap_rate:
            dev.silent_until = now_mono + dev.rng.uniform(2.0, 5.0)
            self.summary.gaps += 1
            return None
        elapsed = now_mono - self.started
        now = time.time()
        spacing = 1.0 / self.opts.hz
        points, bad = [], 0
        for i in range(self.opts.batch):
            t = now - (self.opts.batch - 1 - i) * spacing
            if dev.rng.random() < self.opts.bad_rate:
                points.append(dev.bad_point(t, elapsed))
                bad += 1
            else:
                points.append(dev.point(t, elapsed))
        return points, bad

    async def ticks(self, dev: SimDevice, send: Callable[[Any, int, int], Any]) -> None:
        """Call ``send(frame, n_points, n_bad)`` every ``batch / hz`` seconds until stopped."""
        interval = self.opts.batch / self.opts.hz
        loop = asyncio.get_running_loop()
        next_at = loop.time() + dev.rng.uniform(0, interval)  # spread devices over the interval
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_at - loop.time())):
                    await self.stop.wait()  # the pacing of a generator, not a sync point
            if self.stop.is_set():
                return
            next_at += interval
            made = self.frame(dev)
            if made is None:
                continue
            points, bad = made
            s = self.summary
            s.frames += 1
            s.points_sent += len(points)
            s.bad_points_sent += bad
            await send(points if len(points) > 1 else points[0], len(points), bad)


async def run_ws(
    opts: Options, runner: Runner, devices: list[SimDevice], tokens: list[str]
) -> None:
    from centrifuge import Client, ReplyError  # type: ignore[import-untyped]  # no stubs

    s = runner.summary
    clients = [Client(http_to_ws(opts.url), token=tok, timeout=5.0) for tok in tokens]

    async def one(dev: SimDevice, client: Client) -> None:
        channel = f"{NAMESPACE}:{dev.id}"

        async def send(frame: Any, n: int, bad: int) -> None:
            try:
                await client.publish(channel, frame)
            except ReplyError as exc:
                if exc.code == 107:
                    s.frames_refused += 1
                    s.points_rejected += n
                elif exc.code == 111:
                    s.rate_limited += 1
                else:
                    s.error(f"publish {dev.id}: {exc}")
                return
            except Exception as exc:  # timeouts, lost connection: counted, the device goes on
                s.error(f"publish {dev.id}: {type(exc).__name__}: {exc}")
                return
            s.frames_ok += 1
            s.points_accepted += n - bad
            s.points_rejected += bad

        try:
            await client.connect()
            await client.ready(timeout=10.0)
        except Exception as exc:
            s.error(f"connect {dev.id}: {type(exc).__name__}: {exc}")
            return
        await runner.ticks(dev, send)

    try:
        await asyncio.gather(*(one(d, c) for d, c in zip(devices, clients, strict=True)))
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()


async def run_http(
    opts: Options, runner: Runner, devices: list[SimDevice], tokens: list[str]
) -> None:
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    s = runner.summary
    http = AsyncHTTPClient(force_instance=True, max_clients=max(10, min(len(devices), 200)))
    url = opts.url.rstrip("/") + "/api/telemetry"

    async def one(dev: SimDevice, tok: str) -> None:
        headers = {"Authorization": f"Bearer {tok}", "Content-Type": "application/json"}

        async def send(frame: Any, n: int, bad: int) -> None:
            req = HTTPRequest(
                url, method="POST", body=json.dumps(frame), headers=headers, request_timeout=10
            )
            try:
                resp = await http.fetch(req, raise_error=False)
            except Exception as exc:
                s.error(f"POST {dev.id}: {type(exc).__name__}: {exc}")
                return
            if resp.code == 202:
                body = json.loads(resp.body)
                s.frames_ok += 1
                s.points_accepted += int(body["accepted"])
                s.points_rejected += len(body["rejected"])
            elif resp.code == 400 and resp.body and b"rejected" in resp.body:
                s.frames_refused += 1
                s.points_rejected += len(json.loads(resp.body)["rejected"])
            elif resp.code == 429:
                s.rate_limited += 1
            else:
                s.error(f"POST {dev.id}: HTTP {resp.code} {resp.body[:120]!r}")

        await runner.ticks(dev, send)

    try:
        await asyncio.gather(*(one(d, t) for d, t in zip(devices, tokens, strict=True)))
    finally:
        http.close()


async def simulate(opts: Options, stop: asyncio.Event | None = None) -> Summary:
    """Run the simulation (see the module docstring) and return its summary."""
    if opts.devices < 1 or opts.hz <= 0 or opts.batch < 1:
        raise ValueError("devices and batch must be at least 1, hz positive")
    if opts.transport not in ("ws", "http"):
        raise ValueError(f"transport must be ws or http, got {opts.transport!r}")
    rng = random.Random(opts.seed)
    devices = [
        SimDevice(f"{opts.prefix}{i + 1}", random.Random(rng.random())) for i in range(opts.devices)
    ]
    mint = token_factory(opts)
    tokens = [await asyncio.to_thread(mint, d.id) for d in devices]
    stop = stop or asyncio.Event()
    summary = Summary(opts.transport, opts.devices)
    runner = Runner(opts, summary, stop)
    timer = None
    if opts.duration is not None:
        timer = asyncio.get_running_loop().call_later(opts.duration, stop.set)
    started = time.monotonic()
    try:
        if opts.transport == "ws":
            await run_ws(opts, runner, devices, tokens)
        else:
            await run_http(opts, runner, devices, tokens)
    finally:
        if timer is not None:
            timer.cancel()
        summary.seconds = round(time.monotonic() - started, 3)
    return summary


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m tools.simulate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--url", required=True, help="Squall's HTTP base URL, e.g. http://127.0.0.1:8000"
    )
    p.add_argument("--devices", type=int, default=1, help="number of simulated devices")
    p.add_argument("--hz", type=float, default=1.0, help="points per second per device")
    p.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--transport", choices=("ws", "http"), default="ws")
    p.add_argument("--batch", type=int, default=1, help="points per frame")
    p.add_argument("--secret", default="", help="HMAC secret to mint device tokens with")
    p.add_argument("--token-cmd", default="", help="command printing a device's token ({device})")
    p.add_argument("--config", default="", help="config to read token.hmac_secret from")
    p.add_argument("--prefix", default="sim-", help="device ids are PREFIX1..PREFIXN")
    p.add_argument("--bad-rate", type=float, default=0.01, help="share of deliberately bad points")
    p.add_argument("--gap-rate", type=float, default=0.002, help="chance per tick of going silent")
    p.add_argument("--seed", type=int, help="random seed, for repeatable runs")
    a = p.parse_args(argv)
    return Options(
        url=a.url,
        devices=a.devices,
        hz=a.hz,
        duration=a.duration,
        transport=a.transport,
        batch=a.batch,
        secret=a.secret,
        token_cmd=a.token_cmd,
        config=a.config,
        prefix=a.prefix,
        bad_rate=a.bad_rate,
        gap_rate=a.gap_rate,
        seed=a.seed,
    )


def print_summary(summary: Summary) -> None:
    s = summary
    print(
        f"simulate: {s.transport} devices={s.devices} seconds={s.seconds} frames={s.frames} "
        f"ok={s.frames_ok} refused={s.frames_refused} rate_limited={s.rate_limited} "
        f"errors={s.errors} points sent={s.points_sent} accepted={s.points_accepted} "
        f"rejected={s.points_rejected} (bad sent={s.bad_points_sent}) gaps={s.gaps}"
    )
    for sample in s.error_samples:
        print(f"  error: {sample}")
    print(json.dumps(asdict(s)), flush=True)


async def _main(opts: Options) -> Summary:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return await simulate(opts, stop)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        summary = asyncio.run(_main(opts))
    except (ValueError, subprocess.SubprocessError, SquallError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
