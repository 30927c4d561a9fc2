"""A sandbox's root filesystem: an overlayfs whose lower layers are an image's read-only layers and whose upper
and work directories live on the sandbox's quota-limited disk volume."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from corral.runtime import syscalls


def overlay_options(lowers: Sequence[Path], upper: Path, work: Path) -> str:
    """Mount data for the overlay. Lower layers are given top-most first, as overlayfs wants them."""
    if not lowers:
        raise ValueError("an overlay needs at least one lower layer")
    for p in (*lowers, upper, work):
        if "," in str(p) or ":" in str(p):
            raise ValueError(f"path not usable in overlay options: {p}")
    lower = ":".join(str(p) for p in lowers)
    return f"lowerdir={lower},upperdir={upper},workdir={work},index=off,xino=off"


def mount_overlay(lowers: Sequence[Path], volume: Path, target: Path, *, root_uid: int) -> None:
    """Mount the sandbox root at ``target``; ``upper``/``work`` are made inside ``volume`` (kept if present, so
    a stopped sandbox starts again from the same disk). The upper's root belongs to the sandbox's root.

    The layers are named to the kernel as ``/proc/self/fd/N`` of descriptors opened here, so the mount table a
    sandbox can read (``/proc/self/mountinfo``) shows no host path."""
    upper, work = volume / "upper", volume / "work"
    for d in (upper, work):
        d.mkdir(mode=0o755, exist_ok=True)
    os.chown(upper, root_uid, root_uid)
    target.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(target):
        return
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for p in (*lowers, upper, work)]
    try:
        named = [Path(f"/proc/self/fd/{fd}") for fd in fds]
        syscalls.mount(
            "overlay", str(target), "overlay", 0, overlay_options(named[:-2], named[-2], named[-1])
        )
    finally:
        for fd in fds:
            os.close(fd)


def seed_identity(volume: Path, hostname: str, root_uid: int) -> None:
    """Give a new sandbox its own /etc/hostname and /etc/hosts, and an empty /etc/resolv.conf (the network
    sets the resolver), in its upper layer: images built on a host carry that host's copies."""
    etc = volume / "upper" / "etc"
    etc.mkdir(mode=0o755, exist_ok=True)
    os.chown(etc, root_uid, root_uid)
    files = {
        "hostname": f"{hostname}\n",
        "hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "resolv.conf": "# no resolver: this sandbox has no network\n",
    }
    for name, text in files.items():
        path = etc / name
        path.unlink(missing_ok=True)
        path.write_text(text)
        os.chown(path, root_uid, root_uid)
        path.chmod(0o644)


SYSTEM_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
LOCAL_CA = "usr/local/share/ca-certificates/corral-egress.crt"


def with_trust(bundle: str, trust_pem: str) -> str:
    """A CA bundle with ``trust_pem`` appended (once)."""
    if trust_pem in bundle:
        return bundle
    if bundle and not bundle.endswith("\n"):
        bundle += "\n"
    return bundle + trust_pem


# the usual variables, for tools that do not read the system store
TRUST_ENV = {
    "SSL_CERT_FILE": "/" + SYSTEM_BUNDLE,
    "REQUESTS_CA_BUNDLE": "/" + SYSTEM_BUNDLE,
    "CURL_CA_BUNDLE": "/" + SYSTEM_BUNDLE,
    "NODE_EXTRA_CA_CERTS": "/" + LOCAL_CA,
    "GIT_SSL_CAINFO": "/" + SYSTEM_BUNDLE,
}


def unmount(target: Path) -> None:
    if os.path.ismount(target):
        syscalls.umount(str(target), lazy=True)


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below ``prefix``, deepest first (the order to unmount them in)."""
    found: list[Path] = []
    pre = str(prefix).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(pre) or point == pre.rstrip("/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)
