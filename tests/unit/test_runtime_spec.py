"""The OCI config of a sandbox and the runtime's command lines, as data."""

from __future__ import annotations

import json

import pytest

from corral.runtime.argv import RuntimeCli
from corral.runtime.spec import (
    CAPABILITIES,
    DEVICE_NUMBERS,
    MIB,
    IdRange,
    Limits,
    Runtime,
    SandboxSpec,
    build_config,
)


def spec(runtime: Runtime = Runtime.CRUN, **env: str) -> SandboxSpec:
    return SandboxSpec(
        hostname="vm-abc",
        rootfs="/var/lib/corral/vms/vm_abc/rootfs",
        ids=IdRange(host_start=200_000),
        limits=Limits(vcpus=1.5, mem_mib=512, pids=256),
        cgroups_path="/corral/vm_abc",
        args=("/sbin/corral-init",),
        env=env,
        runtime=runtime,
        annotations={"corral.vm_id": "vm_abc"},
        devices_dir="/var/lib/corral/vms/vm_abc/dev",
    )


def test_root_inside_is_an_unprivileged_range_outside() -> None:
    linux = build_config(spec())["linux"]
    expected = [{"containerID": 0, "hostID": 200_000, "size": 65536}]
    assert linux["uidMappings"] == expected
    assert linux["gidMappings"] == expected


def test_every_namespace_is_private_and_made_by_the_runtime() -> None:
    namespaces = build_config(spec())["linux"]["namespaces"]
    assert {ns["type"] for ns in namespaces} == {"pid", "ipc", "uts", "mount", "cgroup", "network", "user"}
    assert all("path" not in ns for ns in namespaces)  # a netns made beforehand cannot be checkpointed


def test_process_is_confined() -> None:
    process = build_config(spec())["process"]
    assert process["noNewPrivileges"] is True
    assert process["user"] == {"uid": 0, "gid": 0}
    for kind in ("bounding", "effective", "permitted"):
        caps = set(process["capabilities"][kind])
        assert caps == set(CAPABILITIES)
        assert not caps & {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_MKNOD", "CAP_SYS_PTRACE"}
    assert "inheritable" not in process["capabilities"]
    assert "ambient" not in process["capabilities"]


def test_kernel_paths_are_masked_or_read_only() -> None:
    linux = build_config(spec())["linux"]
    assert {"/proc/kcore", "/proc/keys", "/sys/firmware"} <= set(linux["maskedPaths"])
    assert {"/proc/sys", "/proc/sysrq-trigger"} <= set(linux["readonlyPaths"])
    sysfs = next(m for m in build_config(spec())["mounts"] if m["destination"] == "/sys")
    assert "ro" in sysfs["options"]


@pytest.mark.parametrize(("vcpus", "quota"), [(1.5, 150_000), (1, 100_000), (0.25, 25_000), (0.001, 1000)])
def test_cgroup_limits(vcpus: float, quota: int) -> None:
    s = SandboxSpec(**{**spec().__dict__, "limits": Limits(vcpus=vcpus, mem_mib=512, pids=256)})
    resources = build_config(s)["linux"]["resources"]
    assert resources["cpu"] == {"quota": quota, "period": 100_000}
    assert resources["memory"] == {"limit": 512 * MIB, "swap": 512 * MIB}  # no swap beyond the limit
    assert resources["pids"] == {"limit": 256}


def test_crun_gets_the_sandboxs_own_dev_never_the_hosts_nodes() -> None:
    config = build_config(spec(Runtime.CRUN))
    binds = {m["destination"]: m["source"] for m in config["mounts"] if m["type"] == "bind"}
    # /dev itself is a bind of the node's directory (so crun neither makes nor binds device nodes)
    assert binds == {"/dev": "/var/lib/corral/vms/vm_abc/dev"}
    assert config["linux"]["devices"] == []
    points = [m["destination"] for m in config["mounts"]]
    assert points.index("/dev") < min(points.index(p) for p in ("/dev/pts", "/dev/shm", "/dev/mqueue"))
    for missing in ("", "relative/dev"):
        with pytest.raises(ValueError, match="device nodes"):
            build_config(SandboxSpec(**{**spec().__dict__, "devices_dir": missing}))


def test_runc_makes_its_dev_from_the_declared_devices() -> None:
    config = build_config(spec(Runtime.RUNC))
    assert not [m for m in config["mounts"] if m["type"] == "bind"]
    assert next(m for m in config["mounts"] if m["destination"] == "/dev")["type"] == "tmpfs"
    devices = {d["path"]: (d["major"], d["minor"]) for d in config["linux"]["devices"]}
    assert devices == {f"/dev/{d}": n for d, n in DEVICE_NUMBERS.items()}
    assert build_config(SandboxSpec(**{**spec(Runtime.RUNC).__dict__, "devices_dir": ""}))  # not needed


def test_the_devices_cgroup_allows_the_standard_nodes_only() -> None:
    rules = build_config(spec())["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"} in rules
    assert {(r["major"], r.get("minor")) for r in rules[1:]} == {
        *DEVICE_NUMBERS.values(),
        (5, 2),
        (136, None),
    }


def test_environment_defaults_and_overrides() -> None:
    env = build_config(spec(NODE_ENV="production", PATH="/opt/bin"))["process"]["env"]
    assert "NODE_ENV=production" in env
    assert "PATH=/opt/bin" in env
    assert "HOME=/root" in env
    assert len([e for e in env if e.startswith("PATH=")]) == 1


def test_config_is_plain_json_with_identity() -> None:
    config = build_config(spec())
    assert json.loads(json.dumps(config)) == config
    assert config["hostname"] == "vm-abc"
    assert config["root"] == {"path": "/var/lib/corral/vms/vm_abc/rootfs", "readonly": False}
    assert config["linux"]["cgroupsPath"] == "/corral/vm_abc"
    assert config["annotations"] == {"corral.vm_id": "vm_abc"}


@pytest.mark.parametrize(
    "bad",
    [lambda: IdRange(host_start=0), lambda: IdRange(host_start=1, size=0), lambda: Limits(0, 512),
     lambda: Limits(1, 8), lambda: Limits(1, 512, pids=1)],
)  # fmt: skip
def test_impossible_ranges_and_limits_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="must"):
        bad()  # type: ignore[operator]


def test_runtime_command_lines() -> None:
    cli = RuntimeCli(binary="/usr/local/bin/crun", state_root="/run/corral/crun")
    base = ["/usr/local/bin/crun", "--root", "/run/corral/crun"]
    assert cli.create("vm_a", "/b", "/b/pid") == [
        *base,
        "create",
        "--bundle",
        "/b",
        "--pid-file",
        "/b/pid",
        "vm_a",
    ]
    assert cli.start("vm_a") == [*base, "start", "vm_a"]
    assert cli.kill("vm_a") == [*base, "kill", "--all", "vm_a", "KILL"]
    assert cli.delete("vm_a") == [*base, "delete", "--force", "vm_a"]
    assert cli.list_names() == [*base, "list", "--quiet"]
    assert cli.exec("vm_a", ["sh", "-c", "echo $X"], env={"X": "1"}, cwd="/work", user="1000:1000", tty=True) == [
        *base, "exec", "--no-new-privs", "--env", "X=1", "--cwd", "/work", "--user", "1000:1000", "--tty", "vm_a", "sh", "-c", "echo $X",
    ]  # fmt: skip
