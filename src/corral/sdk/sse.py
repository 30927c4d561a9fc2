"""Server-Sent Events read incrementally: bytes go in as they arrive (cut anywhere, even inside a UTF-8
character or a CRLF), whole events come out; and the exec stream's events as typed objects."""

from __future__ import annotations

import json
from dataclasses import dataclass

from corral.sdk.models import ExecEvent, ExecExit, ExecOutput


@dataclass(frozen=True)
class Event:
    event: str
    data: str


class SseParser:
    def __init__(self) -> None:
        self._buffer = b""
        self._pending_cr = False
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """The events ``chunk`` completes."""
        if not chunk:
            return []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF cut between two chunks
        self._pending_cr = chunk.endswith(b"\r")
        self._buffer += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._buffer = self._buffer.split(b"\n")
        out: list[Event] = []
        for raw in lines:
            event = self._line(raw.decode(errors="replace"))
            if event is not None:
                out.append(event)
        return out

    def _line(self, line: str) -> Event | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = Event(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def exec_event(event: Event) -> ExecEvent | None:
    """An exec stream event as a typed object; None for event types this SDK does not know."""
    if event.event in ("stdout", "stderr"):
        return ExecOutput(stream=event.event, data=json.loads(event.data)["data"])
    if event.event == "exit":
        return ExecExit.model_validate_json(event.data)
    return None


class ExecEvents:
    """Bytes of an exec stream in, typed events out."""

    def __init__(self) -> None:
        self._sse = SseParser()
        self.exit: ExecExit | None = None

    def feed(self, chunk: bytes) -> list[ExecEvent]:
        out: list[ExecEvent] = []
        for raw in self._sse.feed(chunk):
            event = exec_event(raw)
            if isinstance(event, ExecExit):
                self.exit = event
            if event is not None:
                out.append(event)
        return out
