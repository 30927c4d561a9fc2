"""What an upload sends: bytes, a file on disk (read in chunks, reopened for a retry) or an open binary file
(rewound for a retry when it can seek)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

import anyio

CHUNK = 256 * 1024

type UploadData = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO


class UploadSource:
    """One upload's body. ``replayable``: it can be sent again (a retry after 429)."""

    def __init__(self, data: UploadData) -> None:
        self._bytes: bytes | None = None
        self._path: Path | None = None
        self._file: BinaryIO | None = None
        self._start = 0
        if isinstance(data, str):
            self._bytes = data.encode()
        elif isinstance(data, bytes | bytearray | memoryview):
            self._bytes = bytes(data)
        elif isinstance(data, os.PathLike):
            self._path = Path(data)
        else:
            self._file = data
            self._start = data.tell() if data.seekable() else -1
        self._sent = False

    @property
    def replayable(self) -> bool:
        return self._file is None or self._start >= 0

    @property
    def size(self) -> int | None:
        if self._bytes is not None:
            return len(self._bytes)
        if self._path is not None:
            return self._path.stat().st_size
        return None

    def _rewind(self) -> BinaryIO | None:
        """The open file from its start again (None for bytes and paths)."""
        if self._file is not None:
            if self._sent and self._start < 0:
                raise RuntimeError("this upload's file cannot be read again (it cannot seek)")
            if self._start >= 0:
                self._file.seek(self._start)
            self._sent = True
        return self._file

    def content(self) -> bytes | Iterator[bytes]:
        """The body for a synchronous request."""
        if self._bytes is not None:
            return self._bytes
        opened = self._rewind()
        return _chunks(opened) if opened is not None else _path_chunks(self._path)

    def acontent(self) -> bytes | AsyncIterator[bytes]:
        """The body for an asynchronous request (file reads in a worker thread)."""
        if self._bytes is not None:
            return self._bytes
        opened = self._rewind()
        return _achunks(opened) if opened is not None else _apath_chunks(self._path)


def _chunks(file: BinaryIO) -> Iterator[bytes]:
    while chunk := file.read(CHUNK):
        yield chunk


def _path_chunks(path: Path | None) -> Iterator[bytes]:
    assert path is not None
    with path.open("rb") as file:
        yield from _chunks(file)


async def _achunks(file: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := await anyio.to_thread.run_sync(file.read, CHUNK):
        yield chunk


async def _apath_chunks(path: Path | None) -> AsyncIterator[bytes]:
    assert path is not None
    file = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        async for chunk in _achunks(file):
            yield chunk
    finally:
        await anyio.to_thread.run_sync(file.close)
