"""The live dashboard in a real browser: Squall + the device simulator + headless Chromium.

Why a browser: the dashboard is JavaScript talking to Squall through the
official ``centrifuge`` SDK and the query API, under a strict CSP; only a real
browser tells us it signs in, lists devices, backfills and then draws live
points. The page is driven by ``dashboard.spec.mjs`` (Node + ``playwright-core``
with the system's ``/usr/bin/chromium``; no downloaded browsers), which prints
a JSON summary as its last line.

Set-up, all real processes stopped by their own pid:

* Squall: ``run.py --config <tmp yaml> --port <free port>`` (``SquallProcess``);
* the simulator: ``python -m tools.simulate`` sending one device for a bounded time;
* the dashboard token minted with the CLI users run: ``run.py token --devices '*'``.

Missing ``node``, Chromium or ``node_modules`` skips (``unavailable``), and fails
under ``SQUALL_REQUIRE_SERVICES=1``. ``SQUALL_UPDATE_DOCS_SCREENSHOT=1`` also
writes the screenshot to ``docs/dashboard.png`` (the README's picture), after
simulating three devices for ``SQUALL_DOCS_WARMUP`` seconds (default 300) so the
charts have history to show.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.process import SquallProcess, clean_env, run_cli
from tests.helpers.scratch import scratch_dir
from tests.helpers.server import API_KEY, SECRET, TIME_FACTOR
from tests.helpers.server import token as mint_token
from tests.helpers.services import REPO, unavailable

SPEC = Path(__file__).with_name("dashboard.spec.mjs")
ARTIFACTS = REPO / "tests" / "artifacts"
DOCS_SCREENSHOT = REPO / "docs" / "dashboard.png"
CHROMIUM = os.environ.get("SQUALL_CHROMIUM", "/usr/bin/chromium")
LIVE_WITHIN_MS = 2000  # selecting the device -> first live point on the chart
# Docs mode: a few devices, and minutes of history before the picture is taken.
UPDATE_DOCS = os.environ.get("SQUALL_UPDATE_DOCS_SCREENSHOT") == "1"
DOCS_WARMUP = float(os.environ.get("SQUALL_DOCS_WARMUP", "300")) if UPDATE_DOCS else 0.0
SIM_DEVICES = 3 if UPDATE_DOCS else 1
SIM_HZ = 20  # points per second per simulated device
SIM_DURATION = 60 + DOCS_WARMUP  # seconds; the simulator stops by itself after the test


def require_browser() -> str:
    """The ``node`` binary, once everything the browser test needs is there."""
    node = shutil.which("node")
    if node is None:
        unavailable("node not found (Node.js 20+ drives the browser test)")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"{CHROMIUM} not found: run scripts/install-browser")
    for package in ("playwright-core", "centrifuge", "uplot"):
        if not (REPO / "node_modules" / package).is_dir():
            unavailable(f"node_modules/{package} missing: run scripts/setup (npm ci)")
    assert node is not None
    return node


def get_json(url: str, token: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback http
        return json.loads(resp.read())


@pytest.fixture
def squall_proc() -> Iterator[SquallProcess]:
    proc = SquallProcess().start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"squall exited with {code}:\n{proc.log_tail()}"


@contextlib.contextmanager
def run_simulator(
    squall: SquallProcess, devices: int, duration: float
) -> Iterator[subprocess.Popen[bytes]]:
    """``devices`` simulated devices sending SIM_HZ points/s for ``duration`` s; stopped by pid."""
    log = scratch_dir("squall-sim-") / "simulate.log"
    argv = [
        sys.executable,
        "-m",
        "tools.simulate",
        "--url",
        squall.http_url,
        "--config",  # its token.hmac_secret mints the device token
        str(squall.config_path),
        "--devices",
        str(devices),
        "--hz",
        str(SIM_HZ),
        "--duration",
        str(duration),
        "--bad-rate",  # no deliberate bad points or silent spells: the test times live points
        "0",
        "--gap-rate",
        "0",
        "--seed",
        "1",
    ]
    env = clean_env()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.returncode not in (0, -15):
            print(f"simulator exited with {proc.returncode}:\n{log.read_text(errors='replace')}")


@pytest.fixture
def simulator(squall_proc: SquallProcess) -> Iterator[subprocess.Popen[bytes]]:
    with run_simulator(squall_proc, SIM_DEVICES, SIM_DURATION) as proc:
        yield proc


def wait_online_device(
    base: str, token: str, sim: subprocess.Popen[bytes], timeout: float = 15.0
) -> dict[str, Any]:
    """The first device ``GET /api/devices`` reports online (the simulator's)."""
    deadline = time.monotonic() + timeout * TIME_FACTOR
    body: Any = None
    while time.monotonic() < deadline:
        assert sim.poll() is None, f"simulator exited early with {sim.returncode}"
        try:
            body = get_json(f"{base}/api/devices", token)
        except urllib.error.HTTPError as exc:
            pytest.fail(f"GET /api/devices: HTTP {exc.code} {exc.read()[:300]!r}")
        online = [d for d in body["devices"] if d["online"] and d["last_values"]]
        if online:
            return dict(online[0])
        time.sleep(0.1)  # polling a condition with a deadline
    pytest.fail(f"no device online within {timeout}s: {body}")


@pytest.mark.timeout(120 + DOCS_WARMUP * TIME_FACTOR)
def test_dashboard_shows_live_device(squall_proc, simulator):
    node = require_browser()
    minted = run_cli(
        ["--config", str(squall_proc.config_path), "token", "--sub", "dash", "--devices", "*"]
    )
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    device = wait_online_device(squall_proc.http_url, token, simulator)
    if DOCS_WARMUP:
        time.sleep(DOCS_WARMUP)  # history for the README picture, not synchronisation
        assert simulator.poll() is None, f"simulator exited early with {simulator.returncode}"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shots = [ARTIFACTS / "dashboard.png"]
    if UPDATE_DOCS:
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shots.append(DOCS_SCREENSHOT)
    env = clean_env(
        {
            "SQUALL_URL": squall_proc.http_url,
            "SQUALL_TOKEN": token,
            "SQUALL_DEVICE": device["id"],
            "SQUALL_SCREENSHOTS": ",".join(str(p) for p in shots),
            "SQUALL_CHROMIUM": CHROMIUM,
            "SQUALL_LIVE_WITHIN": str(int(LIVE_WITHIN_MS * TIME_FACTOR)),
        }
    )
    run = run_spec(node, SPEC, env, 90 * TIME_FACTOR)
    lines = run.stdout.strip().splitlines()
    assert lines, f"no output from the browser script (exit {run.returncode}):\n{run.stderr}"
    summary = json.loads(lines[-1])
    print("browser summary:", json.dumps(summary, indent=2))
    why = (
        f"{summary.get('error')}\nsteps done: {summary.get('steps')}\n"
        f"browser problems: {summary.get('problems')}\n{run.stderr[-3000:]}\n"
        f"squall log:\n{squall_proc.log_tail()}"
    )
    assert summary["ok"], why
    assert run.returncode == 0, why
    assert summary["firstLiveMs"] <= LIVE_WITHIN_MS * TIME_FACTOR
    assert summary["conn"] == "connected"
    assert summary["subscription"] == "subscribed"
    assert {m["metric"] for m in summary["metrics"]} == set(device["last_values"])
    assert all(m["backfilled"] > 0 for m in summary["metrics"]), summary["metrics"]
    assert summary["errors"] == []
    for shot in shots:
        assert shot.stat().st_size > 10_000, shot


FAULTS_SPEC = Path(__file__).with_name("dashboard_faults.spec.mjs")
QUIET_DEVICES = 300  # listed devices besides the live one
QUIET_METRICS = 16  # metrics of each: 4 800 chips in the list


def post_quiet_devices(squall: SquallProcess) -> str:
    """QUIET_DEVICES devices that report once (POST /api/telemetry); the first one's id."""
    ids = [f"quiet-{i:03d}" for i in range(QUIET_DEVICES)]
    now = int(time.time() * 1000)
    for i, dev in enumerate(ids):
        body = json.dumps(
            [{"ts": now, "values": {f"m{k:02d}": i + k / 10 for k in range(QUIET_METRICS)}}]
        ).encode()
        req = urllib.request.Request(  # noqa: S310 - loopback http
            f"{squall.http_url}/api/telemetry",
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {mint_token(dev, extra={'device': True})}"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback http
            assert resp.status == 202, resp.read()
    return ids[0]


def run_spec(
    node: str, spec: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a browser script; one stopped at ``timeout`` fails the test with its stderr
    (the faults script logs each step done there: where it was)."""
    try:
        return subprocess.run(
            [node, str(spec)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr or b""  # bytes here, whatever text= says
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        pytest.fail(f"{spec.name} stopped after {exc.timeout} s:\n{err[-3000:]}")


@pytest.mark.timeout(180)
def test_dashboard_faults():
    """Error banners, many devices, reconnects during a slow history reload, token expiry.

    See ``dashboard_faults.spec.mjs`` for the steps and the bug each one caught.
    """
    node = require_browser()
    # Quiet devices stay "online" for the whole test: their rows must not change.
    squall = SquallProcess(overrides={"telemetry.online_timeout": 3600}).start()
    try:
        squall.wait_ready()
        dash = mint_token("dash", extra={"devices": ["*"]})
        with run_simulator(squall, 1, 120) as sim:
            device = wait_online_device(squall.http_url, dash, sim)["id"]
            other = post_quiet_devices(squall)  # after: the first online device is the live one
            env = clean_env(
                {
                    "SQUALL_URL": squall.http_url,
                    "SQUALL_TOKEN": dash,
                    "SQUALL_USER": "dash",
                    "SQUALL_API_KEY": API_KEY,
                    "SQUALL_SECRET": SECRET,
                    "SQUALL_DEVICE": device,
                    "SQUALL_OTHER": other,
                    "SQUALL_CHROMIUM": CHROMIUM,
                }
            )
            run = run_spec(node, FAULTS_SPEC, env, 140 * TIME_FACTOR)
    finally:
        code = squall.stop()
    lines = run.stdout.strip().splitlines()
    assert lines, f"no output from the browser script (exit {run.returncode}):\n{run.stderr}"
    summary = json.loads(lines[-1])
    print("browser summary:", json.dumps(summary, indent=2))
    why = (
        f"{summary.get('error')}\nsteps done: {summary.get('steps')}\n"
        f"browser problems: {summary.get('problems')}\n{run.stderr[-3000:]}\n"
        f"squall log:\n{squall.log_tail()}"
    )
    assert summary["ok"], why
    assert run.returncode == 0, why
    assert summary["rows"] == QUIET_DEVICES + 1
    assert code == 0, f"squall exited with {code}:\n{squall.log_tail()}"
