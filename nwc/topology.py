"""The provider network NWC controls: fabric switches, links, compute hosts and their VMs.

One file under `topologies/` describes it (see `topologies/README.md`). Admission loads it into
a networkx graph; the OpenFlow compiler reads the ports and datapath ids; the Mininet lab builds
the same network from the same file, so what is tested is what is reserved.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import networkx as nx

from nwc.certnames import remote_address
from nwc.mtu import VM_MTU, VXLAN_OVERHEAD, mtu_plan
from nwc.policy import MAX_BANDWIDTH_MBPS, MAX_IVN_VNI, NAME, NAME_WHAT, Ivn, Policy
from nwc.yamlsource import ConfigError, Cursor, Document, Problem, parse_yaml, read_yaml, shown

Backend = Literal["strongswan", "ovs-ipsec"]
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
CERT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")  # a DNS name; no wildcards
PORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")  # Linux interface names: <= 15


def derived_dpid(kind: str, name: str) -> int:
    """A stable datapath id from a name, so topologies need not spell dpids out.
    0x4e57 is 'NW'; the kind keeps a host and a switch of the same name apart."""
    tag = {"switch": 1, "host": 2}[kind]
    return (0x4E57 << 40) | (tag << 32) | zlib.crc32(name.encode())


def derived_mac(name: str) -> str:
    """A stable, locally administered unicast MAC for a VM that does not give one."""
    raw = zlib.crc32(name.encode()).to_bytes(4, "big")
    return "02:4e:" + ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True)
class Switch:
    name: str
    dpid: int
    # The name the switch's TLS certificate must carry instead of the switch's name, for an
    # OVS whose one certificate serves several fabric bridges (nwc.certnames has the rule).
    cert_name: str | None = None


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    capacity_mbps: float
    reservable_share: float

    @property
    def reservable_mbps(self) -> float:
        return self.capacity_mbps * self.reservable_share

    @property
    def key(self) -> tuple[str, str]:
        return link_key(self.a, self.b)


@dataclass(frozen=True)
class ComputeHost:
    name: str
    switch: str  # the fabric switch its uplink attaches to
    underlay_ip: ipaddress.IPv4Address
    dpid: int  # of the host's integration bridge
    backend: Backend
    management_ip: ipaddress.IPv4Address | None = None
    ovsdb: str | None = None  # e.g. tcp:198.51.100.11:6640; None: the lab decides
    # The name an ssl: OVSDB server's certificate must carry instead of the host's name
    # (nwc.ovsdbtls has the rule); None: the host's name.
    ovsdb_cert_name: str | None = None


@dataclass(frozen=True)
class Vm:
    name: str
    host: str
    ivn: str
    ip: ipaddress.IPv4Address
    mac: str
    port: str  # the OVS port name on its host's bridge


@dataclass(frozen=True)
class Underlay:
    hosts: ipaddress.IPv4Network
    weave_endpoints: ipaddress.IPv4Network  # outer (IKE/ESP) addresses, two per weave
    weave_vteps: ipaddress.IPv4Network  # VXLAN endpoint addresses inside ESP, two per weave
    mtu: int

    @property
    def weave_slots(self) -> int:
        return min(self.weave_endpoints.num_addresses, self.weave_vteps.num_addresses) // 2 - 1


@dataclass(frozen=True)
class WeaveAddresses:
    """Addresses a weave owns on the underlay, derived from its slot (never random)."""

    vni: int
    requester_endpoint: ipaddress.IPv4Address
    target_endpoint: ipaddress.IPv4Address
    requester_vtep: ipaddress.IPv4Address
    target_vtep: ipaddress.IPv4Address


@dataclass(frozen=True)
class Topology:
    name: str
    underlay: Underlay
    switches: Mapping[str, Switch]
    links: tuple[Link, ...]
    hosts: Mapping[str, ComputeHost]
    vms: Mapping[str, Vm]
    source: str = ""

    def weave_addresses(self, slot: int) -> WeaveAddresses:
        if not 0 <= slot < self.underlay.weave_slots:
            raise ValueError(f"weave slot {slot} outside the underlay pools")
        ep, vt = self.underlay.weave_endpoints, self.underlay.weave_vteps
        return WeaveAddresses(
            vni=MAX_IVN_VNI + 1 + slot,
            requester_endpoint=ep[2 * slot + 2], target_endpoint=ep[2 * slot + 3],
            requester_vtep=vt[2 * slot + 2], target_vtep=vt[2 * slot + 3])

    def hosts_of_ivn(self, ivn: str) -> list[str]:
        return self._hosts_by_ivn.get(ivn, [])

    @functools.cached_property
    def _hosts_by_ivn(self) -> dict[str, list[str]]:
        hosts: dict[str, set[str]] = {}
        for vm in self.vms.values():
            hosts.setdefault(vm.ivn, set()).add(vm.host)
        return {ivn: sorted(h) for ivn, h in hosts.items()}

    def uplink(self, host: str) -> Link:
        h = self.hosts[host]
        return next(link for link in self.links if link.key == link_key(h.name, h.switch))

    def ports(self, node: str) -> dict[str, int]:
        """OpenFlow port numbers of a switch (or a host's underlay side), by neighbour:
        neighbours sorted by name get 1, 2, 3... The lab requests exactly these numbers."""
        neighbours = sorted({link.b if link.a == node else link.a
                             for link in self.links if node in (link.a, link.b)})
        return {n: i + 1 for i, n in enumerate(neighbours)}

    def graph(self) -> nx.Graph:
        g = nx.Graph()
        for s in sorted(self.switches):
            g.add_node(s, kind="switch")
        for h in sorted(self.hosts):
            g.add_node(h, kind="host")
        for link in self.links:
            g.add_edge(link.a, link.b, capacity_mbps=link.capacity_mbps,
                       reservable_mbps=link.reservable_mbps)
        return g


def link_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


TOP_KEYS = {"version", "name", "description", "underlay", "reservable_share", "switches",
            "links", "hosts", "vms"}
UNDERLAY_KEYS = {"hosts", "weave_endpoints", "weave_vteps", "mtu"}
LINK_KEYS = {"between", "capacity_mbps", "reservable_share"}
HOST_KEYS = {"switch", "uplink_mbps", "uplink_share", "underlay_ip", "dpid", "backend",
             "management_ip", "ovsdb", "ovsdb_cert_name"}
SWITCH_KEYS = {"dpid", "cert_name"}
VM_KEYS = {"host", "ivn", "ip", "mac", "port"}
CERT_NAME_WHAT = "a DNS name (letters, digits, '.', '-'; no wildcards)"


def vm_problems(topology: Topology, policy: Policy) -> list[str]:
    """What keeps a (running) topology's VMs from fitting `policy`: the checks the loader makes,
    for a topology already in use (a policy reload must fit the running one, whatever its file
    says now)."""
    problems = []
    for vm in sorted(topology.vms.values(), key=lambda v: v.name):
        ivn = policy.ivns.get(vm.ivn)
        if ivn is None:
            problems.append(f"VM {vm.name}: its IVN {vm.ivn} is not in the new policy")
        elif misfit := _address_misfit(vm.ip, ivn):
            problems.append(f"VM {vm.name}: {misfit}")
    return problems


def underlay_mtu_problem(mtu: int, policy: Policy | None) -> str | None:
    """Why an underlay of `mtu` cannot carry a full-size VM frame unfragmented, naming the
    minimum; None if it can. The IVN overlay needs room for VXLAN; with a policy, a weave leg
    also needs room for ESP, whose overhead depends on its profile's ESP proposals. Only
    profiles some IVN allows count: no weave can use the others."""
    overlay = VM_MTU + VXLAN_OVERHEAD
    need, why = overlay, f"a full-size VM frame takes in the IVN overlay ({VM_MTU} + " \
                         f"{VXLAN_OVERHEAD} VXLAN)"
    allowed = sorted({name for ivn in (policy.ivns.values() if policy else ())
                      for name in ivn.weaving.profiles})
    for name in allowed:
        plan = mtu_plan(policy.profiles[name].esp_proposals, mtu)  # type: ignore[union-attr]
        if plan.underlay_mtu_needed > need:
            need = plan.underlay_mtu_needed
            why = (f"a full-size VM frame takes in a weave leg of security profile {name} "
                   f"({VM_MTU} + {VXLAN_OVERHEAD} VXLAN + {plan.esp_overhead} ESP)")
    if mtu >= need:
        return None
    return f"underlay MTU {mtu} is below the {need} bytes {why}; set it to at least {need}"


def _address_misfit(ip: ipaddress.IPv4Address, ivn: Ivn) -> str | None:
    """Why a VM address cannot be in `ivn`, or None."""
    if not ivn.contains(ip):
        return f"{ip} is outside IVN {ivn.name}'s prefixes ({', '.join(map(str, ivn.cidrs))})"
    if ip == ivn.gateway:
        return f"{ip} is IVN {ivn.name}'s gateway address"
    return None


@dataclass(frozen=True)
class _Claim:
    """A certificate name (lower case) or address that names `owner` ("host h1", "switch
    s1"), from its `field` at `cursor`."""

    key: str
    owner: str
    field: str
    cursor: Cursor


def _refuse_shared_identities(claims: list[_Claim]) -> None:
    """A certificate that names two machines passes as either (nwc.certnames): with
    h1.ovsdb_cert_name h2, h2's certificate passes as h1's OVSDB server, which is given h1's
    pre-shared keys, and as h1's br-int. So each name or address belongs to one host or
    switch; only fabric switches may share one (several bridges of one OVS, one
    certificate). The first claim owns it; each later one by someone else is one error,
    where it is written."""
    owners: dict[str, _Claim] = {}
    for claim in claims:
        first = owners.setdefault(claim.key, claim)
        if first.owner == claim.owner or (first.owner.startswith("switch ")
                                           and claim.owner.startswith("switch ")):
            continue
        claim.cursor.problem(f"{claim.field} {claim.key} also names {first.owner} (its "
                             f"{first.field}): one certificate would pass as both "
                             f"{first.owner} and {claim.owner}")


def load_topology(path: Path, policy: Policy | None = None) -> Topology:
    doc, problems = read_yaml(path)
    if problems:
        raise ConfigError(problems)
    return build_topology(doc, policy)


def parse_topology_text(text: str, policy: Policy | None = None,
                        file: str = "<topology>") -> Topology:
    doc, problems = parse_yaml(text, file)
    if problems:
        raise ConfigError(problems)
    return build_topology(doc, policy)


def _address(c: Cursor) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(c.value) if isinstance(c.value, str) else None
    except ValueError:
        pass
    c.problem(f"expected an IPv4 address, got {shown(c.value)}")
    return None


def _prefix(c: Cursor) -> ipaddress.IPv4Network | None:
    try:
        return ipaddress.IPv4Network(c.value, strict=True) if isinstance(c.value, str) else None
    except ValueError:
        pass
    c.problem(f"expected an IPv4 prefix, got {shown(c.value)}")
    return None


def _dpid(c: Cursor) -> int | None:
    return c.integer(minimum=1, maximum=2**64 - 1)


def build_topology(doc: Document, policy: Policy | None = None) -> Topology:
    """Validate a topology document; with a policy, also check VMs against its IVNs."""
    problems: list[Problem] = []
    root = Cursor.root(doc, problems)
    top = root.mapping(TOP_KEYS, {"name", "underlay", "switches", "links", "hosts"})
    if top is None or not {"name", "underlay", "switches", "links", "hosts"} <= set(top):
        raise ConfigError(problems or [Problem(doc.file, 1, "", "not a topology")])
    # integer() first: `true` and `1.0` equal 1 in Python but are not version 1.
    if "version" in top and top["version"].integer() not in (None, 1):
        top["version"].problem("only version 1 of the topology schema exists")
    name = top["name"].string(pattern=NAME, what=NAME_WHAT) or "?"
    share_default = top["reservable_share"].number(minimum=0, maximum=1) \
        if "reservable_share" in top else 0.8
    share_default = 0.8 if share_default is None else share_default

    underlay = None
    uf = top["underlay"].mapping(UNDERLAY_KEYS, {"hosts", "weave_endpoints", "weave_vteps"})
    if uf is not None and {"hosts", "weave_endpoints", "weave_vteps"} <= set(uf):
        nets = {k: _prefix(uf[k]) for k in ("hosts", "weave_endpoints", "weave_vteps")}
        mtu = uf["mtu"].integer(minimum=1280, maximum=9216) if "mtu" in uf else 9000
        keys = list(nets)
        for i, a in enumerate(keys):
            for b in keys[:i]:
                if nets[a] and nets[b] and nets[a].overlaps(nets[b]):
                    uf[a].problem(f"overlaps underlay.{b} ({nets[b]})")
        if "mtu" in uf and mtu and (short := underlay_mtu_problem(mtu, policy)):
            uf["mtu"].problem(short)
            mtu = None
        if all(nets.values()) and mtu:
            underlay = Underlay(nets["hosts"], nets["weave_endpoints"], nets["weave_vteps"], mtu)
            if underlay.weave_slots < 1:
                uf["weave_endpoints"].problem("pool too small for even one weave (needs a /29)")

    switches: dict[str, Switch] = {}
    # What each certificate name or address names (nwc.certnames), in document order: a
    # topology name first, then an explicit certificate name or an address.
    names: list[_Claim] = []
    explicit: list[_Claim] = []
    for sname, sc in (top["switches"].mapping(what="switches") or {}).items():
        if not NAME.fullmatch(sname):
            sc.problem(f"{sname!r} is not {NAME_WHAT}")
            continue
        sf = sc.mapping(SWITCH_KEYS) or {}
        dpid = _dpid(sf["dpid"]) if "dpid" in sf else derived_dpid("switch", sname)
        switch_cert = sf["cert_name"].string(pattern=CERT_NAME, what=CERT_NAME_WHAT) \
            if "cert_name" in sf else None
        if dpid is not None:
            switches[sname] = Switch(sname, dpid, switch_cert)
            names.append(_Claim(sname, f"switch {sname}", "name", sc))
            if switch_cert:
                explicit.append(_Claim(switch_cert.lower(), f"switch {sname}", "cert_name",
                                       sf["cert_name"]))

    hosts: dict[str, ComputeHost] = {}
    links: list[Link] = []
    host_cursors: dict[str, Cursor] = {}
    for hname, hc in (top["hosts"].mapping(what="compute hosts") or {}).items():
        if not NAME.fullmatch(hname):
            hc.problem(f"{hname!r} is not {NAME_WHAT}")
            continue
        if hname in switches:
            hc.problem(f"{hname!r} names a switch too")
            continue
        hf = hc.mapping(HOST_KEYS, {"switch", "uplink_mbps", "underlay_ip"})
        if hf is None or not {"switch", "uplink_mbps", "underlay_ip"} <= set(hf):
            continue
        host_cursors[hname] = hc
        switch = hf["switch"].string(what="a switch name")
        if switch is not None and switch not in switches:
            hf["switch"].problem(f"unknown switch {switch!r}")
            switch = None
        mbps = hf["uplink_mbps"].number(minimum=0, exclusive_minimum=True,
                                        maximum=MAX_BANDWIDTH_MBPS, unit="Mbit/s")
        share = hf["uplink_share"].number(minimum=0, maximum=1) if "uplink_share" in hf \
            else share_default
        ip = _address(hf["underlay_ip"])
        if ip and underlay and ip not in underlay.hosts:
            hf["underlay_ip"].problem(f"{ip} is outside underlay.hosts ({underlay.hosts})")
        dpid = _dpid(hf["dpid"]) if "dpid" in hf else derived_dpid("host", hname)
        backend = hf["backend"].value if "backend" in hf else "strongswan"
        if backend not in ("strongswan", "ovs-ipsec"):
            hf["backend"].problem(f"backend must be strongswan or ovs-ipsec, got {shown(backend)}")
            backend = None
        mgmt = _address(hf["management_ip"]) if "management_ip" in hf else None
        ovsdb = hf["ovsdb"].string(pattern=re.compile(r"(tcp|ssl|unix):.+"),
                                   what="an OVSDB target (tcp:IP:PORT, ssl:..., unix:PATH)") \
            if "ovsdb" in hf else None
        cert_name = hf["ovsdb_cert_name"].string(pattern=CERT_NAME, what=CERT_NAME_WHAT) \
            if "ovsdb_cert_name" in hf else None
        if None in (switch, mbps, share, ip, dpid, backend):
            continue
        hosts[hname] = ComputeHost(hname, switch, ip, dpid, backend, mgmt, ovsdb, cert_name)
        links.append(Link(hname, switch, mbps, share))
        owner = f"host {hname}"
        names.append(_Claim(hname, owner, "name", hc))
        if cert_name:
            explicit.append(_Claim(cert_name.lower(), owner, "ovsdb_cert_name",
                                   hf["ovsdb_cert_name"]))
        if mgmt is not None:
            explicit.append(_Claim(str(mgmt), owner, "management_ip", hf["management_ip"]))
        # The address NWC reaches its OVSDB at names the host too (CertIdentity.of_host).
        addresses = dict.fromkeys(remote_address(r) for r in (ovsdb or "").split(","))
        explicit += [_Claim(str(a), owner, "OVSDB address", hf["ovsdb"])
                     for a in addresses if a is not None]

    seen_links: dict[tuple[str, str], Cursor] = {link.key: top["hosts"] for link in links}
    for lc in top["links"].items():
        lf = lc.mapping(LINK_KEYS, {"between", "capacity_mbps"})
        if lf is None or not {"between", "capacity_mbps"} <= set(lf):
            continue
        ends = lf["between"].value
        if not (isinstance(ends, list) and len(ends) == 2
                and all(isinstance(e, str) for e in ends)):
            lf["between"].problem("expected two switch names, e.g. [leaf1, spine1]")
            continue
        bad = [e for e in ends if e not in switches]
        if bad:
            lf["between"].problem(f"unknown switch {bad[0]!r}"
                                  + (" (hosts attach with hosts.NAME.switch)" if bad[0] in
                                     host_cursors else ""))
            continue
        if ends[0] == ends[1]:
            lf["between"].problem("a link needs two different switches")
            continue
        key = link_key(*ends)
        if key in seen_links:
            lf["between"].problem(f"a link between {key[0]} and {key[1]} is already defined "
                                  "(parallel links are not modelled; add their capacities)")
            continue
        seen_links[key] = lc
        mbps = lf["capacity_mbps"].number(minimum=0, exclusive_minimum=True,
                                          maximum=MAX_BANDWIDTH_MBPS, unit="Mbit/s")
        share = lf["reservable_share"].number(minimum=0, maximum=1) \
            if "reservable_share" in lf else share_default
        if mbps is not None and share is not None:
            links.append(Link(key[0], key[1], mbps, share))

    for kind, items in (("switch", switches), ("host", hosts)):
        by_dpid: dict[int, str] = {}
        for item in items.values():
            other = by_dpid.setdefault(item.dpid, item.name)
            if other != item.name:
                (top["switches" if kind == "switch" else "hosts"]
                 .child(item.name, None).problem(f"dpid {item.dpid:#x} is also used by {other}"))
    # Duplicates within switches or within hosts are reported above; only a host sharing a
    # switch's dpid is left.
    switch_dpids = {s.dpid: s.name for s in switches.values()}
    for h in hosts.values():
        if h.dpid in switch_dpids:
            top["hosts"].child(h.name, None).problem(
                f"dpid {h.dpid:#x} is also used by switch {switch_dpids[h.dpid]}")
    by_ip: dict[ipaddress.IPv4Address, str] = {}
    for h in hosts.values():
        if by_ip.setdefault(h.underlay_ip, h.name) != h.name:
            host_cursors[h.name].problem(f"underlay_ip {h.underlay_ip} is also used by "
                                         f"{by_ip[h.underlay_ip]}")

    _refuse_shared_identities(names + explicit)

    vms: dict[str, Vm] = {}
    vm_root = top.get("vms")
    macs: dict[str, str] = {}
    for vname, vc in ((vm_root.mapping(what="VMs") or {}) if vm_root else {}).items():
        if not NAME.fullmatch(vname):
            vc.problem(f"{vname!r} is not {NAME_WHAT}")
            continue
        vf = vc.mapping(VM_KEYS, {"host", "ivn", "ip"})
        if vf is None or not {"host", "ivn", "ip"} <= set(vf):
            continue
        host = vf["host"].string(what="a compute host name")
        if host is not None and host not in hosts and host not in host_cursors:
            vf["host"].problem(f"unknown compute host {host!r}")
            host = None
        ivn = vf["ivn"].string(what="an IVN name")
        ip = _address(vf["ip"])
        if policy is not None and ivn is not None:
            if ivn not in policy.ivns:
                vf["ivn"].problem(f"unknown IVN {ivn!r}")
                ivn = None
            elif ip is not None and (misfit := _address_misfit(ip, policy.ivns[ivn])):
                vf["ip"].problem(misfit)
        mac = vf["mac"].string(pattern=MAC, what="a lowercase MAC like 02:00:00:00:00:01") \
            if "mac" in vf else derived_mac(vname)
        if mac and int(mac[:2], 16) & 1:
            vf["mac"].problem(f"{mac} is a multicast MAC")
            mac = None
        port = vf["port"].string(pattern=PORT_NAME, what="an interface name of at most 15 "
                                 "characters") if "port" in vf else vname
        if "port" not in vf and not PORT_NAME.fullmatch(vname):
            # The port defaults to the VM's name, and an interface name stops at 15 characters.
            vc.problem(f"VM name {vname!r} is longer than an interface name (15 characters) "
                       "and there is no `port:` to name the VM's port")
            port = None
        if mac and macs.setdefault(mac, vname) != vname:
            vc.problem(f"MAC {mac} is also used by VM {macs[mac]}")
            mac = None
        if None in (host, ivn, ip, mac, port):
            continue
        vms[vname] = Vm(vname, host, ivn, ip, mac, port)
    seen_ip: dict[tuple[str, ipaddress.IPv4Address], str] = {}
    seen_port: dict[tuple[str, str], str] = {}
    for vm in vms.values():
        other = seen_ip.setdefault((vm.ivn, vm.ip), vm.name)
        if other != vm.name:
            vm_root.child(vm.name, None).problem(f"{vm.ip} is also used by VM {other} in "
                                                 f"IVN {vm.ivn}")
        other = seen_port.setdefault((vm.host, vm.port), vm.name)
        if other != vm.name:
            vm_root.child(vm.name, None).problem(f"port {vm.port} on {vm.host} is also VM "
                                                 f"{other}'s")

    if problems or underlay is None:
        raise ConfigError(problems)
    topo = Topology(name, underlay, switches, tuple(links), hosts, vms, doc.file)
    g = topo.graph()
    if switches and not nx.is_connected(g.subgraph(switches)):
        top["links"].problem("the fabric switches do not form one connected network")
        raise ConfigError(problems)
    return topo
