"""The gateway on this host and the sandboxes' links to it: the effects of ``netplan``.

``ensure`` makes (or refreshes) the gateway namespace, its uplink and rules, and is safe to repeat while
sandboxes run: a restarted server keeps their links. ``attach``/``detach`` give a running sandbox its link
and take it away again (the state issue undoes and redoes it around a checkpoint). A link is labelled with
its container, so the slots in use are read back from the kernel after a restart, and links left behind by
sandboxes that are gone are reclaimed."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from corral.net import plan as netplan
from corral.net.plan import NetPlan
from corral.runtime.proc import CommandFailed, run

NETNS_DIR = Path("/run/netns")


class NetworkError(Exception):
    """The sandbox network could not be set up."""


class Gateway:
    def __init__(self, plan: NetPlan) -> None:
        self.plan = plan
        self._lock = threading.Lock()
        self._slots: dict[str, int] = {}  # container id -> slot

    @property
    def ns_path(self) -> Path:
        return NETNS_DIR / self.plan.gateway_ns

    def _ip(self, *args: str, input_text: str | None = None) -> str:
        return run(["ip", "-n", self.plan.gateway_ns, *args], input_text=input_text)

    def _in_gateway(self, argv: list[str], input_text: str | None = None) -> str:
        return run(["nsenter", f"--net={self.ns_path}", *argv], input_text=input_text)

    # ---- the gateway ----------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.ns_path.exists()

    def ensure(self) -> None:
        """Make the gateway namespace, its uplink and its rules; keep what exists (links of running sandboxes)."""
        p = self.plan
        try:
            if not self.exists():
                run(["ip", "netns", "add", p.gateway_ns])
            self._ip("link", "set", "lo", "up")
            self._in_gateway(
                ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in netplan.gateway_sysctls().items())]
            )
            self._in_gateway(["nft", "-f", "-"], input_text=netplan.gateway_ruleset(p))
            if not self._has_link(netplan.UPLINK_IF):
                self._make_uplink()
            self._slots = self._read_slots()
        except CommandFailed as exc:
            raise NetworkError(f"setting up the sandbox network failed: {exc}") from exc

    def _has_link(self, name: str) -> bool:
        try:
            self._ip("link", "show", "dev", name)
        except CommandFailed:
            return False
        return True

    def _make_uplink(self) -> None:
        p = self.plan
        outside, gw_if = p.outside_if, netplan.UPLINK_IF
        target = p.uplink_ns
        # make the pair inside the gateway, then move the outside end where it belongs
        self._ip("link", "add", gw_if, "type", "veth", "peer", "name", outside)
        if target is None:
            if _host_has_link(outside):  # left by a gateway that was removed without its uplink
                run(["ip", "link", "del", outside])
            self._ip("link", "set", outside, "netns", "1")
            out_ip: list[str] = ["ip"]
        else:
            self._ip("link", "set", outside, "netns", target)
            out_ip = ["ip", "-n", target]
        run([*out_ip, "addr", "add", f"{p.uplink_outside_addr}/{p.uplink_prefix}", "dev", outside])
        run([*out_ip, "link", "set", outside, "up"])
        self._ip("addr", "add", f"{p.uplink_gateway_addr}/{p.uplink_prefix}", "dev", gw_if)
        self._ip("link", "set", gw_if, "up")
        self._ip("route", "replace", "default", "via", p.uplink_outside_addr, "dev", gw_if)
        if target is None:
            run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
            run(["nft", "-f", "-"], input_text=netplan.host_ruleset(p))

    def teardown(self) -> None:
        """Remove the gateway, its uplink and (host uplink) the host's table. Sandboxes lose their network."""
        p = self.plan
        if self.exists():
            with contextlib.suppress(CommandFailed):
                self._ip("link", "del", netplan.UPLINK_IF)
            with contextlib.suppress(CommandFailed):
                run(["ip", "netns", "del", p.gateway_ns])
        if p.uplink_ns is None:
            with contextlib.suppress(CommandFailed):
                run(["nft", "delete", "table", "ip", p.host_table])
            if _host_has_link(p.outside_if):
                with contextlib.suppress(CommandFailed):
                    run(["ip", "link", "del", p.outside_if])
        with self._lock:
            self._slots.clear()

    # ---- sandbox links --------------------------------------------------------------------------------------

    def _read_slots(self) -> dict[str, int]:
        """Container id -> slot, from the labels of the gateway's sandbox links."""
        found: dict[str, int] = {}
        for link in json.loads(self._ip("-j", "link", "show") or "[]"):
            slot = netplan.link_slot(str(link.get("ifname", "")))
            alias = link.get("ifalias")
            if slot is not None and alias:
                found[str(alias)] = slot
        return found

    def links(self) -> dict[str, int]:
        """The sandbox links in the kernel now, by container id."""
        try:
            return self._read_slots()
        except CommandFailed:
            return {}

    def _take_slot(self, cid: str, prefer: int | None = None) -> int:
        with self._lock:
            if cid in self._slots:
                raise NetworkError(f"{cid} already has a network link")
            used = set(self._slots.values())
            if prefer is not None and prefer not in used:
                self._slots[cid] = prefer
                return prefer
            for slot in range(1, self.plan.max_slot + 1):
                if slot not in used:
                    self._slots[cid] = slot
                    return slot
        raise NetworkError("no network slot is free on this node")

    def attach(self, cid: str, pid: int, slot: int | None = None) -> str:
        """Give the running sandbox ``cid`` (its init is ``pid``) its link; returns its address. ``slot``:
        the one it had before a checkpoint, if still free (its address, so its peers' view, is kept). On
        failure nothing is left."""
        slot = self._take_slot(cid, slot)
        batch = netplan.attach_gateway_batch(self.plan, slot, cid, pid)
        try:
            try:
                self._ip("-batch", "-", input_text=batch)
            except CommandFailed as exc:
                if "File exists" not in exc.stderr:
                    raise
                # the link of a sandbox that was stopped a moment ago, still going away with its namespace
                self._remove_link(slot)
                self._ip("-batch", "-", input_text=batch)
            run(
                ["nsenter", f"--target={pid}", "--net", "ip", "-batch", "-"],
                input_text=netplan.attach_sandbox_batch(self.plan, slot),
            )
        except CommandFailed as exc:
            self._drop(cid, slot)
            raise NetworkError(f"attaching the sandbox's network failed: {exc}") from exc
        return netplan.slot_address(self.plan, slot)

    def release(self, cid: str) -> None:
        """Free the slot of a sandbox whose network namespace is gone (its processes were killed): the
        kernel removes both ends of the link with the namespace, so no ~20 ms ``ip link del`` is spent
        here; a link still going away when its slot is taken again is removed then (``attach``)."""
        with self._lock:
            self._slots.pop(cid, None)

    def _remove_link(self, slot: int) -> None:
        with contextlib.suppress(CommandFailed):
            self._ip("link", "del", netplan.link_name(slot))

    def detach(self, cid: str) -> int | None:
        """Remove the sandbox's link (both ends) and free its slot; nothing if it has none. Returns the slot."""
        with self._lock:
            slot = self._slots.get(cid)
        if slot is None:
            slot = self.links().get(cid)
        if slot is not None:
            self._drop(cid, slot)
        return slot

    def _drop(self, cid: str, slot: int) -> None:
        self._remove_link(slot)
        with self._lock:
            if self._slots.get(cid) == slot:
                del self._slots[cid]

    def reclaim(self, keep: Iterable[str]) -> list[str]:
        """Remove every link whose container is not in ``keep``; returns their container ids."""
        keep = set(keep)
        gone = [cid for cid in self.links() if cid not in keep]
        for cid in gone:
            self.detach(cid)
        current = self.links()
        with self._lock:
            self._slots = current
        return gone


def _host_has_link(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")
