"""A stand-in for a sandbox's init, for tests of the file workers without a runtime: a process in its own
user namespace (ids 0..65535 inside = ``offset``.. on the host, like a sandbox's) chrooted into ``root``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_CHILD = """
import os, sys
os.unshare(os.CLONE_NEWUSER)
sys.stdout.write("unshared\\n"); sys.stdout.flush()
sys.stdin.readline()
os.chroot(sys.argv[1])  # still the host's uid here: the test's private directories can be walked
os.chdir("/")
os.setresgid(0, 0, 0)
os.setresuid(0, 0, 0)
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.read()
"""


@contextmanager
def userns_box(root: Path, offset: int, size: int = 65536) -> Iterator[int]:
    """The PID of a process whose root is ``root`` in a user namespace mapping 0..size-1 to offset.. ."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "unshared\n"
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{proc.pid}/{name}").write_text(f"0 {offset} {size}\n")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "ready\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
