"""A TCP proxy between the drill's two nodes that can cut or slow their replication link.

This kernel has no netem, and the drill runs without root on loopback, so the link faults of the
drill are made here, in user space (the network-namespace tests make them with nftables and tc):

- `cut()`: nothing crosses any more, in either direction, and no connection is closed: each side
  sees silence, as behind a dropped link (what was read from one side is held, as a network
  holds retransmissions, and arrives after `heal()` if the connection still exists);
- `slow(bytes_per_s)`: every byte waits for its share of the rate, in both directions.

It runs its own event loop in a thread, so the drill's blocking code can drive it.
"""

from __future__ import annotations

import asyncio
import threading

CHUNK = 64 << 10


class LinkProxy:
    """Forward `listen` (host, port) to `target` (host, port), with faults on demand."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self.rate: float | None = None             # bytes per second, None: unlimited
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="linkproxy", daemon=True)

    def start(self) -> LinkProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._connection, *self.listen)

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._open.clear)

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)

    def slow(self, bytes_per_s: float | None) -> None:
        """Limit each direction to `bytes_per_s` (None: no limit)."""
        self.rate = bytes_per_s

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()                    # a cut link connects nothing either
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for side in (writer, up_writer):
                self._writers.discard(side)
                side.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                await self._open.wait()
                if self.rate:
                    await asyncio.sleep(len(data) / self.rate)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


__all__ = ["LinkProxy"]
