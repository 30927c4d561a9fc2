"""The node's pure helpers: overlay mount data, apt sources, image names and metadata, ownership shifting,
sandbox paths and users, and the parts of the OCI config and runtime command lines that sandboxes rely on."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from corral.node.files import FileError, SandboxFiles, normalise, resolve_user
from corral.runtime.argv import RuntimeCli
from corral.runtime.images import DEFAULT_IMAGE, ImageStore, apt_sources, shift_ownership, valid_name
from corral.runtime.rootfs import mounts_under, overlay_options
from corral.runtime.spec import IdRange, Limits, Runtime, SandboxSpec, build_config
from corral.runtime.syscalls import fs_type

# --- overlay --------------------------------------------------------------------------------------------


def test_overlay_lowers_are_given_top_first() -> None:
    opts = overlay_options([Path("/img/layers/2"), Path("/img/layers/1"), Path("/img/layers/0")],
                           Path("/vol/upper"), Path("/vol/work"))  # fmt: skip
    assert opts == (
        "lowerdir=/img/layers/2:/img/layers/1:/img/layers/0,upperdir=/vol/upper,workdir=/vol/work,"
        "index=off,xino=off"
    )


def test_overlay_with_one_lower() -> None:
    opts = overlay_options([Path("/l")], Path("/u"), Path("/w"))
    assert opts.split(",")[:3] == ["lowerdir=/l", "upperdir=/u", "workdir=/w"]


def test_overlay_needs_a_lower() -> None:
    with pytest.raises(ValueError, match="at least one lower"):
        overlay_options([], Path("/u"), Path("/w"))


@pytest.mark.parametrize(
    ("lowers", "upper", "work"),
    [
        (["/a,b"], "/u", "/w"),
        (["/a:b"], "/u", "/w"),
        (["/ok", "/x,upperdir=/etc"], "/u", "/w"),
        (["/ok"], "/u,lowerdir=/", "/w"),
        (["/ok"], "/u:v", "/w"),
        (["/ok"], "/u", "/w,x"),
        (["/ok"], "/u", "/w:x"),
    ],
)
def test_overlay_refuses_separators_in_paths(lowers: list[str], upper: str, work: str) -> None:
    with pytest.raises(ValueError, match="not usable"):
        overlay_options([Path(p) for p in lowers], Path(upper), Path(work))


def test_mounts_under_an_unmounted_prefix_is_empty(tmp_path: Path) -> None:
    assert mounts_under(tmp_path / "no-mounts-here") == []
    assert mounts_under(Path("/nonexistent/corral-test-prefix")) == []


def test_mounts_under_matches_whole_components_deepest_first() -> None:
    assert mounts_under(Path("/pro")) == []  # /proc is not under /pro
    found = mounts_under(Path("/sys/"))
    assert Path("/sys") in found
    depths = [len(p.parts) for p in found]
    assert depths == sorted(depths, reverse=True)
    assert all(p == Path("/sys") or str(p).startswith("/sys/") for p in found)


# --- apt sources ----------------------------------------------------------------------------------------

_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main

Types: deb deb-src
URIs: http://security.debian.org/debian-security http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_apt_sources_from_deb822(tmp_path: Path) -> None:
    path = tmp_path / "debian.sources"
    path.write_text(_SOURCES)
    assert apt_sources(path) == [
        "deb http://deb.debian.org/debian bookworm main contrib",
        "deb http://deb.debian.org/debian bookworm-updates main contrib",
        "deb http://security.debian.org/debian-security bookworm-security main",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]


def test_apt_sources_without_components_default_to_main(tmp_path: Path) -> None:
    path = tmp_path / "debian.sources"
    path.write_text("Types: deb\nURIs: http://m.example/debian\nSuites: trixie\n")
    assert apt_sources(path) == ["deb http://m.example/debian trixie main"]


@pytest.mark.parametrize(
    "text", ["", "\n\n", "# only a comment\n", "Types: deb-src\nURIs: http://x/debian\nSuites: bookworm\n"]
)
def test_apt_sources_fall_back_to_debian(tmp_path: Path, text: str) -> None:
    path = tmp_path / "debian.sources"
    path.write_text(text)
    assert apt_sources(path) == ["deb http://deb.debian.org/debian bookworm main"]


def test_apt_sources_without_a_file(tmp_path: Path) -> None:
    assert apt_sources(tmp_path / "missing.sources") == ["deb http://deb.debian.org/debian bookworm main"]


def test_apt_sources_skip_disabled_stanzas(tmp_path: Path) -> None:
    """sources.list(5): a stanza with ``Enabled: no`` is ignored by apt, so it must not be used here."""
    path = tmp_path / "debian.sources"
    path.write_text(
        "Types: deb\nURIs: http://on.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n"
    )
    assert apt_sources(path) == ["deb http://on.example/debian bookworm main"]


# --- image names and the image store --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [DEFAULT_IMAGE, "debian", "ubuntu:24.04", "ghcr.io/me/tools:v1.2", "me/img@sha256:abc", "a", "a" * 128],
)
def test_valid_image_names(name: str) -> None:
    assert valid_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "Debian", "-x", ".x", "/x", ":x", "a" * 129, "a b", "a\n", "a\\b", "débian", "a,b", "a;b", "a$b"],
)
def test_invalid_image_names(name: str) -> None:
    assert not valid_name(name)


def _write_image(root: Path, name: str, layers: list[str], **extra: Any) -> Path:
    d = root / hashlib.sha256(name.encode()).hexdigest()[:24]
    for layer in layers:
        (d / "layers" / layer).mkdir(parents=True)
    meta = {
        "name": name,
        "layers": layers,
        "size_bytes": 1234,
        "created_at": "2026-01-02T03:04:05+00:00",
        "source": "hand-made",
        **extra,
    }
    (d / "image.json").write_text(json.dumps(meta))
    return d


def test_image_store_reads_hand_made_images(tmp_path: Path) -> None:
    d = _write_image(tmp_path, "debian:bookworm", ["0", "1"], env=["A=1", "B=2"], cmd=["/bin/bash", "-l"])
    _write_image(tmp_path, "alpine", ["0"], env=None)
    store = ImageStore(tmp_path, id_base=100000)
    image = store.get("debian:bookworm")
    assert image is not None
    assert image.name == "debian:bookworm"
    assert image.path == d
    assert image.layers == (d / "layers" / "0", d / "layers" / "1")
    assert image.lowers_top_first == (d / "layers" / "1", d / "layers" / "0")
    assert image.size_bytes == 1234
    assert image.created_at.isoformat() == "2026-01-02T03:04:05+00:00"
    assert image.source == "hand-made"
    assert image.env == ("A=1", "B=2")
    assert image.cmd == ("/bin/bash", "-l")
    alpine = store.get("alpine")
    assert alpine is not None
    assert (alpine.env, alpine.cmd) == ((), ())
    assert store.get("missing") is None
    assert [i.name for i in store.all()] == ["alpine", "debian:bookworm"]  # by name


def test_image_store_layers_feed_the_overlay_top_first(tmp_path: Path) -> None:
    _write_image(tmp_path, "img", ["0", "1", "2"])
    image = ImageStore(tmp_path, 100000).get("img")
    assert image is not None
    opts = overlay_options(image.lowers_top_first, Path("/u"), Path("/w"))
    assert opts.startswith(f"lowerdir={image.path}/layers/2:{image.path}/layers/1:{image.path}/layers/0,")


def test_image_store_all_skips_what_is_not_an_image(tmp_path: Path) -> None:
    _write_image(tmp_path, "good", ["0"])
    (tmp_path / ".lock").write_text("")
    (tmp_path / ".staging-1-2" / "rootfs").mkdir(parents=True)
    (tmp_path / "broken-json").mkdir()
    (tmp_path / "broken-json" / "image.json").write_text("{not json")
    (tmp_path / "missing-keys").mkdir()
    (tmp_path / "missing-keys" / "image.json").write_text(json.dumps({"name": "x"}))
    assert [i.name for i in ImageStore(tmp_path, 100000).all()] == ["good"]


def test_image_store_without_a_directory(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "absent", 100000)
    assert store.all() == []
    assert store.get(DEFAULT_IMAGE) is None


def test_image_store_get_of_incomplete_metadata_is_none(tmp_path: Path) -> None:
    """``all`` skips an image.json with missing keys; ``get`` should treat it as absent too, not raise."""
    d = tmp_path / hashlib.sha256(b"half").hexdigest()[:24]
    d.mkdir()
    (d / "image.json").write_text(json.dumps({"name": "half"}))
    assert ImageStore(tmp_path, 100000).get("half") is None


# --- ownership shifting (run as root) -------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def _owner(p: Path) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid


@needs_root
def test_shift_ownership(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("not in the tree")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "home" / "me").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "home" / "me" / "notes").write_text("mine")
    os.chown(root / "home" / "me", 1000, 1000)
    os.chown(root / "home" / "me" / "notes", 1000, 50)
    su = root / "su"
    su.write_text("#!/bin/sh\n")
    su.chmod(0o4755)
    sgid_dir = root / "shared"
    sgid_dir.mkdir()
    sgid_dir.chmod(0o2775)
    sgid_file = root / "wall"
    sgid_file.write_text("")
    sgid_file.chmod(0o2755)
    (root / "link-out").symlink_to(outside)
    (root / "link-dir").symlink_to(root / "etc")
    modes = {p: os.lstat(p).st_mode for p in [root, *root.rglob("*")]}

    shift_ownership(root, 100000)

    assert _owner(root) == (100000, 100000)
    assert _owner(root / "etc") == (100000, 100000)
    assert _owner(root / "etc" / "passwd") == (100000, 100000)
    assert _owner(root / "home" / "me") == (101000, 101000)
    assert _owner(root / "home" / "me" / "notes") == (101000, 100050)
    assert _owner(root / "link-out") == (100000, 100000)  # the link itself
    assert _owner(outside) == (0, 0)  # not followed out of the tree
    assert _owner(root / "link-dir") == (100000, 100000)
    assert _owner(root / "etc") == (100000, 100000)  # not shifted twice through the link
    assert stat.S_IMODE(os.lstat(su).st_mode) == 0o4755  # setuid survives the chown
    assert stat.S_IMODE(os.lstat(sgid_dir).st_mode) == 0o2775
    assert stat.S_IMODE(os.lstat(sgid_file).st_mode) == 0o2755
    for p, mode in modes.items():
        assert os.lstat(p).st_mode == mode, p


@needs_root
def test_shift_ownership_by_zero_changes_nothing(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("")
    os.chown(f, 1234, 5678)
    shift_ownership(tmp_path, 0)
    assert _owner(f) == (1234, 5678)


@needs_root
def test_shift_ownership_shifts_hard_links_once(tmp_path: Path) -> None:
    """Debian trees have hard-linked files (perl, for one): each inode must be shifted once, not per name."""
    (tmp_path / "a").write_text("x")
    os.link(tmp_path / "a", tmp_path / "b")
    shift_ownership(tmp_path, 100000)
    assert _owner(tmp_path / "a") == (100000, 100000)


# --- sandbox paths and users ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/etc/passwd", "/etc/passwd"),
        ("etc/passwd", "/etc/passwd"),
        ("root", "/root"),
        ("//x", "/x"),
        ("/", "/"),
        ("a" * 4096, "/" + "a" * 4096),
    ],
)
def test_normalise(path: str, expected: str) -> None:
    assert normalise(path) == expected


@pytest.mark.parametrize("path", ["", "\x00", "/etc/\x00passwd", "a" * 4097, "/" + "a" * 4096])
def test_normalise_refuses(path: str) -> None:
    with pytest.raises(FileError) as info:
        normalise(path)
    assert info.value.kind == "invalid"


_NO_SANDBOX = SandboxFiles(pid=2**22 + 12345, uid=0, gid=0)  # no such process: nothing may be read


@pytest.mark.parametrize("user", ["0", "1000", "65535", "0:0", "1000:1000", "1000:0", "65535:65535"])
def test_numeric_users_need_no_sandbox(user: str) -> None:
    assert resolve_user(_NO_SANDBOX, user) == user


@pytest.mark.parametrize("user", ["65536", "1000:65536", "99999999999999999999"])
def test_numeric_users_out_of_range(user: str) -> None:
    with pytest.raises(FileError, match="0-65535") as info:
        resolve_user(_NO_SANDBOX, user)
    assert info.value.kind == "invalid"


@pytest.mark.parametrize("user", ["root", "-1", ":1000", "1000:staff"])
def test_names_without_a_sandbox_are_refused(user: str) -> None:
    with pytest.raises(FileError, match=r"no user|no group|not a user") as info:
        resolve_user(_NO_SANDBOX, user)
    assert info.value.kind == "invalid"


def _host_passwd() -> dict[str, tuple[str, str]]:
    return {
        f[0]: (f[2], f[3])
        for f in (line.split(":") for line in Path("/etc/passwd").read_text().splitlines())
        if len(f) >= 4
    }


@pytest.fixture
def this_host() -> SandboxFiles:
    """This process as the "sandbox": /proc/self/root is the host's root, read in this process (``confined``:
    no file worker) with the root filesystem's kind allowed, so the lookup logic is what is tested here (the
    worker's own reads are tested in test_fileworker.py and on real sandboxes)."""
    root = os.open("/", os.O_PATH)
    try:
        kind = fs_type(root)
    finally:
        os.close(root)
    return SandboxFiles(
        pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), confined=True, filesystems=frozenset({kind})
    )


def test_user_names_come_from_the_sandboxs_passwd(this_host: SandboxFiles) -> None:
    assert resolve_user(this_host, "root") == "0:0"
    assert resolve_user(this_host, "root:5") == "0:5"
    for name, (uid, gid) in _host_passwd().items():
        if name and not name.isdigit():
            assert resolve_user(this_host, name) == f"{uid}:{gid}"


def test_unknown_user_name(this_host: SandboxFiles) -> None:
    with pytest.raises(FileError, match="no user 'no-such-user-here'"):
        resolve_user(this_host, "no-such-user-here")


def test_a_group_name_is_not_silently_dropped(this_host: SandboxFiles) -> None:
    """``root:staff`` must run with group staff (50 here) or be refused, never with root's own group."""
    try:
        resolved = resolve_user(this_host, "root:staff")
    except FileError:
        return
    assert resolved == "0:50"


@pytest.mark.parametrize("user", ["²", "١٢٣", "1000:²", "1000:", "0:"])
def test_odd_numeric_forms_are_refused_or_plain(this_host: SandboxFiles, user: str) -> None:
    """Only ASCII ``uid`` or ``uid:gid`` may reach the runtime; anything else is a FileError (a 422)."""
    try:
        resolved = resolve_user(this_host, user)
    except FileError:
        return
    assert re.fullmatch(r"[0-9]+(:[0-9]+)?", resolved), resolved


# --- OCI config and runtime command lines ---------------------------------------------------------------

_SECCOMP = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "architectures": ["SCMP_ARCH_X86_64"],
    "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}],
}


def _spec(runtime: Runtime = Runtime.CRUN, **fields: Any) -> SandboxSpec:
    base: dict[str, Any] = {
        "hostname": "vm-abc",
        "rootfs": "/var/lib/corral/node/vm_abc/rootfs",
        "ids": IdRange(host_start=100000),
        "limits": Limits(vcpus=1, mem_mib=1024),
        "cgroups_path": "/corral/vm_abc",
        "args": ("/sbin/init",),
        "runtime": runtime,
        "devices_dir": "/var/lib/corral/node/bundles/vm_abc/dev",
    }
    return SandboxSpec(**{**base, **fields})


@pytest.mark.parametrize("runtime", list(Runtime))
def test_seccomp_and_read_only_binds(runtime: Runtime) -> None:
    config = build_config(
        _spec(runtime, seccomp=_SECCOMP, binds=(("/var/lib/corral/ca.pem", "/etc/ssl/corral-ca.pem"),))
    )
    assert config["linux"]["seccomp"] == _SECCOMP
    binds = [m for m in config["mounts"] if m["destination"] == "/etc/ssl/corral-ca.pem"]
    assert binds == [
        {
            "destination": "/etc/ssl/corral-ca.pem",
            "type": "bind",
            "source": "/var/lib/corral/ca.pem",
            "options": ["bind", "ro", "nosuid", "nodev"],
        }
    ]
    assert "rw" not in binds[0]["options"]
    assert json.loads(json.dumps(config)) == config


def test_no_seccomp_no_binds_by_default() -> None:
    config = build_config(_spec())
    assert "seccomp" not in config["linux"]
    binds = [m for m in config["mounts"] if m["type"] == "bind" and m["destination"] != "/dev"]
    assert not [m for m in binds if not m["source"].startswith("/dev/")]


def test_seccomp_is_copied() -> None:
    profile = dict(_SECCOMP)
    config = build_config(_spec(seccomp=profile))
    profile["defaultAction"] = "SCMP_ACT_ALLOW"
    assert config["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"


@pytest.mark.parametrize("runtime", list(Runtime))
def test_device_cgroup_denies_all_then_allows_the_standard_nodes(runtime: Runtime) -> None:
    rules = build_config(_spec(runtime))["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}  # no type, major or minor: every device
    allowed = rules[1:]
    assert all(r["allow"] is True and r["type"] == "c" for r in allowed)
    numbers = {(r["major"], r.get("minor")) for r in allowed}
    six = {(1, 3), (1, 5), (1, 7), (5, 0), (1, 8), (1, 9)}  # null zero full tty random urandom
    assert six <= numbers
    assert (136, None) in numbers  # /dev/pts/*: every minor
    assert numbers - six - {(136, None)} <= {(5, 2)}  # and at most /dev/ptmx besides
    assert not [r for r in allowed if r["major"] in (8, 253, 259)]  # never a block device's major
    assert all(not r["allow"] for r in rules if "type" not in r)


def test_exec_with_a_pid_file() -> None:
    cli = RuntimeCli(binary="crun", state_root="/run/corral/crun")
    argv = cli.exec("vm_a", ["sleep", "1"], pid_file="/tmp/x/pid")
    assert argv == ["crun", "--root", "/run/corral/crun", "exec", "--no-new-privs", "--pid-file", "/tmp/x/pid",
                    "vm_a", "sleep", "1"]  # fmt: skip
    assert "--pid-file" not in cli.exec("vm_a", ["sleep", "1"])


def test_exec_options_come_before_the_name() -> None:
    cli = RuntimeCli(binary="runc", state_root="/run/r")
    argv = cli.exec("vm_a", ["--pid-file", "x"], user="0:0", pid_file="/p")
    name_at = argv.index("vm_a")
    assert argv[name_at + 1 :] == ["--pid-file", "x"]  # the command's own arguments, after the name
    assert argv.index("--pid-file") < name_at
    assert argv[argv.index("--pid-file") + 1] == "/p"
