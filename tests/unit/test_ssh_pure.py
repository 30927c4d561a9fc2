"""The SSH gateway's and `corral vm ssh`'s pure parts: key comparison, passed environment, window sizes,
the OpenSSH command line and the CLI's known_hosts."""

from __future__ import annotations

import struct
from pathlib import Path

import asyncssh

from corral.cli.vm import remember_host_key, ssh_argv
from corral.node.interactive import winsize
from corral.ssh.gateway import client_env, load_or_create_host_key, same_key


def test_same_key_compares_key_material_not_comments() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    other = asyncssh.generate_private_key("ssh-ed25519")
    authorized = key.export_public_key().decode().strip() + " someone@laptop"
    assert same_key(authorized, key.convert_to_public())
    assert not same_key(authorized, other.convert_to_public())
    assert not same_key("not a key", key.convert_to_public())


def test_only_locale_and_colour_variables_pass() -> None:
    asked = {
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "COLORTERM": "truecolor",
        "PATH": "/evil",
        "LD_PRELOAD": "x.so",
    }
    assert client_env(asked) == {"LANG": "C.UTF-8", "LC_ALL": "C", "COLORTERM": "truecolor"}


def test_window_sizes_are_clamped() -> None:
    assert struct.unpack("HHHH", winsize(120, 40)) == (40, 120, 0, 0)
    assert struct.unpack("HHHH", winsize(0, 10**9)) == (10000, 1, 0, 0)


def test_host_key_is_made_once_and_private(tmp_path: Path) -> None:
    first = load_or_create_host_key(tmp_path)
    assert (tmp_path / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert load_or_create_host_key(tmp_path).public_data == first.public_data


def test_cli_ssh_command_and_known_hosts(tmp_path: Path) -> None:
    info = {"host": "10.1.2.3", "port": 2222, "username": "vm_abc", "host_key": "ssh-ed25519 AAAAkey1"}
    known = tmp_path / "corral" / "known_hosts"
    assert ssh_argv(info, known, Path("/k"), ["ls", "-l"]) == [
        "ssh", "-p", "2222", "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
        "-i", "/k", "-o", "IdentitiesOnly=yes", "vm_abc@10.1.2.3", "ls", "-l",
    ]  # fmt: skip
    remember_host_key(info, known)
    remember_host_key(info, known)
    assert known.read_text() == "[10.1.2.3]:2222 ssh-ed25519 AAAAkey1\n"
    remember_host_key({**info, "host_key": "ssh-ed25519 AAAAkey2"}, known)  # the server's key changed
    remember_host_key({**info, "port": 22, "host": "other"}, known)
    assert known.read_text() == "[10.1.2.3]:2222 ssh-ed25519 AAAAkey2\nother ssh-ed25519 AAAAkey1\n"
