"""The provider lab: a whole topology emulated on one machine, with NWC controlling it.

- The controller is a real `nwc run` process (OpenFlow, tunnel part, REST API) with its own
  state directory; the lab talks to it only through its REST API, as tenants do.
- Every compute host is a network namespace with a private OVS (`br-int` for tenants, `br-ul`
  for its underlay address), a private charon and a `nwc agent`; its OVSDB listens on the
  management network, where NWC reaches it (`hosts.NAME.ovsdb` in the lab's copy of the
  topology), and its bridges reach NWC's OpenFlow listener there too.
- The fabric switches are bridges of a private OVS in one namespace, wired as the topology
  says, every link shaped to its capacity (tbf at both ends).
- VMs are Mininet hosts, linked into their compute host's `br-int` on the port the topology
  names, configured as a tenant would configure them (address, default route via the IVN
  gateway) and never touched again: NWC changes nothing in a VM.

Everything is created under one unique prefix and removed by `stop()`, by name and pid. No
Mininet global cleanup is ever run.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nwc.client import ApiClient, ClientError
from nwc.config import SHIPPED_POLICIES, topology_path
from nwc.lab.host import UNDERLAY_BRIDGE, EmulatedFabric, EmulatedHost, ManagementNet
from nwc.lab.labpki import VALIDITY, LabCa
from nwc.lab.netns import Lab, Netns, free_port, kill_pid, run, wait_for
from nwc.lab.strongswan import PrivateCharon, start_agent
from nwc.pipeline import INTEGRATION_BRIDGE, KIND_WEAVE, cookie_owner
from nwc.policy import Policy, load_policy
from nwc.topology import Topology, load_topology

OVSDB_PORT = 6640


def _mininet_node_class() -> type:
    """Mininet imports are deferred: the unit tier must not need Mininet's tools."""
    from mininet.node import Node

    class NetnsNode(Node):  # type: ignore[misc]
        """A Mininet node for a namespace the lab made (a compute host): Mininet links VMs
        into it by its shell's pid, and the Mininet CLI runs commands there."""

        def __init__(self, name: str, netns: str = "", env: dict[str, str] | None = None,
                     **params: Any) -> None:
            self.netns = netns
            self.env = env or {}
            super().__init__(name, inNamespace=False, **params)

        def _popen(self, cmd: list[str], **params: Any) -> subprocess.Popen[Any]:
            exports = [f"{k}={v}" for k, v in self.env.items()]
            return super()._popen(["ip", "netns", "exec", self.netns, "env", *exports, *cmd],
                                  **params)

    return NetnsNode


@dataclass
class LabHost:
    """One emulated compute host: the OpenFlow side (EmulatedHost) plus its IKE daemon and
    tunnel agent."""

    emulated: EmulatedHost
    charon: PrivateCharon
    management_ip: str
    agent: subprocess.Popen[bytes] | None = None

    @property
    def ns(self) -> Netns:
        return self.emulated.ns

    def start_agent(self, lab: Lab) -> None:
        name = self.emulated.name
        self.agent = start_agent(lab, self.ns, self.emulated.ovs, self.charon, name,
                                 backend=self.emulated.topology.hosts[name].backend,
                                 underlay_dev=UNDERLAY_BRIDGE)


@dataclass
class ProviderLab:
    topology: str | Path = "small"
    policy_paths: list[Path] = field(default_factory=lambda: [SHIPPED_POLICIES])
    provision_timeout_s: float = 30.0
    api_port: int | None = None  # the REST API's on 127.0.0.1; None: a free one
    lab: Lab = field(default_factory=Lab)
    policy: Policy = field(init=False)
    topo: Topology = field(init=False)
    mgmt: ManagementNet = field(init=False)
    hosts: dict[str, LabHost] = field(default_factory=dict, init=False)
    fabric: EmulatedFabric = field(init=False)
    net: Any = field(default=None, init=False)  # the Mininet network of VMs
    state_dir: Path = field(init=False)
    api_url: str = field(init=False)
    controller: subprocess.Popen[bytes] | None = field(default=None, init=False)
    openflow_ca: LabCa = field(init=False)
    ovsdb_ca: LabCa = field(init=False)
    _tokens: dict[str, str] = field(default_factory=dict, init=False)

    # -- life ------------------------------------------------------------------------------

    def start(self, progress: Any = None) -> ProviderLab:
        say = progress or (lambda _msg: None)
        try:
            self._start(say)
        except BaseException:
            self.stop()
            raise
        return self

    def load(self) -> ProviderLab:
        """Read the policy and the topology (what the lab will be), building nothing."""
        self.policy = load_policy(self.policy_paths)
        self.topo = load_topology(topology_path(self.topology), self.policy)
        return self

    def _start(self, say: Any) -> None:
        path = topology_path(self.topology)
        self.load()
        self.logs = self.lab.directory("logs")
        self.state_dir = self.lab.directory("nwc-state")
        self.mgmt = ManagementNet(self.lab)
        ofp_port = free_port()
        # The management plane is TLS, as production's should be: switches present
        # certificates from one lab CA, host OVSDB servers from another (NWC's weave CA is a
        # third, for IKE), and NWC presents its own to each.
        pki = self.lab.directory("pki")
        self.openflow_ca = LabCa(pki / "openflow", "nwc-lab-openflow-ca")
        self.ovsdb_ca = LabCa(pki / "ovsdb", "nwc-lab-ovsdb-ca")
        target = f"ssl:{self.mgmt.controller_ip}:{ofp_port}"
        say(f"compute hosts: {', '.join(sorted(self.topo.hosts))} (private OVS, charon, agent; "
            "OpenFlow and OVSDB over TLS)")
        for name in sorted(self.topo.hosts):
            emulated = EmulatedHost(
                self.lab, self.topo, self.policy, name, target, self.mgmt,
                # NWC accepts a host's switch and its OVSDB server only with a certificate
                # naming that host (nwc.certnames): here the CN is the host's name, as
                # ovs-pki's would be.
                switch_tls=self.openflow_ca.issue(name),
                ovsdb_tls=self.ovsdb_ca.issue(name))
            emulated.build()
            emulated.ns.no_ipv6()
            mgmt_ip = str(emulated.management_ip)
            emulated.ovs.vsctl("set-manager", f"pssl:{OVSDB_PORT}:{mgmt_ip}")
            charon = PrivateCharon(self.lab, emulated.ns, name).start()
            self.hosts[name] = LabHost(emulated, charon, mgmt_ip)
        say(f"fabric: {len(self.topo.switches)} switches, "
            f"{sum(1 for link in self.topo.links if link.a in self.topo.switches)} links "
            "shaped to their capacity")
        self.fabric = EmulatedFabric(self.lab, self.topo, target, self.mgmt,
                                     switch_tls=self.openflow_ca.issue("fabric"))
        self.fabric.build({n: h.emulated for n, h in self.hosts.items()})
        self.fabric.ns.no_ipv6()  # so a capture on a fabric link shows only weaves
        self._shape_links()
        for host in self.hosts.values():
            host.start_agent(self.lab)
        say(f"VMs: {', '.join(sorted(self.topo.vms))} (Mininet hosts)")
        self._build_vms()
        say("NWC controller: nwc run")
        self._start_controller(path, ofp_port)
        self._wait_connected()

    def stop(self, keep_state: Path | None = None) -> list[str]:
        """Tear everything down; what was removed (`Lab.close`). `remains()` then tells
        whether anything survived. `keep_state`: a copy of the controller's state directory
        (database, audit log, its keys too: made 0700) and the logs go there first, once
        the controller has stopped writing."""
        if self.net is not None:
            for node in self.net.hosts:  # Mininet's shells: `remains` checks they are gone
                if node.pid:
                    self.lab.watch_pid(node.pid, f"Mininet shell of {node.name}")
            # Mininet's own teardown; if it stumbles, the Lab still removes everything.
            with contextlib.suppress(Exception):
                self.net.stop()
            self.net = None
        if self.controller is not None and self.controller.poll() is None:
            kill_pid(self.controller.pid, timeout=10)
        not_kept = None
        if keep_state is not None and hasattr(self, "state_dir"):
            try:
                self._keep_state(keep_state)
            except OSError as exc:  # the lab still goes
                not_kept = exc
        removed = self.lab.close()
        if not_kept is not None:
            raise RuntimeError(f"could not keep the state in {keep_state}: {not_kept}")
        return removed

    def _keep_state(self, keep: Path) -> None:
        import shutil

        keep.mkdir(mode=0o700, parents=True, exist_ok=True)
        keep.chmod(0o700)  # before the copy too: pki/ca.key must never sit in an open dir
        shutil.copytree(self.state_dir, keep, dirs_exist_ok=True)  # file modes kept
        # copytree gives `keep` the state directory's own mode (0755 would expose the
        # keys' names and any file not 0600): make it private again.
        keep.chmod(0o700)
        if self.logs.exists():
            shutil.copytree(self.logs, keep / "logs", dirs_exist_ok=True)

    def remains(self) -> list[str]:
        """What of the lab is still there after `stop()` (`Lab.remains`); empty if nothing."""
        return self.lab.remains()

    def __enter__(self) -> ProviderLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- building --------------------------------------------------------------------------

    def _shape_links(self) -> None:
        """Both ends of every fabric link get a token bucket at the link's capacity, so a
        link carries what the topology says and no more."""
        for link in self.topo.links:
            for switch, neighbour in ((link.a, link.b), (link.b, link.a)):
                if switch not in self.topo.switches:
                    continue
                dev = EmulatedFabric.port_name(switch, neighbour)
                rate = int(link.capacity_mbps * 1000)
                burst = max(16_000, rate * 1000 // 8 // 250)  # 4 ms of traffic, >= 16 kB
                self.fabric.ns.run("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                                   f"{rate}kbit", "burst", str(burst), "latency", "50ms")

    def _build_vms(self) -> None:
        from mininet.net import Mininet
        from mininet.node import Host

        node_class = _mininet_node_class()
        net = Mininet(build=False, controller=None, autoSetMacs=False, waitConnected=False)
        self.net = net
        compute = {}
        for name, host in self.hosts.items():
            env = host.emulated.ovs.env
            compute[name] = net.addHost(name, cls=node_class, netns=host.ns.name, env=env,
                                        ip=None)
        for vm in sorted(self.topo.vms.values(), key=lambda v: v.name):
            ivn = self.policy.ivns[vm.ivn]
            prefixlen = next(n.prefixlen for n in ivn.cidrs if vm.ip in n)
            node = net.addHost(vm.name, cls=Host, ip=f"{vm.ip}/{prefixlen}", mac=vm.mac,
                               defaultRoute=f"via {ivn.gateway}")
            net.addLink(node, compute[vm.host], intfName1=f"{vm.name[:10]}-eth0",
                        intfName2=vm.port)
        net.build()
        for vm in self.topo.vms.values():
            node = net.get(vm.name)
            node.cmd("sysctl -q -w net.ipv6.conf.all.disable_ipv6=1")
            node.cmd(f"ethtool -K {node.defaultIntf()} tx off rx off")
            host = self.hosts[vm.host]
            host.ns.no_offload(vm.port)
            host.emulated.ovs.add_port(INTEGRATION_BRIDGE, vm.port)

    def _start_controller(self, path: Path, ofp_port: int) -> None:
        doc = yaml.safe_load(path.read_text())
        for name, host in self.hosts.items():
            doc["hosts"][name]["ovsdb"] = f"ssl:{host.management_ip}:{OVSDB_PORT}"
            # NWC accepts this host's switch only from its management address.
            doc["hosts"][name]["management_ip"] = host.management_ip
        # One OVS holds every fabric bridge, with one certificate ("fabric", issued above):
        # each fabric switch is accepted under that name (switches.NAME.cert_name).
        for name in doc["switches"]:
            doc["switches"][name] = {**(doc["switches"][name] or {}), "cert_name": "fabric"}
        lab_topology = self.lab.directory("config") / f"{self.topo.name}.yaml"
        lab_topology.write_text(yaml.safe_dump(doc, sort_keys=False))
        api_port = self.api_port or free_port()
        self.api_url = f"http://127.0.0.1:{api_port}"
        args = [sys.executable, "-m", "nwc", "run", "--state-dir", str(self.state_dir),
                "--topology", str(lab_topology),
                "--ofp-listen-host", str(self.mgmt.controller_ip),
                "--ofp-tcp-listen-port", str(ofp_port),
                "--ofp-allowed-peers", str(self.mgmt.subnet),
                *self.openflow_ca.issue("nwc-openflow").options(
                    ("--ctl-privkey", "--ctl-cert", "--ca-certs")),
                *self.ovsdb_ca.issue("nwc-ovsdb-client").options(
                    ("--ovsdb-ssl-key", "--ovsdb-ssl-cert", "--ovsdb-ssl-ca")),
                "--api-host", "127.0.0.1", "--api-port", str(api_port),
                "--provision-timeout", str(self.provision_timeout_s),
                # The lab's certificates live two days (labpki.VALIDITY): with the production
                # threshold every one of them would warn at each start.
                "--cert-warn-days", str(max(0, VALIDITY.days - 1))]
        for p in self.policy_paths:
            args += ["--policy", str(p)]
        log = open(self.logs / "nwc-run.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            self.controller = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)
        finally:
            log.close()
        self.lab.process(self.controller, "nwc run")
        wait_for(self._api_up, 30, "the NWC REST API")

    def _api_up(self) -> bool:
        if self.controller is not None and self.controller.poll() is not None:
            raise RuntimeError(f"nwc run exited ({self.controller.returncode}); see "
                               f"{self.logs / 'nwc-run.log'}")
        try:
            ApiClient(self.api_url, None, timeout_s=2).call("GET", "/v1/health")
        except Exception:
            return False
        return True

    def _wait_connected(self, timeout: float = 30) -> None:
        # One query per OVS instance (the fabric's holds every fabric switch).
        expected = [(h.emulated.ovs, 1) for h in self.hosts.values()]
        expected.append((self.fabric.ovs, len(self.topo.switches)))

        def all_connected() -> bool:
            for ovs, bridges in expected:
                states = ovs.vsctl("--bare", "--columns=is_connected", "list",
                                   "controller").split()
                if len(states) != bridges or set(states) != {"true"}:
                    return False
            return True
        wait_for(all_connected, timeout, "every switch to connect to NWC", interval=0.2)

    # -- using it --------------------------------------------------------------------------

    def token(self, principal: str) -> str:
        """A bearer token for a tenant (or `admin`), issued as an operator would."""
        if principal not in self._tokens:
            out = run([sys.executable, "-m", "nwc", "token", "issue", principal,
                       "--state-dir", str(self.state_dir)])
            self._tokens[principal] = out.stdout.strip()
        return self._tokens[principal]

    def client(self, principal: str) -> ApiClient:
        return ApiClient(self.api_url, self.token(principal), timeout_s=60)

    def weave(self, tenant: str, requester: str, target: str, *, duration_s: int = 600,
              bandwidth_mbps: float = 10, profile: str | None = None,
              wait: bool = True) -> dict[str, Any]:
        """Ask for a weave as `tenant`; a refusal raises ClientError (status and body)."""
        body: dict[str, Any] = {"requester": requester, "target": target,
                                "duration_s": duration_s, "bandwidth_mbps": bandwidth_mbps}
        if profile:
            body["security_profile"] = profile
        path = "/v1/weaves?wait=true" if wait else "/v1/weaves"
        return self.client(tenant).call("POST", path, body)

    def vm(self, name: str) -> Any:
        return self.net.get(name)

    def vm_popen(self, vm: str, args: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """A background process in a VM's network namespace. Mininet's own popen attaches
        to the VM's mount namespace as well, which escapes a chroot (such as a CI sandbox)
        to the real root; entering only the network namespace does not."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(["nsenter", f"--net=/proc/{self.vm(vm).pid}/ns/net", *args],
                                start_new_session=True, **kw)
        return self.lab.process(proc, f"{args[0]} in {vm}", timeout=2)

    def ping(self, src: str, dst_ip: str, count: int = 1, wait_s: float = 1) -> bool:
        out = self.vm(src).cmd(f"ping -n -c {count} -W {wait_s} {dst_ip} >/dev/null; echo $?")
        return out.strip().splitlines()[-1] == "0"

    def iperf(self, client: str, server: str, *args: str, seconds: int = 6) -> dict[str, Any]:
        """iperf3 from VM `client` to VM `server` (port 5201); its JSON summary."""
        srv = self.vm_popen(server, ["iperf3", "-s", "-1", "-p", "5201"])
        try:
            time.sleep(0.5)
            out = self.vm(client).cmd(f"iperf3 -c {self.ip_of(server)} -p 5201 -t {seconds} "
                                      "-J " + " ".join(args))
            srv.wait(seconds + 15)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait(5)
        return json.loads(out)

    def ip_of(self, vm: str) -> str:
        return str(self.topo.vms[vm].ip)

    def fabric_port_bytes(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(received, transmitted) bytes of every fabric switch port, by (switch, neighbour)."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for switch in self.topo.switches:
            by_port = {p: n for n, p in self.topo.ports(switch).items()}
            port, rx = None, 0
            for line in self.fabric.ovs.ofctl("dump-ports", switch).splitlines():
                line = line.strip()
                if line.startswith("port"):
                    head = line.split(":", 1)[0].split()[-1]
                    port = int(head) if head.isdigit() else None
                if line.startswith("port") or line.startswith("rx"):
                    rx = int(line.split("bytes=")[1].split(",")[0]) if "bytes=" in line else rx
                if line.startswith("tx") and port in by_port:
                    out[(switch, by_port[port])] = (rx, int(line.split("bytes=")[1].split(",")[0]))
        return out

    def link_bytes(self, before: dict[tuple[str, str], tuple[int, int]],
                   after: dict[tuple[str, str], tuple[int, int]]) -> dict[tuple[str, str], int]:
        """Bytes that crossed each link (either way) between two `fabric_port_bytes`
        readings: the most any switch-side end of it received or sent."""
        moved: dict[tuple[str, str], int] = {}
        for (switch, neighbour), (rx, tx) in after.items():
            rx0, tx0 = before.get((switch, neighbour), (0, 0))
            key = (switch, neighbour) if switch <= neighbour else (neighbour, switch)
            moved[key] = max(moved.get(key, 0), rx - rx0, tx - tx0)
        return moved

    def set_link(self, a: str, b: str, up: bool) -> None:
        self.fabric.set_link(a, b, up)

    def wait_state(self, tenant: str, weave_id: str, states: set[str],
                   timeout: float = 30) -> dict[str, Any]:
        client = self.client(tenant)
        deadline = time.monotonic() + timeout
        while True:
            weave = client.call("GET", f"/v1/weaves/{weave_id}")
            if weave["state"] in states or time.monotonic() > deadline:
                return weave
            time.sleep(0.25)  # 4 requests/s: inside the API's per-tenant rate limit (5/s)

    def leftovers(self) -> dict[str, list[str]]:
        """Everything a weave could hold, on every switch and host and in the controller:
        weave flows and meters, leg ports and devices, SAs and shared keys, tunnel records
        in the hosts' OVSDBs, fabric reservations. Empty lists when no weave is live."""
        from nwc.ike import IkeDaemon, IkeNoAnswer, IkeUnavailable

        out: dict[str, list[str]] = {}

        def weave_flows(ovs: Any, bridge: str) -> list[str]:
            flows = []
            for line in ovs.ofctl("dump-flows", bridge).splitlines():
                if "cookie=" not in line:
                    continue
                cookie = int(line.split("cookie=")[1].split(",")[0], 16)
                if cookie_owner(cookie)[0] == KIND_WEAVE:
                    flows.append(line.strip())
            return flows

        for name, host in sorted(self.hosts.items()):
            ovs = host.emulated.ovs
            meters = [line.strip() for line in ovs.ofctl("dump-meters",
                                                         INTEGRATION_BRIDGE).splitlines()
                      if line.strip().startswith("meter=")]
            ike = IkeDaemon(host.charon.vici_socket)
            try:
                sas = sorted(ike.sas()) + sorted(ike.shared_ids())
            except (IkeUnavailable, IkeNoAnswer) as exc:
                sas = [f"charon unreachable: {exc}"]
            ids = ovs.vsctl("get", "open_vswitch", ".", "external_ids")
            out[name] = (
                [f"flow {f}" for f in weave_flows(ovs, INTEGRATION_BRIDGE)]
                + [f"meter {m}" for m in meters]
                + [f"port {p}" for p in ovs.vsctl("list-ports", INTEGRATION_BRIDGE).split()
                   if p.startswith("nwv")]
                + [f"link {line.split(':')[1].strip()}"
                   for line in host.ns.ip("-o", "link").stdout.splitlines()
                   if line.split(":")[1].strip().startswith("nwv")]
                + [f"ike {sa}" for sa in sas]
                + [f"ovsdb {k}" for k in ids.strip("{}").split(", ")
                   if k.startswith("nwc-tunnel") or k.startswith("nwc-status")])
        for switch in sorted(self.topo.switches):
            out[switch] = [f"flow {f}" for f in weave_flows(self.fabric.ovs, switch)]
        fabric = self.client("admin").call("GET", "/v1/fabric")
        out["reservations"] = [f"{link['a']}-{link['b']} {link['reserved_mbps']}"
                               for link in fabric["links"] if link["reserved_mbps"]]
        return {k: v for k, v in out.items() if v}

    def vm_capture(self, vm: str, name: str) -> VmCapture:
        return VmCapture(self, vm, self.lab.directory("captures") / f"{name}.pcap").start()


@dataclass
class VmCapture:
    """tcpdump on a VM's interface (a Mininet host is not a named namespace)."""

    lab: ProviderLab
    vm: str
    path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> VmCapture:
        node = self.lab.vm(self.vm)
        self.proc = self.lab.vm_popen(self.vm, ["tcpdump", "-n", "-U", "--immediate-mode",
                                                "-s", "0", "-i",
                                                str(node.defaultIntf()), "-w", str(self.path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.path.exists() and self.path.stat().st_size > 0, 10,
                 f"tcpdump on {self.vm}")
        return self

    def stop(self) -> list[bytes]:
        from nwc.lab.capture import read_pcap

        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                kill_pid(self.proc.pid)
            self.proc = None
        return read_pcap(self.path)


__all__ = ["ClientError", "LabHost", "ProviderLab", "free_port"]
