"""A new VM's fields: its name, its SSH public key (checked against keys made by ssh-keygen) and its resources."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from corral.domain import validation as v
from corral.domain.errors import ValidationFailed
from corral.services.vms import NewVm, ResourceLimits, validate_new

_KEY_KINDS = {
    "ed25519": ["-t", "ed25519"],
    "rsa": ["-t", "rsa", "-b", "2048"],
    "ecdsa": ["-t", "ecdsa"],
    "ecdsa384": ["-t", "ecdsa", "-b", "384"],
    "ecdsa521": ["-t", "ecdsa", "-b", "521"],
}
_TYPE_OF = {
    "ed25519": "ssh-ed25519",
    "rsa": "ssh-rsa",
    "ecdsa": "ecdsa-sha2-nistp256",
    "ecdsa384": "ecdsa-sha2-nistp384",
    "ecdsa521": "ecdsa-sha2-nistp521",
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Public key lines made by ssh-keygen, each with the comment ``me@laptop``."""
    out = tmp_path_factory.mktemp("keys")
    made: dict[str, str] = {}
    for kind, args in _KEY_KINDS.items():
        path = out / kind
        subprocess.run(
            ["ssh-keygen", "-q", *args, "-N", "", "-C", "me@laptop", "-f", str(path)],
            check=True,
            capture_output=True,
        )
        made[kind] = Path(f"{path}.pub").read_text().strip()
    return made


def _no_comment(line: str) -> str:
    kind, blob, _comment = line.split(" ", 2)
    return f"{kind} {blob}"


# --- public keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(_KEY_KINDS))
def test_real_keys_are_accepted_with_their_comment(keys: dict[str, str], kind: str) -> None:
    line = keys[kind]
    assert line.startswith(_TYPE_OF[kind] + " ")
    assert line.endswith(" me@laptop")
    assert v.ssh_public_key(line) == line
    assert v.ssh_public_key(line + "\n") == line  # as read from a .pub file


@pytest.mark.parametrize("kind", list(_KEY_KINDS))
def test_real_keys_are_accepted_without_a_comment(keys: dict[str, str], kind: str) -> None:
    bare = _no_comment(keys[kind])
    assert v.ssh_public_key(bare) == bare


def test_comment_with_spaces_is_kept_and_surrounding_whitespace_dropped(keys: dict[str, str]) -> None:
    bare = _no_comment(keys["ed25519"])
    assert v.ssh_public_key(f"  {bare} my laptop key \n") == f"{bare} my laptop key"


def test_two_keys_in_one_are_refused(keys: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="public_key"):
        v.ssh_public_key(keys["ed25519"] + "\n" + keys["rsa"])


def _mislabelled(keys: dict[str, str]) -> str:
    _kind, blob = _no_comment(keys["ed25519"]).split()
    return f"ssh-rsa {blob}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda k: "", "OpenSSH public key"),
        (lambda k: "   ", "OpenSSH public key"),
        (lambda k: "garbage", "OpenSSH public key"),
        (lambda k: "not a key at all", "OpenSSH public key"),
        (lambda k: k["ed25519"].split()[1], "OpenSSH public key"),  # the blob alone
        (lambda k: "ssh-ed25519", "OpenSSH public key"),  # the type alone
        (lambda k: "ssh-dss " + k["ed25519"].split()[1], "OpenSSH public key"),
        (lambda k: "ssh-foo " + k["ed25519"].split()[1], "OpenSSH public key"),
        (lambda k: "SSH-ED25519 " + k["ed25519"].split()[1], "OpenSSH public key"),
        (lambda k: "-----BEGIN OPENSSH PRIVATE KEY-----", "OpenSSH public key"),
        (lambda k: "ssh-ed25519 AAAA!!!!", "base64"),
        (lambda k: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "base64"),  # truncated: bad padding
        (lambda k: "ssh-ed25519 " + base64.b64encode(b"abc").decode(), "too short"),
        (_mislabelled, "does not match its type"),
        (lambda k: "ssh-ed25519 " + k["rsa"].split()[1], "does not match its type"),
        (lambda k: "ecdsa-sha2-nistp384 " + k["ecdsa"].split()[1], "does not match its type"),
        (lambda k: "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed2551").decode(), "match"),
        (lambda k: k["ed25519"] + " " + "x" * 16384, "OpenSSH public key"),  # too long
    ],
)
def test_bad_keys_are_refused(keys: dict[str, str], make: object, message: str) -> None:
    text = make(keys)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message) as info:
        v.ssh_public_key(text)
    assert "public_key" in str(info.value)


def test_longest_accepted_key(keys: dict[str, str]) -> None:
    line = keys["ed25519"]
    padded = line + " " + "c" * (16384 - len(line) - 1)
    assert len(padded) == 16384
    assert v.ssh_public_key(padded) == padded
    with pytest.raises(ValueError, match="OpenSSH public key"):
        v.ssh_public_key(padded + "c")


# --- VM names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "Z", "7", "my-dev-env", "my_dev.env", "a" * 64, "A1-b2_c3.d4", "x.", "x-", "x_", "0" * 64, "a..b"],
)
def test_good_names(name: str) -> None:
    assert v.vm_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 65,
        "-leading-dash",
        ".leading-dot",
        "_leading-underscore",
        "has space",
        " lead",
        "trail ",
        "tab\there",
        "new\nline",
        "ends-with-newline\n",
        "slash/name",
        "back\\slash",
        "at@host",
        "colon:name",
        "nul\x00",
        "bücher",
        "名前",
        "café",
        "\uff41bc",  # fullwidth a
        "١٢٣",  # Arabic-Indic digits
        "a\u200bb",  # zero-width space
    ],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="name must be 1-64"):
        v.vm_name(name)


# --- validate_new ---------------------------------------------------------------------------------------


def _new(keys: dict[str, str], **fields: object) -> NewVm:
    base: dict[str, object] = {"name": "dev", "public_key": keys["ed25519"], "image": "debian:bookworm"}
    return NewVm(**{**base, **fields})  # type: ignore[arg-type]


def test_defaults(keys: dict[str, str]) -> None:
    out = validate_new(_new(keys), ResourceLimits())
    assert (out.vcpus, out.mem_mib, out.disk_mib) == (1, 1024, 4096)
    assert out.name == "dev"
    assert out.image == "debian:bookworm"
    assert out.snapshot_id is None
    assert out.public_key == keys["ed25519"]


def test_defaults_follow_the_limits(keys: dict[str, str]) -> None:
    limits = ResourceLimits(default_vcpus=2, default_mem_mib=2048, default_disk_mib=8192)
    out = validate_new(_new(keys), limits)
    assert (out.vcpus, out.mem_mib, out.disk_mib) == (2, 2048, 8192)


def test_given_values_and_snapshot_are_kept(keys: dict[str, str]) -> None:
    out = validate_new(
        _new(keys, vcpus=4, mem_mib=64, disk_mib=65536, snapshot_id="snap_x"), ResourceLimits()
    )
    assert (out.vcpus, out.mem_mib, out.disk_mib, out.snapshot_id) == (4, 64, 65536, "snap_x")


def test_key_is_normalised(keys: dict[str, str]) -> None:
    out = validate_new(_new(keys, public_key="  " + keys["rsa"] + "\n"), ResourceLimits())
    assert out.public_key == keys["rsa"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vcpus", 5),
        ("vcpus", 0),
        ("vcpus", -1),
        ("mem_mib", 63),
        ("mem_mib", 8193),
        ("mem_mib", 0),
        ("mem_mib", -1024),
        ("disk_mib", 63),
        ("disk_mib", 65537),
        ("disk_mib", 0),
        ("disk_mib", -1),
    ],
)
def test_out_of_range_resources_are_refused(keys: dict[str, str], field: str, value: int) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_new(_new(keys, **{field: value}), ResourceLimits())
    assert field in info.value.message
    assert info.value.code == "validation_error"
    assert info.value.status == 422


def test_maxima_follow_the_limits(keys: dict[str, str]) -> None:
    limits = ResourceLimits(max_vcpus=2, max_mem_mib=512, max_disk_mib=1024, default_disk_mib=512)
    with pytest.raises(ValidationFailed, match="vcpus must be between 1 and 2"):
        validate_new(_new(keys, vcpus=3, mem_mib=256), limits)
    with pytest.raises(ValidationFailed, match="mem_mib must be between 64 and 512"):
        validate_new(_new(keys, mem_mib=513), limits)
    with pytest.raises(ValidationFailed, match="disk_mib must be between 64 and 1024"):
        validate_new(_new(keys, mem_mib=256, disk_mib=1025), limits)


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [
        ({"name": ""}, "name"),
        ({"name": "-x"}, "name"),
        ({"name": "bücher"}, "name"),
        ({"public_key": "garbage"}, "public_key"),
        ({"public_key": ""}, "public_key"),
    ],
)
def test_bad_name_or_key_is_a_validation_failure(
    keys: dict[str, str], fields: dict[str, object], mentions: str
) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_new(_new(keys, **fields), ResourceLimits())
    assert mentions in info.value.message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
