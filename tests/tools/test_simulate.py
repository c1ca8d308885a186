"""The telemetry simulator (``tools/simulate.py``) against a real Squall.

In-process runs drive ``simulate()`` on the test's loop against the
``squall`` fixture, through both transports; one run starts the CLI the way
users do (``python -m tools.simulate``) against a ``run.py`` process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers.process import SquallProcess, clean_env
from tests.helpers.server import SECRET, TIME_FACTOR, token
from tests.helpers.services import REPO
from tools.simulate import Options, simulate

HOUR_MS = 3_600_000


@pytest.mark.parametrize("transport", ["ws", "http"])
async def test_simulated_devices_points_are_stored_and_queryable(squall, transport):
    """Every point the simulator reports accepted is stored under its device."""
    sq = await squall()
    opts = Options(
        url=sq.http_url,
        devices=3,
        hz=20,
        duration=0.6,
        transport=transport,
        batch=2 if transport == "http" else 1,
        secret=SECRET,
        bad_rate=0.1,
        gap_rate=0.0,
        seed=5,
    )
    summary = await simulate(opts)
    assert summary.errors == 0, summary.error_samples
    assert summary.points_accepted > 0
    assert summary.points_accepted + summary.points_rejected == summary.points_sent
    assert summary.points_rejected == summary.bad_points_sent
    devices = {d.id: d for d in await sq.hub.telemetry.devices()}
    assert sorted(devices) == ["sim-1", "sim-2", "sim-3"]
    assert set(devices["sim-1"].last_values) == {
        "temperature",
        "humidity",
        "voltage",
        "signal.rssi",
    }
    now = int(time.time() * 1000)
    stored = 0
    for device in devices:
        steps = await sq.hub.telemetry.query(device, "humidity", now - HOUR_MS, now + 1, HOUR_MS)
        stored += sum(s.count for s in steps)
    # Every good point carries humidity and a bad one is refused whole, so the stored
    # humidity count is exactly the number of accepted points.
    assert stored == summary.points_accepted


def test_simulator_cli_feeds_a_running_squall():
    """python -m tools.simulate exits 0, prints a JSON summary, and the devices show up."""
    proc = SquallProcess().start()
    try:
        proc.wait_ready()
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "tools.simulate",
                "--url",
                proc.http_url,
                "--devices",
                "2",
                "--hz",
                "10",
                "--duration",
                "1",
                "--transport",
                "http",
                "--config",
                str(proc.config_path),
                "--prefix",
                "cli-",
            ],
            cwd=REPO,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60 * TIME_FACTOR,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        assert summary["errors"] == 0
        assert summary["points_accepted"] > 0
        req = urllib.request.Request(  # noqa: S310 - loopback http
            f"{proc.http_url}/api/devices",
            headers={"Authorization": f"Bearer {token('ops', extra={'devices': ['cli-*']})}"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback http
            body = json.loads(resp.read())
        assert [d["id"] for d in body["devices"]] == ["cli-1", "cli-2"]
        assert all(d["online"] and d["last_values"] for d in body["devices"])
    finally:
        code = proc.stop()
    assert code == 0, proc.log_tail()
