"""The host's kernel networking as the tunnel agent changes it, through pyroute2 (netlink).

Every operation is idempotent ("ensure" / "remove", either way a no-op when already so), so the
agent can replay a leg after a restart without knowing what it had done before. Runs in the
network namespace of the calling process (the agent is started inside the host's).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

RT_TABLE_MAIN = 254


@dataclass(frozen=True)
class VxlanDevice:
    name: str
    vni: int
    local: ipaddress.IPv4Address
    remote: ipaddress.IPv4Address
    port: int
    mtu: int


class HostNetwork:
    def __init__(self) -> None:
        self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def _index(self, device: str) -> int | None:
        found = self._ipr.link_lookup(ifname=device)
        return found[0] if found else None

    def link_exists(self, device: str) -> bool:
        return self._index(device) is not None

    # -- addresses ------------------------------------------------------------------------

    def has_address(self, address: ipaddress.IPv4Address, device: str) -> bool:
        index = self._index(device)
        if index is None:
            return False
        return any(a.get_attr("IFA_ADDRESS") == str(address) and a["prefixlen"] == 32
                   for a in self._ipr.get_addr(index=index, family=2))

    def ensure_address(self, address: ipaddress.IPv4Address, device: str) -> None:
        index = self._index(device)
        if index is None:
            raise RuntimeError(f"no device {device}")
        if self.has_address(address, device):
            return
        try:
            self._ipr.addr("add", index=index, address=str(address), prefixlen=32)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    def remove_address(self, address: ipaddress.IPv4Address, device: str) -> None:
        index = self._index(device)
        if index is None or not self.has_address(address, device):
            return
        try:
            self._ipr.addr("del", index=index, address=str(address), prefixlen=32)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise

    # -- routes (main table, /32s) ----------------------------------------------------------

    def _routes_to(self, destination: ipaddress.IPv4Address) -> list[dict[str, object]]:
        found = []
        for r in self._ipr.get_routes(family=2, table=RT_TABLE_MAIN):
            if r.get_attr("RTA_DST") == str(destination) and r["dst_len"] == 32:
                found.append({"type": r["type"], "oif": r.get_attr("RTA_OIF"),
                              "src": r.get_attr("RTA_PREFSRC")})
        return found

    def has_blackhole(self, destination: ipaddress.IPv4Address) -> bool:
        return any(r["type"] == 6 for r in self._routes_to(destination))  # RTN_BLACKHOLE

    def ensure_blackhole(self, destination: ipaddress.IPv4Address) -> None:
        if self.has_blackhole(destination):
            return
        self._ipr.route("add", dst=f"{destination}/32", type="blackhole", table=RT_TABLE_MAIN)

    def remove_blackhole(self, destination: ipaddress.IPv4Address) -> None:
        if self.has_blackhole(destination):
            self._ipr.route("del", dst=f"{destination}/32", type="blackhole",
                            table=RT_TABLE_MAIN)

    def has_link_route(self, destination: ipaddress.IPv4Address, device: str,
                       source: ipaddress.IPv4Address | None) -> bool:
        index = self._index(device)
        return any(r["type"] == 1 and r["oif"] == index
                   and (source is None or r["src"] == str(source))
                   for r in self._routes_to(destination))

    def ensure_link_route(self, destination: ipaddress.IPv4Address, device: str,
                          source: ipaddress.IPv4Address | None) -> None:
        index = self._index(device)
        if index is None:
            raise RuntimeError(f"no device {device}")
        if self.has_link_route(destination, device, source):
            return
        args: dict[str, object] = {"dst": f"{destination}/32", "oif": index,
                                   "scope": 253, "table": RT_TABLE_MAIN}  # scope link
        if source is not None:
            args["prefsrc"] = str(source)
        self._ipr.route("replace", **args)

    def remove_link_route(self, destination: ipaddress.IPv4Address, device: str) -> None:
        index = self._index(device)
        if index is None:
            return
        for r in self._routes_to(destination):
            if r["type"] == 1 and r["oif"] == index:
                try:
                    self._ipr.route("del", dst=f"{destination}/32", oif=index,
                                    table=RT_TABLE_MAIN)
                except NetlinkError as exc:
                    if exc.code not in (errno.ESRCH, errno.ENOENT):
                        raise

    # -- the VXLAN device -------------------------------------------------------------------

    def vxlan(self, name: str) -> VxlanDevice | None:
        index = self._index(name)
        if index is None:
            return None
        link = self._ipr.get_links(index)[0]
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
            return None
        data = info.get_attr("IFLA_INFO_DATA")
        return VxlanDevice(name, data.get_attr("IFLA_VXLAN_ID"),
                           ipaddress.IPv4Address(data.get_attr("IFLA_VXLAN_LOCAL")),
                           ipaddress.IPv4Address(data.get_attr("IFLA_VXLAN_GROUP")),
                           data.get_attr("IFLA_VXLAN_PORT"), link.get_attr("IFLA_MTU"))

    def ensure_vxlan(self, want: VxlanDevice) -> None:
        """A VXLAN device exactly as wanted (re-created if it differs), up, with no IPv6
        (it is a bridge port: the host itself must not talk through it). Its outer header
        leaves DF clear, so a full-size frame's VXLAN packet may be fragmented inside the
        IPsec tunnel."""
        have = self.vxlan(want.name)
        if have == want:
            if not self._is_up(want.name):
                self._ipr.link("set", index=self._index(want.name), state="up")
            return
        if have is not None or self.link_exists(want.name):
            self.remove_link(want.name)
        self._ipr.link("add", ifname=want.name, kind="vxlan", vxlan_id=want.vni,
                       vxlan_local=str(want.local), vxlan_group=str(want.remote),
                       vxlan_port=want.port, vxlan_learning=0, mtu=want.mtu)
        _disable_ipv6(want.name)
        self._ipr.link("set", index=self._index(want.name), state="up")

    def _is_up(self, name: str) -> bool:
        index = self._index(name)
        return index is not None and bool(self._ipr.get_links(index)[0]["flags"] & 1)

    def remove_link(self, name: str) -> None:
        index = self._index(name)
        if index is None:
            return
        try:
            self._ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


def _disable_ipv6(device: str) -> None:
    path = Path("/proc/sys/net/ipv6/conf") / device / "disable_ipv6"
    try:
        path.write_text("1")
    except OSError:  # no IPv6 in this kernel: nothing to disable
        log.debug("cannot disable IPv6 on %s", device)
