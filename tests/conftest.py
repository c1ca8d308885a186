"""Shared fixtures: real services, the log guard, and unique names per test.

pytest-tornasync runs ``async def`` tests on the per-test ``io_loop`` but
cannot run async fixtures, so async set-up happens in sync fixtures through
``io_loop.run_sync``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import pytest_tornasync.plugin as tornasync

from tests.helpers import logs, scratch, services

pytest_plugins = ["tests.helpers.server"]


def _async_test_timeout(item: pytest.Function) -> float | None:
    """The limit ``run_sync`` gives an ``async def`` test: ``@pytest.mark.timeout(N)``'s N.

    pytest-tornasync reads only ``@pytest.mark.timeout(seconds=N)``, a keyword
    pytest-timeout refuses, so the one marker both plugins accept left every
    async test at ``--async-test-timeout`` (30 s) whatever it asked for.
    """
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    timeout: float | None = item.config.option.async_test_timeout
    return timeout


tornasync.get_test_timeout = _async_test_timeout  # looked up at each call


@pytest.fixture(scope="session", autouse=True)
def _scratch_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Working directories of started processes go under this run's basetemp (kept for
    the last few runs by pytest, then removed) rather than piling up in /tmp.
    Autouse and session-scoped, so it is set before the session's Redis and FerretDB."""
    scratch.set_base(tmp_path_factory.mktemp("processes", numbered=False))
    yield
    scratch.set_base(None)


@pytest.fixture(autouse=True)
def _log_guard() -> Iterator[logs.RecordingHandler]:
    """Fail a test that logs ERROR without declaring it with ``expect_log``."""
    handler = logs.install()
    yield handler
    logs.uninstall()
    errors = handler.unexpected_errors()
    if errors:
        pytest.fail("unexpected error logs:\n" + "\n".join(errors))


@pytest.fixture
def unique_prefix() -> str:
    """A key prefix / database name no other test uses."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis: ``SQUALL_REDIS_URL``, or a private redis-server we start."""
    url = os.environ.get("SQUALL_REDIS_URL")
    if url:
        yield url
        return
    try:
        svc = services.start_redis()
    except RuntimeError as exc:
        services.unavailable(str(exc))
    try:
        yield f"redis://127.0.0.1:{svc.port}/0"
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def mongo_url() -> Iterator[str]:
    """URL of a real MongoDB wire-protocol server: ``SQUALL_MONGODB_URL``, or FerretDB we start."""
    url = os.environ.get("SQUALL_MONGODB_URL")
    if url:
        yield url
        return
    try:
        svc = services.start_ferretdb()
    except RuntimeError as exc:
        services.unavailable(str(exc))
    try:
        yield f"mongodb://127.0.0.1:{svc.port}/"
    finally:
        svc.stop()
