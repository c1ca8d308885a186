#!/usr/bin/env python3
"""Squall benchmark suite: build, run every scenario against every server, report.

    python bench/run.py [--quick] [--servers squall,centrifugo,naive,socketio,insert_one]
                        [--scenarios fanout,channels,conns,telemetry] [--reps N]
                        [--centrifugo PATH] [--mongodb-url URL]

Builds the Go load generator (bench/loadgen) and, when no binary is found,
tries ``go install`` of Centrifugo into bench/.cache/bin. Each server runs
pinned to CPU 0 and the load generator to CPU 1 (``taskset``); every point is
measured ``--reps`` times on a fresh server process. Writes bench/RESULTS.md,
bench/results/summary.json and PNG plots under bench/results/.

All traffic goes to 127.0.0.1. Exit status is non-zero when the suite itself
breaks: the load generator does not build, a server that was started cannot be
driven (no connection, zero deliveries, more than 1% failed connections), or no
server could be benchmarked. A peer that is not available (no Centrifugo
binary can be had, no run.py for Squall) is reported in RESULTS.md, not failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CACHE = BENCH / ".cache"
BIN = CACHE / "bin"
LOGS = CACHE / "logs"
LOADGEN = BIN / "loadgen"

# Shared by every server; the same values are in squall-bench.yaml and
# peers/centrifugo.json so each server can also be started by hand.
SECRET = "squall-bench-hmac-secret-0123456789abcdef"
API_KEY = "squall-bench-api-key"
CENTRIFUGO_MODULE = "github.com/centrifugal/centrifugo/v6@latest"
REQUIRED_MODULES = ("tornado", "jwt", "aiohttp", "socketio", "engineio", "matplotlib", "pymongo")

PLOTS = {
    "latency_vs_rate.png": "latency (p50, p99) against delivered messages/s",
    "throughput.png": "max sustained deliveries/s per scenario",
    "rss_vs_connections.png": "server RSS and accept time against idle connections",
}
NOISY = 0.25  # cores used by other processes during a run above which it is marked noisy
TIMES = "\u00d7"  # multiplication sign
DASH = "\u2013"  # en dash, for ranges


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- profiles


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes and timings of one suite run."""

    name: str
    reps: int
    fanout_subs: tuple[int, ...]
    channels_conns: int
    conns_sizes: tuple[int, ...]
    step: float  # seconds of publishing per ramp step
    grace: float  # seconds after a step during which deliveries still count
    measure: float  # seconds of publishing at 50% and 90% of the maximum
    drain: float  # longest wait for the server to go quiet between steps
    factor: float  # rate multiplier between ramp steps
    refine: int  # bisection steps after the first step that falls behind
    max_deliveries: float  # ramp cap (deliveries/s); a server reaching it is marked capped
    fanout_start: float  # first ramp step, deliveries/s
    channels_start: float  # first ramp step, deliveries/s
    ingest_start: float  # first ramp step, telemetry points/s
    conn_rate: float  # connection attempts per second
    timeout: float  # hard limit for one load generator run, seconds
    # Telemetry (scenario 4); defaults are the full profile's.
    baseline_start: float = 200  # first ramp step of the insert_one baseline, points/s
    persist_step: float = 5.0  # seconds of the fixed-rate step whose points are counted in MongoDB
    persist_wait: float = 20.0  # longest wait after a step for the store to finish writing, s
    devices: int = 1000  # WebSocket devices (the target point: 1 000 x 10 Hz)
    device_hz: float = 10.0  # frames per second per device, one point each
    devices_step: float = 5.0  # seconds of the measured WebSocket step (after a 1 s warm-up)


FULL = Profile(
    name="full",
    reps=3,
    fanout_subs=(100, 1000, 5000),
    channels_conns=5000,
    conns_sizes=(1000, 10000, 20000),
    step=1.5,
    grace=1.0,
    measure=3.0,
    drain=10.0,
    factor=2.0,
    refine=2,
    max_deliveries=2_000_000,
    fanout_start=5000,
    channels_start=10000,
    ingest_start=5000,
    conn_rate=5000,
    timeout=600,
)

QUICK = Profile(
    name="quick",
    reps=1,
    fanout_subs=(100,),
    channels_conns=200,
    conns_sizes=(200, 1000),
    step=1.0,
    grace=0.5,
    measure=1.5,
    drain=3.0,
    factor=2.0,
    refine=1,
    max_deliveries=200_000,
    fanout_start=2000,
    channels_start=2000,
    ingest_start=2000,
    conn_rate=5000,
    timeout=180,
    persist_step=2.0,
    persist_wait=5.0,
    devices=50,
    device_hz=5.0,
    devices_step=3.0,
)


# ---------------------------------------------------------------- servers


@dataclasses.dataclass
class Server:
    """One server under test and how to start it."""

    key: str
    title: str
    proto: str  # loadgen -proto
    ws_path: str
    argv: Callable[[int], list[str]]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    cwd: Path = REPO
    available: bool = True
    reason: str = ""
    version: str = ""
    failures: list[str] = dataclasses.field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"not listening on 127.0.0.1:{port} after {timeout:.0f}s")


def pinned(cpu: int, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > cpu:
        return ["taskset", "-c", str(cpu), *argv]
    return argv


class Running:
    """A started server process; stopped by its own pid."""

    def __init__(self, server: Server, label: str, env: dict[str, str] | None = None) -> None:
        self.server = server
        self.port = free_port()
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{server.key}-{label}.log"
        self.log = self.log_path.open("wb")
        env = {**os.environ, **server.env, **(env or {})}
        self.proc = subprocess.Popen(
            pinned(0, server.argv(self.port)),
            cwd=server.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{server.title} {exc}; log: {self.log_path}") from None
        time.sleep(0.3)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.server.ws_path}"

    def api_url(self, method: str) -> str:
        return f"http://127.0.0.1:{self.port}/api/{method}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@contextlib.contextmanager
def running(server: Server, label: str, env: dict[str, str] | None = None) -> Iterator[Running]:
    """Start server on a free port (three tries: another process may take the port)."""
    for attempt in range(3):
        try:
            r = Running(server, label, env)
            break
        except RuntimeError as exc:
            if attempt == 2:
                raise
            say(f"{server.title} did not start ({exc}); retrying")
    try:
        yield r
    finally:
        r.stop()


def make_servers(args: argparse.Namespace) -> list[Server]:
    py = sys.executable
    squall = Server(
        key="squall",
        title="Squall",
        proto="centrifugo",
        ws_path="/connection/websocket",
        argv=lambda port: [
            py,
            "run.py",
            "--port",
            str(port),
            "--config",
            str(BENCH / "squall-bench.yaml"),
            "--log-level",
            "WARNING",
        ],
        env={"SQUALL_TOKEN_HMAC_SECRET": SECRET, "SQUALL_API_KEY": API_KEY},
    )
    if not (REPO / "run.py").exists():
        squall.available, squall.reason = False, "no run.py in the repository yet"
    centrifugo = Server(
        key="centrifugo",
        title="Centrifugo",
        proto="centrifugo",
        ws_path="/connection/websocket",
        argv=lambda port: [
            str(args.centrifugo_bin),
            "--config",
            str(CACHE / "centrifugo.json"),
            "--http_server.port",
            str(port),
        ],
        env={"GOMAXPROCS": "1"},
        cwd=CACHE,
    )
    naive = Server(
        key="naive",
        title="naive Tornado",
        proto="centrifugo",
        ws_path="/connection/websocket",
        argv=lambda port: [
            py,
            str(BENCH / "peers" / "naive_tornado.py"),
            "--port",
            str(port),
            "--secret",
            SECRET,
            "--api-key",
            API_KEY,
        ],
    )
    sio = Server(
        key="socketio",
        title="python-socketio",
        proto="socketio",
        ws_path="/socket.io/?EIO=4&transport=websocket",
        argv=lambda port: [
            py,
            str(BENCH / "peers" / "socketio_server.py"),
            "--port",
            str(port),
            "--secret",
            SECRET,
            "--api-key",
            API_KEY,
        ],
    )
    insert_one = Server(
        key="insert_one",
        title="insert_one baseline",
        proto="centrifugo",
        ws_path="/connection/websocket",  # not served: HTTP telemetry ingest only
        argv=lambda port: [
            py,
            str(BENCH / "peers" / "telemetry_insert_one.py"),
            "--port",
            str(port),
            "--secret",
            SECRET,
        ],
    )
    return [squall, centrifugo, naive, sio, insert_one]


# ---------------------------------------------------------------- setup


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE as far as allowed; children inherit it. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (200_000, 65_536):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def ensure_python_deps() -> None:
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return
    say(f"installing bench/requirements.txt (missing: {', '.join(missing)})")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements.txt")],
        check=True,
    )


def build_loadgen() -> float:
    if not shutil.which("go"):
        raise SystemExit("bench: the Go toolchain (go) is needed to build bench/loadgen")
    BIN.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    subprocess.run(["go", "build", "-o", str(LOADGEN), "."], cwd=BENCH / "loadgen", check=True)
    return time.monotonic() - t0


def find_centrifugo(explicit: str | None) -> tuple[Path | None, str]:
    """Locate or install Centrifugo; returns (binary, reason when missing)."""
    candidates = [explicit, os.environ.get("CENTRIFUGO_BIN"), str(BIN / "centrifugo")]
    candidates.append(shutil.which("centrifugo"))
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    candidates.append(str(Path(gopath) / "bin" / "centrifugo"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c), ""
    if explicit:
        return None, f"--centrifugo {explicit} is not an executable file"
    if not shutil.which("go"):
        return None, "no centrifugo binary and no Go toolchain to install one"
    say(f"go install {CENTRIFUGO_MODULE} (first time: several minutes)")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            ["go", "install", CENTRIFUGO_MODULE],
            env={**os.environ, "GOBIN": str(BIN)},
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"`go install {CENTRIFUGO_MODULE}` did not finish within 20 minutes"
    if proc.returncode == 0 and (BIN / "centrifugo").is_file():
        say(f"centrifugo installed in {time.monotonic() - t0:.0f}s")
        return BIN / "centrifugo", ""
    # Name no registry host in the report: "reading https://…/list: 403" -> "reading the
    # module proxy: 403".
    text = re.sub(r"https?://\S*?(:?)(?=\s|$)", r"the module proxy\1", proc.stderr or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = " ".join(lines[-2:])[:300] or f"exit status {proc.returncode}"
    return None, f"`go install {CENTRIFUGO_MODULE}` failed: {detail}"


def write_centrifugo_config() -> None:
    cfg = json.loads((BENCH / "peers" / "centrifugo.json").read_text())
    cfg["client"]["token"]["hmac_secret_key"] = SECRET
    cfg["http_api"]["key"] = API_KEY
    cfg["usage_stats"] = {"disabled": True}  # nothing here may call out to the internet
    (CACHE / "centrifugo.json").write_text(json.dumps(cfg, indent=2))


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0][:120] if text else "?"


# ---------------------------------------------------------------- load generator


def cpu_busy_seconds() -> float:
    """Machine-wide busy CPU seconds from /proc/stat: user, nice, system and steal.

    Interrupt and softirq time are left out: loopback networking for our own
    traffic is accounted there, not to the server or the load generator.
    """
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    v = [int(x) for x in fields] + [0] * 8
    return (v[0] + v[1] + v[2] + v[7]) / os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = text[text.rindex(")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime + me.ru_utime + me.ru_stime


def run_loadgen(srv: Running, prof: Profile, extra: list[str]) -> dict[str, Any]:
    """Run the load generator pinned to CPU 1 and return its JSON report.

    Adds ``_rc`` (exit status) and ``_foreign_cpu`` (CPU cores used by other
    processes on the machine during the run: a noise indicator).
    """
    argv = [
        str(LOADGEN),
        "-proto",
        srv.server.proto,
        "-ws",
        srv.ws_url,
        "-api",
        srv.api_url("publish"),
        "-api-key",
        API_KEY,
        "-secret",
        SECRET,
        "-pid",
        str(srv.pid),
        "-step",
        f"{prof.step}s",
        "-grace",
        f"{prof.grace}s",
        "-measure",
        f"{prof.measure}s",
        "-drain",
        f"{prof.drain}s",
        "-factor",
        str(prof.factor),
        "-refine",
        str(prof.refine),
        "-max-deliveries",
        str(prof.max_deliveries),
        "-conn-rate",
        str(prof.conn_rate),
        "-timeout",
        f"{prof.timeout}s",
        *extra,
    ]
    t0, busy0 = time.monotonic(), cpu_busy_seconds()
    srv0, mine0 = proc_cpu_seconds(srv.pid), children_cpu_seconds()
    proc = subprocess.run(
        pinned(1, argv),
        stdout=subprocess.PIPE,
        text=True,
        timeout=prof.timeout + 120,
        check=False,
    )
    wall = max(time.monotonic() - t0, 1e-6)
    ours = (proc_cpu_seconds(srv.pid) - srv0) + (children_cpu_seconds() - mine0)
    foreign = max(0.0, cpu_busy_seconds() - busy0 - ours) / wall
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    report: dict[str, Any] = json.loads(lines[-1]) if lines else {"ok": False}
    if not lines:
        report["errors"] = [f"loadgen printed no report (exit status {proc.returncode})"]
    report["_rc"] = proc.returncode
    report["_foreign_cpu"] = round(foreign, 3)
    return report


# ---------------------------------------------------------------- scenarios


@dataclasses.dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool


def _lat(step: dict[str, Any] | None, q: str) -> float | None:
    if not step:
        return None
    v = step.get("latency", {}).get(q)
    return float(v) if v is not None else None


def ramp_figures(rep: dict[str, Any]) -> dict[str, float | None]:
    top = rep.get("max_sustained") or {}
    a50, a90 = rep.get("at_50pct"), rep.get("at_90pct")
    return {
        "max": top.get("deliveries_per_s"),
        "p50_50": _lat(a50, "p50_ms"),
        "p99_50": _lat(a50, "p99_ms"),
        "p999_50": _lat(a50, "p999_ms"),
        "p50_90": _lat(a90, "p50_ms"),
        "p99_90": _lat(a90, "p99_ms"),
        "p999_90": _lat(a90, "p999_ms"),
    }


LATENCY_FIGURES = [
    Figure("p50_50", "p50 latency at 50% of max", "ms", False),
    Figure("p99_50", "p99 latency at 50% of max", "ms", False),
    Figure("p999_50", "p99.9 latency at 50% of max", "ms", False),
    Figure("p50_90", "p50 latency at 90% of max", "ms", False),
    Figure("p99_90", "p99 latency at 90% of max", "ms", False),
    Figure("p999_90", "p99.9 latency at 90% of max", "ms", False),
]


class Scenario:
    key = ""
    title = ""
    figures: list[Figure] = []

    def points(self, prof: Profile, fd_cap: int) -> list[tuple[str, int]]:
        raise NotImplementedError

    def applicable(self, srv: Server) -> str:
        """Empty when the scenario applies to srv; otherwise why not."""
        if srv.key == "insert_one":
            return "telemetry persistence baseline only"
        return ""

    def serves(self, label: str, srv: Server) -> str:
        """Empty when the point ``label`` is run on srv; otherwise why not."""
        return ""

    def slug(self, label: str, size: int) -> str:
        """The point's part of log file names."""
        return str(size)

    @contextlib.contextmanager
    def around(self, srv: Server, tag: str) -> Iterator[dict[str, str]]:
        """Held while one server run lasts; yields extra environment for the server."""
        yield {}

    def measure(
        self, run: Running, label: str, size: int, prof: Profile, hint: float | None
    ) -> dict[str, Any]:
        """Drive one running server through the point; the load generator's report."""
        return run_loadgen(run, prof, self.args(size, prof, run, hint))

    def probe(self, run: Running) -> str:
        """Checked on a running server before its first run; empty means go."""
        return ""

    def args(self, size: int, prof: Profile, run: Running, hint: float | None) -> list[str]:
        raise NotImplementedError

    def figures_of(self, rep: dict[str, Any]) -> dict[str, float | None]:
        return ramp_figures(rep)

    def hint_of(self, figs: dict[str, float | None]) -> float | None:
        """A start value for later repetitions: a quarter of the maximum found."""
        m = figs.get("max")
        return m / 4 if m else None


# The latency target point: S subscribers at 10 publications/s, measured
# before the ramp (so no overloaded step precedes it).
FIXED_PUB_RATE = 10


class FanOut(Scenario):
    key = "fanout"
    title = "1. Fan-out: one channel, S subscribers, HTTP API publisher"
    figures = [
        Figure("max", "max sustained deliveries/s", "/s", True),
        Figure("p50_fixed", f"p50 latency at {FIXED_PUB_RATE} publications/s", "ms", False),
        Figure("p99_fixed", f"p99 latency at {FIXED_PUB_RATE} publications/s", "ms", False),
        *LATENCY_FIGURES,
    ]

    def points(self, prof: Profile, fd_cap: int) -> list[tuple[str, int]]:
        return [(f"S={s:,}", min(s, fd_cap)) for s in prof.fanout_subs]

    def args(self, size: int, prof: Profile, run: Running, hint: float | None) -> list[str]:
        start = max(hint or 0, prof.fanout_start)
        return [
            "-mode",
            "fanout",
            "-subs",
            str(size),
            "-start",
            f"{start:.0f}",
            "-fixed",
            str(FIXED_PUB_RATE),
        ]

    def figures_of(self, rep: dict[str, Any]) -> dict[str, float | None]:
        fixed = rep.get("fixed")
        return {
            **ramp_figures(rep),
            "p50_fixed": _lat(fixed, "p50_ms"),
            "p99_fixed": _lat(fixed, "p99_ms"),
        }


class Channels(Scenario):
    key = "channels"
    title = "2. Many channels: N connections, own channel + one shared channel"
    figures = [Figure("max", "max sustained deliveries/s", "/s", True), *LATENCY_FIGURES]

    def points(self, prof: Profile, fd_cap: int) -> list[tuple[str, int]]:
        n = min(prof.channels_conns, fd_cap)
        return [(f"N={n:,}", n)]

    def args(self, size: int, prof: Profile, run: Running, hint: float | None) -> list[str]:
        start = max(hint or 0, prof.channels_start)
        return ["-mode", "channels", "-conns", str(size), "-start", f"{start:.0f}", "-batch", "20"]


class Conns(Scenario):
    key = "conns"
    title = "3. Connections: idle authenticated connections, one subscription each"
    figures = [
        Figure("accept_s", "time to accept all", "s", False),
        Figure("accept_rate", "accepted connections/s", "/s", True),
        Figure("rss_per_conn_kib", "server RSS per connection", "KiB", False),
        Figure("rss_after_mib", "server RSS with all connected", "MiB", False),
        Figure("handshake_p99", "p99 connect+subscribe time", "ms", False),
    ]

    def points(self, prof: Profile, fd_cap: int) -> list[tuple[str, int]]:
        out = []
        for n in prof.conns_sizes:
            eff = min(n, fd_cap)
            label = f"{n:,} connections"
            if eff != n:
                label = f"{eff:,} connections (capped from {n:,} by RLIMIT_NOFILE)"
            out.append((label, eff))
        return out

    def args(self, size: int, prof: Profile, run: Running, hint: float | None) -> list[str]:
        return ["-mode", "conns", "-conns", str(size), "-settle", "2s", "-hold", "1s"]

    def figures_of(self, rep: dict[str, Any]) -> dict[str, float | None]:
        c = rep.get("conns") or {}
        if not c:
            return {}
        return {
            "accept_s": c.get("accept_seconds"),
            "accept_rate": c.get("accept_per_s"),
            "rss_per_conn_kib": c.get("rss_per_conn_bytes", 0) / 1024,
            "rss_after_mib": c.get("rss_after_bytes", 0) / (1 << 20),
            "handshake_p99": c.get("handshake", {}).get("p99_ms"),
        }

    def hint_of(self, figs: dict[str, float | None]) -> float | None:
        return None


# ---------------------------------------------------------------- telemetry store

FERRETDB_CPU = 1  # FerretDB shares the load generator's CPU: CPU 0 stays the server's alone
POINTS = "telemetry_points"  # Squall's telemetry.points_collection (default; the yaml keeps it)
BASELINE_POINTS = "points"  # the insert_one peer's collection


def ferretdb_binary() -> str | None:
    """FerretDB as the tests find it: $SQUALL_FERRETDB_BIN, .services/bin, then PATH."""
    env = os.environ.get("SQUALL_FERRETDB_BIN")
    candidates: list[str | None] = [env]
    if not env:
        candidates = [str(REPO / ".services" / "bin" / "ferretdb"), shutil.which("ferretdb")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


class FerretDB:
    """A private FerretDB v1: SQLite backend in a temporary directory, a free loopback
    port, pinned to FERRETDB_CPU; stopped by its own pid and its directory removed."""

    def __init__(self, binary: str, label: str) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="squall-bench-ferretdb-"))
        data = self.dir / "data"
        data.mkdir()
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"ferretdb-{label}.log"
        argv = [  # the flags of tests/helpers/services.py
            binary,
            "--handler=sqlite",
            f"--sqlite-url=file:{data}/",
            f"--listen-addr=127.0.0.1:{self.port}",
            f"--state-dir={self.dir}",
            "--debug-addr=-",
            "--telemetry=disable",
            "--log-level=warn",
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                pinned(FERRETDB_CPU, argv),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"FerretDB {exc}; log: {self.log_path}") from None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class MongoSource:
    """Where scenario 4 gets MongoDB: ``--mongodb-url``; else a FerretDB that run.py
    starts for every server run; else none (Squall's in-memory store)."""

    def __init__(self, url: str, ferretdb: str | None) -> None:
        self.url = url
        self.ferretdb = None if url else ferretdb
        self.version = ""
        if self.ferretdb:
            self.version = tool_version([self.ferretdb, "--version"]).removeprefix("version: ")
        self._seq = 0

    @property
    def available(self) -> bool:
        return bool(self.url or self.ferretdb)

    def describe(self) -> str:
        if self.url:
            parts = urllib.parse.urlsplit(self.url)
            host = f"{parts.hostname}:{parts.port or 27017}"
            return (
                f"the MongoDB server given by `--mongodb-url` ({host}); a fresh database for "
                "every server run, dropped afterwards"
            )
        if self.ferretdb:
            return (
                f"FerretDB {self.version} (SQLite backend), started by run.py for every server "
                "run with an empty data directory and a fresh database, pinned to CPU 1 "
                "(shared with the load generator, so CPU 0 stays the server's alone)"
            )
        return (
            "**none**: no `--mongodb-url`, no `$SQUALL_BENCH_MONGODB_URL` and no FerretDB binary "
            "(`$SQUALL_FERRETDB_BIN`, `.services/bin/ferretdb` from `scripts/install-services`, "
            "`ferretdb` on PATH). Squall ran with its in-memory telemetry store: the accepted "
            "and latency figures below are in-memory figures, nothing was persisted, and the "
            "insert_one baseline could not run"
        )

    @contextlib.contextmanager
    def database(self, label: str) -> Iterator[tuple[str, str]]:
        """A (url, database name) used by one server run only."""
        self._seq += 1
        name = f"squall_bench_{os.getpid()}_{self._seq}"
        if self.ferretdb:
            for attempt in range(3):  # another process may take the free port first
                try:
                    fdb = FerretDB(self.ferretdb, label)
                    break
                except RuntimeError as exc:
                    if attempt == 2:
                        raise
                    say(f"FerretDB did not start ({exc}); retrying")
            try:
                yield fdb.url, name
            finally:
                fdb.stop()
            return
        try:
            yield self.url, name
        finally:
            drop_database(self.url, name)


def mongo_client(url: str) -> Any:
    from pymongo import MongoClient

    return MongoClient(url, serverSelectionTimeoutMS=5000, socketTimeoutMS=120_000)


def drop_database(url: str, name: str) -> None:
    """Drop a database of ours; again while it reappears (FerretDB may still be applying
    writes a client gave up on), a few times at most."""
    try:
        with mongo_client(url) as client:
            for _ in range(5):
                client.drop_database(name)
                time.sleep(1.0)
                if name not in client.list_database_names():
                    return
    except Exception as exc:  # cleanup must not fail the suite
        say(f"could not drop database {name}: {type(exc).__name__}: {exc}"[:300])
        return
    say(f"database {name} still exists after 5 drops (writes still arriving); drop it by hand")


def stored_points(url: str, db: str, server_key: str) -> int:
    """Points stored in MongoDB: the baseline's documents (one per point), or the distinct
    ``(device, ts)`` of Squall's chunks (a point stored in two chunks counts once, as
    Squall's reads count it)."""
    with mongo_client(url) as client:
        if server_key == "insert_one":
            return int(client[db][BASELINE_POINTS].count_documents({}))
        seen: set[tuple[str, int]] = set()
        for chunk in client[db][POINTS].find({}, {"_id": 0, "d": 1, "ts": 1}):
            seen.update((chunk["d"], int(ts)) for ts in chunk.get("ts") or ())
        return len(seen)


def written_counter(run: Running) -> tuple[int, int, str] | None:
    """(points whose write MongoDB acknowledged, points queued, store error) from the server.

    Squall: ``telemetry.points_written`` and ``queue_depth`` of ``GET /ready``; the
    baseline: ``GET /stats`` (it writes before it answers, so nothing is queued).
    """
    path = "/stats" if run.server.key == "insert_one" else "/ready"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{run.port}{path}", timeout=5) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # /ready answers 503 while the store is down
        try:
            body = json.loads(exc.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None
    if run.server.key == "insert_one":
        return int(body.get("inserted", 0)), 0, ""
    t = body.get("telemetry") or {}
    if "points_written" not in t:
        return None  # in-memory store: nothing is written anywhere
    return int(t["points_written"]), int(t.get("queue_depth", 0)), str(t.get("error", ""))


class WriteSampler:
    """Samples ``written_counter`` every 0.1 s, in a thread while the load generator runs
    and then in the caller until the server's writes stop."""

    def __init__(self, run: Running) -> None:
        self.run = run
        self.samples: list[tuple[float, int]] = []  # (time.time(), points written)
        self.queued = 0
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> tuple[int, int, str] | None:
        s = written_counter(self.run)
        if s is not None:
            self.samples.append((time.time(), s[0]))
            self.queued, self.error = s[1], s[2] or self.error
        return s

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(0.1):
                self.sample()

        self._thread = threading.Thread(target=loop, name="write-sampler", daemon=True)
        self._thread.start()

    def settle(self, wait: float, quiet: float = 1.0) -> bool:
        """Stop the thread; sample until nothing is queued and the count has not moved
        for ``quiet`` seconds (True), or ``wait`` seconds have passed (False)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + wait
        last, since = None, time.monotonic()
        while True:
            s = self.sample()
            now = time.monotonic()
            if s is not None:
                if s[0] != last:
                    last, since = s[0], now
                elif s[1] == 0 and now - since >= quiet:
                    return True
            if now >= deadline:
                return False
            time.sleep(0.1)

    def last_increase(self) -> tuple[float, int] | None:
        """(time, count) of the first sample that showed the final count."""
        if not self.samples:
            return None
        final = self.samples[-1][1]
        return next((t, n) for t, n in self.samples if n == final)


# ---------------------------------------------------------------- scenario 4


class Telemetry(Scenario):
    """Telemetry ingest (scenario 4): Squall's batched write-behind path against a
    per-point ``insert_one`` baseline, and WebSocket devices with dashboards.

    Three points, each on a fresh server process (and, with FerretDB, a fresh
    FerretDB) per repetition:

    * ``HTTP ramp``: ``POST /api/telemetry`` at ramping rates (``ingest`` mode:
      frames of 10 points, 200 devices in turn, device tokens): max sustained
      accepted points/s and request latency. Squall and the baseline.
    * ``HTTP persistence``: one fixed-rate step (``ingest-fixed``) at the median max
      accepted rate of the ramp point, ``persist_step`` seconds; the servers'
      acknowledged-write counters are sampled every 0.1 s until they stop moving,
      and MongoDB is counted before and after. Persisted points/s = points stored
      / (time from the step's start to the last increase). Squall and the baseline.
    * ``WebSocket``: D device connections at F frames/s of one point each
      (``devices`` mode), dashboards subscribed to every device channel (100
      channels each: ``client.max_channels`` is 128); accepted points/s, publish
      reply latency, ingest-to-dashboard latency, and points persisted. Squall only.

    It runs only where ``probe`` gets a 2xx for one point.
    """

    key = "telemetry"
    title = "4. Telemetry ingest: device points, MongoDB persistence"
    RAMP = "HTTP ramp"
    PERSIST = "HTTP persistence"
    WS = "WebSocket"
    RAMP_FIGURES = [
        Figure("max", "max sustained accepted points/s (10 per request)", "/s", True),
        Figure("p50_50", "p50 request latency at 50% of max", "ms", False),
        Figure("p99_50", "p99 request latency at 50% of max", "ms", False),
        Figure("p50_90", "p50 request latency at 90% of max", "ms", False),
        Figure("p99_90", "p99 request latency at 90% of max", "ms", False),
    ]
    PERSIST_FIGURES = [
        Figure("offered", "offered points/s (median max accepted of the ramp)", "/s", True),
        Figure("accepted", "accepted points/s in the step", "/s", True),
        Figure("persisted", "persisted points/s", "/s", True),
        Figure("stored_pct", "stored / accepted", "%", True),
        Figure("drain_s", "last write after the step ended", "s", False),
    ]
    WS_FIGURES = [
        Figure("accepted", "accepted points/s", "/s", True),
        Figure("reply_p99", "p99 publish reply", "ms", False),
        Figure("e2e_p50", "p50 ingest to dashboard", "ms", False),
        Figure("e2e_p99", "p99 ingest to dashboard", "ms", False),
        Figure("e2e_p999", "p99.9 ingest to dashboard", "ms", False),
        Figure("delivered_pct", "points delivered to the dashboards in time", "%", True),
        Figure("stored_pct", "stored / accepted", "%", True),
    ]
    figures = RAMP_FIGURES

    def __init__(self) -> None:
        self.mongo = MongoSource("", None)
        self.max_accepted: dict[str, list[float]] = {}
        self._db: tuple[str, str] | None = None  # (url, database) of the current server run

    def configure(self, args: argparse.Namespace) -> None:
        host = urllib.parse.urlsplit(args.mongodb_url).hostname if args.mongodb_url else None
        if host not in (None, "127.0.0.1", "localhost", "::1"):
            raise SystemExit("bench: --mongodb-url must point at this machine's loopback")
        self.mongo = MongoSource(args.mongodb_url, ferretdb_binary())

    def points(self, prof: Profile, fd_cap: int) -> list[tuple[str, int]]:
        d = min(prof.devices, max(1, fd_cap - 20))  # + dashboards and the HTTP client
        ws = f"{self.WS}: {d:,} devices {TIMES} {prof.device_hz:g} Hz"
        if d != prof.devices:
            ws += f" (capped from {prof.devices:,} by RLIMIT_NOFILE)"
        return [(self.RAMP, 0), (self.PERSIST, 0), (ws, d)]

    def kind(self, label: str) -> str:
        if label.startswith(self.WS):
            return "ws"
        return "persist" if label == self.PERSIST else "ramp"

    def slug(self, label: str, size: int) -> str:
        return {"ramp": "http-ramp", "persist": "http-persist"}.get(self.kind(label), f"ws-{size}")

    def applicable(self, srv: Server) -> str:
        if srv.key in ("squall", "insert_one"):
            return ""
        return "no telemetry endpoint (Squall feature)"

    def serves(self, label: str, srv: Server) -> str:
        kind = self.kind(label)
        if kind == "ws" and srv.key == "insert_one":
            return "HTTP ingest only"
        if kind == "persist" and not self.mongo.available:
            return "no MongoDB"
        return ""

    @contextlib.contextmanager
    def around(self, srv: Server, tag: str) -> Iterator[dict[str, str]]:
        if not self.mongo.available:
            self._db = None
            yield {}
            return
        with self.mongo.database(tag) as (url, name):
            self._db = (url, name)
            try:
                yield {"SQUALL_MONGODB_URL": url, "SQUALL_MONGODB_DATABASE": name}
            finally:
                self._db = None

    def probe(self, run: Running) -> str:
        import jwt

        token = jwt.encode(
            {"sub": "bench-probe", "device": True, "exp": int(time.time()) + 600},
            SECRET,
            algorithm="HS256",
        )
        body = json.dumps([{"values": {"probe": 1}}]).encode()
        req = urllib.request.Request(  # noqa: S310 (an http://127.0.0.1 URL we built)
            run.api_url("telemetry"),
            data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 (same URL)
                text = resp.read(2000).decode(errors="replace")
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode(errors="replace").strip()
            return f"not available: the server answers HTTP {exc.code} to POST /api/telemetry" + (
                f" ({detail})" if detail else ""
            )
        except OSError as exc:
            return f"not available: POST /api/telemetry failed ({exc})"
        if '"error"' in text or '"reason"' in text:
            return f"not available: POST /api/telemetry answered {text[:200]}"
        return ""

    def args(self, size: int, prof: Profile, run: Running, hint: float | None) -> list[str]:
        first = prof.baseline_start if run.server.key == "insert_one" else prof.ingest_start
        start = max(hint or 0, first)
        return [
            "-mode",
            "ingest",
            "-api",
            run.api_url("telemetry"),
            "-start",
            f"{start:.0f}",
            "-points",
            "10",
            "-devices",
            "200",
            "-prefix",
            "ramp-",
        ]

    def measure(
        self, run: Running, label: str, size: int, prof: Profile, hint: float | None
    ) -> dict[str, Any]:
        kind = self.kind(label)
        if kind == "ramp":
            rep = run_loadgen(run, prof, self.args(size, prof, run, hint))
            top = (rep.get("max_sustained") or {}).get("deliveries_per_s")
            if top:
                self.max_accepted.setdefault(run.server.key, []).append(float(top))
            after = written_counter(run) if self._db else None
            if after is not None:  # how far the store was behind when the ramp ended
                rep["store_after"] = {"written": after[0], "queued": after[1], "error": after[2]}
        elif kind == "persist":
            rep = self._persist(run, prof)
        else:
            rep = self._devices(run, size, prof)
        rep["_kind"] = kind
        return rep

    def _persist(self, run: Running, prof: Profile) -> dict[str, Any]:
        tops = self.max_accepted.get(run.server.key)
        rate = statistics.median(tops) if tops else prof.ingest_start
        sampler = WriteSampler(run)
        sampler.settle(prof.persist_wait, quiet=0.5)  # the probe's point is written
        before = self._count(run)
        sampler.samples.clear()
        sampler.sample()  # the count before the step
        sampler.start()
        rep = run_loadgen(
            run,
            prof,
            [
                "-mode",
                "ingest-fixed",
                "-api",
                run.api_url("telemetry"),
                "-rate",
                f"{rate:.0f}",
                "-measure",
                f"{prof.persist_step}s",
                "-points",
                "10",
                "-devices",
                "200",
                "-prefix",
                "persist-",
            ],
        )
        drained = sampler.settle(prof.persist_wait)
        counted_at = time.time()
        after = self._count(run)
        tel = rep.get("telemetry") or {}
        p: dict[str, Any] = {"offered": rate, "drained": drained, "wait_s": prof.persist_wait}
        p["accepted"] = int(tel.get("points_accepted_total", 0))
        step = tel.get("step") or {}
        p["accepted_per_s"] = step.get("deliveries_per_s")
        if step.get("reason"):  # the step fell behind: why (503s from a full queue, ...)
            p["step_reason"] = step["reason"]
        if isinstance(before, str) or isinstance(after, str):
            p["error"] = before if isinstance(before, str) else after
        else:
            p["stored"] = after - before
        last = sampler.last_increase()
        t0 = tel.get("step_start_unix_ns", 0) / 1e9
        t1 = tel.get("step_end_unix_ns", 0) / 1e9
        stored = p.get("stored")
        if stored is not None and t0:
            if not drained:
                # The writer was busy from the step's start until the wait ran out: what
                # MongoDB holds by then, over that time. (The server's counter may lag:
                # Squall counts a batch only once all of it is acknowledged.)
                p["persisted_per_s"] = stored / (counted_at - t0)
            elif stored == 0:
                p["persisted_per_s"] = 0.0
            elif last is not None and last[0] > t0:
                p["persisted_per_s"] = stored / (last[0] - t0)
                p["drain_s"] = max(0.0, last[0] - t1)
        p["queued_at_end"] = sampler.queued
        if sampler.error:
            p["store_error"] = sampler.error[:300]
        rep["persist"] = p
        return rep

    def _devices(self, run: Running, size: int, prof: Profile) -> dict[str, Any]:
        sampler = WriteSampler(run) if self._db else None
        before: int | str | None = None
        if sampler is not None:
            sampler.settle(prof.persist_wait, quiet=0.5)
            before = self._count(run)
        dashboards = max(1, -(-size // 100))  # at most 100 channels each (max_channels is 128)
        rep = run_loadgen(
            run,
            prof,
            [
                "-mode",
                "devices",
                "-devices",
                str(size),
                "-hz",
                f"{prof.device_hz:g}",
                "-points",
                "1",
                "-dashboards",
                str(dashboards),
                "-warmup",
                "1s",
                "-measure",
                f"{prof.devices_step}s",
                "-prefix",
                "ws-",
            ],
        )
        if sampler is not None:
            drained = sampler.settle(prof.persist_wait)
            after = self._count(run)
            tel = rep.get("telemetry") or {}
            p: dict[str, Any] = {"drained": drained, "wait_s": prof.persist_wait}
            p["accepted"] = int(tel.get("points_accepted_total", 0))
            if isinstance(before, str) or isinstance(after, str):
                p["error"] = before if isinstance(before, str) else after
            elif before is not None:
                p["stored"] = after - before
            p["queued_at_end"] = sampler.queued
            if sampler.error:
                p["store_error"] = sampler.error[:300]
            rep["persist"] = p
        return rep

    def _count(self, run: Running) -> int | str:
        """Points stored in this run's database, or why they could not be counted."""
        if self._db is None:
            return "no database"
        try:
            return stored_points(*self._db, run.server.key)
        except Exception as exc:  # a failed count is reported, it does not stop the suite
            return f"counting the stored points failed: {type(exc).__name__}: {exc}"[:300]

    def figures_of(self, rep: dict[str, Any]) -> dict[str, float | None]:
        kind = rep.get("_kind", "ramp")
        p = rep.get("persist") or {}
        stored_pct = None
        if p.get("stored") is not None and p.get("accepted") and p.get("drained"):
            stored_pct = 100.0 * p["stored"] / p["accepted"]
        if kind == "persist":
            return {
                "offered": p.get("offered"),
                "accepted": p.get("accepted_per_s"),
                "persisted": p.get("persisted_per_s"),
                "stored_pct": stored_pct,
                "drain_s": p.get("drain_s"),
            }
        if kind == "ws":
            step = (rep.get("telemetry") or {}).get("step") or {}
            if not step:
                return {}
            ratio = step.get("delivered_ratio")
            return {
                "accepted": step.get("deliveries_per_s"),
                "reply_p99": (step.get("publish") or {}).get("http_latency", {}).get("p99_ms"),
                "e2e_p50": _lat(step, "p50_ms"),
                "e2e_p99": _lat(step, "p99_ms"),
                "e2e_p999": _lat(step, "p999_ms"),
                "delivered_pct": 100.0 * ratio if ratio is not None else None,
                "stored_pct": stored_pct,
            }
        return {k: v for k, v in ramp_figures(rep).items() if k in {f.key for f in self.figures}}

    def hint_of(self, figs: dict[str, float | None]) -> float | None:
        return super().hint_of(figs) if "max" in figs else None


TELEMETRY = Telemetry()


SCENARIOS: list[Scenario] = [FanOut(), Channels(), Conns(), TELEMETRY]


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class Cell:
    """All repetitions of one (scenario, point, server)."""

    reports: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    figures: list[dict[str, float | None]] = dataclasses.field(default_factory=list)
    note: str = ""


Results = dict[tuple[str, str, str], Cell]


def check_report(rep: dict[str, Any], where: str) -> list[str]:
    """Problems that mean the suite could not drive the server."""
    problems = []
    if rep.get("_rc") != 0 or not rep.get("ok"):
        problems.append(f"{where}: loadgen failed: {'; '.join(rep.get('errors') or ['?'])}")
    opened = rep.get("open") or {}
    req = opened.get("requested", 0)
    if req and opened.get("errors", 0) > 0.01 * req:
        problems.append(
            f"{where}: {opened['errors']} of {req} connections failed: {opened.get('first_error')}"
        )
    return problems


def run_suite(
    args: argparse.Namespace, prof: Profile, servers: list[Server], fd_cap: int
) -> tuple[Results, dict[str, str]]:
    results: Results = {}
    skipped: dict[str, str] = {}  # "scenario/server" -> why not run
    wanted = set(args.scenarios.split(","))
    for sc in SCENARIOS:
        if sc.key not in wanted:
            continue
        say(f"== {sc.title}")
        for label, size in sc.points(prof, fd_cap):
            hints: dict[str, float | None] = {}
            for rep_i in range(prof.reps):
                for srv in servers:
                    if not srv.available:
                        continue
                    why = sc.applicable(srv) or skipped.get(f"{sc.key}/{srv.key}", "")
                    if why:
                        skipped[f"{sc.key}/{srv.key}"] = why
                        continue
                    if sc.serves(label, srv):
                        continue
                    where = f"{sc.key} {label} {srv.title} rep {rep_i + 1}"
                    cell = results.setdefault((sc.key, label, srv.key), Cell())
                    tag = f"{sc.key}-{sc.slug(label, size)}-r{rep_i + 1}"
                    try:
                        with sc.around(srv, tag) as env, running(srv, tag, env) as run:
                            why = sc.probe(run)
                            if why:
                                skipped[f"{sc.key}/{srv.key}"] = why
                                say(f"{where}: {why}")
                                results.pop((sc.key, label, srv.key), None)
                                continue
                            say(f"{where}: running")
                            hint = hints.get(srv.key)
                            rep = sc.measure(run, label, size, prof, hint)
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        srv.failures.append(f"{where}: {exc}")
                        cell.note = str(exc)
                        say(f"{where}: FAILED {exc}")
                        continue
                    problems = check_report(rep, where)
                    srv.failures.extend(problems)
                    for p in problems:
                        say(p)
                    figs = sc.figures_of(rep)
                    cell.reports.append(rep)
                    cell.figures.append(figs)
                    if rep_i == 0:
                        hints[srv.key] = sc.hint_of(figs)
    return results, skipped


# ---------------------------------------------------------------- report


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def stats(vals: list[float | None]) -> tuple[float, float, float] | None:
    xs = [v for v in vals if v is not None]
    if not xs:
        return None
    return statistics.median(xs), min(xs), max(xs)


def ratio(v: float | None, ref: float | None) -> str:
    if v is None or not ref:
        return "n/a"
    return f"{TIMES}{v / ref:.2f}"


def render(
    args: argparse.Namespace,
    prof: Profile,
    servers: list[Server],
    results: Results,
    skipped: dict[str, str],
    meta: dict[str, Any],
) -> str:
    out: list[str] = []
    w = out.append
    w("# Squall benchmark results\n")
    w(
        f"Generated by `{meta.get('command') or 'python bench/run.py'}` "
        f"({prof.name} profile, {prof.reps} repetition(s) per point) on {meta['date']}; "
        f"the suite took {meta['duration_s']:.0f} s. Regenerate rather than edit.\n"
    )
    if prof.name == "quick":
        w(
            "> **Quick profile**: small sizes, one repetition, short steps. These figures only "
            "prove that the suite works; do not compare them with anything.\n"
        )
    w("## Machine and method\n")
    w(f"- CPU: {meta['cpu']} ({meta['cores']} cores), {meta['kernel']}")
    w(f"- Python {meta['python']}, {meta['go']}, load generator built in {meta['build_s']:.1f} s")
    w(
        f"- Pinning: {meta['pinning']}. Centrifugo runs with GOMAXPROCS=1, memory engine, "
        "usage statistics disabled, bound to 127.0.0.1."
    )
    w(
        f"- File descriptor limit: {meta['fd_limit']:,}"
        + (
            f" (could not be raised: connection counts above {meta['fd_cap']:,} are capped)"
            if meta["fd_capped"]
            else ""
        )
    )
    w(
        f"- Load average before/after: {meta['load_before']} / {meta['load_after']}; "
        f"CPU used by other processes during the runs: median {meta['foreign_median']:.2f}, "
        f"max {meta['foreign_max']:.2f} cores."
    )
    if meta["foreign_max"] > NOISY:
        w(
            "  **Warning: other processes competed for the CPUs during this run; the figures "
            "are noisy.**"
        )
    w(
        "- Each cell: median over the repetitions, then (min" + DASH + "max), then the median "
        f"as a ratio to Centrifugo ({TIMES}C) and to the naive Tornado floor ({TIMES}N). "
        "For throughput a higher ratio is better; for latency, time and memory a lower one.\n"
    )
    w("### When a step falls behind\n")
    w(
        "The publisher offers a fixed rate for one step "
        f"({prof.step:g} s; {prof.measure:g} s for the 50%/90% points). A step **keeps up** "
        "when all of these hold, otherwise it **falls behind**:\n"
    )
    w(
        "1. the publisher could issue at least 95% of the offered HTTP publish requests "
        "(32 in flight at most; a server whose API cannot take them falls behind);"
    )
    w("2. at most 1% of publish requests failed;")
    w(
        f"3. at least 95% of the expected deliveries (publications {TIMES} subscribers) arrived "
        f"within the step plus {prof.grace:g} s of grace;"
    )
    w("4. no subscriber was disconnected during the step;")
    w("5. p99 end-to-end latency (publisher send time to subscriber receipt) is at most 500 ms.\n")
    w(
        f"The rate starts low and is multiplied by {prof.factor:g} until a step falls behind, "
        f"then {prof.refine} bisection step(s) narrow the gap. The **max sustained** figure is "
        "the measured deliveries/s of the best step that kept up; latency is then measured "
        "with the rate at 50% and 90% of that step's rate. A ramp that reaches "
        f"{prof.max_deliveries:,.0f} deliveries/s stops there (marked *capped*); a maximum "
        "whose first failing step had the load generator at 90% of its core or more is "
        "marked *loadgen-bound*.\n"
    )

    w("## Servers\n")
    w("| server | status | version |")
    w("|---|---|---|")
    for s in servers:
        if not s.available:
            status = f"not available: {s.reason}"
        elif s.failures:
            status = f"**failed** ({len(s.failures)} problem(s), see below)"
        else:
            status = "measured"
        w(f"| {s.title} | {status} | {s.version or '-'} |")
    w("")

    by_key = {s.key: s for s in servers}
    for sc in SCENARIOS:
        if sc.key not in set(args.scenarios.split(",")):
            continue
        w(f"## {sc.title}\n")
        not_run = {k.split("/")[1]: v for k, v in skipped.items() if k.startswith(sc.key + "/")}
        if sc.key == "telemetry":
            out.extend(render_telemetry(prof, servers, results, not_run, meta))
            continue
        points = sc.points(prof, meta["fd_cap"])
        for label, _size in points:
            cells = {k[2]: c for k, c in results.items() if k[0] == sc.key and k[1] == label}
            if not cells:
                continue
            if len(points) > 1 or sc.key == "channels":
                w(f"### {label}\n")
            w(f"| figure | server | median | min{DASH}max | {TIMES}C | {TIMES}N |")
            w("|---|---|---:|---:|---:|---:|")
            for fig in sc.figures:
                med = {k: stats([f.get(fig.key) for f in c.figures]) for k, c in cells.items()}
                ref_c = (med.get("centrifugo") or (None,))[0]
                ref_n = (med.get("naive") or (None,))[0]
                for s in servers:
                    if s.key not in cells:
                        continue
                    st = med[s.key]
                    name = fig.label if fig.unit == "/s" else f"{fig.label} ({fig.unit})"
                    if st is None:
                        w(f"| {name} | {s.title} | n/a | | | |")
                        continue
                    capped = ""
                    reps = cells[s.key].reports
                    if fig.key == "max" and any(r.get("capped") for r in reps):
                        capped = " (capped)"
                    if fig.key == "max" and any(r.get("loadgen_bound") for r in reps):
                        capped += " (loadgen-bound)"
                    noisy = ""
                    if any(r.get("_foreign_cpu", 0) > NOISY for r in cells[s.key].reports):
                        noisy = " \u2020"
                    w(
                        f"| {name} | {s.title} | **{fmt(st[0])}**{capped}{noisy} | "
                        f"{fmt(st[1])}{DASH}{fmt(st[2])} | {ratio(st[0], ref_c)} | "
                        f"{ratio(st[0], ref_n)} |"
                    )
            w("")
        if any(
            r.get("_foreign_cpu", 0) > NOISY
            for k, c in results.items()
            if k[0] == sc.key
            for r in c.reports
        ):
            w(
                f"\u2020 other processes used more than {NOISY} of a core during at least one "
                "repetition of this cell: treat it as noisy.\n"
            )
        for k, v in sorted(not_run.items()):
            if k in by_key and by_key[k].available:
                w(f"- {by_key[k].title}: not run ({v}).")
        w("")

    w("## Plots\n")
    for name, what in PLOTS.items():
        if (meta["results_dir"] / name).exists():
            w(f"- [{name}](results/{name}): {what}")
    w("")
    problems = [p for s in servers for p in s.failures]
    if problems:
        w("## Problems\n")
        for p in problems:
            w(f"- {p}")
        w("")
    return "\n".join(out) + "\n"


def _cell_text(st: tuple[float, float, float] | None, reps: list[dict[str, Any]]) -> str:
    """'**median** (min to max)' of one telemetry figure, marked when the machine was noisy."""
    if st is None:
        return "n/a"
    noisy = " \u2020" if any(r.get("_foreign_cpu", 0) > NOISY for r in reps) else ""
    spread = f" ({fmt(st[1])}{DASH}{fmt(st[2])})" if len(reps) > 1 else ""
    return f"**{fmt(st[0])}**{noisy}{spread}"


def render_telemetry(
    prof: Profile,
    servers: list[Server],
    results: Results,
    not_run: dict[str, str],
    meta: dict[str, Any],
) -> list[str]:
    """The telemetry section of RESULTS.md (after its heading)."""
    out: list[str] = []
    w = out.append
    by_key = {s.key: s for s in servers}
    sq = by_key.get("squall")
    if sq is None:
        w("Not run: Squall was not among the selected servers (--servers).\n")
        return out
    if not sq.available:
        w(f"Not available: Squall is not available ({sq.reason}).\n")
        return out
    if "squall" in not_run:
        w(f"Squall: {not_run['squall']}. The scenario will run once it does.\n")
        return out
    tel = TELEMETRY
    mongo = tel.mongo.available
    w(f"**Telemetry store**: {tel.mongo.describe()}.\n")
    labels = {tel.kind(lbl): lbl for lbl, _ in tel.points(prof, meta["fd_cap"])}
    full = prof.name == "full"

    def cell(kind: str, srv: str) -> Cell | None:
        return results.get((tel.key, labels[kind], srv))

    def med(kind: str, srv: str, key: str) -> tuple[float, float, float] | None:
        c = cell(kind, srv)
        return stats([f.get(key) for f in c.figures]) if c else None

    def text(kind: str, srv: str, key: str) -> str:
        c = cell(kind, srv)
        if c is None:
            return "not run"
        return _cell_text(med(kind, srv, key), c.reports)

    base = by_key.get("insert_one")
    base_note = ""
    if base is None:
        base_note = "not selected (--servers)"
    elif not base.available:
        base_note = f"not available: {base.reason}"
    elif "insert_one" in not_run:
        base_note = not_run["insert_one"]

    w("### HTTP: `POST /api/telemetry`, frames of 10 points from 200 devices\n")
    ramp_text = (
        "**Ramp**: the request rate ramps as in the other scenarios (a step keeps up when at "
        "least 95% of the offered requests could be issued, at most 1% failed and the p99 "
        "request latency is at most 500 ms)."
    )
    if mongo:
        w(
            "Squall stores points through its batched write-behind path (a queue, then one "
            "unordered insert of up to `telemetry.batch_size` points, as one chunk document "
            "per device and bucket); the baseline "
            "(`peers/telemetry_insert_one.py`) "
            f"awaits one `insert_one` per point before it answers. {ramp_text} "
            "**Persistence**: one step at the median max accepted rate of the ramp, "
            f"{prof.persist_step:g} s, on a fresh server and database; the server's count of "
            "points whose write MongoDB acknowledged (Squall: `points_written` of `/ready`; the "
            "baseline: `/stats`) is sampled every 0.1 s until it has not moved for 1 s with "
            f"nothing queued (at most {prof.persist_wait:g} s after the step), and the points "
            "are counted in MongoDB before and after the step (the distinct points of Squall's "
            "chunks in `telemetry_points`, the documents of the baseline's `points`). "
            "Persisted points/s = points "
            "stored / (time from the step's start to the last increase).\n"
        )
        if base_note:
            w(f"insert_one baseline: {base_note}.\n")
    else:
        w(
            f"{ramp_text} No MongoDB: these are figures of Squall's in-memory telemetry store; "
            "persistence and the insert_one baseline were not measured.\n"
        )
    have_base = any(cell(k, "insert_one") for k in ("ramp", "persist"))
    target_col = full and mongo
    head = "| figure | Squall, batched | insert_one baseline | Squall \u00f7 baseline |"
    rule = "|---|---:|---:|---:|"
    if not have_base:
        head, rule = "| figure | Squall |", "|---|---:|"
    if target_col:
        head += " target |"
        rule += "---|"
    w(head)
    w(rule)
    targets = {("persist", "persisted"): "\u2265 20 000/s and \u2265 \u00d720 the baseline"}
    undrained = False
    rows = [("ramp", f) for f in tel.RAMP_FIGURES]
    if mongo:
        rows += [("persist", f) for f in tel.PERSIST_FIGURES]
    for kind, fig in rows:
        name = fig.label if fig.unit == "/s" else f"{fig.label} ({fig.unit})"
        if kind == "persist":
            name = f"persistence step: {name}"
        s_st, b_st = med(kind, "squall", fig.key), med(kind, "insert_one", fig.key)
        r = ""
        if fig.unit == "/s" and fig.key != "offered":
            r = ratio(s_st[0] if s_st else None, b_st[0] if b_st else None)
        cells = [text(kind, srv, fig.key) for srv in ("squall", "insert_one")]
        if kind == "persist" and fig.key == "persisted":
            for i, srv in enumerate(("squall", "insert_one")):
                c = cell(kind, srv)
                if c and any(not (r.get("persist") or {}).get("drained", True) for r in c.reports):
                    cells[i] += " ‡"
                    undrained = True
        row = (
            f"| {name} | {cells[0]} | {cells[1]} | {r} |"
            if have_base
            else f"| {name} | {cells[0]} |"
        )
        if target_col:
            row += f" {targets.get((kind, fig.key), '')} |"
        w(row)
    w("")
    if undrained:
        w(
            "‡ in at least one repetition the store was still writing when the wait ended: "
            "the figure is the points MongoDB held then over the time since the step started "
            "(the writer was busy throughout).\n"
        )
    notes: list[str] = []
    for srv in ("squall", "insert_one"):
        title = by_key[srv].title if srv in by_key else srv
        c = cell("ramp", srv)
        for i, rep in enumerate(c.reports if c else []):
            after = rep.get("store_after")
            if after and after.get("queued"):
                err = f"; store error: {after['error']}" if after.get("error") else ""
                notes.append(
                    f"{title}, ramp rep {i + 1}: {after['queued']:,} accepted points were still "
                    f"queued, {after['written']:,} written, when the ramp ended{err}."
                )
        c = cell("persist", srv)
        for i, rep in enumerate(c.reports if c else []):
            notes.append(f"{title}, persistence rep {i + 1}: {_persist_note(rep)}")
    for n in notes:
        w(f"- {n}")
    if notes:
        w("")

    ws_label = labels["ws"]
    w(f"### {ws_label}\n")
    d = next(size for lbl, size in tel.points(prof, meta["fd_cap"]) if lbl == ws_label)
    w(
        f"{d:,} device connections (device tokens) each publish a frame of one point to "
        f"`telemetry:<device>` {prof.device_hz:g} times a second over the WebSocket and wait for "
        "the publish reply; the point carries its send time (`bench_ts`, \u00b5s). "
        f"{max(1, -(-d // 100))} dashboard connection(s) (tokens with a `devices` glob), at most "
        "100 device channels each, record the time from send to receipt of every point. "
        f"{prof.devices_step:g} s measured after a 1 s warm-up. A frame due while the previous "
        "reply is more than one period late is skipped and counted; the step keeps up when at "
        "least 95% of the frames were sent, at most 1% failed, 95% of the accepted points "
        "reached the dashboards in time and p99 is at most 500 ms.\n"
    )
    c = cell("ws", "squall")
    if c is None:
        w("Not run.\n")
        return out
    target_ws = full and d == 1000 and prof.device_hz == 10
    head, rule = "| figure | Squall |", "|---|---:|"
    if target_ws:
        head += " target |"
        rule += "---|"
    w(head)
    w(rule)
    for fig in tel.WS_FIGURES:
        if fig.key == "stored_pct" and not mongo:
            continue
        name = fig.label if fig.unit == "/s" else f"{fig.label} ({fig.unit})"
        row = f"| {name} | {text('ws', 'squall', fig.key)} |"
        if target_ws:
            row += " \u2264 50 ms |" if fig.key == "e2e_p99" else " |"
        w(row)
    w("")
    for i, rep in enumerate(c.reports):
        step = (rep.get("telemetry") or {}).get("step") or {}
        pub = step.get("publish") or {}
        line = (
            f"- rep {i + 1}: offered {step.get('rate', 0):,.0f} frames/s, sent "
            f"{pub.get('sent', 0):,} of {pub.get('intended', 0):,} frames "
            f"({pub.get('skipped', 0):,} skipped, {pub.get('errors', 0):,} failed), "
            f"server CPU {step.get('server_cpu_pct', 0):.0f}%, load generator CPU "
            f"{step.get('loadgen_cpu_pct', 0):.0f}%"
        )
        if step.get("reason"):
            line += f"; fell behind: {step['reason']}"
        if pub.get("first_error"):
            line += f"; first error: {pub['first_error'][:160]}"
        if rep.get("persist"):
            line += f"; {_persist_note(rep)}"
        w(line + ("" if line.endswith(".") else "."))
    w("")
    if any(
        r.get("_foreign_cpu", 0) > NOISY
        for k, cl in results.items()
        if k[0] == tel.key
        for r in cl.reports
    ):
        w(
            f"\u2020 other processes used more than {NOISY} of a core during at least one "
            "repetition of this cell: treat it as noisy.\n"
        )
    return out


def _persist_note(rep: dict[str, Any]) -> str:
    """What reached MongoDB in one run, in words."""
    p = rep.get("persist") or {}
    if not p:
        return "no persistence figures."
    if p.get("error"):
        return f"{p['accepted']:,} points accepted; {p['error']}."
    stored, acc = p.get("stored"), p.get("accepted", 0)
    lead = f"the step fell behind ({p['step_reason'][:160]}); " if p.get("step_reason") else ""
    if not p.get("drained"):
        text = (
            f"{stored:,} of {acc:,} accepted points stored when the wait ended "
            f"{p['wait_s']:g} s after the step, {p.get('queued_at_end', 0):,} still queued"
        )
    elif stored == acc:
        text = f"all {acc:,} accepted points stored"
    else:
        text = f"{stored:,} of {acc:,} accepted points stored (**{acc - stored:,} lost**)"
    if p.get("drain_s") is not None:
        text += f", the last {p['drain_s']:.1f} s after the step ended"
    if p.get("store_error"):
        text += f"; the store reported: {p['store_error'][:200]}"
    return lead + text + "."


def _plot_steps(cell: Cell | None) -> list[dict[str, Any]]:
    """Steps of a cell's first repetition that delivered something."""
    if not cell or not cell.reports:
        return []
    return [st for st in cell.reports[0].get("steps", []) if st.get("deliveries_per_s")]


def _max_of(cell: Cell | None) -> float:
    st = stats([f.get("max") for f in cell.figures]) if cell else None
    return st[0] if st else 0.0


def plot(
    results: Results, servers: list[Server], prof: Profile, fd_cap: int, out_dir: Path
) -> None:
    """Write the PNG plots into out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:  # a plot this run cannot draw must not survive from an older run
        (out_dir / name).unlink(missing_ok=True)
    colors = {"squall": "C0", "centrifugo": "C1", "naive": "C2", "socketio": "C3"}
    colors["insert_one"] = "C4"
    titles = {s.key: s.title for s in servers}

    fan = FanOut().points(prof, fd_cap)
    panels = [("fanout", lbl) for lbl, _ in fan]
    panels += [("channels", lbl) for lbl, _ in Channels().points(prof, fd_cap)]
    panels = [p for p in panels if any(_plot_steps(results.get((*p, s.key))) for s in servers)]
    if panels:
        n = len(panels)
        fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
        for ax, (sc_key, lbl) in zip(axes[0], panels, strict=True):
            for s in servers:
                steps = _plot_steps(results.get((sc_key, lbl, s.key)))
                good = sorted(
                    (st["deliveries_per_s"], st["latency"]["p50_ms"], st["latency"]["p99_ms"])
                    for st in steps
                    if st["ok"]
                )
                bad = [(st["deliveries_per_s"], st["latency"]["p99_ms"]) for st in steps]
                bad = [b for b, st in zip(bad, steps, strict=True) if not st["ok"]]
                c = colors[s.key]
                if good:
                    xs = [p[0] for p in good]
                    ax.plot(xs, [p[2] for p in good], "o-", color=c, label=titles[s.key])
                    ax.plot(xs, [p[1] for p in good], "x--", color=c, alpha=0.6)
                if bad:
                    ax.plot(
                        [b[0] for b in bad],
                        [b[1] for b in bad],
                        "o",
                        mfc="none",
                        color=c,
                        alpha=0.7,
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("delivered messages/s")
            ax.set_ylabel("latency, ms (solid p99, dashed p50)")
            name = "fan-out" if sc_key == "fanout" else "many channels"
            ax.set_title(f"{name} {lbl} (first repetition; hollow: fell behind)", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "latency_vs_rate.png", dpi=110)
        plt.close(fig)

    groups = [("fanout", lbl) for lbl, _ in fan]
    groups += [("channels", lbl) for lbl, _ in Channels().points(prof, fd_cap)]
    groups = [g for g in groups if any(_max_of(results.get((*g, s.key))) for s in servers)]
    if groups:
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4.2))
        present = [s for s in servers if any(_max_of(results.get((*g, s.key))) for g in groups)]
        width = 0.8 / max(1, len(present))
        for i, s in enumerate(present):
            ys = [_max_of(results.get((*g, s.key))) for g in groups]
            xs = [j + i * width for j in range(len(groups))]
            ax.bar(xs, ys, width, color=colors[s.key], label=titles[s.key])
        ax.set_xticks([j + width * (len(present) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{g[0]} {g[1]}" for g in groups], fontsize=8)
        ax.set_ylabel("max sustained deliveries/s (median)")
        ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "throughput.png", dpi=110)
        plt.close(fig)

    pts_c = Conns().points(prof, fd_cap)
    if any(("conns", lbl, s.key) in results for lbl, _ in pts_c for s in servers):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for s in servers:
            xs, rss, acc = [], [], []
            for lbl, n in pts_c:
                c = results.get(("conns", lbl, s.key))
                r = stats([f.get("rss_after_mib") for f in c.figures]) if c else None
                a = stats([f.get("accept_s") for f in c.figures]) if c else None
                if r and a:
                    xs.append(n)
                    rss.append(r[0])
                    acc.append(a[0])
            if xs:
                a1.plot(xs, rss, "o-", color=colors[s.key], label=titles[s.key])
                a2.plot(xs, acc, "o-", color=colors[s.key], label=titles[s.key])
        a1.set_xlabel("idle connections")
        a1.set_ylabel("server RSS, MiB")
        a2.set_xlabel("idle connections")
        a2.set_ylabel("time to accept all, s")
        for a in (a1, a2):
            a.set_xlim(left=0)
            a.set_ylim(bottom=0)
            a.grid(True, alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "rss_vs_connections.png", dpi=110)
        plt.close(fig)


def summary_json(results: Results, prof: Profile) -> dict[str, Any]:
    out: dict[str, Any] = {"profile": prof.name, "cells": []}
    for (sc, label, srv), cell in sorted(results.items()):
        keys = sorted({k for f in cell.figures for k in f})
        out["cells"].append(
            {
                "scenario": sc,
                "point": label,
                "server": srv,
                "median": {
                    k: (stats([f.get(k) for f in cell.figures]) or (None,))[0] for k in keys
                },
                "runs": cell.figures,
            }
        )
    return out


def machine_meta() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": f"Linux {platform.release()}",
        "python": platform.python_version(),
        "go": tool_version(["go", "version"]),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Squall benchmark suite")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition (CI smoke)")
    ap.add_argument("--servers", default="squall,centrifugo,naive,socketio,insert_one")
    ap.add_argument("--scenarios", default="fanout,channels,conns,telemetry")
    ap.add_argument("--reps", type=int, help="repetitions per point (default: 3, quick: 1)")
    ap.add_argument("--centrifugo", dest="centrifugo_bin", help="path of a centrifugo binary")
    ap.add_argument(
        "--centrifugo-source",
        default="",
        help="where the centrifugo binary came from, printed in RESULTS.md next to its version",
    )
    ap.add_argument(
        "--mongodb-url",
        default=os.environ.get("SQUALL_BENCH_MONGODB_URL", ""),
        help="loopback MongoDB (or FerretDB) URL for Squall's stores, telemetry included "
        "(default $SQUALL_BENCH_MONGODB_URL; empty: in-memory stores, and the telemetry "
        "scenario starts its own FerretDB when it finds one)",
    )
    ap.add_argument("--fanout-subs", help="comma-separated S for fan-out (default 100,1000,5000)")
    ap.add_argument("--channels-conns", type=int, help="N for many channels (default 5000)")
    ap.add_argument("--conns-sizes", help="comma-separated idle connection counts")
    ap.add_argument(
        "--output",
        default=str(BENCH / "RESULTS.md"),
        help="where to write the report (default bench/RESULTS.md)",
    )
    args = ap.parse_args(argv)
    prof = QUICK if args.quick else FULL
    if args.reps:
        prof = dataclasses.replace(prof, reps=args.reps)
    if args.fanout_subs:
        prof = dataclasses.replace(prof, fanout_subs=_ints(args.fanout_subs))
    if args.channels_conns:
        prof = dataclasses.replace(prof, channels_conns=args.channels_conns)
    if args.conns_sizes:
        prof = dataclasses.replace(prof, conns_sizes=_ints(args.conns_sizes))
    t_start = time.monotonic()
    load_before = loadavg()

    fd_limit = raise_fd_limit()
    fd_cap = fd_limit - 200
    CACHE.mkdir(parents=True, exist_ok=True)
    ensure_python_deps()
    say("building bench/loadgen")
    build_s = build_loadgen()
    say(f"loadgen built in {build_s:.1f}s")

    wanted = args.servers.split(",")
    servers = [s for s in make_servers(args) if s.key in wanted]
    TELEMETRY.configure(args)
    for s in servers:
        if s.key == "centrifugo":
            binary, why = find_centrifugo(args.centrifugo_bin)
            if binary is None:
                s.available, s.reason = False, why
            else:
                args.centrifugo_bin = binary
                write_centrifugo_config()
                s.version = tool_version([str(binary), "version"])
                if args.centrifugo_source:
                    s.version += f"; {args.centrifugo_source}"
        elif s.key == "squall" and s.available:
            s.version = "run.py of this working tree, " + _git_describe()
            if args.mongodb_url:
                host = urllib.parse.urlsplit(args.mongodb_url).hostname or ""
                if host not in ("127.0.0.1", "localhost", "::1"):
                    raise SystemExit("bench: --mongodb-url must point at this machine's loopback")
                s.env["SQUALL_MONGODB_URL"] = args.mongodb_url
                s.version += ", MongoDB stores"
            else:
                s.version += ", in-memory stores"
                if TELEMETRY.mongo.available:
                    s.version += " (scenario 4: FerretDB, see its section)"
            ensure_squall_deps(s)
        elif s.key == "naive":
            s.version = "bench/peers/naive_tornado.py, tornado " + _dist_version("tornado")
        elif s.key == "socketio":
            s.version = (
                f"python-socketio {_dist_version('python-socketio')}, "
                f"aiohttp {_dist_version('aiohttp')}"
            )
        elif s.key == "insert_one":
            s.version = (
                "bench/peers/telemetry_insert_one.py, "
                f"pymongo {_dist_version('pymongo')} AsyncMongoClient"
            )
            if not TELEMETRY.mongo.available:
                s.available, s.reason = False, "no MongoDB (no --mongodb-url and no FerretDB)"
        if not s.available:
            say(f"{s.title}: not available: {s.reason}")
    if not any(s.available for s in servers):
        say("no server can be benchmarked")
        return 1

    results, skipped = run_suite(args, prof, servers, fd_cap)

    results_dir = Path(args.output).resolve().parent / "results"  # plots beside the report
    results_dir.mkdir(parents=True, exist_ok=True)
    foreign = [r.get("_foreign_cpu", 0.0) for c in results.values() for r in c.reports]
    meta = {
        **machine_meta(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": shlex.join(["python", "bench/run.py", *sys.argv[1:]]),
        "duration_s": time.monotonic() - t_start,
        "build_s": build_s,
        "pinning": "server on CPU 0, load generator on CPU 1 (taskset)"
        if shutil.which("taskset") and (os.cpu_count() or 1) >= 2
        else "none (taskset or a second CPU missing)",
        "fd_limit": fd_limit,
        "fd_cap": fd_cap,
        "fd_capped": fd_cap < max(max(prof.conns_sizes), max(prof.fanout_subs)),
        "load_before": load_before,
        "load_after": loadavg(),
        "foreign_median": statistics.median(foreign) if foreign else 0.0,
        "foreign_max": max(foreign) if foreign else 0.0,
        "results_dir": results_dir,
    }
    try:
        plot(results, servers, prof, fd_cap, results_dir)
    except Exception as exc:  # a broken plot must not hide the figures
        say(f"plotting failed: {exc!r}")
        servers[0].failures.append(f"plotting failed: {exc!r}")
    meta["duration_s"] = time.monotonic() - t_start
    text = render(args, prof, servers, results, skipped, meta)
    Path(args.output).write_text(text)
    (results_dir / "summary.json").write_text(json.dumps(summary_json(results, prof), indent=1))
    (CACHE / "last-run.json").write_text(
        json.dumps([{"cell": list(k), "reports": c.reports} for k, c in results.items()])
    )
    say(f"wrote {args.output} in {meta['duration_s']:.0f}s total")
    print_summary(results, servers)

    failures = [p for s in servers for p in s.failures]
    measured = [s for s in servers if s.available and not s.failures]
    if failures:
        say(f"FAILED: {len(failures)} problem(s)")
        for p in failures:
            say(f"  {p}")
        return 1
    if not measured:
        return 1
    return 0


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def squall_importable() -> str:
    """Empty when Squall's modules import in this interpreter, else the error."""
    proc = subprocess.run(
        [sys.executable, "-c", "import server.app, server.config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode == 0:
        return ""
    lines = (proc.stderr or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def ensure_squall_deps(server: Server) -> None:
    """Install the root requirements.txt when Squall's imports fail for lack of a module."""
    err = squall_importable()
    if err.startswith("ModuleNotFoundError") and (REPO / "requirements.txt").exists():
        say(f"Squall does not import ({err}); installing requirements.txt")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-r", str(REPO / "requirements.txt")],
            check=False,
        )
        err = squall_importable()
    if err:
        server.failures.append(f"Squall does not import with {sys.executable}: {err}")
        server.available = False
        server.reason = f"does not import: {err}"


def _git_describe() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "commit unknown"
    return f"commit {out.stdout.strip()}" if out.returncode == 0 else "no commit yet"


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def print_summary(results: Results, servers: list[Server]) -> None:
    titles = {s.key: s.title for s in servers}
    for (sc, label, srv), cell in sorted(results.items()):
        figs = {
            k: (stats([f.get(k) for f in cell.figures]) or (None,))[0]
            for k in sorted({k for f in cell.figures for k in f})
        }
        shown = ", ".join(f"{k}={fmt(v)}" for k, v in figs.items()) or f"FAILED {cell.note}"
        print(f"{sc:9} {label:12} {titles.get(srv, srv):16} {shown}")


if __name__ == "__main__":
    sys.exit(main())
