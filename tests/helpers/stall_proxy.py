"""A loopback TCP proxy that holds back the answer to chosen requests.

Why: a server that is reachable but slow to answer one command (an index build
on a busy MongoDB, say) makes the driver time out on a socket that works. A
real server does that only under load a test cannot order; this proxy does it
on cue, in front of the real server, so the driver, its timeouts and the
server's own work stay real.

``StallProxy(host, port)``: ``await start()`` gives the port to connect to;
``stall_next(needle, seconds)`` makes the next request whose bytes contain
``needle`` (e.g. ``b"createIndexes"``, a MongoDB command's name as it appears
in the BSON of the request) have its answer held back ``seconds``. The request
itself goes through at once, so the server does the work; a driver that gave up
meanwhile closes the connection, and the late answer is dropped with it.
``stalled`` counts the requests held back so far. Bytes are matched per read:
keep needles short (a command name), requests here are small.
"""

from __future__ import annotations

import asyncio
import contextlib


class StallProxy:
    """See the module docstring."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._stalls: list[tuple[bytes, float]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # one per connection
        self._pumps: set[asyncio.Task[None]] = set()  # two per connection
        self.stalled = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def stall_next(self, needle: bytes, seconds: float) -> None:
        self._stalls.append((needle, seconds))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pump in list(self._pumps):
            pump.cancel()  # its connection's task then closes both ends and ends
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        hold_until = [0.0]  # loop time before which the next answer is not passed on
        up = asyncio.create_task(self._requests(client_r, server_w, hold_until))
        down = asyncio.create_task(self._answers(server_r, client_w, hold_until))
        self._pumps |= {up, down}
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._pumps -= {up, down}
            for w in (client_w, server_w):
                w.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await w.wait_closed()
            self._tasks.discard(task)

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold_until: list[float]
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                for i, (needle, seconds) in enumerate(self._stalls):
                    if needle in data:
                        del self._stalls[i]
                        self.stalled += 1
                        hold_until[0] = asyncio.get_running_loop().time() + seconds
                        break
                writer.write(data)
                await writer.drain()

    async def _answers(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold_until: list[float]
    ) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                wait = hold_until[0] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
