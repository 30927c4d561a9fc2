"""Failure reasons: what failed in words, never a host path or a command's raw stderr."""

from __future__ import annotations

import errno

import pytest

from corral.domain.errors import Conflict
from corral.runtime.proc import CommandFailed
from corral.services.failures import describe, scrub

STDERR = "crun: open `/var/lib/corral/node/state/vm_x/status`: Read-only file system\n"


class Safe(Exception):
    pass


@pytest.mark.parametrize(
    ("argv", "stderr", "expected"),
    [
        (
            ["/opt/corral/bin/crun", "--root", "/var/lib/corral/node/state", "delete", "--force", "vm_x"],
            STDERR,
            "removing the sandbox's container failed: the disk pool is read-only (the kernel remounted it; "
            "see the kernel log) (crun delete exited with status 1)",
        ),
        (
            ["btrfs", "subvolume", "delete", "/var/lib/corral/node/disk/vols/vm_x"],
            "ERROR: Could not destroy subvolume/snapshot: Device or resource busy",
            "deleting the sandbox's disk failed: a mount or file of the sandbox is still in use "
            "(btrfs subvolume delete exited with status 1)",
        ),
        (
            ["umount", "/var/lib/corral/node/bundles/vm_x/rootfs"],
            "umount: target is busy",
            "unmounting the sandbox's root filesystem failed (umount exited with status 1)",
        ),
        (
            ["/usr/sbin/frobnicate", "/var/lib/x"],
            "no idea",
            "the host command frobnicate failed (frobnicate exited with status 1)",
        ),
    ],
)
def test_host_commands_in_words(argv: list[str], stderr: str, expected: str) -> None:
    assert describe(CommandFailed(argv, 1, stderr)) == expected


def test_a_safe_message_gets_the_words_of_its_command_and_loses_paths() -> None:
    cause = CommandFailed(["crun", "create", "vm_x"], 1, STDERR)
    try:
        try:
            raise cause
        except CommandFailed as exc:
            raise Safe(f"the sandbox failed to boot: {exc}") from exc
    except Safe as exc:
        reason = describe(exc, safe=(Safe,))
    assert reason == (
        "the sandbox failed to boot: creating the sandbox's container failed: the disk pool is read-only "
        "(the kernel remounted it; see the kernel log) (crun create exited with status 1)"
    )
    assert describe(Safe("no disk at /var/lib/corral/node/disk/vols/vm_x"), safe=(Safe,)) == (
        "no disk at <path>"
    )


def test_other_errors() -> None:
    assert describe(Conflict("VM is busy")) == "VM is busy"
    oserr = OSError(errno.ENOSPC, "No space left on device", "/var/lib/corral/node/disk/x")
    assert describe(oserr) == "a host I/O error: No space left on device (ENOSPC)"
    assert describe(KeyError("x")) == "an unexpected error (KeyError); the server's log has the detail"
    assert scrub("at /a/b/c and ./rel/x and http://h/x/y") == "at <path> and ./rel/x and http://h/x/y"
