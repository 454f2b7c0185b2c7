"""A private strongSwan charon per emulated compute host.

Each instance has its own strongswan.conf (STRONGSWAN_CONF), its VICI socket and log in the
lab directory, and runs in the host's network namespace and in a mount namespace of its own
with a private tmpfs on /run: charon's pid file path is compiled in (/var/run/charon.pid), so
two instances (or the system's) would otherwise collide. The kernel here has no ESP, so IPsec
is done in userspace by kernel-libipsec (TUN device ipsec0, tunnel mode only); strongSwan 5.9.8
needs the kdf plugin for IKEv2. Started and stopped by pid only.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nwc.lab.netns import Lab, Netns, kill_pid, wait_for
from nwc.lab.ovs import PrivateOvs

CHARON = Path("/usr/lib/ipsec/charon")

# Exactly the plugins NWC's tunnels need: crypto for the proposals a profile may name
# (policy.py), X.509 for x509 profiles, kdf (5.9.8 fails IKE without it), the userspace ESP
# backend plus netlink for routes and addresses, sockets, and VICI for the agent.
PLUGINS = ("random nonce openssl aes sha2 hmac gcm ccm ctr chapoly curve25519 x509 pem pkcs1 "
           "pkcs8 pubkey constraints revocation kdf kernel-libipsec kernel-netlink "
           "socket-default vici")


def charon_conf(directory: Path) -> str:
    """strongswan.conf for one lab host. Log level 1 never prints key material (that needs
    level 4 and above)."""
    return f"""\
charon {{
  load_modular = no
  load = {PLUGINS}
  install_routes = yes
  # A leg whose key changes under a live SA is reauthenticated (nwc.agent): new SA first,
  # then the old one goes, so its traffic never waits.
  make_before_break = yes
  # Lab links are lossless: fail an unreachable peer in seconds, not minutes.
  retransmit_tries = 3
  retransmit_timeout = 1.0
  retransmit_base = 1.4
  filelog {{
    lab {{
      path = {directory}/charon.log
      time_format = %H:%M:%S
      default = 1
      ike = 1
      knl = 1
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{directory}/charon.vici
    }}
    kernel-libipsec {{
      load = yes
    }}
  }}
}}
"""


@dataclass
class PrivateCharon:
    lab: Lab
    ns: Netns
    name: str
    directory: Path = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.directory = self.lab.directory(f"charon-{self.name}")
        (self.directory / "strongswan.conf").write_text(charon_conf(self.directory))

    @property
    def vici_socket(self) -> Path:
        return self.directory / "charon.vici"

    @property
    def log_path(self) -> Path:
        return self.directory / "charon.log"

    @property
    def pid(self) -> int | None:
        """charon's own pid while it runs (to pause it: a peer that does not answer)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None \
            else None

    def start(self, timeout: float = 10.0) -> PrivateCharon:
        if self._proc is not None and self._proc.poll() is None:
            return self
        self.vici_socket.unlink(missing_ok=True)
        # `ip netns exec` then `unshare` then `sh` each exec the next, so the pid we hold
        # ends up being charon's own.
        proc = self.ns.popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             f"mount -t tmpfs nwc-charon-run /run && exec {CHARON}"],
            env={"STRONGSWAN_CONF": str(self.directory / "strongswan.conf")},
            log=self.directory / "charon.stdout")
        self.lab.process(proc, f"charon of {self.name}")
        self._proc = proc
        try:
            wait_for(lambda: self.vici_socket.exists() or proc.poll() is not None, timeout,
                     f"charon of {self.name}")
        except TimeoutError:
            self.stop()
            raise
        if proc.poll() is not None:
            said = (self.directory / "charon.stdout").read_text(errors="replace")
            tail = "\n".join(said.strip().splitlines()[-8:])
            raise RuntimeError(f"charon of {self.name} exited ({proc.returncode}); it said:\n"
                               f"{tail}")
        return self

    def stop(self) -> None:
        """Stop by pid (SIGTERM, then SIGKILL): charon removes its SAs and ipsec0 goes."""
        if self._proc is not None:
            kill_pid(self._proc.pid)
            self._proc = None
        self.vici_socket.unlink(missing_ok=True)

    def crash(self) -> None:
        """SIGKILL, as a crash would: charon cleans nothing up (its VICI socket file stays;
        its TUN device, and the routes into it, go with the process)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None


def start_agent(lab: Lab, ns: Netns, ovs: PrivateOvs, charon: PrivateCharon, name: str, *,
                backend: str, underlay_dev: str, interval: float | None = None
                ) -> subprocess.Popen[bytes]:
    """`nwc agent` for one emulated host: its OVSDB over the local socket, its charon over
    VICI, its log under the lab's logs; stopped (by pid) when the lab closes."""
    args = [sys.executable, "-m", "nwc", "agent", "--ovsdb", ovs.db_target,
            "--vici", str(charon.vici_socket), "--underlay-dev", underlay_dev,
            "--backend", backend, "--state-dir", str(lab.directory(f"agent-{name}")),
            "--ovsdb-server-ctl", str(ovs.rundir / "ovsdb-server.ctl")]
    if interval is not None:
        args += ["--interval", str(interval)]
    proc = ns.popen(args, log=lab.directory("logs") / f"agent-{name}.log")
    return lab.process(proc, f"agent of {name}")
