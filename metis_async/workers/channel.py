"""The channel between the core's process and one ingest worker: framed messages on a socket.

A frame is a small header (a pickled tuple: the message kind and its fields) and an optional
body of raw bytes (a version's encoded messages, an update's values, a partial sum), so bulk
data is never pickled. Frames arrive in the order they were sent, which the design relies on:
fold instructions reach a worker before the request for its partial sum, and a new version
before the tasks that need it. Both ends are processes of the same controller, started by it
and connected over a Unix socket in a private (0700) directory, so pickle carries only our own
data.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import struct
from typing import Any

_SIZES = struct.Struct("<IQ")  # header bytes, body bytes


class ChannelClosed(ConnectionError):
    """The other end of a worker channel went away."""


class Channel:
    """One end of a worker channel.

    Args:
        reader: the socket's stream reader.
        writer: the socket's stream writer.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.bytes_sent = 0

    def send(self, header: tuple[Any, ...], body: bytes | memoryview = b"") -> None:
        """Queue one frame (never blocks; the transport buffers it)."""
        if self._writer.is_closing():
            return
        head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
        data = memoryview(body).cast("B")  # bytes, whatever the buffer's element type
        self._writer.write(_SIZES.pack(len(head), data.nbytes) + head)
        if data.nbytes:
            self._writer.write(data)
        self.bytes_sent += _SIZES.size + len(head) + data.nbytes

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        await self._writer.drain()

    async def receive(self) -> tuple[tuple[Any, ...], bytes]:
        """The next frame: its header and body; raises `ChannelClosed` at the end."""
        try:
            sizes = await self._reader.readexactly(_SIZES.size)
            head_bytes, body_bytes = _SIZES.unpack(sizes)
            header = pickle.loads(await self._reader.readexactly(head_bytes))
            body = await self._reader.readexactly(body_bytes) if body_bytes else b""
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            raise ChannelClosed("worker channel closed") from error
        return header, body

    def close(self) -> None:
        """Close the socket."""
        self._writer.close()

    async def aclose(self) -> None:
        """Close the socket and wait until it is closed."""
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
