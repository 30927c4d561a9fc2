"""Container images imported from files into unpacked root filesystems, without trusting the image.

A source is an OCI image layout (a directory, or that directory archived as a tar file) or a ``docker save``
tarball (``manifest.json``; when newer docker also writes an OCI layout beside it, ``manifest.json`` wins).
The import works in two passes over the layers:

1. Check: every blob's digest and size against its descriptor (for ``docker save``: against the digest in its
   ``blobs/sha256/...`` or ``<hex>.json`` name where there is one), every layer against the ``diff_ids`` of the
   image config, every member path and hardlink target against the root. Nothing is written until the whole
   image has passed, so a tampered or malformed image leaves ``dest_rootfs`` empty.
2. Apply, layer by layer: first the layer's whiteouts against what the lower layers left (``.wh.NAME``
   removes ``NAME``; ``.wh..wh..opq`` empties its directory, so entries of the same layer survive either
   way), then its entries.

Entries are written through directory file descriptors: each parent is opened component by component from a
descriptor of ``dest_rootfs`` with ``O_NOFOLLOW | O_DIRECTORY``, so a symlink already in the rootfs (``etc ->
/``, ``x -> ../../..``) is never followed; an entry that would go through one is refused with
:class:`ImageFormatError` (real runtimes resolve such paths inside the root instead; images built by docker or
buildah never need it). An entry that replaces a symlink (a directory, a file, another symlink) removes the
symlink itself, never what it points to. Whiteouts that would go through a symlink remove nothing. Symlink
targets are stored as they are: they are resolved inside the sandbox, where the rootfs is ``/``.

Regular files, directories, symlinks and hardlinks (to entries inside the rootfs only) are created with their
mode bits, numeric owner (when running as root) and mtime. Device nodes, fifos and unknown entry types are
skipped and counted. Extended attributes are not applied.

If the import fails during the second pass (a path through a symlink, a hardlink to a missing file, a full
disk), ``dest_rootfs`` is left partly written: the caller discards it.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import zlib
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

log = logging.getLogger(__name__)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

MAX_JSON_BYTES = 16 * 1024 * 1024  # index, manifests and configs; a real config is a few kilobytes
MAX_INDEX_DEPTH = 8  # index -> index -> ... -> manifest
_CHUNK = 1024 * 1024
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ImageFormatError(ValueError):
    """The image cannot be imported; the message says why, in terms the user can act on."""


# --- pure parsing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about how to run it (the ``config`` object of the image config JSON)."""

    env: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor of an OCI index or manifest."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def blob_path(self) -> str:
        algorithm, hex_digest = self.digest.split(":", 1)
        return f"blobs/{algorithm}/{hex_digest}"


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class DockerManifest:
    """The first image of a ``docker save`` ``manifest.json``: paths inside the archive."""

    config: str
    layers: tuple[str, ...]


@dataclass(frozen=True)
class Whiteout:
    """A whiteout entry: ``path`` is removed, or (``opaque``) the lower-layer content of directory ``path``."""

    path: tuple[str, ...]
    opaque: bool = False


def normalize_member_path(name: str) -> tuple[str, ...]:
    """The components of a tar member path below the root.

    A leading ``/`` or ``./`` is dropped (``/etc/passwd`` is ``etc/passwd``), ``.`` and empty components are
    ignored, ``..`` is resolved lexically (never through the filesystem); a path that climbs above the root is
    refused. ``()`` is the root itself.
    """
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ImageFormatError(f"path {name!r} in the image escapes the root filesystem")
            parts.pop()
        else:
            parts.append(part)
    return tuple(parts)


def is_whiteout_name(name: str) -> bool:
    return name.startswith(WHITEOUT_PREFIX)


def interpret_whiteout(parts: tuple[str, ...]) -> Whiteout | None:
    """The whiteout a normalized member path stands for; ``None`` if it is no whiteout.

    ``.wh..wh.``-prefixed names other than the opaque marker (aufs bookkeeping such as ``.wh..wh.plnk``) are
    no whiteouts either; the caller skips every ``.wh.`` name when extracting.
    """
    if not parts or not is_whiteout_name(parts[-1]):
        return None
    name = parts[-1]
    if name == OPAQUE_WHITEOUT:
        return Whiteout(parts[:-1], opaque=True)
    if name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
        return None
    target = name[len(WHITEOUT_PREFIX) :]
    if target in ("", ".", ".."):
        raise ImageFormatError(f"invalid whiteout entry {'/'.join(parts)!r}")
    return Whiteout((*parts[:-1], target))


def parse_digest(value: object, what: str = "digest") -> tuple[str, str]:
    """``(algorithm, hex)`` of a ``sha256:<64 hex>`` or ``sha512:<128 hex>`` digest."""
    if not isinstance(value, str) or ":" not in value:
        raise ImageFormatError(f"{what} {value!r} is not a digest like sha256:<hex>")
    algorithm, hex_digest = value.split(":", 1)
    if algorithm not in _HEX_LENGTHS:
        raise ImageFormatError(f"{what} {value!r} uses an unsupported algorithm (sha256 and sha512 are)")
    if len(hex_digest) != _HEX_LENGTHS[algorithm] or not re.fullmatch(r"[0-9a-f]+", hex_digest):
        raise ImageFormatError(f"{what} {value!r} is not a valid {algorithm} digest")
    return algorithm, hex_digest


def digest_from_path(path: str) -> str | None:
    """The digest a ``docker save`` path names: ``blobs/sha256/<hex>``, or ``<hex>.json`` for a legacy config."""
    match = re.fullmatch(r"(?:\./)?blobs/(sha256|sha512)/([0-9a-f]+)", path)
    if match:
        digest = f"{match[1]}:{match[2]}"
        return digest if len(match[2]) == _HEX_LENGTHS[match[1]] else None
    match = re.fullmatch(r"(?:\./)?([0-9a-f]{64})\.json", path)
    return f"sha256:{match[1]}" if match else None


def _absent(value: object, default: object) -> object:
    """JSON ``null`` (or a missing key) as the default."""
    return default if value is None else value


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ImageFormatError(f"{what} must be a string, not {type(value).__name__}")
    return value


def _strings(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ImageFormatError(f"{what} must be a list of strings")
    return tuple(value)


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageFormatError(f"{what} must be a JSON object")
    return value


def parse_descriptor(value: object, what: str = "descriptor") -> Descriptor:
    obj = _object(value, what)
    media_type = _string(obj.get("mediaType", ""), f"{what} mediaType")
    digest = obj.get("digest")
    parse_digest(digest, f"{what} digest")
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageFormatError(f"{what} size must be a non-negative integer")
    platform = None
    if obj.get("platform") is not None:
        raw = _object(obj["platform"], f"{what} platform")
        platform = Platform(
            os=_string(raw.get("os", ""), f"{what} platform os"),
            architecture=_string(raw.get("architecture", ""), f"{what} platform architecture"),
            variant=_string(raw.get("variant", ""), f"{what} platform variant"),
        )
    annotations = _object(_absent(obj.get("annotations"), {}), f"{what} annotations")
    return Descriptor(
        media_type=media_type,
        digest=str(digest),
        size=size,
        platform=platform,
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


def document_kind(media_type: str, document: Mapping[str, Any]) -> Literal["index", "manifest"]:
    """Whether an index entry points at a nested index (manifest list) or at an image manifest."""
    kind = media_type or _string(document.get("mediaType", ""), "mediaType")
    if kind in INDEX_TYPES:
        return "index"
    if kind in MANIFEST_TYPES:
        return "manifest"
    if kind == "application/vnd.docker.distribution.manifest.v1+json" or document.get("schemaVersion") == 1:
        raise ImageFormatError(
            "docker schema 1 manifests are not supported; re-save the image with a newer docker"
        )
    if "manifests" in document:
        return "index"
    if "layers" in document and "config" in document:
        return "manifest"
    raise ImageFormatError(f"unsupported manifest media type {kind!r}")


def _is_attestation(desc: Descriptor) -> bool:
    return desc.annotations.get("vnd.docker.reference.type") == "attestation-manifest"


def select_manifest(
    index: Mapping[str, Any], os_name: str = "linux", architecture: str = "amd64"
) -> Descriptor:
    """The entry of an index to follow: the first for ``os_name``/``architecture``, else the first one.

    Build attestations (buildx's ``unknown/unknown`` manifests) are never chosen.
    """
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageFormatError("index has no 'manifests' list")
    descriptors = [parse_descriptor(entry, f"index entry {i}") for i, entry in enumerate(entries)]
    candidates = [desc for desc in descriptors if not _is_attestation(desc)]
    if not candidates:
        raise ImageFormatError("index lists no image manifests")
    for desc in candidates:
        if desc.platform and (desc.platform.os, desc.platform.architecture) == (os_name, architecture):
            return desc
    return candidates[0]


def parse_manifest(document: Mapping[str, Any]) -> Manifest:
    config = parse_descriptor(document.get("config"), "manifest config")
    if config.media_type and config.media_type not in CONFIG_TYPES:
        raise ImageFormatError(
            f"this is not a container image: its config has media type {config.media_type!r}"
        )
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise ImageFormatError("manifest has no 'layers' list")
    return Manifest(
        config=config,
        layers=tuple(parse_descriptor(layer, f"manifest layer {i}") for i, layer in enumerate(layers)),
    )


def parse_docker_manifest(document: object) -> DockerManifest:
    if not isinstance(document, list) or not document:
        raise ImageFormatError("manifest.json must be a non-empty list of images")
    first = _object(document[0], "manifest.json entry")
    config = _string(first.get("Config"), "manifest.json Config")
    layers = first.get("Layers")
    if not isinstance(layers, list):
        raise ImageFormatError("manifest.json Layers must be a list of strings")
    return DockerManifest(config=config, layers=_strings(layers, "manifest.json Layers"))


def parse_image_config(document: Mapping[str, Any]) -> ImageConfig:
    """The runtime settings of an image config JSON (Env, Cmd, Entrypoint, WorkingDir, User)."""
    image_os = document.get("os") or "linux"
    if image_os != "linux":
        raise ImageFormatError(f"the image is built for {image_os!r}, not linux")
    config = _object(_absent(document.get("config"), {}), "image config 'config'")
    return ImageConfig(
        env=_strings(config.get("Env"), "config Env"),
        cmd=_strings(config.get("Cmd"), "config Cmd"),
        entrypoint=_strings(config.get("Entrypoint"), "config Entrypoint"),
        working_dir=_string(_absent(config.get("WorkingDir"), ""), "config WorkingDir"),
        user=_string(_absent(config.get("User"), ""), "config User"),
    )


def parse_diff_ids(document: Mapping[str, Any]) -> tuple[str, ...] | None:
    """``rootfs.diff_ids`` of an image config (digests of the uncompressed layers), ``None`` if absent."""
    rootfs = document.get("rootfs")
    if rootfs is None:
        return None
    diff_ids = _object(rootfs, "image config rootfs").get("diff_ids")
    if diff_ids is None:
        return None
    ids = _strings(diff_ids, "image config rootfs.diff_ids")
    for diff_id in ids:
        parse_digest(diff_id, "diff_id")
    return ids


def layer_compression(media_type: str, magic: bytes) -> Literal["tar", "gzip", "zstd"]:
    """How a layer blob is compressed, from its first bytes; a media type only decides for zstd.

    Gzip is detected by its magic bytes alone (tools label gzip layers as plain tar and the other way round).
    """
    if media_type.endswith("+encrypted"):
        raise ImageFormatError("encrypted layers are not supported")
    if magic.startswith(ZSTD_MAGIC) or media_type.endswith(("+zstd", ".zstd")):
        return "zstd"
    if magic.startswith(GZIP_MAGIC):
        return "gzip"
    return "tar"


# --- reading the source ---------------------------------------------------------------------------------


class _Store(Protocol):
    label: str

    def has(self, name: str) -> bool: ...

    def open(self, name: str) -> IO[bytes]: ...


class _DirStore:
    """Files of an image directory (OCI layout, or an unpacked ``docker save``), never outside it."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.label = str(root)

    def _path(self, name: str) -> Path | None:
        try:
            parts = normalize_member_path(name)
        except ImageFormatError:
            return None
        path = Path(os.path.realpath(self.root.joinpath(*parts)))
        return path if path.is_relative_to(self.root) and path.is_file() else None

    def has(self, name: str) -> bool:
        return self._path(name) is not None

    def open(self, name: str) -> IO[bytes]:
        path = self._path(name)
        if path is None:
            raise ImageFormatError(f"{self.label}: {name} is missing from the image")
        return path.open("rb")


class _TarStore:
    """Members of an image archive, following the archive's own links (old ``docker save`` links layers)."""

    def __init__(self, archive: tarfile.TarFile, label: str) -> None:
        self.archive = archive
        self.label = label
        self.members: dict[tuple[str, ...], tarfile.TarInfo] = {}
        for member in archive.getmembers():
            try:
                self.members[normalize_member_path(member.name)] = member
            except ImageFormatError:
                continue  # never extracted; a name that escapes just cannot be looked up

    def _resolve(self, name: str) -> tarfile.TarInfo | None:
        try:
            parts = normalize_member_path(name)
            for _ in range(40):
                member = self.members.get(parts)
                if member is None or member.isreg():
                    return member
                if member.issym():
                    base = "" if member.linkname.startswith("/") else "/".join(parts[:-1])
                    parts = normalize_member_path(f"{base}/{member.linkname}")
                elif member.islnk():
                    parts = normalize_member_path(member.linkname)
                else:
                    return None
        except ImageFormatError:
            return None
        return None

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def open(self, name: str) -> IO[bytes]:
        member = self._resolve(name)
        stream = self.archive.extractfile(member) if member is not None else None
        if stream is None:
            raise ImageFormatError(f"{self.label}: {name} is missing from the image")
        return stream


@contextmanager
def _open_store(source: Path) -> Iterator[_Store]:
    if source.is_dir():
        yield _DirStore(source)
        return
    if not source.exists():
        raise ImageFormatError(f"image source {source} does not exist")
    if not source.is_file():
        raise ImageFormatError(f"image source {source} is neither a directory nor a file")
    try:
        archive = tarfile.open(source, "r:*")  # noqa: SIM115 - closed below
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ImageFormatError(
            f"{source} is not an image archive (an OCI layout or docker save tar file): {exc}"
        ) from exc
    with archive:
        try:
            store = _TarStore(archive, str(source))
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise ImageFormatError(f"{source} is a damaged tar file: {exc}") from exc
        yield store


class _Hasher(Protocol):
    def hexdigest(self) -> str: ...


def _check_blob(data_hash: _Hasher, count: int, digest: str | None, size: int | None, what: str) -> None:
    if size is not None and count != size:
        raise ImageFormatError(f"{what} is {count} bytes, its descriptor says {size}")
    if digest is not None:
        algorithm = digest.split(":", 1)[0]
        actual = f"{algorithm}:{data_hash.hexdigest()}"
        if actual != digest:
            raise ImageFormatError(f"{what} does not match its digest {digest} (it is {actual}); refusing it")


def _read_json(
    store: _Store, name: str, what: str, digest: str | None = None, size: int | None = None
) -> Any:
    with store.open(name) as stream:
        data = stream.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ImageFormatError(f"{store.label}: {what} ({name}) is larger than {MAX_JSON_BYTES} bytes")
    algorithm = digest.split(":", 1)[0] if digest else "sha256"
    _check_blob(hashlib.new(algorithm, data), len(data), digest, size, f"{store.label}: {what} ({name})")
    try:
        return json.loads(data)
    except ValueError as exc:  # includes UnicodeDecodeError
        raise ImageFormatError(f"{store.label}: {what} ({name}) is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class _Layer:
    path: str  # inside the store
    digest: str | None
    size: int | None
    media_type: str
    diff_id: str | None
    label: str


@dataclass(frozen=True)
class _Image:
    config: ImageConfig
    layers: tuple[_Layer, ...]


def _layers(
    store: _Store, found: Sequence[tuple[str, str | None, int | None, str]], config_doc: Mapping[str, Any]
) -> tuple[_Layer, ...]:
    diff_ids = parse_diff_ids(config_doc)
    if diff_ids is not None and len(diff_ids) != len(found):
        raise ImageFormatError(
            f"{store.label}: the image config lists {len(diff_ids)} layers, the manifest {len(found)}"
        )
    return tuple(
        _Layer(
            path=path,
            digest=digest,
            size=size,
            media_type=media_type,
            diff_id=diff_ids[i] if diff_ids is not None else None,
            label=f"{store.label}: layer {i + 1} ({digest or path})",
        )
        for i, (path, digest, size, media_type) in enumerate(found)
    )


def _resolve_docker(store: _Store) -> _Image:
    manifest = parse_docker_manifest(_read_json(store, "manifest.json", "manifest.json"))
    config_doc = _object(
        _read_json(store, manifest.config, "image config", digest_from_path(manifest.config)), "image config"
    )
    found = [(path, digest_from_path(path), None, "") for path in manifest.layers]
    return _Image(parse_image_config(config_doc), _layers(store, found, config_doc))


def _resolve_oci(store: _Store) -> _Image:
    if store.has("oci-layout"):
        layout = _object(_read_json(store, "oci-layout", "oci-layout"), "oci-layout")
        version = str(layout.get("imageLayoutVersion", ""))
        if not version.startswith("1."):
            raise ImageFormatError(f"{store.label}: unsupported OCI image layout version {version!r}")
    document = _object(_read_json(store, "index.json", "index.json"), "index.json")
    kind = "index"
    for depth in range(MAX_INDEX_DEPTH + 1):
        if kind == "manifest":
            break
        if depth == MAX_INDEX_DEPTH:
            raise ImageFormatError(f"{store.label}: indexes nested more than {MAX_INDEX_DEPTH} deep")
        desc = select_manifest(document)
        document = _object(
            _read_json(store, desc.blob_path, "manifest", desc.digest, desc.size), f"manifest {desc.digest}"
        )
        kind = document_kind(desc.media_type, document)
    manifest = parse_manifest(document)
    config = manifest.config
    config_doc = _object(
        _read_json(store, config.blob_path, "image config", config.digest, config.size), "image config"
    )
    found = [(layer.blob_path, layer.digest, layer.size, layer.media_type) for layer in manifest.layers]
    return _Image(parse_image_config(config_doc), _layers(store, found, config_doc))


def _resolve(store: _Store) -> _Image:
    if store.has("manifest.json"):
        return _resolve_docker(store)
    if store.has("index.json"):
        return _resolve_oci(store)
    raise ImageFormatError(
        f"{store.label} is not an OCI image layout or a docker save archive (it has no index.json or manifest.json)"
    )


# --- reading layers -------------------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _HashingReader(io.RawIOBase):
    """Passes bytes through, hashing and counting them."""

    def __init__(self, source: _Readable, algorithm: str = "sha256") -> None:
        self._source = source
        self.hash = hashlib.new(algorithm)
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(len(view))
        view[: len(data)] = data
        self.hash.update(data)
        self.count += len(data)
        return len(data)


def _drain(stream: _Readable) -> None:
    while stream.read(_CHUNK):
        pass


_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _layer_members(
    store: _Store, layer: _Layer
) -> Generator[tuple[tarfile.TarFile, tarfile.TarInfo], None, None]:
    """The members of a layer, in order; once all are read, checks the blob and uncompressed digests."""
    with ExitStack() as stack:
        raw = stack.enter_context(store.open(layer.path))
        blob = _HashingReader(raw, layer.digest.split(":", 1)[0] if layer.digest else "sha256")
        buffered = stack.enter_context(io.BufferedReader(blob, _CHUNK))
        compression = layer_compression(layer.media_type, buffered.peek(4)[:4])
        if compression == "zstd":
            raise ImageFormatError(f"{layer.label}: zstd layers are not supported")
        tar_stream: _Readable = buffered
        if compression == "gzip":
            tar_stream = stack.enter_context(gzip.GzipFile(fileobj=buffered, mode="rb"))
        uncompressed = _HashingReader(tar_stream, "sha256")
        tar_buffered = stack.enter_context(io.BufferedReader(uncompressed, _CHUNK))
        try:
            with tarfile.open(fileobj=tar_buffered, mode="r|") as archive:
                for member in archive:
                    yield archive, member
            _drain(tar_buffered)
            _drain(buffered)
        except _TAR_ERRORS as exc:
            raise ImageFormatError(f"{layer.label} is not a valid {compression} layer: {exc}") from exc
    _check_blob(blob.hash, blob.count, layer.digest, layer.size, layer.label)
    if layer.diff_id is not None:
        algorithm = layer.diff_id.split(":", 1)[0]
        if algorithm != "sha256":
            raise ImageFormatError(f"{layer.label}: unsupported diff_id algorithm {algorithm}")
        _check_blob(
            uncompressed.hash, uncompressed.count, layer.diff_id, None, f"{layer.label}, uncompressed,"
        )


@dataclass
class _LayerPlan:
    whiteouts: list[Whiteout] = field(default_factory=list)


def _check_layer(store: _Store, layer: _Layer) -> _LayerPlan:
    """First pass: digests, member paths, hardlink targets; what the layer's whiteouts remove."""
    plan = _LayerPlan()
    with closing(_layer_members(store, layer)) as members:
        for _, member in members:
            try:
                parts = normalize_member_path(member.name)
                if member.islnk():
                    normalize_member_path(member.linkname)
                whiteout = interpret_whiteout(parts)
            except ImageFormatError as exc:
                raise ImageFormatError(f"{layer.label}: {exc}") from exc
            if whiteout is not None:
                plan.whiteouts.append(whiteout)
            elif not parts and not member.isdir():
                raise ImageFormatError(
                    f"{layer.label}: entry {member.name!r} would replace the root directory"
                )
    return plan


# --- writing the rootfs ---------------------------------------------------------------------------------


def _mtime_ns(member: tarfile.TarInfo) -> int:
    mtime = member.mtime
    return mtime * 1_000_000_000 if isinstance(mtime, int) else int(mtime * 1e9)


def _lstat(parent_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(parent_fd: int, name: str) -> None:
    """Removes an entry (a directory with all it holds), without following symlinks."""
    st = _lstat(parent_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent_fd)
    else:
        os.unlink(name, dir_fd=parent_fd)


@dataclass
class _Counts:
    entries: int = 0
    skipped: int = 0


class _Writer:
    """Writes layers into the directory ``root_fd`` without ever following a symlink inside it."""

    def __init__(self, root_fd: int, label: str) -> None:
        self.root_fd = root_fd
        self.label = label
        self.chown = os.geteuid() == 0
        self.counts = _Counts()
        self._dirs: dict[tuple[str, ...], tarfile.TarInfo] = {}

    def _walk(self, parts: tuple[str, ...], *, create: bool, member: str) -> int | None:
        """A new descriptor of directory ``parts``: missing directories are made (0755) if ``create``.

        A component that is a symlink or no directory is refused (``create``) or gives ``None``, as does a
        missing one without ``create``.
        """
        fd = os.dup(self.root_fd)
        try:
            for depth, part in enumerate(parts):
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(next_fd, 0o755)  # whatever the umask
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    if not create:
                        os.close(fd)
                        return None
                    where = "/".join(parts[: depth + 1])
                    raise ImageFormatError(
                        f"{self.label}: entry {member!r} goes through {where!r}, which is a symlink or not a "
                        "directory; refusing to follow it"
                    ) from exc
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def apply_whiteout(self, whiteout: Whiteout) -> None:
        path = whiteout.path if whiteout.opaque else whiteout.path[:-1]
        fd = self._walk(path, create=False, member="")
        if fd is None:
            return  # nothing there, or only through a symlink: nothing of the rootfs to remove
        try:
            names = os.listdir(fd) if whiteout.opaque else [whiteout.path[-1]]
            for name in names:
                _remove(fd, name)
        finally:
            os.close(fd)

    def write(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = normalize_member_path(member.name)
        if parts and is_whiteout_name(parts[-1]):
            return  # applied before the layer (or aufs bookkeeping)
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            self.counts.skipped += 1  # device nodes, fifos, unknown types
            return
        if not parts:  # "./": the root directory's own metadata (anything else there was refused)
            if member.isdir():
                self._dirs[parts] = member
                if self.chown:
                    os.chown(self.root_fd, member.uid, member.gid)
            return
        parent_fd = self._walk(parts[:-1], create=True, member=member.name)
        assert parent_fd is not None
        try:
            self._write_entry(archive, member, parent_fd, parts)
        finally:
            os.close(parent_fd)
        self.counts.entries += 1

    def _write_entry(
        self, archive: tarfile.TarFile, member: tarfile.TarInfo, parent_fd: int, parts: tuple[str, ...]
    ) -> None:
        name = parts[-1]
        existing = _lstat(parent_fd, name)
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                _remove(parent_fd, name)
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            try:
                if self.chown:
                    os.chown(fd, member.uid, member.gid)
            finally:
                os.close(fd)
            self._dirs[parts] = member  # mode and mtime once the layer is written
        elif member.islnk():
            self._link(member, parent_fd, parts)
        else:
            _remove(parent_fd, name)
            if member.issym():
                os.symlink(member.linkname, name, dir_fd=parent_fd)
                if self.chown:
                    os.chown(name, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
                mtime = _mtime_ns(member)
                os.utime(name, ns=(mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)
            else:
                self._file(archive, member, parent_fd, name)

    def _file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, parent_fd: int, name: str) -> None:
        source = archive.extractfile(member)
        assert source is not None
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent_fd)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
            out.flush()
            if self.chown:
                os.chown(fd, member.uid, member.gid)  # before chmod: chown clears setuid bits
            os.chmod(fd, stat.S_IMODE(member.mode))
            mtime = _mtime_ns(member)
            os.utime(fd, ns=(mtime, mtime))

    def _link(self, member: tarfile.TarInfo, parent_fd: int, parts: tuple[str, ...]) -> None:
        target = normalize_member_path(member.linkname)
        if target == parts:
            return
        if not target:
            raise ImageFormatError(f"{self.label}: hardlink {member.name!r} points at the root directory")
        target_fd = self._walk(target[:-1], create=False, member=member.name)
        target_st = _lstat(target_fd, target[-1]) if target_fd is not None else None
        try:
            if target_fd is None or target_st is None:
                raise ImageFormatError(
                    f"{self.label}: hardlink {member.name!r} points at {member.linkname!r}, which is not in the "
                    "root filesystem (or only through a symlink)"
                )
            if stat.S_ISDIR(target_st.st_mode):
                raise ImageFormatError(f"{self.label}: hardlink {member.name!r} points at a directory")
            _remove(parent_fd, parts[-1])
            os.link(target[-1], parts[-1], src_dir_fd=target_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        finally:
            if target_fd is not None:
                os.close(target_fd)

    def finish_layer(self) -> None:
        """Directory modes and mtimes, deepest first (so that writing children did not change them again)."""
        for parts in sorted(self._dirs, key=len, reverse=True):
            member = self._dirs[parts]
            fd = self._walk(parts, create=False, member=member.name)
            if fd is None:
                continue  # replaced later in the layer
            try:
                os.chmod(fd, stat.S_IMODE(member.mode))
                mtime = _mtime_ns(member)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        self._dirs.clear()


# --- entry points ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportReport:
    config: ImageConfig
    layers: int
    entries: int  # files, directories, symlinks and hardlinks written (over all layers)
    skipped_special: int  # device nodes, fifos and unknown entry types, not created


def read_image_config(source: Path) -> ImageConfig:
    """The runtime settings of an image, without unpacking it (manifests and config are digest-checked)."""
    with _open_store(source) as store:
        return _resolve(store).config


def unpack_image(source: Path, dest_rootfs: Path) -> ImportReport:
    """Unpacks the image at ``source`` into the existing empty directory ``dest_rootfs``.

    Raises :class:`ImageFormatError` for anything wrong with the image, :class:`ValueError` if
    ``dest_rootfs`` is not an empty directory.
    """
    try:
        root_fd = os.open(dest_rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"destination {dest_rootfs} is not a directory: {exc.strerror}") from exc
    try:
        if os.listdir(root_fd):
            raise ValueError(f"destination {dest_rootfs} is not empty")
        with _open_store(source) as store:
            image = _resolve(store)
            plans = [_check_layer(store, layer) for layer in image.layers]
            writer = _Writer(root_fd, store.label)
            for layer, plan in zip(image.layers, plans, strict=True):
                writer.label = layer.label
                for whiteout in plan.whiteouts:
                    writer.apply_whiteout(whiteout)
                with closing(_layer_members(store, layer)) as members:
                    for archive, member in members:
                        try:
                            writer.write(archive, member)
                        except _TAR_ERRORS as exc:
                            raise ImageFormatError(f"{layer.label} is damaged: {exc}") from exc
                writer.finish_layer()
    finally:
        os.close(root_fd)
    counts = writer.counts
    if counts.skipped:
        log.info("%s: skipped %d device nodes, fifos or unknown entries", source, counts.skipped)
    return ImportReport(image.config, len(image.layers), counts.entries, counts.skipped)


def import_image(source: Path, dest_rootfs: Path) -> ImageConfig:
    """Unpacks the image at ``source`` into the empty directory ``dest_rootfs``; returns how to run it."""
    return unpack_image(source, dest_rootfs).config
