"""OpenFlow over TLS: `nwc run --ctl-privkey/--ctl-cert/--ca-certs` programs a real private
ovs-vswitchd that connects with an `ssl:` target and its own certificate, and refuses peers
that speak plain TCP, hold a certificate from another CA, or hold one from the right CA that
names another switch than the one whose datapath id they announce."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nwc.config import load_config
from nwc.lab.host import ManagementNet
from nwc.lab.labpki import LabCa, TlsFilePaths
from nwc.lab.netns import Lab, free_port, unique_prefix, wait_for
from nwc.lab.ovs import PrivateOvs

pytestmark = pytest.mark.functional

OF13_HELLO = bytes([4, 0, 0, 8, 0, 0, 0, 1])


def _first_bytes(sock: socket.socket) -> bytes:
    sock.settimeout(12)  # longer than the server's handshake timeout
    try:
        return sock.recv(64)
    except (OSError, ssl.SSLError):
        return b""


def _start_nwc(lab: Lab, tmp_path: Path, host: str, port: int, ctl: TlsFilePaths) -> Path:
    """`nwc run` with OpenFlow over TLS on host:port (the shipped small topology); its log."""
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nwc", "run", "--state-dir", str(tmp_path / "state"),
             "--api-host", "127.0.0.1", "--api-port", str(free_port("127.0.0.1")),
             "--ofp-listen-host", host, "--ofp-tcp-listen-port", str(port),
             *ctl.options(("--ctl-privkey", "--ctl-cert", "--ca-certs"))],
            stdout=log, stderr=subprocess.STDOUT)
    lab.process(proc, "nwc run")
    wait_for(lambda: "OpenFlow 1.3 listening" in log_path.read_text(), 60, "nwc run to listen")
    return log_path


def _switch(lab: Lab, mgmt: ManagementNet, name: str, tls: TlsFilePaths, dpid: int,
            target: str, bridge: str = "br0") -> PrivateOvs:
    """A private ovs-vswitchd in a namespace of its own, presenting `tls`, with one bridge
    claiming `dpid` and connecting to `target`."""
    ns = lab.netns(name)
    mgmt.attach(ns)
    ovs = PrivateOvs(lab, ns, name).start(tls=tls)
    ovs.vsctl("add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=netdev",
              "fail_mode=secure", "protocols=OpenFlow13", f"other_config:datapath-id={dpid:016x}")
    ovs.vsctl("set-controller", bridge, target)
    return ovs


def ovs_connected(ovs: PrivateOvs) -> bool:
    return ovs.vsctl("--columns=is_connected", "--bare", "list", "controller") == "true"


def _client(ca_cert: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS client that checks the controller against `ca_cert` and presents `cert`."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(str(ca_cert))
    client.load_cert_chain(str(cert), str(key))
    return client


def test_openflow_over_tls_with_a_real_switch_and_only_trusted_peers(tmp_path: Path) -> None:
    switch_ca = LabCa(tmp_path / "pki", "switch-ca")
    ctl = switch_ca.issue("nwc-controller")
    ca_cert = ctl.ca_certificate
    sw = switch_ca.issue("h1")  # a host's br-int presents the host's certificate
    sw_key, sw_cert = sw.private_key, sw.certificate
    rogue = LabCa(tmp_path / "rogue", "rogue-ca").issue("rogue")
    rogue_key, rogue_cert = rogue.private_key, rogue.certificate
    h1 = load_config().topology.hosts["h1"]

    with Lab(unique_prefix("tls")) as lab:
        mgmt = ManagementNet(lab)
        host = str(mgmt.controller_ip)
        port = free_port(host)
        log_path = _start_nwc(lab, tmp_path, host, port, ctl)

        # A real switch: its own certificate, NWC's CA to check the controller's.
        ovs = _switch(lab, mgmt, "sw", sw, h1.dpid, f"ssl:{host}:{port}", bridge="br-int")
        wait_for(lambda: ovs_connected(ovs), 30, "the switch to connect over TLS")
        # NWC programmed it: the IVN base flows of h1 are there (cookie kind 1).
        wait_for(lambda: "cookie=0x1" in ovs.ofctl("dump-flows", "br-int"), 20,
                 "NWC's flows on the switch")

        # Plain TCP gets no OpenFlow at all: no hello in clear, the connection is closed.
        with socket.create_connection((host, port), timeout=5) as plain:
            plain.sendall(OF13_HELLO)
            assert _first_bytes(plain) == b""

        # A certificate from another CA: the handshake fails and nothing is greeted.
        client = _client(ca_cert, rogue_cert, rogue_key)
        with socket.create_connection((host, port), timeout=5) as raw:
            try:
                with client.wrap_socket(raw) as rogue:
                    rogue.sendall(OF13_HELLO)
                    greeting = _first_bytes(rogue)
            except (OSError, ssl.SSLError):
                greeting = b""
        assert greeting == b""

        # A trusted switch certificate is greeted with OpenFlow 1.3's hello, through TLS.
        client = _client(ca_cert, sw_cert, sw_key)
        with socket.create_connection((host, port), timeout=5) as raw, \
                client.wrap_socket(raw) as trusted:
            trusted.sendall(OF13_HELLO)
            assert _first_bytes(trusted)[:2] == bytes([4, 0])

        # The switch stayed connected meanwhile.
        time.sleep(0.5)
        assert ovs_connected(ovs)
        text = log_path.read_text()
        assert "TLS handshake failed" in text
        assert "switch h1" in text and "connected" in text


def _flows(ovs: PrivateOvs) -> list[str]:
    return [line for line in ovs.ofctl("dump-flows", "br0").splitlines() if "cookie=" in line]


def test_a_certificate_for_another_name_cannot_claim_a_fabric_switch(tmp_path: Path) -> None:
    """The tester's case (a compute host, holding a switch-CA certificate as deploy.md has it,
    adds a bridge with fabric switch s1's dpid while s1 is away): refused before any flow,
    and the real s1 is taken when it connects."""
    switch_ca = LabCa(tmp_path / "pki", "switch-ca")
    ctl = switch_ca.issue("nwc-controller")
    s1 = load_config().topology.switches["s1"]

    with Lab(unique_prefix("tlsid")) as lab:
        mgmt = ManagementNet(lab)
        host = str(mgmt.controller_ip)
        port = free_port(host)
        log_path = _start_nwc(lab, tmp_path, host, port, ctl)
        target = f"ssl:{host}:{port}"

        fake = _switch(lab, mgmt, "h2", switch_ca.issue("h2"), s1.dpid, target)
        wait_for(lambda: "refusing switch s1" in log_path.read_text(), 30,
                 "NWC to refuse h2's certificate for s1")
        refusal = next(line for line in log_path.read_text().splitlines()
                       if "refusing switch s1" in line)
        assert "CN=h2" in refusal and "expected s1" in refusal  # both names
        audit = tmp_path / "state" / "audit.jsonl"
        wait_for(lambda: audit.exists() and "switch_identity" in audit.read_text(), 10,
                 "the security event in the audit log")

        real = _switch(lab, mgmt, "s1", switch_ca.issue("s1"), s1.dpid, target)
        wait_for(lambda: f"switch s1 ({s1.dpid:#x}) connected" in log_path.read_text(), 30,
                 "the real s1 to be taken")
        wait_for(lambda: bool(_flows(real)), 20, "NWC's flows on the real s1")
        # ovs-vswitchd writes is_connected to its database every few seconds.
        wait_for(lambda: ovs_connected(real), 30, "the real s1's controller status")
        assert not _flows(fake)  # the impostor never got s1's program
        assert "refusing a second connection" not in log_path.read_text()


def test_nwc_run_refuses_part_of_a_tls_configuration(tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "nwc", "run", "--state-dir", str(tmp_path / "state"),
         "--ctl-privkey", str(tmp_path / "k.pem")], capture_output=True, text=True, timeout=60,
        check=False)
    assert refused.returncode == 2 and "go together" in refused.stderr
