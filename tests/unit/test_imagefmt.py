"""Images imported from files: pure parsing as tables, then real OCI layouts and docker save archives built
here with tarfile and hashlib, unpacked into tmp_path (as root: ownership is checked), including hostile ones.

Hostile layers are either refused with ImageFormatError (a path that climbs out, a hardlink out, an entry
through a symlink) or handled without leaving the rootfs (an entry replacing a symlink replaces the symlink; a
whiteout through a symlink removes nothing). Either way nothing outside the rootfs changes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.runtime.imagefmt import (
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageConfig,
    ImageFormatError,
    Whiteout,
    digest_from_path,
    document_kind,
    import_image,
    interpret_whiteout,
    layer_compression,
    normalize_member_path,
    parse_descriptor,
    parse_diff_ids,
    parse_docker_manifest,
    parse_image_config,
    parse_manifest,
    read_image_config,
    select_manifest,
    unpack_image,
)

MTIME = 1_600_000_000
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

# --- building images --------------------------------------------------------------------------------------


def _info(
    name: str, kind: bytes, *, mode: int, uid: int = 0, gid: int = 0, mtime: int = MTIME
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = mtime
    return info


@dataclass(frozen=True)
class Entry:
    info: tarfile.TarInfo
    data: bytes = b""


def file(name: str, data: bytes = b"x", mode: int = 0o644, **kw: Any) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode=mode, **kw)
    info.size = len(data)
    return Entry(info, data)


def directory(name: str, mode: int = 0o755, **kw: Any) -> Entry:
    return Entry(_info(name, tarfile.DIRTYPE, mode=mode, **kw))


def symlink(name: str, target: str, **kw: Any) -> Entry:
    info = _info(name, tarfile.SYMTYPE, mode=0o777, **kw)
    info.linkname = target
    return Entry(info)


def hardlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.LNKTYPE, mode=0o644)
    info.linkname = target
    return Entry(info)


def special(name: str, kind: bytes) -> Entry:
    info = _info(name, kind, mode=0o666)
    info.devmajor, info.devminor = 1, 3
    return Entry(info)


def layer(*entries: Entry) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            tar.addfile(entry.info, io.BytesIO(entry.data) if entry.info.isreg() else None)
    return out.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def uncompressed(blob: bytes) -> bytes:
    return gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob


def config_json(layers: Sequence[bytes], **config: Any) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [sha256(uncompressed(blob)) for blob in layers]},
    }


@dataclass
class OciLayout:
    """An OCI image layout being written into ``root``."""

    root: Path
    blobs: dict[str, bytes] = field(default_factory=dict)

    def blob(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        digest = sha256(data)
        path = self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def json_blob(self, document: dict[str, Any], media_type: str, **extra: Any) -> dict[str, Any]:
        return self.blob(json.dumps(document).encode(), media_type, **extra)

    def image(
        self,
        layers: Sequence[bytes],
        config: dict[str, Any] | None = None,
        media_types: Sequence[str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Writes config, layers and manifest; returns the manifest's descriptor."""
        types = media_types or [LAYER_GZIP if blob[:2] == b"\x1f\x8b" else LAYER_TAR for blob in layers]
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.json_blob(config or config_json(layers), OCI_CONFIG),
            "layers": [self.blob(blob, kind) for blob, kind in zip(layers, types, strict=True)],
        }
        return self.json_blob(manifest, OCI_MANIFEST, **extra)

    def index(self, *manifests: dict[str, Any]) -> Path:
        (self.root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(manifests)}
        (self.root / "index.json").write_text(json.dumps(index))
        return self.root


def oci(tmp_path: Path, *layers: bytes, **config: Any) -> Path:
    image = OciLayout(tmp_path / "oci")
    return image.index(image.image(layers, config_json(layers, **config) if config else None))


def tar_directory(directory: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)
    return archive


def docker_save(tmp_path: Path, *layers: bytes, config: dict[str, Any] | None = None) -> Path:
    """An old-style ``docker save`` tarball: ``<id>.json`` config, ``<layer id>/layer.tar``; a repeated layer
    is stored once and linked, as docker does."""
    root = tmp_path / "docker"
    root.mkdir()
    config_data = json.dumps(config or config_json(layers)).encode()
    config_name = hashlib.sha256(config_data).hexdigest() + ".json"
    (root / config_name).write_bytes(config_data)
    paths: list[str] = []
    seen: dict[bytes, str] = {}
    for i, blob in enumerate(layers):
        layer_id = hashlib.sha256(f"layer-{i}".encode()).hexdigest()
        (root / layer_id).mkdir()
        if blob in seen:
            (root / layer_id / "layer.tar").symlink_to(f"../{seen[blob]}")
        else:
            (root / layer_id / "layer.tar").write_bytes(blob)
            seen[blob] = f"{layer_id}/layer.tar"
        paths.append(f"{layer_id}/layer.tar")
    manifest = [{"Config": config_name, "RepoTags": ["demo:latest"], "Layers": paths}]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return tar_directory(root, tmp_path / "docker.tar")


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    path = tmp_path / "rootfs"
    path.mkdir()
    return path


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A directory outside the rootfs that no import may write into."""
    path = tmp_path / "sentinel"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the rootfs holding a file no import may change, link or remove."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_text("host secret")
    return path


def untouched(sentinel: Path, outside: Path) -> bool:
    return (
        not any(sentinel.iterdir())
        and sorted(p.name for p in outside.iterdir()) == ["secret"]
        and (outside / "secret").read_text() == "host secret"
        and (outside / "secret").stat().st_nlink == 1
    )


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# --- pure parsing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("etc/passwd", ("etc", "passwd")),
        ("./etc/passwd", ("etc", "passwd")),
        ("/etc/passwd", ("etc", "passwd")),
        ("etc//x/./y/", ("etc", "x", "y")),
        ("a/../b", ("b",)),
        ("./", ()),
        (".", ()),
        ("", ()),
        ("..foo/.wh.x", ("..foo", ".wh.x")),
    ],
)
def test_member_paths_are_normalized_below_the_root(name: str, parts: tuple[str, ...]) -> None:
    assert normalize_member_path(name) == parts


@pytest.mark.parametrize("name", ["..", "../evil", "./../evil", "/../evil", "a/../../evil", "a/b/../../../c"])
def test_member_paths_that_climb_out_are_refused(name: str) -> None:
    with pytest.raises(ImageFormatError, match="escapes the root filesystem"):
        normalize_member_path(name)


@pytest.mark.parametrize(
    ("parts", "whiteout"),
    [
        (("etc", "passwd"), None),
        (("etc", ".wh.passwd"), Whiteout(("etc", "passwd"))),
        ((".wh.var",), Whiteout(("var",))),
        (("opt", "app", ".wh..wh..opq"), Whiteout(("opt", "app"), opaque=True)),
        ((".wh..wh..opq",), Whiteout((), opaque=True)),
        (("x", ".wh..wh.plnk"), None),  # aufs bookkeeping, not a whiteout
        (("x", ".wh..hidden"), Whiteout(("x", ".hidden"))),
        ((), None),
    ],
)
def test_whiteout_names(parts: tuple[str, ...], whiteout: Whiteout | None) -> None:
    assert interpret_whiteout(parts) == whiteout


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh..."])
def test_whiteouts_of_nothing_are_refused(name: str) -> None:
    with pytest.raises(ImageFormatError, match="invalid whiteout"):
        interpret_whiteout(("x", name))


def _desc(digest_char: str, arch: str | None = None, **extra: Any) -> dict[str, Any]:
    desc: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + digest_char * 64, "size": 1}
    if arch:
        desc["platform"] = {"os": "linux", "architecture": arch}
    return desc | extra


@pytest.mark.parametrize(
    ("entries", "chosen"),
    [
        ([_desc("a")], "a"),
        ([_desc("a", "arm64"), _desc("b", "amd64"), _desc("c", "amd64")], "b"),
        ([_desc("a", "arm64"), _desc("b", "s390x")], "a"),
        (
            [
                _desc("a", annotations={"vnd.docker.reference.type": "attestation-manifest"}),
                _desc("b", "arm64"),
            ],
            "b",
        ),
    ],
)
def test_index_entry_selection(entries: list[dict[str, Any]], chosen: str) -> None:
    assert select_manifest({"manifests": entries}).digest == "sha256:" + chosen * 64


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ({}, "no 'manifests' list"),
        ({"manifests": []}, "no image manifests"),
        ({"manifests": [{"digest": "sha256:abc", "size": 1}]}, "not a valid sha256 digest"),
        ({"manifests": [{"digest": "md5:" + "a" * 32, "size": 1}]}, "unsupported algorithm"),
        ({"manifests": [{"digest": "sha256:" + "a" * 64}]}, "size must be a non-negative integer"),
        ({"manifests": ["nope"]}, "must be a JSON object"),
    ],
)
def test_bad_indexes_are_refused(index: dict[str, Any], message: str) -> None:
    with pytest.raises(ImageFormatError, match=message):
        select_manifest(index)


def test_document_kinds() -> None:
    assert document_kind(OCI_INDEX, {}) == "index"
    assert document_kind(DOCKER_MANIFEST_LIST, {}) == "index"
    assert document_kind("", {"mediaType": OCI_MANIFEST}) == "manifest"
    assert document_kind("", {"manifests": []}) == "index"
    assert document_kind("", {"config": {}, "layers": []}) == "manifest"
    with pytest.raises(ImageFormatError, match="schema 1"):
        document_kind("", {"schemaVersion": 1, "fsLayers": []})
    with pytest.raises(ImageFormatError, match="unsupported manifest media type"):
        document_kind("application/vnd.example+json", {})


def test_manifest_of_something_else_than_an_image_is_refused() -> None:
    helm = {
        "mediaType": "application/vnd.cncf.helm.config.v1+json",
        "digest": "sha256:" + "a" * 64,
        "size": 2,
    }
    with pytest.raises(ImageFormatError, match="not a container image"):
        parse_manifest({"config": helm, "layers": []})
    manifest = parse_manifest({"config": helm | {"mediaType": OCI_CONFIG}, "layers": [_desc("b")]})
    assert manifest.layers[0].blob_path == "blobs/sha256/" + "b" * 64


@pytest.mark.parametrize(
    ("media_type", "magic", "compression"),
    [
        (LAYER_TAR, b"usr/", "tar"),
        (LAYER_GZIP, b"\x1f\x8b\x08\x00", "gzip"),
        (LAYER_TAR, b"\x1f\x8b\x08\x00", "gzip"),  # mislabelled: the bytes decide
        (LAYER_GZIP, b"usr/", "tar"),
        ("", b"\x1f\x8b\x08\x00", "gzip"),
        (LAYER_ZSTD, b"usr/", "zstd"),
        ("", b"\x28\xb5\x2f\xfd", "zstd"),
    ],
)
def test_layer_compression_comes_from_magic_bytes(media_type: str, magic: bytes, compression: str) -> None:
    assert layer_compression(media_type, magic) == compression


def test_encrypted_layers_are_refused() -> None:
    with pytest.raises(ImageFormatError, match="encrypted"):
        layer_compression(LAYER_GZIP + "+encrypted", b"")


def test_image_config_is_parsed_with_defaults() -> None:
    assert parse_image_config({}) == ImageConfig()
    assert parse_image_config({"config": None}) == ImageConfig()
    document = {
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin", "LANG=C.UTF-8"],
            "Cmd": ["bash"],
            "Entrypoint": None,
            "WorkingDir": "/app",
            "User": "1000:1000",
        },
    }
    assert parse_image_config(document) == ImageConfig(
        env=("PATH=/usr/bin", "LANG=C.UTF-8"), cmd=("bash",), working_dir="/app", user="1000:1000"
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"os": "windows"}, "built for 'windows'"),
        ({"config": {"Env": "PATH=/bin"}}, "Env must be a list of strings"),
        ({"config": {"Cmd": ["sh", 1]}}, "Cmd must be a list of strings"),
        ({"config": {"WorkingDir": 5}}, "WorkingDir must be a string"),
        ({"config": []}, "must be a JSON object"),
    ],
)
def test_bad_image_configs_are_refused(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ImageFormatError, match=message):
        parse_image_config(document)


def test_diff_ids() -> None:
    assert parse_diff_ids({}) is None
    assert parse_diff_ids({"rootfs": {"diff_ids": ["sha256:" + "a" * 64]}}) == ("sha256:" + "a" * 64,)
    with pytest.raises(ImageFormatError, match="not a valid sha256 digest"):
        parse_diff_ids({"rootfs": {"diff_ids": ["sha256:zz"]}})


@pytest.mark.parametrize(
    ("path", "digest"),
    [
        ("blobs/sha256/" + "a" * 64, "sha256:" + "a" * 64),
        ("a" * 64 + ".json", "sha256:" + "a" * 64),
        ("blobs/sha256/abc", None),
        ("a" * 64 + "/layer.tar", None),
        ("config.json", None),
    ],
)
def test_digests_named_by_docker_save_paths(path: str, digest: str | None) -> None:
    assert digest_from_path(path) == digest


def test_docker_manifest() -> None:
    manifest = parse_docker_manifest([{"Config": "c.json", "Layers": ["a/layer.tar"]}, {"Config": "other"}])
    assert (manifest.config, manifest.layers) == ("c.json", ("a/layer.tar",))
    bad_documents: list[object] = [[], {}, [{"Layers": []}], [{"Config": "c.json", "Layers": "a"}]]
    for bad in bad_documents:
        with pytest.raises(ImageFormatError):
            parse_docker_manifest(bad)


def test_descriptor_platform_and_annotations() -> None:
    desc = parse_descriptor(_desc("a", "arm64", annotations={"org.opencontainers.image.ref.name": "1.0"}))
    assert desc.platform is not None
    assert (desc.platform.os, desc.platform.architecture) == ("linux", "arm64")
    assert desc.annotations == {"org.opencontainers.image.ref.name": "1.0"}


# --- importing ----------------------------------------------------------------------------------------------


BASE = layer(
    directory("./"),
    directory("etc"),
    file("etc/hostname", b"base\n"),
    file("etc/gone", b"old"),
    directory("opt/app/sub"),
    file("opt/app/old.txt", b"old"),
    file("opt/app/sub/deep.txt", b"old"),
    directory("var/cache"),
    file("var/cache/big", b"x" * 1000),
    file("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
)
UPPER = layer(
    file("etc/.wh.gone"),
    file("opt/app/new.txt", b"new"),  # before the opaque marker: same layer, kept
    file("opt/app/.wh..wh..opq"),
    file("opt/app/sub/fresh.txt", b"new"),  # after it: kept too; sub/deep.txt of the base goes
    file(".wh.var"),
    file("var", b"now a file"),  # whiteout and new entry in the same layer: the entry stays
    hardlink("usr/bin/tool2", "usr/bin/tool"),
)


def check_layered_rootfs(rootfs: Path) -> None:
    assert tree(rootfs) == {
        "etc",
        "etc/hostname",
        "opt",
        "opt/app",
        "opt/app/new.txt",
        "opt/app/sub",
        "opt/app/sub/fresh.txt",
        "usr",
        "usr/bin",
        "usr/bin/tool",
        "usr/bin/tool2",
        "var",
    }
    assert (rootfs / "var").read_text() == "now a file"
    assert (rootfs / "usr/bin/tool2").stat().st_ino == (rootfs / "usr/bin/tool").stat().st_ino


def test_two_layers_with_whiteouts_and_an_opaque_directory(tmp_path: Path, rootfs: Path) -> None:
    report = unpack_image(oci(tmp_path, BASE, UPPER), rootfs)
    check_layered_rootfs(rootfs)
    assert (report.layers, report.skipped_special) == (2, 0)


def test_gzip_layers_are_detected_by_their_bytes(tmp_path: Path, rootfs: Path) -> None:
    image = OciLayout(tmp_path / "oci")
    # The first is gzip labelled as plain tar, the second plain tar labelled as gzip.
    source = image.index(image.image([gz(BASE), UPPER], media_types=[LAYER_TAR, LAYER_GZIP]))
    import_image(source, rootfs)
    check_layered_rootfs(rootfs)


def test_metadata_is_preserved_and_special_files_skipped(tmp_path: Path, rootfs: Path) -> None:
    blob = layer(
        directory("./", mode=0o755),
        directory("home/user", mode=0o750, uid=1000, gid=1001, mtime=1_000_000),
        file("home/user/.profile", b"export A=1\n", mode=0o600, uid=1000, gid=1001, mtime=2_000_000),
        file("usr/bin/su", b"elf", mode=0o4755, mtime=3_000_000),
        symlink("usr/bin/sh", "dash", uid=5, gid=6, mtime=4_000_000),
        directory("dev"),
        special("dev/null", tarfile.CHRTYPE),
        special("dev/sda", tarfile.BLKTYPE),
        special("run/fifo", tarfile.FIFOTYPE),
    )
    report = unpack_image(oci(tmp_path, blob), rootfs)
    assert report.skipped_special == 3
    assert not (rootfs / "dev/null").exists()
    assert not (rootfs / "run/fifo").exists()

    home = (rootfs / "home/user").stat()
    assert (stat.S_IMODE(home.st_mode), home.st_uid, home.st_gid, home.st_mtime) == (
        0o750,
        1000,
        1001,
        1_000_000,
    )
    profile = (rootfs / "home/user/.profile").stat()
    assert (stat.S_IMODE(profile.st_mode), profile.st_uid, profile.st_gid) == (0o600, 1000, 1001)
    assert profile.st_mtime == 2_000_000
    su = (rootfs / "usr/bin/su").stat()
    assert (stat.S_IMODE(su.st_mode), su.st_mtime) == (0o4755, 3_000_000)
    sh = (rootfs / "usr/bin/sh").lstat()
    assert os.readlink(rootfs / "usr/bin/sh") == "dash"
    assert (sh.st_uid, sh.st_gid, sh.st_mtime) == (5, 6, 4_000_000)
    assert stat.S_IMODE((rootfs / "usr").stat().st_mode) == 0o755  # made implicitly


def test_image_config_is_returned(tmp_path: Path, rootfs: Path) -> None:
    source = oci(
        tmp_path,
        layer(file("app/main.py", b"print(1)")),
        Env=["PATH=/usr/local/bin:/usr/bin", "PYTHONUNBUFFERED=1"],
        Cmd=["python", "main.py"],
        Entrypoint=["/usr/bin/tini", "--"],
        WorkingDir="/app",
        User="app",
    )
    expected = ImageConfig(
        env=("PATH=/usr/local/bin:/usr/bin", "PYTHONUNBUFFERED=1"),
        cmd=("python", "main.py"),
        entrypoint=("/usr/bin/tini", "--"),
        working_dir="/app",
        user="app",
    )
    assert read_image_config(source) == expected
    assert not any(rootfs.iterdir())
    assert import_image(source, rootfs) == expected
    assert (rootfs / "app/main.py").read_text() == "print(1)"


def test_nested_index_picks_linux_amd64(tmp_path: Path, rootfs: Path) -> None:
    image = OciLayout(tmp_path / "oci")
    arm = image.image([layer(file("arch", b"arm64"))], platform={"os": "linux", "architecture": "arm64"})
    amd = image.image([layer(file("arch", b"amd64"))], platform={"os": "linux", "architecture": "amd64"})
    attestation = image.image(
        [layer(file("sbom", b"{}"))],
        platform={"os": "unknown", "architecture": "unknown"},
        annotations={"vnd.docker.reference.type": "attestation-manifest"},
    )
    nested = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [arm, amd, attestation]}
    source = image.index(image.json_blob(nested, OCI_INDEX))
    import_image(source, rootfs)
    assert tree(rootfs) == {"arch"}
    assert (rootfs / "arch").read_text() == "amd64"


def test_oci_layout_archived_as_a_tar_file(tmp_path: Path, rootfs: Path) -> None:
    source = tar_directory(oci(tmp_path, gz(BASE), UPPER), tmp_path / "image.tar")
    import_image(source, rootfs)
    check_layered_rootfs(rootfs)


def test_docker_save_tarball(tmp_path: Path, rootfs: Path) -> None:
    again = layer(file("etc/motd", b"hi"))
    source = docker_save(
        tmp_path, BASE, again, UPPER, again, config=config_json([BASE, again, UPPER, again], Cmd=["sh"])
    )
    assert import_image(source, rootfs) == ImageConfig(cmd=("sh",))
    assert (rootfs / "etc/motd").read_text() == "hi"


def test_docker_save_prefers_manifest_json_over_the_oci_layout(tmp_path: Path, rootfs: Path) -> None:
    """Newer docker writes both; here the OCI index points at another image, manifest.json wins."""
    image = OciLayout(tmp_path / "both")
    blob = layer(file("from", b"manifest.json"))
    image.index(image.image([layer(file("from", b"index.json"))]))
    config = image.json_blob(config_json([blob], User="docker"), OCI_CONFIG)
    layer_desc = image.blob(blob, LAYER_TAR)
    manifest = [
        {
            "Config": f"blobs/sha256/{config['digest'][7:]}",
            "Layers": [f"blobs/sha256/{layer_desc['digest'][7:]}"],
        }
    ]
    (image.root / "manifest.json").write_text(json.dumps(manifest))
    source = tar_directory(image.root, tmp_path / "both.tar")
    assert import_image(source, rootfs).user == "docker"
    assert (rootfs / "from").read_text() == "manifest.json"


def test_tampered_layer_blob_is_refused_before_anything_is_written(tmp_path: Path, rootfs: Path) -> None:
    source = oci(tmp_path, BASE, UPPER)
    blob_path = source / "blobs/sha256" / sha256(UPPER).removeprefix("sha256:")
    blob_path.write_bytes(UPPER.replace(b"now a file", b"now EVIL!!"))
    with pytest.raises(ImageFormatError, match="does not match its digest"):
        import_image(source, rootfs)
    assert not any(rootfs.iterdir())


def test_tampered_config_and_manifest_are_refused(tmp_path: Path, rootfs: Path) -> None:
    blob = layer(file("a"))
    image = OciLayout(tmp_path / "oci")
    source = image.index(image.image([blob]))
    manifest = json.loads((source / "index.json").read_text())["manifests"][0]
    manifest_path = source / "blobs/sha256" / manifest["digest"][7:]
    document = json.loads(manifest_path.read_text())
    config_path = source / "blobs/sha256" / document["config"]["digest"][7:]
    config_path.write_text(config_path.read_text().replace("amd64", "arm64"))
    with pytest.raises(ImageFormatError, match=r"image config .* does not match its digest"):
        read_image_config(source)
    manifest_path.write_text(manifest_path.read_text() + " ")
    with pytest.raises(ImageFormatError, match=r"manifest .* is \d+ bytes, its descriptor says"):
        import_image(source, rootfs)


def test_layer_not_matching_the_configs_diff_id_is_refused(tmp_path: Path, rootfs: Path) -> None:
    good, evil = layer(file("a", b"good")), layer(file("a", b"evil"))
    source = docker_save(tmp_path, evil, config=config_json([good]))
    with pytest.raises(ImageFormatError, match=r"uncompressed.*does not match its digest"):
        import_image(source, rootfs)
    assert not any(rootfs.iterdir())


def test_zstd_layers_are_refused(tmp_path: Path, rootfs: Path) -> None:
    image = OciLayout(tmp_path / "by-type")
    source = image.index(image.image([layer(file("a"))], media_types=[LAYER_ZSTD]))
    with pytest.raises(ImageFormatError, match="zstd layers are not supported"):
        import_image(source, rootfs)
    image = OciLayout(tmp_path / "by-magic")
    source = image.index(image.image([b"\x28\xb5\x2f\xfd" + b"\0" * 100], media_types=[LAYER_TAR]))
    with pytest.raises(ImageFormatError, match="zstd layers are not supported"):
        import_image(source, rootfs)


# --- hostile images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../evil", "./../evil", "/../evil", "etc/../../evil", "../sentinel/evil", "../../sentinel/evil"]
)
def test_members_climbing_out_are_refused(
    tmp_path: Path, rootfs: Path, sentinel: Path, outside: Path, name: str
) -> None:
    with pytest.raises(ImageFormatError, match="escapes the root filesystem"):
        import_image(oci(tmp_path, layer(file("ok"), file(name, b"pwned"))), rootfs)
    assert not any(rootfs.iterdir())
    assert not (tmp_path / "evil").exists()
    assert untouched(sentinel, outside)


def test_hardlink_out_of_the_rootfs_is_refused(
    tmp_path: Path, rootfs: Path, sentinel: Path, outside: Path
) -> None:
    with pytest.raises(ImageFormatError, match="escapes the root filesystem"):
        import_image(oci(tmp_path, layer(hardlink("passwd", "../../etc/passwd"))), rootfs)
    assert not any(rootfs.iterdir())
    assert untouched(sentinel, outside)


def _through_symlink_cases(sentinel: Path) -> list[tuple[list[bytes], str]]:
    relative = os.path.relpath(sentinel, "/")  # from the root of the host, whatever tmp_path is
    return [
        # A symlink in one layer, a file through it in the next.
        ([layer(symlink("link", str(sentinel))), layer(file("link/file", b"pwned"))], "link"),
        # The same within one layer.
        ([layer(symlink("link", str(sentinel)), file("link/file", b"pwned"))], "link"),
        # etc -> / and a file through it: would write into the host's sentinel via an absolute path.
        ([layer(symlink("etc", "/")), layer(file(f"etc/{relative}/file", b"pwned"))], "etc"),
        # x -> ../../.. (enough to reach / from the rootfs) and a file through it.
        ([layer(symlink("x", "../" * 30)), layer(file(f"x/{relative}/file", b"pwned"))], "x"),
        # A symlink deeper down, then a directory entry below it.
        ([layer(directory("a"), symlink("a/b", str(sentinel))), layer(directory("a/b/c"))], "a/b"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_entries_through_a_symlink_are_refused(
    tmp_path: Path, rootfs: Path, sentinel: Path, outside: Path, case: int
) -> None:
    layers, link = _through_symlink_cases(sentinel)[case]
    with pytest.raises(ImageFormatError, match=f"goes through '{link}', which is a symlink"):
        import_image(oci(tmp_path, *layers), rootfs)
    assert untouched(sentinel, outside)


def test_hardlink_through_a_symlink_is_refused(
    tmp_path: Path, rootfs: Path, sentinel: Path, outside: Path
) -> None:
    layers = [layer(symlink("link", str(outside))), layer(hardlink("stolen", "link/secret"))]
    with pytest.raises(ImageFormatError, match="not in the root filesystem"):
        import_image(oci(tmp_path, *layers), rootfs)
    assert not (rootfs / "stolen").exists()
    assert untouched(sentinel, outside)


def test_hardlink_to_a_symlink_links_the_symlink(
    tmp_path: Path, rootfs: Path, sentinel: Path, outside: Path
) -> None:
    layers = [layer(symlink("link", str(outside / "secret"))), layer(hardlink("copy", "link"))]
    import_image(oci(tmp_path, *layers), rootfs)
    assert os.readlink(rootfs / "copy") == str(outside / "secret")
    assert untouched(sentinel, outside)


def test_entries_replacing_a_symlink_replace_the_symlink(
    tmp_path: Path, rootfs: Path, sentinel: Path, outside: Path
) -> None:
    """Safely handled, not refused: the symlink goes, nothing it pointed at changes."""
    lower = layer(
        symlink("dir", str(sentinel)),
        symlink("file", str(outside / "secret")),
        symlink("other", str(outside)),
    )
    upper = layer(
        directory("dir", mode=0o700),
        file("dir/inside", b"mine"),
        file("file", b"replaced", mode=0o600),
        symlink("other", "/elsewhere"),
    )
    import_image(oci(tmp_path, lower, upper), rootfs)
    assert (rootfs / "dir").is_dir()
    assert not (rootfs / "dir").is_symlink()
    assert (rootfs / "dir/inside").read_text() == "mine"
    assert not (rootfs / "file").is_symlink()
    assert (rootfs / "file").read_text() == "replaced"
    assert os.readlink(rootfs / "other") == "/elsewhere"
    assert untouched(sentinel, outside)


def test_whiteouts_through_a_symlink_remove_nothing(
    tmp_path: Path, rootfs: Path, sentinel: Path, outside: Path
) -> None:
    """Safely skipped, not refused: there is nothing of the rootfs behind a symlink to remove."""
    lower = layer(symlink("link", str(outside)), symlink("etc", "/"))
    upper = layer(
        file("link/.wh.secret"), file("link/.wh..wh..opq"), file(f"etc/{outside.relative_to('/')}/.wh.secret")
    )
    import_image(oci(tmp_path, lower, upper), rootfs)
    assert os.readlink(rootfs / "link") == str(outside)
    assert untouched(sentinel, outside)


def test_whiteout_of_a_symlink_removes_the_symlink(
    tmp_path: Path, rootfs: Path, sentinel: Path, outside: Path
) -> None:
    import_image(oci(tmp_path, layer(symlink("link", str(outside))), layer(file(".wh.link"))), rootfs)
    assert not any(rootfs.iterdir())
    assert untouched(sentinel, outside)


def test_a_file_replacing_the_root_is_refused(tmp_path: Path, rootfs: Path) -> None:
    with pytest.raises(ImageFormatError, match="replace the root directory"):
        import_image(oci(tmp_path, layer(file("./", b""))), rootfs)


# --- bad sources and destinations ---------------------------------------------------------------------------


def test_missing_source(tmp_path: Path, rootfs: Path) -> None:
    with pytest.raises(ImageFormatError, match=r"image source .*nope\.tar does not exist"):
        import_image(tmp_path / "nope.tar", rootfs)


@pytest.mark.parametrize("content", [b"", b"this is not an image\n" * 100, gz(b"garbage" * 100)])
def test_garbage_file_source(tmp_path: Path, rootfs: Path, content: bytes) -> None:
    source = tmp_path / "garbage.tar"
    source.write_bytes(content)
    with pytest.raises(ImageFormatError, match="is not an image archive"):
        import_image(source, rootfs)


def test_directory_that_is_no_image(tmp_path: Path, rootfs: Path) -> None:
    source = tmp_path / "empty"
    source.mkdir()
    with pytest.raises(ImageFormatError, match=r"no index\.json or manifest\.json"):
        import_image(source, rootfs)
    archive = tmp_path / "other.tar"
    with tarfile.open(archive, "w") as tar:
        tar.addfile(tarfile.TarInfo("README"), io.BytesIO())
    with pytest.raises(ImageFormatError, match=r"no index\.json or manifest\.json"):
        import_image(archive, rootfs)


def test_garbage_json_and_missing_blobs(tmp_path: Path, rootfs: Path) -> None:
    source = oci(tmp_path, layer(file("a")))
    index = (source / "index.json").read_text()
    (source / "index.json").write_text("{not json")
    with pytest.raises(ImageFormatError, match=r"index\.json .* is not valid JSON"):
        import_image(source, rootfs)
    (source / "index.json").write_text(index)
    for blob in (source / "blobs/sha256").iterdir():
        blob.unlink()
    with pytest.raises(ImageFormatError, match=r"blobs/sha256/[0-9a-f]+ is missing from the image"):
        import_image(source, rootfs)


def test_damaged_layer(tmp_path: Path, rootfs: Path) -> None:
    image = OciLayout(tmp_path / "oci")
    truncated = gz(layer(file("big", os.urandom(100_000))))[:-1000]
    source = image.index(image.image([truncated], config=config_json([]) | {"rootfs": None}))
    with pytest.raises(ImageFormatError, match="is not a valid gzip layer"):
        import_image(source, rootfs)


def test_destination_must_be_an_empty_directory(tmp_path: Path, rootfs: Path) -> None:
    source = oci(tmp_path, layer(file("a")))
    (rootfs / "x").touch()
    with pytest.raises(ValueError, match="is not empty"):
        import_image(source, rootfs)
    with pytest.raises(ValueError, match="is not a directory"):
        import_image(source, tmp_path / "missing")
