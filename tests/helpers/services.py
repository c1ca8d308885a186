"""Real Redis and MongoDB wire-protocol servers for the tests.

Why: the engines are tested against the real thing (STYLE.md 21). This module
starts private ``redis-server`` and FerretDB processes on free loopback
ports, each with its own temporary directory, waits until they answer, and
stops them by their own pid. Fault tests use ``ServiceProcess.stop()`` /
``start()`` to take a service away and bring it back on the same port.

Where the binaries come from:

* ``redis-server`` from ``PATH`` (Debian package ``redis-server``), or
  ``SQUALL_REDIS_SERVER_BIN``.
* FerretDB from ``SQUALL_FERRETDB_BIN``, else ``.services/bin/ferretdb`` in the
  repository (built by ``scripts/install-services``), else ``ferretdb`` on
  ``PATH``.

``SQUALL_REDIS_URL`` / ``SQUALL_MONGODB_URL`` point the suite at servers that
already run instead (a real MongoDB, for instance); fault tests that must
restart a service still start their own.

When ``SQUALL_REQUIRE_SERVICES=1`` (set by ``.ci/run``), a service that cannot
be found or started fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.scratch import scratch_dir

REPO = Path(__file__).resolve().parents[2]


def require_services() -> bool:
    return os.environ.get("SQUALL_REQUIRE_SERVICES", "") == "1"


def unavailable(reason: str) -> None:
    """Skip, or fail when CI requires every service."""
    if require_services():
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class ServiceProcess:
    """One server process we own: started on a fixed loopback port, stopped by pid."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        if not wait_port(self.port, timeout):
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} did not listen on {self.port}: {tail}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        """Abrupt stop (SIGKILL), for fault tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def redis_binary() -> str | None:
    return os.environ.get("SQUALL_REDIS_SERVER_BIN") or shutil.which("redis-server")


def ferretdb_binary() -> str | None:
    env = os.environ.get("SQUALL_FERRETDB_BIN")
    if env:
        return env
    local = REPO / ".services" / "bin" / "ferretdb"
    if local.exists():
        return str(local)
    return shutil.which("ferretdb")


def start_redis(port: int | None = None) -> ServiceProcess:
    binary = redis_binary()
    if binary is None:
        raise RuntimeError("redis-server not found (apt-get install -y redis-server)")
    port = port or free_port()
    workdir = scratch_dir("squall-redis-")
    argv = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--protected-mode",
        "yes",
    ]
    svc = ServiceProcess("redis", argv, port, workdir)
    svc.start()
    return svc


def start_ferretdb(port: int | None = None, workdir: Path | None = None) -> ServiceProcess:
    binary = ferretdb_binary()
    if binary is None:
        raise RuntimeError("ferretdb not found (run scripts/install-services)")
    port = port or free_port()
    workdir = workdir or scratch_dir("squall-ferretdb-")
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    argv = [
        binary,
        "--handler=sqlite",
        f"--sqlite-url=file:{data}/",
        f"--listen-addr=127.0.0.1:{port}",
        f"--state-dir={workdir}",
        "--debug-addr=-",
        "--telemetry=disable",
        "--log-level=warn",
    ]
    svc = ServiceProcess("ferretdb", argv, port, workdir)
    svc.start()
    return svc
