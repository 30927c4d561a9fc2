"""The node's images: read-only unpacked layers on disk, built from Debian packages or imported from files.

Layout: ``<images>/<key>/image.json`` (name, layers, size, config) and ``<images>/<key>/layers/<n>/`` (the
unpacked trees, lowest first); ``key`` is a hash of the name. File owners are shifted into the sandboxes' id
range at build/import time, so root inside a sandbox owns the image's root-owned files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_IMAGE = "debian:bookworm"
DEFAULT_PACKAGES = (
    "bash",
    "coreutils",
    "python3",
    "git",
    "curl",
    "ca-certificates",
    "openssh-client",
    "procps",
    "iproute2",
    "iputils-ping",
    "nftables",
    "dnsutils",
)
DEFAULT_SUITE = "bookworm"


def build_source(suite: str, packages: tuple[str, ...]) -> str:
    """How a built image records what it was built from (a default image built from another list is stale)."""
    return f"mmdebstrap {suite}: {' '.join(packages)}"


_NAME = re.compile(r"^[a-z0-9][a-z0-9._/:@-]{0,127}$")

Progress = Callable[[str, float], None]  # (phase, fraction done 0..1)


class ImageError(Exception):
    """Building or importing an image failed; the message is for the user."""


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


@dataclass(frozen=True)
class Image:
    name: str
    path: Path
    layers: tuple[Path, ...]  # lowest first
    size_bytes: int
    created_at: datetime
    source: str
    env: tuple[str, ...] = ()
    cmd: tuple[str, ...] = field(default=())

    @property
    def lowers_top_first(self) -> tuple[Path, ...]:
        return tuple(reversed(self.layers))


def shift_ownership(root: Path, base: int) -> None:
    """Add ``base`` to every uid/gid under ``root`` (not following symlinks), keeping setuid/setgid bits that
    chown clears."""
    if base == 0:
        return

    seen: set[tuple[int, int]] = set()

    def shift(path: str, st: os.stat_result) -> None:
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):  # a hard link: one inode, shifted once
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
        os.lchown(path, st.st_uid + base, st.st_gid + base)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(st.st_mode))

    shift(str(root), os.lstat(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in (*dirnames, *filenames):
            p = os.path.join(dirpath, entry)
            shift(p, os.lstat(p))


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def apt_sources(sources_file: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> list[str]:
    """One-line apt sources for mmdebstrap, derived from the host's deb822 file (same mirror, same suites)."""
    lines: list[str] = []
    if sources_file.exists():
        for stanza in sources_file.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
            if "deb" not in fields.get("Types", "").split() or fields.get("Enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("URIs", "").split():
                for suite in fields.get("Suites", "").split():
                    lines.append(f"deb {uri} {suite} {fields.get('Components', 'main')}")
    return lines or ["deb http://deb.debian.org/debian bookworm main"]


_PHASES = (
    ("downloading packages", 0.10),
    ("extracting archives", 0.35),
    ("installing essential packages", 0.45),
    ("installing remaining packages", 0.65),
    ("cleaning package lists", 0.90),
    ("success", 1.0),
)


class ImageStore:
    def __init__(self, root: Path, id_base: int) -> None:
        self.root = root
        self.id_base = id_base
        self._cache: dict[str, tuple[tuple[int, int], Image]] = {}

    def _dir(self, name: str) -> Path:
        return self.root / hashlib.sha256(name.encode()).hexdigest()[:24]

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def get(self, name: str) -> Image | None:
        """The image, read from its ``image.json`` (remembered while that file is unchanged)."""
        meta = self._dir(name) / "image.json"
        try:
            st = meta.stat()
            key = (st.st_ino, st.st_mtime_ns)
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
            image = self._image(self._dir(name), json.loads(meta.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            return None
        self._cache[name] = (key, image)
        return image

    def all(self) -> list[Image]:
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            try:
                found.append(self._image(d, json.loads((d / "image.json").read_text())))
            except (OSError, ValueError, KeyError):
                continue
        return sorted(found, key=lambda i: i.name)

    @staticmethod
    def _image(d: Path, data: dict[str, object]) -> Image:
        layers = data["layers"]
        assert isinstance(layers, list)
        return Image(
            name=str(data["name"]),
            path=d,
            layers=tuple(d / "layers" / str(layer) for layer in layers),
            size_bytes=int(str(data["size_bytes"])),
            created_at=datetime.fromisoformat(str(data["created_at"])),
            source=str(data["source"]),
            env=tuple(str(x) for x in data.get("env", []) or []),  # type: ignore[attr-defined]
            cmd=tuple(str(x) for x in data.get("cmd", []) or []),  # type: ignore[attr-defined]
        )

    def _install(
        self, name: str, tree: Path, source: str, env: tuple[str, ...], cmd: tuple[str, ...]
    ) -> Image:
        """Move an unpacked tree (inside ``self.root``) into place as image ``name``, replacing an older one."""
        shift_ownership(tree, self.id_base)
        final = self._dir(name)
        staging = tree.parent
        (staging / "layers").mkdir(exist_ok=True)
        tree.rename(staging / "layers" / "0")
        meta = {
            "name": name,
            "layers": ["0"],
            "size_bytes": tree_size(staging / "layers" / "0"),
            "created_at": datetime.now(UTC).isoformat(),
            "source": source,
            "env": list(env),
            "cmd": list(cmd),
        }
        (staging / "image.json").write_text(json.dumps(meta))
        old = None
        if final.exists():
            old = final.with_name(final.name + f".old-{time.time_ns()}")
            final.rename(old)
        staging.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        image = self.get(name)
        assert image is not None
        return image

    def _staging(self) -> Path:
        d = self.root / f".staging-{os.getpid()}-{time.time_ns()}"
        d.mkdir(parents=True)
        return d

    def clean_staging(self) -> None:
        if self.root.is_dir():
            for d in self.root.glob(".staging-*"):
                shutil.rmtree(d, ignore_errors=True)

    def build(
        self,
        name: str = DEFAULT_IMAGE,
        packages: tuple[str, ...] = DEFAULT_PACKAGES,
        suite: str = DEFAULT_SUITE,
        progress: Progress | None = None,
    ) -> Image:
        """Build an image from Debian packages with mmdebstrap (about 20 s)."""
        if not valid_name(name):
            raise ImageError(f"invalid image name {name!r}")
        with self._lock():
            staging = self._staging()
            tree = staging / "rootfs"
            tree.mkdir()
            argv = [
                "mmdebstrap",
                "--mode=root",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                "--verbose",
                suite,
                str(tree),
                *apt_sources(),
            ]
            try:
                self._run_with_progress(argv, progress)
                return self._install(name, tree, build_source(suite, packages), (), ("/bin/bash",))
            except FileNotFoundError as exc:
                raise ImageError("mmdebstrap is not installed (apt-get install mmdebstrap)") from exc
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _run_with_progress(argv: list[str], progress: Progress | None) -> None:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
        assert proc.stderr is not None
        tail: list[str] = []
        for line in proc.stderr:
            tail = [*tail[-20:], line.rstrip()]
            if progress is not None:
                for phase, fraction in _PHASES:
                    if line.startswith("I: ") and phase in line:
                        progress(phase, fraction)
        if proc.wait() != 0:
            raise ImageError("mmdebstrap failed:\n" + "\n".join(tail))

    def import_file(self, source: Path, name: str) -> Image:
        """Import an OCI image layout (directory or tar) or a ``docker save`` tarball as image ``name``."""
        if not valid_name(name):
            raise ImageError(f"invalid image name {name!r}")
        with self._lock():
            staging = self._staging()
            tree = staging / "rootfs"
            tree.mkdir()
            from corral.runtime.imagefmt import import_image

            try:
                config = import_image(source, tree)
                cmd = (*config.entrypoint, *config.cmd)
                return self._install(name, tree, f"import {source.name}", config.env, cmd)
            except ValueError as exc:
                raise ImageError(str(exc)) from exc
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def remove(self, name: str) -> bool:
        with self._lock():
            d = self._dir(name)
            if not d.exists():
                return False
            shutil.rmtree(d)
            return True
