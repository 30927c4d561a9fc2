"""The wire of the file workers (pure): what the host and a worker holding a sandbox's credentials say to each
other over their socket.

A frame is ``!II`` (length of a JSON header, length of a binary payload), the header, the payload. A request's
header is ``{"op": name, ...arguments}`` (file data, link targets: the payload); a reply's is ``{"ok": true,
...results}`` or ``{"errno": n, "kind": k, "message": m}``. The JSON side never carries more than names,
numbers and small maps, so neither side ever unpickles anything the other sent."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

HEADER = struct.Struct("!II")
HELLO = struct.Struct("!Q")  # a worker's first message: its pid (0: it could not start), with a pidfd of it
# A page of 10000 entries with 255-byte names fits: names travel hex-encoded (510 characters), a listing entry
# is under 600 bytes (5.8 MB a page), a readdir entry with its stat under 760 (7.6 MB); tests check the worst case.
MAX_JSON = 8 * 1024 * 1024
MAX_DATA = 8 * 1024 * 1024

_STAT_FIELDS = ("mode", "ino", "dev", "nlink", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns")


class ProtocolError(Exception):
    """The other side sent something that is not a frame of this protocol."""


def encode(header: Mapping[str, Any], data: bytes = b"") -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > MAX_JSON or len(data) > MAX_DATA:
        raise ProtocolError("frame too large")
    return HEADER.pack(len(text), len(data)) + text + data


def sizes(prefix: bytes) -> tuple[int, int]:
    """(JSON length, payload length) of a frame's fixed prefix, checked against the limits."""
    text, data = HEADER.unpack(prefix)
    if text > MAX_JSON or data > MAX_DATA:
        raise ProtocolError("frame too large")
    return text, data


def decode_header(text: bytes) -> dict[str, Any]:
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("a frame's header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("a frame's header is not an object")
    return header


def stat_to_wire(st: os.stat_result) -> list[int]:
    return [
        st.st_mode,
        st.st_ino,
        st.st_dev,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
    ]


def stat_from_wire(raw: object) -> os.stat_result:
    if not (isinstance(raw, list) and len(raw) == len(_STAT_FIELDS) and all(type(v) is int for v in raw)):
        raise ProtocolError("a stat is not ten integers")
    mode, ino, dev, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns = raw
    times = {"atime": atime_ns, "mtime": mtime_ns, "ctime": ctime_ns}
    extra: dict[str, float | int] = {}
    for name, ns in times.items():
        extra[f"st_{name}"] = ns / 1e9
        extra[f"st_{name}_ns"] = ns
    base = (mode, ino, dev, nlink, uid, gid, size, atime_ns // 10**9, mtime_ns // 10**9, ctime_ns // 10**9)
    return os.stat_result(base, extra)


def error_reply(err: int, kind: str, message: str) -> dict[str, Any]:
    return {"errno": err, "kind": kind, "message": message}
