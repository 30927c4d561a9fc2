"""The sandbox network as data: addresses and interface names derived from a slot, the nftables rulesets of
the gateway (and of the host, for the host uplink) and the ``ip`` batches that attach a sandbox. Pure: the
functions here build text; ``net/gateway.py`` runs it.

Layout: every sandbox's network namespace (made by the runtime in the sandbox's user namespace) holds
``eth0`` with one address from the sandbox subnet (``/32``) and a default route to ``GATEWAY_ADDR``. The
other end of its veth, ``cs<slot>``, lives in the gateway namespace, which holds the egress proxy, the DNS
resolver and every rule; the gateway reaches the outside through ``up0``, its uplink."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

GATEWAY_ADDR = "169.254.1.1"  # the gateway's address on every sandbox link (link-local, never routed)
SANDBOX_IF = "eth0"
UPLINK_IF = "up0"
LINK_PREFIX = "cs"
TABLE = "corral"
# per sandbox, at the gateway: flows open at once, and new flows per second (the proxy's descriptors and the
# gateway's connection tracking are shared by every sandbox of the node)
MAX_FLOWS = 4096
NEW_PER_SECOND = 1000


@dataclass(frozen=True)
class NetPlan:
    gateway_ns: str = "corral-gw"
    sandbox_subnet: str = "10.88.0.0/16"
    # "host": a veth to the host, which masquerades; "netns:NAME": a veth into namespace NAME (tests)
    uplink: str = "host"
    uplink_subnet: str = "100.127.88.0/30"  # first address: the outside end; second: the gateway's
    upstream_dns: tuple[str, ...] = ()
    proxy_port: int = 15001
    dns_port: int = 15053

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.sandbox_subnet, strict=True)
        if net.version != 4 or net.prefixlen > 28:
            raise ValueError("the sandbox subnet must be an IPv4 network of at least 16 addresses")
        link = ipaddress.ip_network(self.uplink_subnet, strict=True)
        if link.version != 4 or link.num_addresses < 4:
            raise ValueError("the uplink subnet must be an IPv4 network of at least 4 addresses")
        if net.overlaps(link):
            raise ValueError("the sandbox and uplink subnets overlap")
        if not (self.uplink == "host" or (self.uplink.startswith("netns:") and len(self.uplink) > 6)):
            raise ValueError("uplink must be 'host' or 'netns:NAME'")
        if not 0 < len(self.gateway_ns) <= 64 or "/" in self.gateway_ns:
            raise ValueError("bad gateway namespace name")

    @property
    def tag(self) -> str:
        """Six hex digits naming this gateway's objects in the host's namespace."""
        return hashlib.sha256(self.gateway_ns.encode()).hexdigest()[:6]

    @property
    def outside_if(self) -> str:
        """The uplink's outside end (on the host, or in the uplink namespace)."""
        return f"cu-{self.tag}"

    @property
    def uplink_outside_addr(self) -> str:
        return str(ipaddress.ip_network(self.uplink_subnet)[1])

    @property
    def uplink_gateway_addr(self) -> str:
        return str(ipaddress.ip_network(self.uplink_subnet)[2])

    @property
    def uplink_prefix(self) -> int:
        return ipaddress.ip_network(self.uplink_subnet).prefixlen

    @property
    def uplink_ns(self) -> str | None:
        return self.uplink[len("netns:") :] if self.uplink.startswith("netns:") else None

    @property
    def max_slot(self) -> int:
        return min(ipaddress.ip_network(self.sandbox_subnet).num_addresses - 2, 65535)

    @property
    def host_table(self) -> str:
        return f"corral-{self.tag}"


def slot_address(plan: NetPlan, slot: int) -> str:
    """A sandbox's address: the subnet's ``slot``-th address (slots start at 1)."""
    if not 1 <= slot <= plan.max_slot:
        raise ValueError(f"slot {slot} is outside 1..{plan.max_slot}")
    return str(ipaddress.ip_network(plan.sandbox_subnet)[slot])


def address_slot(plan: NetPlan, address: str) -> int | None:
    """The slot of a sandbox address, or None when the address is no sandbox's."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    net = ipaddress.ip_network(plan.sandbox_subnet)
    if ip not in net:
        return None
    slot = int(ip) - int(net.network_address)
    return slot if 1 <= slot <= plan.max_slot else None


def link_name(slot: int) -> str:
    return f"{LINK_PREFIX}{slot}"


def link_slot(name: str) -> int | None:
    rest = name[len(LINK_PREFIX) :]
    return int(rest) if name.startswith(LINK_PREFIX) and rest.isdigit() else None


def gateway_ruleset(plan: NetPlan) -> str:
    """The gateway's one table, replaced atomically. From sandboxes: IPv6 and spoofed sources dropped before
    anything else; DNS (TCP and UDP, any address) to the resolver and every other TCP connection to the
    proxy; a rate-limited echo to the gateway (before the established rule: one ping's requests share a
    conntrack entry); at most MAX_FLOWS flows and NEW_PER_SECOND new ones per second per sandbox; nothing
    else, and nothing forwarded. Nothing enters from the uplink but replies, and the gateway itself opens no
    connection into a sandbox."""
    subnet = plan.sandbox_subnet
    sandboxes = f'iifname "{LINK_PREFIX}*"'
    to_sandboxes = f'oifname "{LINK_PREFIX}*"'
    return f"""table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  chain pre_raw {{
    type filter hook prerouting priority raw; policy accept;
    meta nfproto ipv6 drop
    {sandboxes} ip saddr != {subnet} drop
    {sandboxes} fib saddr . iif oif missing drop
    {sandboxes} ip daddr {{ 127.0.0.0/8, 224.0.0.0/4, 255.255.255.255 }} drop
  }}
  chain pre_nat {{
    type nat hook prerouting priority dstnat; policy accept;
    {sandboxes} meta l4proto {{ tcp, udp }} th dport 53 redirect to :{plan.dns_port}
    {sandboxes} meta l4proto tcp redirect to :{plan.proxy_port}
  }}
  set conns {{ type ipv4_addr; flags dynamic; size 65535; }}
  set rate {{ type ipv4_addr; flags dynamic,timeout; timeout 10s; size 65535; }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iif lo accept
    ct state invalid drop
    {sandboxes} ct state new add @conns {{ ip saddr ct count over {MAX_FLOWS} }} drop
    {sandboxes} ct state new update @rate {{ ip saddr limit rate over {NEW_PER_SECOND}/second burst {NEW_PER_SECOND * 2} packets }} drop
    {sandboxes} ip daddr {GATEWAY_ADDR} icmp type echo-request limit rate 10/second burst 20 packets accept
    icmp type echo-request drop
    ct state established,related accept
    {sandboxes} ct status dnat tcp dport {plan.proxy_port} accept
    {sandboxes} ct status dnat meta l4proto {{ tcp, udp }} th dport {plan.dns_port} accept
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    meta nfproto ipv6 drop
    {to_sandboxes} ct state established,related accept
    {to_sandboxes} icmp type echo-reply accept
    {to_sandboxes} drop
  }}
}}
"""


def host_ruleset(plan: NetPlan) -> str:
    """For the host uplink, a table in the host's namespace: the gateway's traffic is forwarded (masqueraded)
    to the host's network, and may open no connection to the host itself."""
    up, gw = plan.outside_if, plan.uplink_gateway_addr
    table = plan.host_table
    return f"""table ip {table}
delete table ip {table}
table ip {table} {{
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{up}" ct state established,related accept
    iifname "{up}" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{up}" ip saddr {gw} accept
    oifname "{up}" ct state established,related accept
    oifname "{up}" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {gw} oifname != "{up}" masquerade
  }}
}}
"""


def gateway_sysctls() -> dict[str, str]:
    """Inside the gateway namespace: no IPv6 at all, no forwarding (the proxy terminates every connection)."""
    return {
        "net.ipv6.conf.all.disable_ipv6": "1",
        "net.ipv6.conf.default.disable_ipv6": "1",
        "net.ipv4.ip_forward": "0",
        "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.default.rp_filter": "1",
    }


def attach_gateway_batch(plan: NetPlan, slot: int, cid: str, pid: int) -> str:
    """``ip -batch`` in the gateway namespace: the veth pair, its sandbox end moved into the namespace of
    ``pid`` as ``eth0``, and the gateway end (named by the slot, labelled with the container) routed."""
    link = link_name(slot)
    return "\n".join(
        [
            f"link add {link} type veth peer name {SANDBOX_IF} netns {pid}",
            f"link set {link} alias {cid}",
            f"addr add {GATEWAY_ADDR}/32 dev {link} scope link",
            f"link set {link} up",
            f"route add {slot_address(plan, slot)}/32 dev {link}",
            "",
        ]
    )


def attach_sandbox_batch(plan: NetPlan, slot: int) -> str:
    """``ip -batch`` inside the sandbox's namespace: its address, and the gateway as the default route."""
    return "\n".join(
        [
            "link set lo up",
            f"addr add {slot_address(plan, slot)}/32 dev {SANDBOX_IF}",
            f"link set {SANDBOX_IF} up",
            f"route add {GATEWAY_ADDR}/32 dev {SANDBOX_IF} scope link",
            f"route add default via {GATEWAY_ADDR} dev {SANDBOX_IF}",
            "",
        ]
    )


def resolv_conf() -> str:
    return f"nameserver {GATEWAY_ADDR}\noptions edns0\n"


def upstream_dns_from(resolv_conf_text: str) -> tuple[str, ...]:
    """Non-loopback IPv4 name servers of a resolv.conf (a loopback stub is unreachable from the gateway)."""
    found: list[str] = []
    for line in resolv_conf_text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if ip.version == 4 and not ip.is_loopback:
                found.append(str(ip))
    return tuple(found)
