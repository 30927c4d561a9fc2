"""The sandbox network as data (pure, but for the last tests): plan validation, slots and addresses, link
names, the ``ip`` batches, the upstream name servers, and the nftables rulesets, which the real ``nft``
parser must accept (checked without changing anything, and loaded for real in a throwaway namespace)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from corral.net import plan as netplan
from corral.net.plan import (
    GATEWAY_ADDR,
    NetPlan,
    address_slot,
    attach_gateway_batch,
    attach_sandbox_batch,
    gateway_ruleset,
    host_ruleset,
    link_name,
    link_slot,
    resolv_conf,
    slot_address,
    upstream_dns_from,
)
from tests.fakenet import add_netns, del_netns, run_in

# --- NetPlan --------------------------------------------------------------------------------------------


def test_defaults() -> None:
    plan = NetPlan()
    assert plan.max_slot == 65534
    assert plan.uplink_outside_addr == "100.127.88.1"
    assert plan.uplink_gateway_addr == "100.127.88.2"
    assert plan.uplink_prefix == 30
    assert plan.uplink_ns is None
    assert len(plan.tag) == 6
    assert int(plan.tag, 16) >= 0
    assert plan.outside_if == f"cu-{plan.tag}"
    assert len(plan.outside_if) <= 15  # IFNAMSIZ - 1
    assert plan.host_table == f"corral-{plan.tag}"


def test_tag_depends_on_the_gateway_namespace_only() -> None:
    assert NetPlan(gateway_ns="a").tag == NetPlan(gateway_ns="a", sandbox_subnet="10.9.0.0/24").tag
    assert NetPlan(gateway_ns="a").tag != NetPlan(gateway_ns="b").tag


def test_uplink_namespace() -> None:
    assert NetPlan(uplink="netns:fake-internet").uplink_ns == "fake-internet"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sandbox_subnet": "fd00::/64"}, "sandbox subnet must be an IPv4 network"),
        ({"sandbox_subnet": "10.88.0.0/29"}, "sandbox subnet must be an IPv4 network"),
        ({"sandbox_subnet": "10.88.0.1/16"}, "has host bits set"),
        ({"sandbox_subnet": "nonsense"}, "does not appear to be"),
        ({"uplink_subnet": "100.127.88.0/31"}, "uplink subnet must be an IPv4 network"),
        ({"uplink_subnet": "fd00::/126"}, "uplink subnet must be an IPv4 network"),
        ({"uplink_subnet": "100.127.88.1/30"}, "has host bits set"),
        ({"uplink_subnet": "10.88.4.0/30"}, "overlap"),
        ({"sandbox_subnet": "100.127.0.0/16"}, "overlap"),
        ({"uplink": "nethost"}, "uplink must be"),
        ({"uplink": "netns:"}, "uplink must be"),
        ({"uplink": ""}, "uplink must be"),
        ({"gateway_ns": ""}, "bad gateway namespace name"),
        ({"gateway_ns": "a/b"}, "bad gateway namespace name"),
        ({"gateway_ns": "x" * 65}, "bad gateway namespace name"),
    ],
)
def test_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NetPlan(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sandbox_subnet": "10.88.0.0/28"},  # the smallest: 16 addresses
        {"sandbox_subnet": "10.0.0.0/8"},
        {"uplink_subnet": "192.168.77.0/24"},
        {"uplink": "netns:x"},
        {"gateway_ns": "g" * 64},
    ],
)
def test_valid_plans(kwargs: dict[str, Any]) -> None:
    NetPlan(**kwargs)


@pytest.mark.parametrize(
    ("subnet", "max_slot"),
    [("10.88.0.0/28", 14), ("10.88.0.0/24", 254), ("10.88.0.0/16", 65534), ("10.0.0.0/8", 65535)],
)
def test_max_slot(subnet: str, max_slot: int) -> None:
    assert NetPlan(sandbox_subnet=subnet).max_slot == max_slot


# --- slots and addresses --------------------------------------------------------------------------------

PLAN = NetPlan()
SMALL = NetPlan(sandbox_subnet="10.9.9.0/28")


@pytest.mark.parametrize(
    ("plan", "slot", "address"),
    [
        (PLAN, 1, "10.88.0.1"),
        (PLAN, 255, "10.88.0.255"),
        (PLAN, 256, "10.88.1.0"),
        (PLAN, 65534, "10.88.255.254"),
        (SMALL, 1, "10.9.9.1"),
        (SMALL, 14, "10.9.9.14"),
    ],
)
def test_slot_address_round_trip(plan: NetPlan, slot: int, address: str) -> None:
    assert slot_address(plan, slot) == address
    assert address_slot(plan, address) == slot


@pytest.mark.parametrize(("plan", "slot"), [(PLAN, 0), (PLAN, -1), (PLAN, 65535), (SMALL, 15), (SMALL, 0)])
def test_slot_address_out_of_bounds(plan: NetPlan, slot: int) -> None:
    with pytest.raises(ValueError, match=r"outside 1\.\."):
        slot_address(plan, slot)


@pytest.mark.parametrize(
    ("plan", "address"),
    [
        (PLAN, "10.88.0.0"),  # the network address
        (PLAN, "10.88.255.255"),  # broadcast
        (PLAN, "10.87.255.255"),
        (PLAN, "10.89.0.1"),
        (PLAN, GATEWAY_ADDR),
        (PLAN, "::1"),
        (PLAN, "garbage"),
        (PLAN, ""),
        (SMALL, "10.9.9.15"),
        (SMALL, "10.9.9.16"),
    ],
)
def test_address_slot_of_no_sandbox(plan: NetPlan, address: str) -> None:
    assert address_slot(plan, address) is None


def test_address_slot_of_a_wide_subnet_stops_at_the_slot_limit() -> None:
    wide = NetPlan(sandbox_subnet="10.0.0.0/8")
    assert address_slot(wide, slot_address(wide, 65535)) == 65535
    assert address_slot(wide, "10.1.0.0") is None  # slot 65536


def test_every_slot_of_a_small_subnet_round_trips() -> None:
    addresses = [slot_address(SMALL, slot) for slot in range(1, SMALL.max_slot + 1)]
    assert len(set(addresses)) == SMALL.max_slot
    assert [address_slot(SMALL, a) for a in addresses] == list(range(1, SMALL.max_slot + 1))


@pytest.mark.parametrize("slot", [1, 9, 10, 65534])
def test_link_name_round_trip(slot: int) -> None:
    name = link_name(slot)
    assert name == f"cs{slot}"
    assert len(name) <= 15
    assert link_slot(name) == slot


@pytest.mark.parametrize("name", ["cs", "eth0", "up0", "lo", "cu-abcdef", "csx", "cs-1", "cs1a", "xcs1", ""])
def test_link_slot_of_other_links(name: str) -> None:
    assert link_slot(name) is None


# --- ip batches and resolv.conf -------------------------------------------------------------------------


def test_attach_gateway_batch() -> None:
    batch = attach_gateway_batch(PLAN, 7, "vm_0123abcd", 4242)
    assert batch.splitlines() == [
        "link add cs7 type veth peer name eth0 netns 4242",
        "link set cs7 alias vm_0123abcd",
        f"addr add {GATEWAY_ADDR}/32 dev cs7 scope link",
        "link set cs7 up",
        "route add 10.88.0.7/32 dev cs7",
    ]
    assert batch.endswith("\n")


def test_attach_sandbox_batch() -> None:
    batch = attach_sandbox_batch(PLAN, 300)
    assert batch.splitlines() == [
        "link set lo up",
        "addr add 10.88.1.44/32 dev eth0",
        "link set eth0 up",
        f"route add {GATEWAY_ADDR}/32 dev eth0 scope link",
        f"route add default via {GATEWAY_ADDR} dev eth0",
    ]
    assert batch.endswith("\n")


@pytest.mark.parametrize("slot", [0, 65535])
def test_batches_refuse_a_slot_out_of_bounds(slot: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        attach_gateway_batch(PLAN, slot, "c", 1)
    with pytest.raises(ValueError, match="outside"):
        attach_sandbox_batch(PLAN, slot)


def test_resolv_conf_points_at_the_gateway() -> None:
    assert resolv_conf() == f"nameserver {GATEWAY_ADDR}\noptions edns0\n"
    assert upstream_dns_from(resolv_conf()) == (GATEWAY_ADDR,)


def test_gateway_sysctls_turn_off_ipv6_and_forwarding() -> None:
    sysctls = netplan.gateway_sysctls()
    assert sysctls["net.ipv6.conf.all.disable_ipv6"] == "1"
    assert sysctls["net.ipv6.conf.default.disable_ipv6"] == "1"
    assert sysctls["net.ipv4.ip_forward"] == "0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nameserver 1.1.1.1\nnameserver 8.8.8.8\n", ("1.1.1.1", "8.8.8.8")),
        ("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n", ()),  # systemd-resolved's stub
        ("nameserver 127.0.0.1\nnameserver 192.168.1.1\n", ("192.168.1.1",)),
        ("nameserver ::1\nnameserver 2606:4700:4700::1111\nnameserver 9.9.9.9\n", ("9.9.9.9",)),
        ("nameserver fe80::1%eth0\n", ()),
        ("nameserver garbage\nnameserver 300.1.1.1\nnameserver\n", ()),
        ("# nameserver 1.1.1.1\n;nameserver 1.0.0.1\n", ()),
        ("  nameserver   10.0.0.2   # the router\n", ("10.0.0.2",)),
        ("NAMESERVER 1.1.1.1\n", ()),
        ("domain lan\nsearch a b\n", ()),
        ("", ()),
    ],
)
def test_upstream_dns_from(text: str, expected: tuple[str, ...]) -> None:
    assert upstream_dns_from(text) == expected


# --- the rulesets, through the real nft parser ----------------------------------------------------------

RULESETS = [
    pytest.param(gateway_ruleset(PLAN), id="gateway"),
    pytest.param(
        gateway_ruleset(NetPlan(sandbox_subnet="10.9.9.0/28", proxy_port=8080, dns_port=5353)), id="gw2"
    ),
    pytest.param(host_ruleset(PLAN), id="host"),
    pytest.param(host_ruleset(NetPlan(gateway_ns="other", uplink_subnet="192.168.77.0/24")), id="host2"),
]


@pytest.mark.parametrize("ruleset", RULESETS)
def test_ruleset_passes_nft_check(ruleset: str, tmp_path: Path) -> None:
    """``nft -c`` checks in the kernel and changes nothing (the run checks no table is left behind)."""
    path = tmp_path / "rules.nft"
    path.write_text(ruleset)
    proc = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_a_broken_ruleset_fails_nft_check(tmp_path: Path) -> None:
    """The check above can fail: nft really parses the file."""
    path = tmp_path / "rules.nft"
    path.write_text(gateway_ruleset(PLAN).replace("policy drop;", "policy dorp;", 1))
    proc = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0


def _chains(ns: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    listing = json.loads(run_in(ns, ["nft", "-j", "list", "ruleset"]).stdout)
    return {
        (c["family"], c["table"], c["name"]): c
        for item in listing["nftables"]
        if (c := item.get("chain")) is not None
    }


def _rule_count(ns: str) -> int:
    listing = json.loads(run_in(ns, ["nft", "-j", "list", "ruleset"]).stdout)
    return sum(1 for item in listing["nftables"] if "rule" in item)


@pytest.mark.kernel
def test_rulesets_load_and_replace_themselves_in_a_namespace() -> None:
    """Loaded twice in a fresh namespace (the second load replaces the table, as on every start): the chains,
    hooks and policies are what the plan says, and no rule is doubled."""
    ns = add_netns("cnt-")
    try:
        for ruleset in (gateway_ruleset(PLAN), host_ruleset(PLAN)):
            run_in(ns, ["nft", "-f", "-"], input=ruleset)
        first = _rule_count(ns)
        for ruleset in (gateway_ruleset(PLAN), host_ruleset(PLAN)):
            run_in(ns, ["nft", "-f", "-"], input=ruleset)
        assert _rule_count(ns) == first
        chains = _chains(ns)
        got = {key: (c["type"], c["hook"], c["prio"], c["policy"]) for key, c in chains.items()}
        host = PLAN.host_table
        assert got == {
            ("inet", "corral", "pre_raw"): ("filter", "prerouting", -300, "accept"),
            ("inet", "corral", "pre_nat"): ("nat", "prerouting", -100, "accept"),
            ("inet", "corral", "input"): ("filter", "input", 0, "drop"),
            ("inet", "corral", "forward"): ("filter", "forward", 0, "drop"),
            ("inet", "corral", "output"): ("filter", "output", 0, "accept"),
            ("ip", host, "input"): ("filter", "input", 0, "accept"),
            ("ip", host, "forward"): ("filter", "forward", 0, "accept"),
            ("ip", host, "postrouting"): ("nat", "postrouting", 100, "accept"),
        }
        text = run_in(ns, ["nft", "list", "table", "inet", "corral"]).stdout
        assert f"redirect to :{PLAN.dns_port}" in text
        assert f"redirect to :{PLAN.proxy_port}" in text
        assert "ip saddr != 10.88.0.0/16 drop" in text
    finally:
        del_netns(ns)
