"""A private Open vSwitch (ovsdb-server + ovs-vswitchd) inside one network namespace.

Each emulated host gets its own database, run directory, log and sockets (OVS_RUNDIR and
friends), so two hosts' bridges of the same name never collide and the system OVS, if any, is
never touched. Bridges use the userspace datapath (`datapath_type=netdev`): these kernels have
no openvswitch module.
"""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from nwc.lab.labpki import TlsFilePaths
from nwc.lab.netns import Lab, Netns, kill_pid, wait_for

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")


@dataclass
class PrivateOvs:
    lab: Lab
    ns: Netns
    name: str  # short; names the run directory
    ovsdb_tcp: str | None = None  # e.g. "198.51.100.11:6640": also listen there (management)
    rundir: Path = field(init=False)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.rundir = self.lab.directory(f"ovs-{self.name}")

    @property
    def env(self) -> dict[str, str]:
        d = str(self.rundir)
        return {"OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d, "OVS_SYSCONFDIR": d,
                "OVS_PKGDATADIR": "/usr/share/openvswitch"}

    @property
    def db_sock(self) -> Path:
        return self.rundir / "db.sock"

    @property
    def db_target(self) -> str:
        """The OVSDB connection string for ovsdbapp / ovs-vsctl --db."""
        return f"unix:{self.db_sock}"

    def mgmt_target(self, bridge: str) -> str:
        """What ovs-ofctl takes to talk to a bridge of this instance."""
        return f"unix:{self.rundir / bridge}.mgmt"

    def start(self, *, switchd: bool = True, tls: TlsFilePaths | None = None,
              ovsdb_tls: TlsFilePaths | None = None) -> PrivateOvs:
        """ovsdb-server, then ovs-vswitchd (unless `switchd` is False: a bare database, for
        tests of what is written into it). `tls`: ovs-vswitchd's key, certificate and CA, for
        `ssl:` controller targets; `ovsdb_tls` the same for ovsdb-server, for `pssl:`
        managers."""
        db = self.rundir / "conf.db"
        self.ns.run("ovsdb-tool", "create", str(db), str(SCHEMA), env=self.env)
        # The tunnel backends keep pre-shared keys in here. OVS writes it 0640, and again at
        # every compaction (the agent compacts after each leg removal), so a chmod would not
        # last: the run directory, 0700 and ours (Lab.directory checks one it finds), is what
        # keeps it private.
        remotes = [f"--remote=punix:{self.db_sock}", "--remote=db:Open_vSwitch,Open_vSwitch,"
                   "manager_options"]
        if self.ovsdb_tcp:
            remotes.append(f"--remote=ptcp:{self.ovsdb_tcp.rsplit(':', 1)[1]}:"
                           f"{self.ovsdb_tcp.rsplit(':', 1)[0]}")
        if ovsdb_tls:
            remotes += ovsdb_tls.options()
        server = self.ns.popen(
            ["ovsdb-server", str(db), *remotes, f"--unixctl={self.rundir}/ovsdb-server.ctl",
             f"--pidfile={self.rundir}/ovsdb-server.pid",
             f"--log-file={self.rundir}/ovsdb-server.log"], env=self.env)
        self._track(server, "ovsdb-server")
        wait_for(self.db_sock.exists, 10, f"ovsdb-server of {self.name}")
        self.vsctl("--no-wait", "init")
        if not switchd:
            return self
        ssl_options = tls.options() if tls else []
        vswitchd = self.ns.popen(
            ["ovs-vswitchd", self.db_target, f"--unixctl={self.rundir}/ovs-vswitchd.ctl",
             f"--pidfile={self.rundir}/ovs-vswitchd.pid",
             f"--log-file={self.rundir}/ovs-vswitchd.log", *ssl_options], env=self.env)
        self._track(vswitchd, "ovs-vswitchd")
        wait_for(lambda: (self.rundir / "ovs-vswitchd.ctl").exists(), 10,
                 f"ovs-vswitchd of {self.name}")
        return self

    def _track(self, proc: subprocess.Popen[bytes], what: str) -> None:
        self._procs.append(proc)
        self.lab.process(proc, f"{what} of {self.name}")

    def stop(self) -> None:
        for proc in reversed(self._procs):
            kill_pid(proc.pid)
        self._procs.clear()

    def vsctl(self, *args: str, timeout: float = 10) -> str:
        return self.ns.run("ovs-vsctl", f"--db={self.db_target}", f"--timeout={int(timeout)}",
                           *args, env=self.env, timeout=timeout + 5).stdout.strip()

    def ofctl(self, command: str, bridge: str, *args: str, check: bool = True) -> str:
        return self.ns.run("ovs-ofctl", "-O", "OpenFlow13", command, self.mgmt_target(bridge),
                           *args, env=self.env, check=check).stdout

    def appctl(self, *args: str, target: str = "ovs-vswitchd") -> str:
        return self.ns.run("ovs-appctl", "-t", f"{self.rundir}/{target}.ctl", *args,
                           env=self.env).stdout

    def add_bridge(self, bridge: str, *, dpid: int | None = None,
                   controller: str | None = None, fail_mode: str = "secure") -> None:
        """A userspace-datapath bridge speaking only OpenFlow 1.3, secure by default: with
        no controller it forwards nothing rather than learning MACs across tenants. Its
        controller is out-of-band: in-band (OVS's default) adds hidden NORMAL flows for the
        controller's address above every OpenFlow flow, which carry traffic between tenants
        (nwc.bridgeguard)."""
        args = ["--may-exist", "add-br", bridge, "--", "set", "bridge", bridge,
                "datapath_type=netdev", "protocols=OpenFlow13", f"fail_mode={fail_mode}"]
        if dpid is not None:
            args.append(f"other_config:datapath-id={dpid:016x}")
        self.vsctl(*args)
        if controller:
            # One transaction: a moment in-band is enough for OVS to add its flows.
            self.vsctl("set-controller", bridge, controller, "--", "set", "controller", bridge,
                       "connection_mode=out-of-band")

    def add_port(self, bridge: str, port: str, ofport: int | None = None,
                 **interface: str) -> None:
        args = ["--may-exist", "add-port", bridge, port]
        if ofport is not None or interface:
            args += ["--", "set", "interface", port]
            if ofport is not None:
                args.append(f"ofport_request={ofport}")
            args += [f"{k}={v}" for k, v in interface.items()]
        self.vsctl(*args)

    def ofport(self, port: str) -> int:
        with contextlib.suppress(ValueError):
            return int(self.vsctl("get", "interface", port, "ofport"))
        return -1
