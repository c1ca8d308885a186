"""Persistent namespaces across a restart: history, offsets and recovery come from the store.

Each test runs ``python run.py`` processes on one MongoDB database (the
session's FerretDB, or ``SQUALL_MONGODB_URL``) with the ``persist`` namespace
of the test config: broker history of 5, ``persist: true``. Publications go
through the HTTP API and the centrifuge-python SDK; stored documents are read
with PyMongo directly.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from centrifuge import ReplyError, StreamPosition

from tests.cluster import Sdk, api, api_ok, subscribed, take, until
from tests.e2e import raw_client, ready, store_overrides, stored
from tests.helpers import services
from tests.helpers.process import ProcessGroup, close_checked
from tests.helpers.server import TIME_FACTOR

HISTORY_SIZE = 5  # the test config's persist namespace keeps this many in the broker


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Squall processes of this test; stopped by pid at teardown, their ERROR lines fail it."""
    group = ProcessGroup(tmp_path)
    yield group
    close_checked(group)


@pytest.fixture
def sdk(procs: ProcessGroup, io_loop: Any) -> Iterator[Sdk]:
    """SDK clients, disconnected before the processes stop."""
    made = Sdk()
    yield made
    io_loop.run_sync(made.close)


def data(n: int) -> dict[str, int]:
    return {"n": n}


async def test_history_offsets_and_recovery_survive_a_graceful_restart(
    procs: ProcessGroup, sdk: Sdk, mongo_url: str, unique_prefix: str
) -> None:
    """After SIGTERM and a new process on the same DB, history, offsets and recovery carry on."""
    channel = "persist:restart"
    overrides = store_overrides(mongo_url, unique_prefix)
    first = procs(overrides=overrides)
    first.start()
    await first.wait_ready_async(path="/ready")

    publisher, _ = await sdk.connected(first.ws_url, "pub")
    pub_sub, _, _ = await subscribed(publisher, channel)
    reader, _ = await sdk.connected(first.ws_url, "reader")
    _, reader_events, _ = await subscribed(reader, channel, recoverable=True)

    for n in (1, 2, 3):
        assert (await api_ok(first, "publish", {"channel": channel, "data": data(n)}))[
            "offset"
        ] == n
    live = await take(reader_events, 3)
    assert [(p.offset, p.data) for p in live] == [(n, data(n)) for n in (1, 2, 3)]
    await reader.disconnect()  # offline from offset 3 on; the SDK keeps its position

    # N = 12 > history_size, alternately through the SDK and the HTTP API.
    total = 12
    epoch = ""
    for n in range(4, total + 1):
        if n % 2:
            result = await api_ok(first, "publish", {"channel": channel, "data": data(n)})
            assert result["offset"] == n
            epoch = result["epoch"]
        else:
            await pub_sub.publish(data(n))
    before = await api_ok(first, "history", {"channel": channel, "limit": -1})
    assert [p["offset"] for p in before["publications"]] == list(range(1, total + 1))
    assert (before["offset"], before["epoch"]) == (total, epoch)

    assert await first.stop_async() == 0
    assert "mongo store closed with" not in first.log_text()  # nothing left unwritten
    docs = await stored(mongo_url, unique_prefix, channel)
    assert [(d["offset"], d["epoch"], orjson.loads(d["data"])) for d in docs] == [
        (n, epoch, data(n)) for n in range(1, total + 1)
    ]

    second = procs(overrides=overrides, port=first.port)  # the SDK clients reconnect here
    second.start()
    await second.wait_ready_async(path="/ready")

    after = await api_ok(second, "history", {"channel": channel, "limit": -1})
    assert after == before  # every publication, beyond history_size, same offsets and epoch
    page = await api_ok(second, "history", {"channel": channel, "limit": 4, "reverse": True})
    assert [p["offset"] for p in page["publications"]] == [12, 11, 10, 9]
    back = {"offset": 9, "epoch": epoch}  # the next page back, beyond history_size
    page = await api_ok(
        second, "history", {"channel": channel, "limit": 4, "reverse": True, "since": back}
    )
    assert [p["offset"] for p in page["publications"]] == [8, 7, 6, 5]
    page = await api_ok(
        second, "history", {"channel": channel, "limit": -1, "since": {"offset": 10}}
    )
    assert [p["offset"] for p in page["publications"]] == [11, 12]  # no epoch: the current one

    # The publisher's SDK resubscribes on the new process and reads the same history.
    await asyncio.wait_for(pub_sub.ready(), 10)
    sdk_history = await pub_sub.history(limit=-1)
    assert (sdk_history.offset, sdk_history.epoch) == (total, epoch)
    assert [(p.offset, p.data) for p in sdk_history.publications] == [
        (n, data(n)) for n in range(1, total + 1)
    ]
    since = await pub_sub.history(limit=-1, since=StreamPosition(offset=10, epoch=epoch))
    assert [p.offset for p in since.publications] == [11, 12]

    # New publications continue the stream: N+1, N+2, same epoch.
    for n in (total + 1, total + 2):
        result = await api_ok(second, "publish", {"channel": channel, "data": data(n)})
        assert (result["offset"], result["epoch"]) == (n, epoch)
    latest = total + 2

    # Raw protocol: subscribe with recover from offset 3 gets exactly 4..14, recovered.
    raw = await raw_client(second, "raw")
    try:
        reply = await raw.command(
            "subscribe", {"channel": channel, "recover": True, "offset": 3, "epoch": epoch}
        )
        result = reply["subscribe"]
        assert result.get("recovered") is True, result
        assert (result["offset"], result["epoch"]) == (3, epoch)  # recovered from
        pubs = result["publications"]
        assert [p["offset"] for p in pubs] == list(range(4, latest + 1))
        assert [p["data"] for p in pubs] == [data(n) for n in range(4, latest + 1)]
    finally:
        raw.close()

    # The SDK subscriber that went offline at offset 3 reconnects and recovers the rest.
    await reader.connect()
    ctx = await reader_events.next("subscribed", 10)
    assert ctx.was_recovering
    assert ctx.recovered
    missed = await take(reader_events, latest - 3)
    assert [(p.offset, p.data) for p in missed] == [(n, data(n)) for n in range(4, latest + 1)]
    assert reader_events.drain("publication") == []


async def test_graceful_shutdown_writes_every_acknowledged_publication(
    procs: ProcessGroup, mongo_url: str, unique_prefix: str
) -> None:
    """A burst still queued at SIGTERM is written before exit; a new process serves all of it."""
    channel = "persist:burst"
    # Batches wait up to 30 s for more: the burst is certainly still queued at SIGTERM.
    overrides = store_overrides(
        mongo_url, unique_prefix, **{"mongodb.flush_interval": 30.0, "mongodb.batch_size": 1000}
    )
    first = procs(overrides=overrides)
    first.start()
    await first.wait_ready_async(path="/ready")
    burst = 40
    replies = await asyncio.gather(
        *(api(first, "publish", {"channel": channel, "data": data(n)}) for n in range(burst))
    )
    acked = {
        orjson.dumps(data(n)) for n, r in zip(range(burst), replies, strict=True) if "result" in r
    }
    assert len(acked) == burst, [r for r in replies if "result" not in r]
    code, body = await ready(first)
    assert code == 200
    assert body["store"]["queue_depth"] == burst  # accepted, not yet written

    first.terminate()
    assert await first.wait_async(10) == 0
    assert "mongo store closed with" not in first.log_text()
    docs = await stored(mongo_url, unique_prefix, channel)
    assert {d["data"] for d in docs} == acked
    assert [d["offset"] for d in docs] == list(range(1, burst + 1))

    second = procs(overrides=overrides)
    second.start()
    await second.wait_ready_async(path="/ready")
    history = await api_ok(second, "history", {"channel": channel, "limit": -1})
    assert [p["offset"] for p in history["publications"]] == list(range(1, burst + 1))
    assert {orjson.dumps(p["data"]) for p in history["publications"]} == acked
    result = await api_ok(second, "publish", {"channel": channel, "data": data(burst)})
    assert result["offset"] == burst + 1


async def test_publication_too_large_to_store_is_refused_before_delivery(
    procs: ProcessGroup, sdk: Sdk, mongo_url: str, unique_prefix: str
) -> None:
    """Over mongodb.max_document_bytes: error 107 with the reason, not delivered, not stored."""
    channel = "persist:big"
    overrides = store_overrides(mongo_url, unique_prefix, **{"mongodb.max_document_bytes": 4096})
    proc = procs(overrides=overrides)
    proc.start()
    await proc.wait_ready_async(path="/ready")
    client, _ = await sdk.connected(proc.ws_url, "alice")
    sub, events, _ = await subscribed(client, channel)

    reply = await api(proc, "publish", {"channel": channel, "data": {"x": "y" * 5000}})
    assert reply["error"]["code"] == 107, reply
    assert "mongodb.max_document_bytes" in reply["error"]["message"]
    assert "temporary" not in reply["error"]
    assert (await api_ok(proc, "publish", {"channel": channel, "data": data(1)}))["offset"] == 1
    (pub,) = await take(events, 1)
    assert (pub.offset, pub.data) == (1, data(1))  # the refused one never reached subscribers
    with pytest.raises(ReplyError) as refused:
        await sub.publish({"x": "y" * 5000})
    assert (refused.value.code, refused.value.temporary) == (107, False)
    history = await api_ok(proc, "history", {"channel": channel, "limit": -1})
    assert [p["data"] for p in history["publications"]] == [data(1)]


async def test_a_killed_process_loses_its_queue_but_no_offset_is_given_twice(
    procs: ProcessGroup, mongo_url: str, unique_prefix: str
) -> None:
    """SIGKILL with publications queued: the restarted node continues past the offsets it lost,
    so a client that saw a lost one recovers with recovered false, never a silent gap."""
    channel = "persist:killed"
    queue_size = 50
    # Three make a batch, written at once; the next two wait 30 s: queued at SIGKILL.
    overrides = store_overrides(
        mongo_url,
        unique_prefix,
        **{
            "mongodb.flush_interval": 30.0,
            "mongodb.batch_size": 3,
            "mongodb.queue_size": queue_size,
            "server.name": "node-a",  # the restarted process is the same node
        },
    )
    first = procs(overrides=overrides)
    first.start()
    await first.wait_ready_async(path="/ready")
    for n in (1, 2, 3):
        await api_ok(first, "publish", {"channel": channel, "data": data(n)})

    async def written() -> bool:
        return (await ready(first))[1]["store"]["queue_depth"] == 0

    await until(written, what="the first batch written")
    epoch = ""
    for n in (4, 5):  # delivered, acknowledged, still queued
        result = await api_ok(first, "publish", {"channel": channel, "data": data(n)})
        assert result["offset"] == n
        epoch = result["epoch"]
    first.kill()
    assert [d["offset"] for d in await stored(mongo_url, unique_prefix, channel)] == [1, 2, 3]

    second = procs(overrides=overrides)
    second.start()
    await second.wait_ready_async(path="/ready")
    # Not 4 again: a client that got the lost 4 and 5 would take the new ones for them.
    result = await api_ok(second, "publish", {"channel": channel, "data": data(6)})
    assert (result["offset"], result["epoch"]) == (3 + queue_size + 1, epoch)
    assert "did not close" in second.log_text()
    history = await api_ok(second, "history", {"channel": channel, "limit": -1})
    assert [p["data"] for p in history["publications"]] == [data(n) for n in (1, 2, 3, 6)]
    raw = await raw_client(second, "raw")
    try:
        for seen in (5, 3):  # saw a lost one; saw none, but missed the lost ones
            reply = await raw.command(
                "subscribe", {"channel": channel, "recover": True, "offset": seen, "epoch": epoch}
            )
            assert reply["subscribe"].get("recovered") is False, reply
            assert reply["subscribe"]["offset"] == 3 + queue_size + 1
            await raw.command("unsubscribe", {"channel": channel})
    finally:
        raw.close()

    # A graceful stop is no crash: the next process continues at the next offset.
    assert await second.stop_async() == 0
    third = procs(overrides=overrides)
    third.start()
    await third.wait_ready_async(path="/ready")
    assert "did not close" not in third.log_text()
    result = await api_ok(third, "publish", {"channel": channel, "data": data(7)})
    assert result["offset"] == 3 + queue_size + 2


async def test_graceful_shutdown_answers_a_publish_in_flight(
    procs: ProcessGroup, mongo_url: str, unique_prefix: str
) -> None:
    """SIGTERM while a server API publish waits on Redis: the publisher gets its reply before
    the connection is closed (the publication is delivered and stored either way)."""
    channel = "persist:inflight"
    try:
        redis = services.start_redis()
    except RuntimeError as exc:
        services.unavailable(str(exc))
    assert redis.proc is not None
    try:
        overrides = store_overrides(mongo_url, unique_prefix)
        overrides["redis.url"] = f"redis://127.0.0.1:{redis.port}/0"
        overrides["redis.socket_timeout"] = 5.0  # the publish waits for Redis, not failing
        proc = procs(overrides=overrides)
        proc.start()
        await proc.wait_ready_async(path="/ready")
        assert (await api_ok(proc, "publish", {"channel": channel, "data": data(1)}))["offset"] == 1
        os.kill(redis.proc.pid, signal.SIGSTOP)
        pending = asyncio.ensure_future(api(proc, "publish", {"channel": channel, "data": data(2)}))
        await asyncio.sleep(0.3 * TIME_FACTOR)  # the request reaches Squall; nothing reports it
        proc.terminate()

        async def shutting_down() -> bool:
            return "shutting down" in proc.log_text()

        await until(shutting_down, what="the shutdown begun")
        await asyncio.sleep(0.3 * TIME_FACTOR)  # connections would be closed by now
        os.kill(redis.proc.pid, signal.SIGCONT)
        reply = await pending
        assert reply.get("result", {}).get("offset") == 2, reply
        assert await proc.wait_async(10) == 0
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
        redis.stop()
    docs = await stored(mongo_url, unique_prefix, channel)
    assert [d["offset"] for d in docs] == [1, 2]


async def test_a_position_past_the_int64_range_is_not_recoverable_and_no_error(
    procs: ProcessGroup, mongo_url: str, unique_prefix: str
) -> None:
    """Offsets are uint64 on the wire; MongoDB stores signed 64-bit integers. A client
    recovering from (or paging back from) an offset above 2**63 - 1 gets recovered: false
    and a history page as the other engines give, not error 100 and a logged traceback."""
    channel = "persist:huge"
    proc = procs(overrides=store_overrides(mongo_url, unique_prefix))
    proc.start()
    await proc.wait_ready_async(path="/ready")
    for n in (1, 2):
        await api_ok(proc, "publish", {"channel": channel, "data": data(n)})
    epoch = (await api_ok(proc, "history", {"channel": channel, "limit": 0}))["epoch"]
    client = await raw_client(proc)
    try:
        reply = await client.command(
            "subscribe", {"channel": channel, "recover": True, "offset": 2**63, "epoch": epoch}
        )
        assert reply.get("subscribe", {}).get("recovered") is False, reply
        reply = await client.command(
            "history",
            {
                "channel": channel,
                "limit": -1,
                "reverse": True,
                "since": {"offset": 2**64 - 1, "epoch": epoch},
            },
        )
        assert [p["offset"] for p in reply["history"]["publications"]] == [2, 1], reply
    finally:
        client.close()
    since = {"offset": 2**63, "epoch": epoch}
    page = await api_ok(proc, "history", {"channel": channel, "limit": -1, "since": since})
    assert page["publications"] == [], page
