"""The sandbox's seccomp filter, as data."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import pytest

from corral.runtime.seccomp import ALLOWED, DENIED, default_profile

SYSCALL_NAME = re.compile(r"[a-z_][a-z0-9_]*")
CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET, spelled out again

ESSENTIALS = (
    "execve",
    "openat",
    "read",
    "write",
    "mmap",
    "futex",
    "clone",
    "exit_group",
    "rt_sigreturn",
    "epoll_wait",
    "socket",
    "connect",
    "statx",
    "getdents64",
    "wait4",
)


def rules() -> list[dict[str, Any]]:
    syscalls: list[dict[str, Any]] = default_profile()["syscalls"]
    return syscalls


def rules_for(name: str) -> list[dict[str, Any]]:
    return [rule for rule in rules() if name in rule["names"]]


def allowed_names() -> set[str]:
    return {name for rule in rules() if rule["action"] == "SCMP_ACT_ALLOW" for name in rule["names"]}


def test_everything_not_listed_is_refused_with_eperm() -> None:
    profile = default_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1
    assert profile["architectures"] == ["SCMP_ARCH_X86_64"]


def test_no_denied_syscall_is_ever_allowed() -> None:
    assert DENIED, "the denylist must not be empty"
    assert not set(DENIED) & allowed_names()
    assert not set(DENIED) & set(ALLOWED)


@pytest.mark.parametrize(
    "name",
    [
        "mount",
        "umount2",
        "pivot_root",
        "fsopen",
        "move_mount",
        "open_tree",
        "mount_setattr",
        "unshare",
        "setns",
        "init_module",
        "finit_module",
        "kexec_load",
        "reboot",
        "settimeofday",
        "clock_settime",
        "clock_adjtime",
        "bpf",
        "perf_event_open",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_getfd",
        "kcmp",
        "keyctl",
        "add_key",
        "request_key",
        "userfaultfd",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "open_by_handle_at",
        "name_to_handle_at",
        "mbind",
        "set_mempolicy",
        "get_mempolicy",
        "move_pages",
        "iopl",
        "ioperm",
        "vm86",
        "syslog",
        "swapon",
        "acct",
        "quotactl",
        "clone3",
    ],
)
def test_dangerous_syscall_is_in_the_denylist(name: str) -> None:
    assert name in DENIED
    assert name not in allowed_names()


def test_clone3_answers_enosys_so_glibc_falls_back_to_clone() -> None:
    assert rules_for("clone3") == [{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]


def test_clone_is_allowed_only_without_namespace_flags() -> None:
    assert rules_for("clone") == [
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        }
    ]
    assert CLONE_NAMESPACE_FLAGS == 2114060288


def test_personality_is_allowed_only_for_harmless_values() -> None:
    personality = rules_for("personality")
    values = set()
    for rule in personality:
        assert rule["names"] == ["personality"]
        assert rule["action"] == "SCMP_ACT_ALLOW"
        [arg] = rule["args"]  # one condition per rule: conditions within a rule are ANDed
        assert arg["index"] == 0
        assert arg["op"] == "SCMP_CMP_EQ"
        values.add(arg["value"])
    assert values == {0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF}
    assert len(personality) == len(values)


def test_every_name_belongs_to_one_rule_unless_its_rules_are_all_conditions() -> None:
    for rule in rules():
        assert len(rule["names"]) == len(set(rule["names"])), rule["names"]
    counts = Counter(name for rule in rules() for name in rule["names"])
    for name, count in counts.items():
        if count > 1:
            assert all("args" in rule for rule in rules_for(name)), name
            assert len({rule["action"] for rule in rules_for(name)}) == 1, name
    assert [name for name, count in counts.items() if count > 1] == ["personality"]


def test_rules_are_well_formed() -> None:
    for rule in rules():
        assert set(rule) <= {"names", "action", "errnoRet", "args"}
        assert rule["names"]
        assert rule["action"] in {"SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO"}
        assert ("errnoRet" in rule) == (rule["action"] == "SCMP_ACT_ERRNO")
        for arg in rule.get("args", []):
            assert set(arg) == {"index", "value", "valueTwo", "op"}
            assert 0 <= arg["index"] <= 5


def test_every_name_looks_like_a_syscall() -> None:
    names = [name for rule in rules() for name in rule["names"]] + list(DENIED)
    assert all(SYSCALL_NAME.fullmatch(name) for name in names), [
        name for name in names if not SYSCALL_NAME.fullmatch(name)
    ]


def test_lists_have_no_duplicates() -> None:
    assert len(ALLOWED) == len(set(ALLOWED))
    assert len(DENIED) == len(set(DENIED))


@pytest.mark.parametrize("name", ESSENTIALS)
def test_what_ordinary_programs_need_is_allowed(name: str) -> None:
    assert name in allowed_names()


def test_profile_is_json_and_a_fresh_copy_each_time() -> None:
    profile = default_profile()
    assert json.loads(json.dumps(profile)) == profile
    profile["syscalls"][0]["names"].append("mount")
    assert "mount" not in default_profile()["syscalls"][0]["names"]
