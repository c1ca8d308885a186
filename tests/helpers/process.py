"""Run Squall as a real process: ``python run.py --config <tmp yaml> --port <port>``.

Why: start-up, signal handling, exit codes, the CLI and environment overrides
only exist in ``run.py``, so tests of them (and multi-node tests, where each
node is its own process) must run the command a user runs, not the in-process
``squall`` fixture. Each ``SquallProcess`` writes its config to a private
temporary directory, captures stdout and stderr in a log file there, and is
stopped by its own pid (SIGTERM, then SIGKILL after a deadline), never by name.

Use::

    proc = SquallProcess(overrides={"client.ping_interval": 0}).start()
    proc.wait_ready()                        # /health answers 200
    ...
    assert proc.stop(timeout=10) == 0        # SIGTERM, wait, exit code

In ``async`` tests use the ``*_async`` variants: they wait in a worker thread,
so the test's IOLoop keeps serving its WebSocket clients meanwhile.

``ProcessGroup`` owns several processes and stops whatever is still running at
teardown; a test module wires it into a fixture (see ``tests/test_run.py``).
``run_cli`` runs a one-shot command (``run.py token ...``) and captures its
output.

To extend: give ``SquallProcess`` the new knob as a keyword argument (a config
key goes through ``overrides``, an environment variable through ``env``); keep
the default config the same as the in-process fixture's ``BASE_CONFIG``.
"""

from __future__ import annotations

import asyncio
import copy
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.config import ENV_OVERRIDES
from tests.helpers.scratch import scratch_dir
from tests.helpers.server import BASE_CONFIG, TIME_FACTOR, set_dotted
from tests.helpers.services import REPO, free_port

RUN_PY = REPO / "run.py"
DEFAULT_READY_TIMEOUT = 20.0  # seconds for a fresh interpreter to import and listen


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The test runner's environment without ``SQUALL_*`` config overrides, plus ``env``.

    A developer's ``SQUALL_REDIS_URL`` must not silently switch a test's process
    to another engine; a test that wants one passes it explicitly.
    """
    out = {k: v for k, v in os.environ.items() if k not in ENV_OVERRIDES}
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env or {})
    return out


def run_cli(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python run.py ARGS`` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, str(RUN_PY), *args],
        cwd=REPO,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout * TIME_FACTOR,
        check=False,
    )


def http_get(url: str, timeout: float = 2.0) -> tuple[int | None, bytes]:
    """``GET url``: (status, body), or (None, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback http
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except OSError:
        return None, b""


class SquallProcess:
    """One ``run.py`` server process (see the module docstring).

    Args:
        config: the whole YAML config as a dict; default: the in-process
            fixture's ``BASE_CONFIG`` (test secret and API key).
        overrides: dotted keys applied on top, e.g. ``{"redis.url": url}``.
        port: port to listen on; default: a free loopback port.
        port_flag: pass ``--port`` on the command line (False to test
            ``SQUALL_PORT`` or the config file's port; ``port`` must then be
            where the process will actually listen).
        env: extra environment variables (``SQUALL_*`` from the runner's own
            environment are dropped, see ``clean_env``).
        args: extra command-line arguments, e.g. ``["--name", "node-a"]``.
        workdir: directory for the config and log; default: a new temp dir.
        max_open_files: the process's file descriptor limit (``RLIMIT_NOFILE``);
            default: the runner's.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        *,
        overrides: dict[str, Any] | None = None,
        port: int | None = None,
        port_flag: bool = True,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        workdir: Path | None = None,
        max_open_files: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.max_open_files = max_open_files
        self.workdir = workdir or scratch_dir("squall-proc-")
        self.config = copy.deepcopy(BASE_CONFIG if config is None else config)
        set_dotted(self.config, "server.port", self.port)
        for key, value in (overrides or {}).items():
            set_dotted(self.config, key, value)
        self.config_path = self.workdir / "config.yaml"
        self.log_path = self.workdir / "squall.log"
        self.env = clean_env(env)
        self.argv = [sys.executable, str(RUN_PY), "--config", str(self.config_path)]
        if port_flag:
            self.argv += ["--port", str(self.port)]
        self.argv += args or []
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SquallProcess:
        """Write the config and spawn the process (does not wait; see ``wait_ready``).

        Can be called again after ``stop``/``kill`` to restart on the same port.
        """
        assert not self.running, "already running"
        self.config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=None if self.max_open_files is None else self._limit_files,
            )
        return self

    def _limit_files(self) -> None:  # in the child, before exec
        assert self.max_open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_open_files, self.max_open_files))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def health(self, path: str = "/health") -> int | None:
        """HTTP status of ``GET path``, or None when nothing answers."""
        return http_get(f"{self.http_url}{path}")[0]

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT, path: str = "/health") -> None:
        """Wait until ``GET path`` answers 200 (``/ready`` to also wait for the engines).

        Raises:
            RuntimeError: the process exited, or did not answer in time (with the log tail).
        """
        deadline = time.monotonic() + timeout * TIME_FACTOR
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"squall exited with {self.returncode}:\n{self.log_tail()}")
            if self.health(path) == 200:
                return
            time.sleep(0.05)  # polling a condition with a deadline, not synchronising on time
        raise RuntimeError(f"squall: {path} not 200 within {timeout}s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this process (by pid) if it is still running."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM: ask for a graceful shutdown, without waiting."""
        self.signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """Wait for the process to exit; its exit code, or None if still running."""
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout * TIME_FACTOR)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout``; SIGKILL if still running. Returns the exit code.

        A process that had to be killed returns ``-9`` (negative signal number).
        """
        if self.proc is None:
            return 0
        self.terminate()
        code = self.wait(timeout)
        if code is None:
            self.kill()
            code = self.proc.returncode
        return code

    def kill(self) -> None:
        """SIGKILL (abrupt stop, for fault tests) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # ------------------------------------------------------------------ async variants

    async def wait_ready_async(
        self, timeout: float = DEFAULT_READY_TIMEOUT, path: str = "/health"
    ) -> None:
        await asyncio.to_thread(self.wait_ready, timeout, path)

    async def wait_async(self, timeout: float) -> int | None:
        return await asyncio.to_thread(self.wait, timeout)

    async def stop_async(self, timeout: float = 10.0) -> int:
        return await asyncio.to_thread(self.stop, timeout)

    # ------------------------------------------------------------------ output

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def error_lines(self) -> list[str]:
        """The log's lines at ERROR or above, and tracebacks (the access log is left out:
        a 5xx there is a response, reported by the test that expects or not expects it)."""
        return [
            line
            for line in self.log_text().splitlines()
            if " tornado.access " not in line
            and (" ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"))
        ]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]


class ProcessGroup:
    """Processes a test started; ``close()`` stops those still running (SIGTERM, then SIGKILL).

    Args:
        base: directory under which each process gets its own ``procN`` workdir
            (a test's ``tmp_path``); default: a new temporary directory each.
    """

    def __init__(self, base: Path | None = None) -> None:
        self.base = base
        self.processes: list[SquallProcess] = []

    def __call__(self, *args: Any, **kwargs: Any) -> SquallProcess:
        """``group(**same_as_SquallProcess)``: create and track (not started yet)."""
        if self.base is not None and "workdir" not in kwargs:
            workdir = self.base / f"proc{len(self.processes)}"
            workdir.mkdir(parents=True, exist_ok=True)
            kwargs["workdir"] = workdir
        proc = SquallProcess(*args, **kwargs)
        self.processes.append(proc)
        return proc

    def error_lines(self) -> list[str]:
        return [line for proc in self.processes for line in proc.error_lines()]

    def close(self, timeout: float = 10.0) -> None:
        for proc in self.processes:
            if proc.running:
                proc.stop(timeout)


# ---------------------------------------------------------------------- several instances

NODE_HEARTBEAT_INTERVAL = 0.25  # seconds; cluster nodes announce themselves this often
NODE_EXPIRY = 2.0  # seconds; a node silent this long leaves `info`


def close_checked(owner: ProcessGroup | SquallCluster) -> None:
    """Stop every process of ``owner`` by pid, then fail the test on their ERROR lines."""
    owner.close()
    errors = owner.error_lines()
    if errors:
        pytest.fail("error logs from squall processes:\n" + "\n".join(errors))


def _with_client_name(url: str, name: str) -> str:
    """``url`` with ``client_name=name``: the node's Redis connections show it in CLIENT LIST."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    query = [(k, v) for k, v in query if k != "client_name"] + [("client_name", name)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class SquallCluster:
    """Several ``run.py`` processes sharing one Redis under one key prefix.

    Why: cross-instance delivery, cluster-wide presence, control messages,
    node heartbeats and recovery on another node only exist between real
    processes. Every node gets:

    * ``redis.url`` with ``client_name=<node name>``, so a fault test finds that
      node's pub/sub link in ``CLIENT LIST`` (``CLIENT KILL ID``);
    * ``redis.prefix``: the test's unique prefix, so tests never see each other;
    * ``server.name`` ``node-a``, ``node-b``, ... and short heartbeat/expiry
      intervals (``NODE_HEARTBEAT_INTERVAL``, ``NODE_EXPIRY``), so ``info``
      converges within a test.

    Use::

        cluster = SquallCluster(redis_url, unique_prefix, base=tmp_path)
        a, b = await cluster.start_async(2)   # in parallel; waits for /ready on each
        cluster.add(**{"redis.reconnect_delay": 1.0})   # per-node config: add, then start
        (c,) = await cluster.start_async()
        ...
        cluster.close()                       # stops what still runs, by pid

    ``close`` also returns every node's log lines at ERROR or with a traceback,
    so a test module can fail on them (logs are part of the oracle).
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        *,
        base: Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.group = ProcessGroup(base)
        self.overrides = {
            "redis.prefix": prefix,
            "redis.reconnect_max_delay": 0.5,
            "server.node_heartbeat_interval": NODE_HEARTBEAT_INTERVAL,
            "server.node_expiry": NODE_EXPIRY,
            **(overrides or {}),
        }

    @property
    def nodes(self) -> list[SquallProcess]:
        return self.group.processes

    def add(self, **overrides: Any) -> SquallProcess:
        """A new node (not started), named after its position: node-a, node-b, ..."""
        name = f"node-{chr(ord('a') + len(self.nodes))}"
        cfg = {
            **self.overrides,
            "server.name": name,
            "redis.url": _with_client_name(self.redis_url, name),
            **overrides,
        }
        return self.group(overrides=cfg)

    def start(self, n: int = 0, **overrides: Any) -> list[SquallProcess]:
        """Add ``n`` nodes, start them with any others added but never started, together,
        and wait until each answers ``/ready``. Returns the nodes started."""
        for _ in range(n):
            self.add(**overrides)
        procs = [proc for proc in self.nodes if proc.proc is None]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_ready(path="/ready")
        return procs

    async def start_async(self, n: int = 0, **overrides: Any) -> list[SquallProcess]:
        return await asyncio.to_thread(self.start, n, **overrides)

    def error_lines(self) -> list[str]:
        """Log lines at ERROR or above (or tracebacks) from every node so far."""
        return [
            f"{p.config['server']['name']}: {line}" for p in self.nodes for line in p.error_lines()
        ]

    def close(self, timeout: float = 10.0) -> None:
        self.group.close(timeout)
