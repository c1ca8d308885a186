#!/usr/bin/env python3
"""Squall benchmark suite: build, run every scenario against every server, report.

    python bench/run.py [--quick] [--servers squall,centrifugo,naive,socketio]
                        [--scenarios fanout,channels,conns,telemetry] [--reps N]
                        [--centrifugo PATH]

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
import shutil
import signal
import socket
import statistics
import subprocess
import sys
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
REQUIRED_MODULES = ("tornado", "jwt", "aiohttp", "socketio", "engineio", "matplotlib")

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

    def __init__(self, server: Server, label: str) -> None:
        self.server = server
        self.port = free_port()
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{server.key}-{label}.log"
        self.log = self.log_path.open("wb")
        env = {**os.environ, **server.env}
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
def running(server: Server, label: str) -> Iterator[Running]:
    """Start server on a free port (three tries: another process may take the port)."""
    for attempt in range(3):
        try:
            r = Running(server, label)
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
    return [squall, centrifugo, naive, sio]


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
        return ""

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


class FanOut(Scenario):
    key = "fanout"
    title = "1. Fan-out: one channel, S subscribers, HTTP API publisher"
    figures = [Figure("max", "max sustained deliveries/s", "/s", True), *LATENCY_FIGURES]

    def points(self, prof: Profile, fd_cap: int) -> list[tuple[str, int]]:
        return [(f"S={s:,}", min(s, fd_cap)) for s in prof.fanout_subs]

    def args(self, size: int, prof: Profile, run: Running, hint: float | None) -> list[str]:
        start = max(hint or 0, prof.fanout_start)
        return ["-mode", "fanout", "-subs", str(size), "-start", f"{start:.0f}"]


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


class Telemetry(Scenario):
    """Telemetry ingest through Squall's ``POST /api/telemetry``.

    Pluggable: it runs only where ``probe`` gets a 2xx for one point. The load
    generator's ``ingest`` mode posts frames of 10 points, each frame from one
    of 200 devices in turn with that device's token (claims ``sub``,
    ``device: true``). The store is the in-memory one, or MongoDB when
    ``--mongodb-url`` (or ``$SQUALL_BENCH_MONGODB_URL``) is given.
    """

    key = "telemetry"
    title = "4. Telemetry ingest: POST /api/telemetry"
    figures = [
        Figure("max", "max sustained points/s (10 per request)", "/s", True),
        Figure("p50_50", "p50 request latency at 50% of max", "ms", False),
        Figure("p99_50", "p99 request latency at 50% of max", "ms", False),
        Figure("p50_90", "p50 request latency at 90% of max", "ms", False),
        Figure("p99_90", "p99 request latency at 90% of max", "ms", False),
    ]

    def points(self, prof: Profile, fd_cap: int) -> list[tuple[str, int]]:
        return [("HTTP", 0)]

    def applicable(self, srv: Server) -> str:
        return "" if srv.key == "squall" else "no telemetry endpoint (Squall feature)"

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
        start = max(hint or 0, prof.ingest_start)
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
        ]


SCENARIOS: list[Scenario] = [FanOut(), Channels(), Conns(), Telemetry()]


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
                    where = f"{sc.key} {label} {srv.title} rep {rep_i + 1}"
                    cell = results.setdefault((sc.key, label, srv.key), Cell())
                    tag = f"{sc.key}-{size}-r{rep_i + 1}"
                    try:
                        with running(srv, tag) as run:
                            why = sc.probe(run)
                            if why:
                                skipped[f"{sc.key}/{srv.key}"] = why
                                say(f"{where}: {why}")
                                results.pop((sc.key, label, srv.key), None)
                                continue
                            say(f"{where}: running")
                            hint = hints.get(srv.key)
                            rep = run_loadgen(run, prof, sc.args(size, prof, run, hint))
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
        f"Generated by `python bench/run.py{' --quick' if prof.name == 'quick' else ''}` "
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
            sq = by_key.get("squall")
            if sq is None:
                w("Not run: Squall was not among the selected servers (--servers).\n")
                continue
            if not sq.available:
                w(f"Not available: Squall is not available ({sq.reason}).\n")
                continue
            if "squall" in not_run:
                w(f"Squall: {not_run['squall']}. The scenario will run once it does.\n")
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
    ap.add_argument("--servers", default="squall,centrifugo,naive,socketio")
    ap.add_argument("--scenarios", default="fanout,channels,conns,telemetry")
    ap.add_argument("--reps", type=int, help="repetitions per point (default: 3, quick: 1)")
    ap.add_argument("--centrifugo", dest="centrifugo_bin", help="path of a centrifugo binary")
    ap.add_argument(
        "--mongodb-url",
        default=os.environ.get("SQUALL_BENCH_MONGODB_URL", ""),
        help="loopback MongoDB (or FerretDB) URL for Squall's stores, telemetry included "
        "(default $SQUALL_BENCH_MONGODB_URL; empty: in-memory stores)",
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
    for s in servers:
        if s.key == "centrifugo":
            binary, why = find_centrifugo(args.centrifugo_bin)
            if binary is None:
                s.available, s.reason = False, why
            else:
                args.centrifugo_bin = binary
                write_centrifugo_config()
                s.version = tool_version([str(binary), "version"])
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
            ensure_squall_deps(s)
        elif s.key == "naive":
            s.version = "bench/peers/naive_tornado.py, tornado " + _dist_version("tornado")
        elif s.key == "socketio":
            s.version = (
                f"python-socketio {_dist_version('python-socketio')}, "
                f"aiohttp {_dist_version('aiohttp')}"
            )
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
