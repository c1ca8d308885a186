"""A database outage under a running Squall: live delivery goes on, nothing acknowledged is lost.

The test starts its own FerretDB (``services.start_ferretdb``) so it can kill
it and bring it back on the same port and data directory while a publisher
sends a numbered sequence through the HTTP API. The stored documents are then
read with PyMongo directly and compared with what the publisher was told.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import tornado.httpclient
from pymongo import AsyncMongoClient

from tests.cluster import Sdk, api, api_ok, subscribed, take, until
from tests.e2e import ready, store_overrides, stored
from tests.helpers import services
from tests.helpers.process import ProcessGroup, close_checked
from tests.helpers.server import TIME_FACTOR, token

QUEUE_SIZE = 6  # mongodb.queue_size: publications the process may hold while the DB is down
REFUSED = 3  # publications the test sends into the full queue


@pytest.fixture
def ferretdb(tmp_path: Path) -> Iterator[services.ServiceProcess]:
    """A private FerretDB this test may kill and restart (same port, same data directory)."""
    workdir = tmp_path / "ferretdb"
    workdir.mkdir()
    try:
        svc = services.start_ferretdb(workdir=workdir)
    except RuntimeError as exc:
        services.unavailable(str(exc))
    yield svc
    svc.stop()


@pytest.fixture
def procs(ferretdb: services.ServiceProcess, tmp_path: Path) -> Iterator[ProcessGroup]:
    """Squall processes, stopped by pid before FerretDB is; their ERROR lines fail the test."""
    group = ProcessGroup(tmp_path)
    yield group
    close_checked(group)


@pytest.fixture
def sdk(procs: ProcessGroup, io_loop: Any) -> Iterator[Sdk]:
    made = Sdk()
    yield made
    io_loop.run_sync(made.close)


async def test_outage_keeps_live_delivery_refuses_when_full_and_loses_nothing_acknowledged(
    ferretdb: services.ServiceProcess, procs: ProcessGroup, sdk: Sdk, unique_prefix: str
) -> None:
    """DB killed and restarted: live delivery goes on, /ready says 503, a full queue gives 1001,
    and every acknowledged publication is stored exactly once, nothing refused is."""
    channel = "persist:outage"
    url = f"mongodb://127.0.0.1:{ferretdb.port}/"
    proc = procs(
        overrides=store_overrides(
            url, unique_prefix, **{"mongodb.queue_size": QUEUE_SIZE, "mongodb.batch_size": 2}
        )
    )
    proc.start()
    await proc.wait_ready_async(path="/ready")
    client, _ = await sdk.connected(proc.ws_url, "watcher")
    _, events, _ = await subscribed(client, channel)

    acked: list[int] = []
    refused: list[int] = []
    sent = 0

    async def publish() -> None:
        nonlocal sent
        sent += 1
        n = sent
        reply = await api(proc, "publish", {"channel": channel, "data": {"n": n}})
        if "result" in reply:
            acked.append(n)
        else:
            assert reply["error"] == {
                "code": 1001,
                "message": "durable store queue is full",
                "temporary": True,
            }, reply
            refused.append(n)

    async def store_status() -> tuple[int, dict[str, Any]]:
        code, body = await ready(proc)
        return code, body.get("store", {})

    async def drained() -> bool:
        code, store = await store_status()
        return code == 200 and store.get("queue_depth") == 0

    # Database up.
    for _ in range(4):
        await publish()
    assert acked == [1, 2, 3, 4]
    assert [p.data["n"] for p in await take(events, 4)] == acked
    await until(drained, what="the first publications written")

    # Database down: publishing goes on until the queue is full, then 1001.
    ferretdb.kill()

    async def not_ready() -> bool:
        return (await store_status())[0] == 503

    await until(not_ready, within=10, what="/ready 503 after the database went away")
    code, store = await store_status()
    assert code == 503
    assert store["ready"] is False
    assert store["error"]
    for _ in range(2):
        await publish()
    # The rest at once: exactly queue_size are accepted, whatever the interleaving.
    await asyncio.gather(*(publish() for _ in range(QUEUE_SIZE - 2 + REFUSED)))
    during = acked[4:]
    assert len(during) == QUEUE_SIZE
    assert sorted(during + refused) == list(range(5, 5 + QUEUE_SIZE + REFUSED))
    assert len(refused) == REFUSED
    # Subscribers got the accepted ones (only those) live, while the database was down.
    live = [p.data["n"] for p in await take(events, QUEUE_SIZE)]
    assert sorted(live) == sorted(during)
    assert not ferretdb.running
    code, store = await store_status()
    assert (code, store["queue_depth"], store["queue_limit"]) == (503, QUEUE_SIZE, QUEUE_SIZE)
    # A bystander channel without persistence is not affected.
    await api_ok(proc, "publish", {"channel": "chat:bystander", "data": {"ok": True}})

    # Database back on the same port and data: the queue drains, /ready is 200 again.
    ferretdb.start()
    await until(drained, within=20, what="/ready 200 with an empty queue after the restart")
    for _ in range(3):
        await publish()
    assert acked[-3:] == [sent - 2, sent - 1, sent]
    assert [p.data["n"] for p in await take(events, 3)] == acked[-3:]
    await until(drained, what="the last publications written")
    assert events.drain("publication") == []  # nothing refused was delivered

    docs = await stored(url, unique_prefix, channel)
    numbers = [orjson.loads(d["data"])["n"] for d in docs]
    assert sorted(numbers) == sorted(acked)  # each acknowledged publication once, none missing
    assert not set(numbers) & set(refused)
    assert [d["offset"] for d in docs] == list(range(1, len(acked) + 1))
    assert [orjson.loads(d["data"])["n"] for d in docs][:4] == acked[:4]
    assert "mongo store recovered after" in proc.log_text()


async def test_shutdown_deadline_before_the_flush_says_how_many_were_not_written(
    ferretdb: services.ServiceProcess, procs: ProcessGroup, unique_prefix: str
) -> None:
    """SIGTERM while the database is down, with server.shutdown_timeout shorter than
    mongodb.shutdown_flush_timeout: the process exits at its deadline and logs at ERROR how
    many acknowledged publications it could not write (README, Shutdown and crashes)."""
    channel = "persist:deadline"
    url = f"mongodb://127.0.0.1:{ferretdb.port}/"
    proc = procs(
        overrides=store_overrides(
            url,
            unique_prefix,
            **{"server.shutdown_timeout": 1.0, "mongodb.shutdown_flush_timeout": 30.0},
        )
    )
    proc.start()
    await proc.wait_ready_async(path="/ready")
    await api_ok(proc, "publish", {"channel": channel, "data": {"n": 0}})  # restored, written

    async def written() -> bool:
        return (await ready(proc))[1]["store"]["queue_depth"] == 0

    await until(written, what="the first publication written")
    ferretdb.kill()
    for n in (1, 2, 3):
        await api_ok(proc, "publish", {"channel": channel, "data": {"n": n}})
    proc.terminate()
    assert await proc.wait_async(10) == 0
    procs.processes.remove(proc)  # its ERROR line is the behaviour under test
    errors = proc.error_lines()
    assert len(errors) == 1, errors
    assert "3 accepted publications not written" in errors[0], errors


async def test_database_back_without_its_data_gets_indexes_and_crash_marker_again(
    ferretdb: services.ServiceProcess, procs: ProcessGroup, unique_prefix: str
) -> None:
    """FerretDB restarted with its data wiped under a running Squall: the writes after it
    create the unique index and the node's marker again, so a later SIGKILL is still noticed
    and its lost offsets are not given again."""
    channel = "persist:wiped"
    url = f"mongodb://127.0.0.1:{ferretdb.port}/"
    # Two make a batch, written at once; a single one waits 30 s: queued at SIGKILL.
    overrides = store_overrides(
        url,
        unique_prefix,
        **{
            "mongodb.flush_interval": 30.0,
            "mongodb.batch_size": 2,
            "mongodb.queue_size": QUEUE_SIZE,
            "server.name": "node-w",
        },
    )
    first = procs(overrides=overrides)
    first.start()
    await first.wait_ready_async(path="/ready")

    async def drained() -> bool:
        code, body = await ready(first)
        return code == 200 and body["store"]["queue_depth"] == 0

    for n in (1, 2):
        await api_ok(first, "publish", {"channel": channel, "data": {"n": n}})
    await until(drained, what="the first batch written")

    ferretdb.kill()
    shutil.rmtree(ferretdb.workdir / "data")
    (ferretdb.workdir / "data").mkdir()
    ferretdb.start()
    for n in (3, 4):
        assert (await api_ok(first, "publish", {"channel": channel, "data": {"n": n}}))[
            "offset"
        ] == n
    await until(drained, within=20, what="the batch written to the empty database")
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    db = client[unique_prefix]

    async def recreated() -> bool:
        indexes = await db["publications"].index_information()
        marker = await db["publications_writers"].find_one({"_id": "node-w"})
        unique = indexes.get("channel_epoch_offset", {}).get("unique") is True
        return unique and marker is not None and marker["running"] is True

    try:
        await until(recreated, what="the unique index and the marker created again")
    finally:
        await client.close()

    result = await api_ok(first, "publish", {"channel": channel, "data": {"n": 5}})  # queued
    assert result["offset"] == 5
    first.kill()
    second = procs(overrides=overrides)
    second.start()
    await second.wait_ready_async(path="/ready")
    result = await api_ok(second, "publish", {"channel": channel, "data": {"n": 6}})
    assert result["offset"] == 4 + QUEUE_SIZE + 1  # not 5: the lost one had it


async def test_history_remove_while_the_database_is_down_answers_100_in_json(
    ferretdb: services.ServiceProcess, procs: ProcessGroup, unique_prefix: str
) -> None:
    """history_remove of a persistent channel with the database unreachable gets error 100
    (temporary), not an HTTP 500 page; it works again once the database is back."""
    channel = "persist:remove"
    url = f"mongodb://127.0.0.1:{ferretdb.port}/"
    proc = procs(overrides=store_overrides(url, unique_prefix))
    proc.start()
    await proc.wait_ready_async(path="/ready")
    await api_ok(proc, "publish", {"channel": channel, "data": {"n": 1}})
    ferretdb.stop()
    reply = await api(proc, "history_remove", {"channel": channel})
    assert reply["error"] == {"code": 100, "message": "internal server error", "temporary": True}
    ferretdb.start()
    await until(lambda: _removed(proc, channel), what="history_remove after the outage")
    history = await api_ok(proc, "history", {"channel": channel, "limit": -1})
    assert history["publications"] == [], history


async def _removed(proc: Any, channel: str) -> bool:
    return "result" in await api(proc, "history_remove", {"channel": channel})


async def test_telemetry_store_marked_down_by_a_query_is_ready_again_without_points(
    ferretdb: services.ServiceProcess, procs: ProcessGroup, unique_prefix: str
) -> None:
    """A dashboard query during an outage marks the telemetry store down; once the database
    is back /ready turns 200 again by itself, with no device sending points (it stayed 503
    until some device's points were written)."""
    url = f"mongodb://127.0.0.1:{ferretdb.port}/"
    proc = procs(overrides=store_overrides(url, unique_prefix))
    proc.start()
    await proc.wait_ready_async(path="/ready")
    http = tornado.httpclient.AsyncHTTPClient()
    dashboard = {"Authorization": f"Bearer {token('alice', extra={'devices': ['*']})}"}

    async def devices() -> int:
        resp = await http.fetch(
            f"{proc.http_url}/api/devices",
            headers=dashboard,
            raise_error=False,
            request_timeout=5.0 * TIME_FACTOR,
        )
        return int(resp.code)

    assert await devices() == 200
    ferretdb.kill()
    assert await devices() == 503  # the query fails, and marks the telemetry store down
    code, body = await ready(proc)
    assert (code, body["telemetry"]["ready"]) == (503, False)
    ferretdb.start()

    async def telemetry_ready() -> bool:
        code, body = await ready(proc)
        return code == 200 and body["telemetry"]["ready"] is True

    await until(telemetry_ready, within=10, what="/ready 200 with the database back")
    assert await devices() == 200
