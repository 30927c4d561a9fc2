"""A long-lived bash in a sandbox that runs one command after another, keeping its working directory,
variables and functions between them (``GET /v1/vms/{id}/shell``).

Each command is handed to the shell in a here-document (so no quoting of it matters) and ``eval``'d in the
shell itself with stdin from /dev/null (a command cannot read the next ones); then the shell prints a marker
with a random nonce and the exit status on stdout, and the marker on stderr, so the end of each command's
output is known on both streams."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from corral.node.interactive import Session

BASH = ["/bin/bash", "--noprofile", "--norc"]
MARK = b"\x1e"
RESTART_EXIT = 124  # like exec's timeout


def wrap(command: str, nonce: str) -> bytes:
    """The text written to the shell for ``command``."""
    end = f"__CORRAL_{nonce}"
    return (
        f"IFS= read -r -d '' __corral_cmd <<'{end}'\n{command}\n{end}\n"
        f'eval "$__corral_cmd" </dev/null; __corral_rc=$?\n'
        f"printf '\\036{nonce} %d\\036' \"$__corral_rc\"; printf '\\036{nonce}\\036' >&2\n"
    ).encode()


class MarkerScanner:
    """Splits a stream at the marker ``\\x1e<nonce>[ <status>]\\x1e``: ``feed`` returns the output before it
    (holding back a tail that could be the start of a marker) and, once seen, the marker's text."""

    def __init__(self, nonce: str) -> None:
        self.head = MARK + nonce.encode()
        self.buf = b""
        self.found: bytes | None = None

    def feed(self, data: bytes) -> bytes:
        if self.found is not None:
            return b""
        self.buf += data
        at = self.buf.find(self.head)
        if at >= 0:
            close = self.buf.find(MARK, at + len(self.head))
            if close >= 0:
                out = self.buf[:at]
                self.found = self.buf[at + len(self.head) : close].strip()
                self.buf = b""
                return out
            out, self.buf = self.buf[:at], self.buf[at:]
            return out
        keep = 0
        for n in range(min(len(self.head) - 1, len(self.buf)), 0, -1):
            if self.buf.endswith(self.head[:n]):
                keep = n
                break
        cut = len(self.buf) - keep
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def rest(self) -> bytes:
        """What is held back, when the stream ended without a marker."""
        out, self.buf = self.buf, b""
        return out


@dataclass(frozen=True)
class Output:
    stream: str
    data: bytes


@dataclass(frozen=True)
class Done:
    exit_code: int
    duration_ms: int
    timed_out: bool = False
    shell_exited: bool = False  # the command ended the shell (``exit``): a new one is started


class BashSession:
    """One bash; ``run`` yields a command's output and then its ``Done``. A command that times out, or one
    that ends the shell, costs the shell's state: a fresh bash takes its place."""

    def __init__(self, start: Callable[[], Awaitable[Session]]) -> None:
        self._start = start
        self._session: Session | None = None

    async def open(self) -> None:
        self._session = await self._start()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, command: str, limit_s: float) -> AsyncIterator[Output | Done]:
        if self._session is None or self._session.done:
            await self.close()
            await self.open()
        session = self._session
        assert session is not None
        began = time.monotonic()
        nonce = secrets.token_hex(8)
        scanners = {"stdout": MarkerScanner(nonce), "stderr": MarkerScanner(nonce)}
        queue: asyncio.Queue[Output | None] = asyncio.Queue(maxsize=64)

        async def pump(stream: str) -> None:
            scanner = scanners[stream]
            while scanner.found is None:
                data = await session.read(stream)
                if not data:
                    if rest := scanner.rest():
                        await queue.put(Output(stream, rest))
                    break
                if out := scanner.feed(data):
                    await queue.put(Output(stream, out))
            await queue.put(None)

        await session.write(wrap(command, nonce))
        pumps = [asyncio.create_task(pump(s)) for s in scanners]
        ended = 0
        timed_out = False
        deadline = began + limit_s
        try:
            while ended < len(pumps):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    timed_out = True
                    break
                if item is None:
                    ended += 1
                else:
                    yield item
        finally:
            for task in pumps:
                task.cancel()
        duration = int((time.monotonic() - began) * 1000)
        status = scanners["stdout"].found
        if timed_out or status is None:
            exited = not timed_out  # the streams ended without a marker: the command ended the shell
            code = RESTART_EXIT if timed_out else await _exit_of(session)
            await self.close()
            yield Done(code, duration, timed_out=timed_out, shell_exited=exited)
            return
        yield Done(int(status.split()[-1]), duration)


async def _exit_of(session: Session) -> int:
    try:
        return await asyncio.wait_for(session.wait(), 2.0)
    except (TimeoutError, RuntimeError):
        return 255
