"""Failure reasons a VM's owner and the operator can act on, from the exception that ended an operation.

A reason is stored on the VM (``failure_reason``) and returned by the API, so it says what failed in words and
never carries a host path or a host command's raw stderr: the full detail goes to the server's log. Pure.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence

from corral.domain.errors import CorralError
from corral.runtime.proc import CommandFailed

# what a host tool is, for the person reading the reason
_TOOLS = {
    "crun": "the container runtime (crun)",
    "runc": "the container runtime (runc)",
    "criu": "the checkpoint tool (criu)",
    "btrfs": "the disk pool (btrfs)",
    "mount": "mount",
    "umount": "unmount",
    "losetup": "the disk pool's loop device (losetup)",
    "ip": "the sandbox network (ip)",
    "nft": "the sandbox firewall (nft)",
    "nsenter": "a command in the sandbox's namespaces (nsenter)",
    "mkfs.btrfs": "making the disk pool (mkfs.btrfs)",
    "tar": "copying files (tar)",
}

# (tool, subcommand) -> what it was doing
_ACTIONS = {
    ("crun", "delete"): "removing the sandbox's container",
    ("crun", "kill"): "signalling the sandbox's processes",
    ("crun", "create"): "creating the sandbox's container",
    ("crun", "start"): "starting the sandbox's container",
    ("crun", "state"): "reading the sandbox's state",
    ("crun", "checkpoint"): "checkpointing the sandbox",
    ("crun", "restore"): "restoring the sandbox",
    ("btrfs", "subvolume delete"): "deleting the sandbox's disk",
    ("btrfs", "subvolume create"): "creating the sandbox's disk",
    ("btrfs", "subvolume snapshot"): "copying the sandbox's disk",
    ("btrfs", "qgroup limit"): "setting the sandbox's disk quota",
    ("btrfs", "qgroup create"): "setting the sandbox's disk quota",
    ("btrfs", "qgroup destroy"): "removing the sandbox's disk quota",
    ("umount", ""): "unmounting the sandbox's root filesystem",
    ("mount", ""): "mounting the sandbox's root filesystem",
}

# what a tool's stderr means, in words an operator can act on (first match wins); the stderr itself is logged
_CAUSES = (
    ("read-only file system", "the disk pool is read-only (the kernel remounted it; see the kernel log)"),
    ("no space left on device", "the disk pool is full"),
    ("disk quota exceeded", "the sandbox's disk quota is exceeded"),
    ("device or resource busy", "a mount or file of the sandbox is still in use"),
    ("cannot allocate memory", "the host is out of memory"),
    ("too many open files", "the server has too many open files"),
    ("operation not permitted", "the host refused the operation (permissions)"),
    ("permission denied", "the host refused the operation (permissions)"),
    ("no such file or directory", "something the operation needs is missing on the host"),
    ("does not exist", "something the operation needs is missing on the host"),
    ("timed out", "the operation timed out"),
)

# an absolute path of two components or more: host paths never leave the server
_PATH = re.compile(r"(?<![\w.:/-])/(?:[\w.@+%,=~-]+/)+[\w.@+%,=~-]*")


def scrub(text: str) -> str:
    """``text`` with every absolute path replaced by ``<path>`` and whitespace runs folded."""
    return " ".join(_PATH.sub("<path>", text).split())


def _tool(argv: Sequence[str]) -> tuple[str, str]:
    """(tool name, subcommand words): the command's own words, never its path or path arguments."""
    name = argv[0].rsplit("/", 1)[-1] if argv else "?"
    words = [a for a in argv[1:] if a and not a.startswith(("-", "/")) and "/" not in a]
    if name in ("crun", "runc"):
        verbs = [
            w for w in words if w in {"delete", "kill", "create", "start", "state", "checkpoint", "restore"}
        ]
        return name, verbs[0] if verbs else ""
    if name == "btrfs":
        return name, " ".join(words[:2])
    return name, ""


def describe_command(exc: CommandFailed) -> str:
    name, sub = _tool(exc.argv)
    action = _ACTIONS.get(("crun" if name == "runc" else name, sub))
    tool = _TOOLS.get(name, f"the host command {name}")
    said = exc.stderr.lower()
    cause = next((words for needle, words in _CAUSES if needle in said), None)
    command = f"{name} {sub}".strip()
    head = f"{action} failed" if action else f"{tool} failed"
    tail = f"{command} exited with status {exc.returncode}"
    return f"{head}: {cause} ({tail})" if cause else f"{head} ({tail})"


def describe_os_error(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    what = exc.strerror or type(exc).__name__
    return f"a host I/O error: {what}" + (f" ({name})" if name else "")


def describe(exc: BaseException, *, safe: tuple[type[BaseException], ...] = ()) -> str:
    """The reason for ``exc``: a ``CorralError``'s message; for the ``safe`` exception types (messages written
    for the owner), their message, with the words of a ``CommandFailed`` behind it in place of its raw text and
    host paths removed; a host command's failure or an OS error in words; anything else by its type."""
    if isinstance(exc, CorralError):
        return exc.message
    if isinstance(exc, CommandFailed):
        return describe_command(exc)
    if safe and isinstance(exc, safe):
        message = str(exc)
        cause = exc.__cause__
        if isinstance(cause, CommandFailed):
            raw = str(cause)
            message = message.replace(raw, describe_command(cause)) if raw in message else message
        return scrub(message)
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    return f"an unexpected error ({type(exc).__name__}); the server's log has the detail"
