"""Weave tunnels for real: two emulated compute hosts (network namespaces, each with its own OVS
on the userspace datapath, its own charon with kernel-libipsec, and a `nwc agent` process), the
controller's tunnel part in this process, VMs on each host's br-int. Traffic crosses, the
underlay carries only IKE and ESP, a stopped IKE daemon leaks nothing, a wrong key fails fast
with a security event, and a torn-down weave leaves each host exactly as it was."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from weave_world import PING_PATTERN, POLICY, World, external_ids, ovs_map, ping

from nwc.admission import WeaveRequest
from nwc.config import SHIPPED_POLICIES, Config
from nwc.controller import Controller
from nwc.hostdb import HostDb, configure_ssl, ssl_files
from nwc.ike import IkeDaemon
from nwc.lab.capture import Capture, cleartext, contains, summarize
from nwc.lab.netns import Lab, unique_prefix, wait_for
from nwc.lab.ovs import PrivateOvs
from nwc.lab.tunnel_lab import TWO_HOSTS
from nwc.pki import CertificateAuthority, LegKey, Secret
from nwc.topology import parse_topology_text
from nwc.tunnel import (
    AGENT_ACK_KEY,
    AGENT_ALIVE_KEY,
    RECORD_PREFIX,
    RECORDS_VERSION_KEY,
    STATUS_PREFIX,
    LegRecord,
    LegStatus,
    Phase,
)
from nwc.tunnels import RECONNECT_S, Tunnels, tunnels_for
from nwc.weave import Leg, State, Weave

pytestmark = pytest.mark.functional

MARKER = b"NWC-TENANT-PAYLOAD-must-never-be-seen-on-the-underlay"


def h1_h2_weave(now: dt.datetime) -> Weave:
    """A one-leg acme-web/globex-db weave between h1 and h2, slot 0, for the tunnel part
    alone (no weaver)."""
    return Weave(id="wv-000001", requester="acme-web", target="globex-db",
                 requester_tenant="acme", target_tenant="globex",
                 legs=(Leg("h1", "h2", ("h1", "s1", "h2"), 0),), kbps=1000, profile="gold",
                 requester_prefixes=(ipaddress.IPv4Network("192.0.2.0/26"),),
                 target_prefixes=(ipaddress.IPv4Network("192.0.2.64/26"),),
                 created_at=now, expires_at=now + dt.timedelta(hours=1))
PYTHON = "/usr/bin/python3"  # the VMs' own interpreter; no NWC code runs inside a VM

TCP_SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5201)); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(20); n = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    n += len(d)
print(n)
"""
TCP_SOURCE = """
import socket, sys, time
data = sys.argv[2].encode() * int(sys.argv[3])
for _ in range(100):
    try:
        c = socket.create_connection((sys.argv[1], 5201), timeout=5)
        break
    except OSError:
        time.sleep(0.1)
c.sendall(data); c.close()
"""


def tcp_transfer(world: World, source: str, sink: str, repeat: int = 2000) -> int:
    """Send MARKER x repeat over TCP from one VM to another; the bytes that arrived."""
    receiver = world.tl.vm(sink)
    address = str(world.tl.topology.vms[sink].ip)
    log = world.lab.directory("logs") / f"tcp-{source}-{sink}.out"
    server = receiver.popen([PYTHON, "-c", TCP_SINK], log=log)
    world.lab.process(server, f"tcp sink in {sink}")
    world.tl.vm(source).run(PYTHON, "-c", TCP_SOURCE, address, MARKER.decode(), str(repeat),
                            timeout=60)
    server.wait(30)
    return int(log.read_text().split()[-1])


def host_secrets(world: World, weave: Weave) -> list[str]:
    """Every form in which a leg's key could leak: base64 and hex of the PSK."""
    found = []
    for host in world.tl.hosts.values():
        for key, text in external_ids(host.ovs).items():
            if key.startswith(RECORD_PREFIX) and weave.id in key:
                record = LegRecord.from_json(text)
                if record.psk is not None:
                    found += [record.psk.to_text(), record.psk.reveal().hex()]
    return sorted(set(found))


def process_arguments() -> str:
    chunks = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                chunks.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                continue
    return "\n".join(chunks)


def test_a_weave_carries_traffic_encrypted_and_leaves_nothing_behind(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tl = world.tl
    capture = Capture(world.lab, tl.hosts["h1"].ns, "ul0", "weave-up").start()
    weave = world.up()
    secrets = host_secrets(world, weave)
    assert secrets, "a gold weave has a pre-shared key on its hosts"

    db1 = str(tl.topology.vms["db1"].ip)
    assert ping(tl.vm("web1"), db1)
    # Full-size frames pass with DF set: VM MTU 1500 holds across VXLAN+ESP.
    assert ping(tl.vm("web1"), db1, count=2, size=1472, df=True)
    assert tcp_transfer(world, "web1", "db1") == len(MARKER) * 2000
    frames = capture.stop()
    kinds = summarize(frames)
    assert not cleartext(frames), f"cleartext on the underlay: {kinds}"
    assert kinds["esp-in-udp"] > 0 and kinds["ike"] > 0
    assert contains(frames, MARKER[:24]) == 0
    assert contains(frames, bytes.fromhex(PING_PATTERN)) == 0

    def stats() -> dict[str, Any]:
        return world.controller.weave_stats(world.weave(weave.id))

    # Byte counters reach the controller every couple of seconds, state changes at once.
    wait_for(lambda: stats()["tunnel_legs"][0]["ends"]["h1"]["bytes_out"] > 0, 10,
             "byte counters")
    assert stats()["sa_state"] == "established"
    assert stats()["tunnel_legs"][0]["ends"]["h1"]["encryption"] == "AES_GCM_16"
    # No key in the process list, the API's view of the weave, or the audit trail.
    shown = [process_arguments(), json.dumps(stats()), json.dumps(weave.to_dict()),
             json.dumps(world.controller.store.audit_records())]
    for secret in secrets:
        assert not any(secret in text for text in shown)

    world.end(weave)
    assert world.weave(weave.id).state is State.TERMINATED
    world.assert_pristine()
    # Nor in any log, file or database left on the hosts (OVSDB was compacted).
    logs = [r.getMessage() for r in caplog.records]
    files = [p for p in world.lab.directory("logs").iterdir()]
    for host in tl.hosts.values():
        files += [host.ovs.rundir / "conf.db", host.charon.log_path]
        files += [p for p in host.state_dir.rglob("*") if p.is_file()]
    for secret in secrets:
        assert not any(secret in line for line in logs)
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{secret[:6]}... in {path}"


def test_with_the_ike_daemon_killed_nothing_leaves_in_clear(world: World) -> None:
    tl = world.tl
    weave = world.up()
    db1 = str(tl.topology.vms["db1"].ip)
    assert ping(tl.vm("web1"), db1, count=1)

    h1 = tl.hosts["h1"]
    capture = Capture(world.lab, h1.ns, "ul0", "ike-stopped").start()
    h1.charon.crash()  # SIGKILL: nothing is cleaned up by charon itself
    wait_for(lambda: world.security("sa_down"), 15, "the controller to see the SA go")
    assert not ping(tl.vm("web1"), db1, count=5, timeout=1)
    assert not ping(tl.vm("db1"), str(tl.topology.vms["web1"].ip), count=3, timeout=1)
    frames = capture.stop()
    assert not cleartext(frames), f"cleartext with charon stopped: {summarize(frames)}"
    assert contains(frames, bytes.fromhex(PING_PATTERN)) == 0
    assert "nwv0" in h1.ns.run("ip", "-o", "link").stdout  # the tunnel port stayed...
    assert "blackhole" in h1.ns.run("ip", "route").stdout  # ...and so did the blackhole
    assert world.weave(weave.id).state is State.ACTIVE  # the weave holds; its traffic waits

    h1.charon.start()
    wait_for(lambda: world.security("sa_restored"), 30, "the SA to come back")
    assert ping(tl.vm("web1"), db1, count=2)
    world.end(weave)
    world.assert_pristine()


def test_an_sa_that_goes_away_leaves_nothing_in_clear(world: World) -> None:
    """A failed rekey ends with the SAs deleted, as a peer's `terminate` does: from then on
    the weave's VXLAN meets the blackhole route, never the underlay in clear."""
    tl = world.tl
    weave = world.up()
    db1 = str(tl.topology.vms["db1"].ip)
    assert ping(tl.vm("web1"), db1, count=1)

    h1, h2 = tl.hosts["h1"], tl.hosts["h2"]
    (name,) = [n for n, sa in h2.ike.sas().items() if sa.installed]
    capture = Capture(world.lab, h1.ns, "ul0", "sa-gone").start()
    h2.ike.terminate(name)  # both ends delete the IKE and CHILD SAs
    wait_for(lambda: not any(sa.installed for sa in h1.ike.sas().values()), 10,
             "the SAs to go on h1")
    sent = ping(tl.vm("web1"), db1, count=3, timeout=1)
    frames = capture.stop()
    assert not cleartext(frames), f"cleartext without an SA: {summarize(frames)}"
    assert contains(frames, bytes.fromhex(PING_PATTERN)) == 0
    if sent:  # the agent re-initiated in time: then it went through ESP, checked above
        assert summarize(frames)["esp-in-udp"] > 0, summarize(frames)
    world.end(weave)
    world.assert_pristine()


def test_a_teardown_whose_delete_the_peer_never_answers_logs_no_error(world: World) -> None:
    """h2's charon (and agent) stand still while h1 tears its end down: charon's DELETE times
    out and it answers "terminating SA failed", though `force` deleted the SA. That is a
    normal teardown: h1's agent reports its leg removed without an error, and so does h2's
    once it goes on (its DELETE meets an h1 that no longer knows the SA)."""
    tl = world.tl
    weave = world.up()
    h1, h2 = tl.hosts["h1"], tl.hosts["h2"]
    paused = [h2.charon.pid, h2.agent_pid]
    assert all(pid is not None for pid in paused)
    logs = {name: world.lab.directory("logs") / f"agent-{name}.log" for name in ("h1", "h2")}
    removed = f"leg {weave.id}-s{weave.legs[0].slot}: removed"
    c = world.controller
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        c.call(c.weaver.terminate, weave.id)
        tl.disconnect(weave.legs[0].slot)
        wait_for(lambda: removed in logs["h1"].read_text(), 20, "h1 to remove its end")
        assert not h1.ike.sas()
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    wait_for(world.part.drained, 30, "h2 to remove its end")
    world.wait_state(weave.id, State.TERMINATED, timeout=10)
    world.assert_pristine()
    for name, path in logs.items():
        text = path.read_text()
        assert removed in text
        errors = [line for line in text.splitlines() if " ERROR " in line]
        assert not errors, f"the agent of {name} logged errors: {errors}"


def test_a_stopped_agent_is_noticed_and_its_ends_shown_stale(world: World) -> None:
    """Found by a resilience tester: with h1's agent gone, no event, log line or metric said
    so, and the weave's stats kept showing h1's last status as current."""
    from nwc.metrics import Metrics

    weave = world.up()
    c = world.controller
    pid = world.tl.hosts["h1"].agent_pid
    assert pid is not None
    seen = len(world.events)

    def agent_events() -> list[tuple[str, bool]]:
        return [(e["host"], e["up"]) for e in list(world.events)[seen:]
                if e.get("type") == "host.agent"]

    os.kill(pid, signal.SIGSTOP)  # as good as dead to the controller, and can go on after
    try:
        wait_for(lambda: agent_events() == [("h1", False)], 30,
                 "the controller to notice h1's agent stopped")
        end = c.weave_stats(weave)["tunnel_legs"][0]["ends"]
        assert end["h1"]["stale"] and end["h1"]["stale_reason"].startswith(
            "agent unresponsive since")
        assert not end["h2"]["stale"]
        metrics = Metrics(c).exposition().decode()
        assert 'nwc_host_agent_up{host="h1"} 0.0' in metrics
        assert 'nwc_host_agent_up{host="h2"} 1.0' in metrics
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: agent_events() == [("h1", False), ("h1", True)], 30,
             "the controller to see h1's agent back")
    assert not c.weave_stats(weave)["tunnel_legs"][0]["ends"]["h1"]["stale"]
    world.end(weave)
    world.assert_pristine()


def test_a_wrong_key_gives_no_tunnel_and_a_security_event(world: World) -> None:
    tl = world.tl
    h1, h2 = tl.hosts["h1"], tl.hosts["h2"]
    pid = h1.agent_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # hold the initiator back while h2's charon is tampered with
    try:
        weave = world.create("acme-web", "globex-db", "gold")
        key = f"{weave.id}-s{weave.legs[0].slot}"

        def h2_listening() -> bool:
            text = external_ids(h2.ovs).get(STATUS_PREFIX + key)
            return text is not None and LegStatus.from_json(text).phase is Phase.LISTENING

        wait_for(h2_listening, 20, "h2 to listen")
        record = LegRecord.from_json(external_ids(h2.ovs)[RECORD_PREFIX + key])
        # The key in h2's charon is not the one NWC gave h1.
        IkeDaemon(h2.charon.vici_socket).load_shared(
            record.spec.connection_name, Secret(b"not the key NWC issued" + b"\0" * 10),
            [record.spec.local_id, record.spec.remote_id])
    finally:
        os.kill(pid, signal.SIGCONT)
    ended = world.wait_state(weave.id, State.FAILED, timeout=30)
    assert ended.reason == "provision_failed"  # a decision, not a provisioning timeout
    events = world.security("ike_failure")
    assert events and events[-1]["weave_id"] == weave.id
    assert "AUTHENTICATION_FAILED" in events[-1]["detail"]
    audit = [r for r in world.controller.store.audit_records() if r["action"] == "security"]
    assert any(r.get("weave_id") == weave.id and r["outcome"] == "ike_failure"
               for r in audit)
    wait_for(world.part.drained, 30, "teardown after the failure")
    for host in (h1, h2):
        assert not any(sa.installed for sa in host.ike.sas().values())
    world.assert_pristine()


def test_two_weaves_between_the_same_hosts_with_different_profiles(world: World) -> None:
    tl = world.tl
    gold = world.create("acme-web", "globex-db", "gold")
    silver = world.create("acme-web", "initech-app", "silver")
    tl.connect("web1", "db1", gold.legs[0].slot)
    tl.connect("web2", "app1", silver.legs[0].slot)
    world.wait_state(gold.id, State.ACTIVE)
    world.wait_state(silver.id, State.ACTIVE)
    assert ping(tl.vm("web1"), str(tl.topology.vms["db1"].ip), count=2)
    assert ping(tl.vm("web2"), str(tl.topology.vms["app1"].ip), count=2)
    assert tcp_transfer(world, "web2", "app1", repeat=500) == len(MARKER) * 500

    ike = tl.hosts["h1"].ike
    sas = ike.sas()
    gold_sa = sas[f"nwc-{gold.id}-s{gold.legs[0].slot}"]
    silver_sa = sas[f"nwc-{silver.id}-s{silver.legs[0].slot}"]
    assert gold_sa.installed and silver_sa.installed
    assert gold_sa.child_id != silver_sa.child_id
    # gold: AES-256-GCM and a PSK; silver: AES-128-GCM and certificates.
    assert (gold_sa.encryption, gold_sa.key_bits) == ("AES_GCM_16", 256)
    assert (silver_sa.encryption, silver_sa.key_bits) == ("AES_GCM_16", 128)
    assert ike.shared_ids() == {f"nwc-{gold.id}-s{gold.legs[0].slot}"}
    assert len(ike.key_ids()) == 1  # silver's leg key, in charon's memory only
    world.end(gold)
    world.end(silver)
    world.assert_pristine()


def test_ovs_ipsec_backend_writes_its_interfaces_into_a_real_ovsdb() -> None:
    """Hosts whose OVS does the IPsec (kernel datapath + ovs-monitor-ipsec) cannot encrypt on
    these machines; what NWC writes into their OVSDB is checked against a real ovsdb-server."""
    text = (TWO_HOSTS.replace("underlay_ip: 100.64.0.1}", "underlay_ip: 100.64.0.1, "
                              "backend: ovs-ipsec}")
            .replace("underlay_ip: 100.64.0.2}", "underlay_ip: 100.64.0.2, backend: ovs-ipsec}"))
    topo = parse_topology_text(text, POLICY)
    with Lab(unique_prefix("o")) as lab:  # the module's lab may still be up: other names
        hosts = {name: lab.netns(name) for name in ("h1", "h2")}
        lab.veth(hosts["h1"], "ul0", hosts["h2"], "ul0")
        dbs, agents = {}, {}
        for name, ns in hosts.items():
            ns.ip("addr", "add", f"{topo.hosts[name].underlay_ip}/24", "dev", "ul0")
            ovs = dbs[name] = PrivateOvs(lab, ns, name).start(switchd=False)
            ovs.vsctl("--no-wait", "add-br", "br-int")
            state = lab.directory(f"agent-{name}")
            proc = ns.popen(
                [sys.executable, "-m", "nwc", "agent",
                 "--backend", "ovs-ipsec", "--ovsdb", ovs.db_target, "--underlay-dev", "ul0",
                 "--vici", str(state / "no-charon.vici"), "--state-dir", str(state),
                 "--interval", "0.05"], log=lab.directory("logs") / f"agent-{name}.log")
            lab.process(proc, f"agent {name}")
            agents[name] = state
        config = Config(POLICY, topo, (SHIPPED_POLICIES,), Path("ovs-ipsec.yaml"))
        controller = Controller(config, lab.directory("controller"))
        part = tunnels_for(controller, {n: o.db_target for n, o in dbs.items()},
                           poll_interval=0.05)
        controller.add_part(part)
        controller.start()
        part.start()
        try:
            _check_ovs_ipsec(controller, part, dbs, agents)
        finally:
            part.stop()
            controller.stop()


def _check_ovs_ipsec(controller: Controller, part: Tunnels, dbs: dict[str, Any],
                     agents: dict[str, Path]) -> None:
    def iface(ovs: Any, column: str) -> str:
        return ovs.vsctl("--if-exists", "get", "interface", "nwv0", column)

    gold = controller.call(controller.weaver.create,
                           WeaveRequest("acme-web", "globex-db", 600, 5, "gold"))
    assert isinstance(gold, Weave)
    for name, ovs in dbs.items():
        wait_for(lambda o=ovs: iface(o, "type") == "vxlan", 20, f"{name}'s interface")
    h1, h2 = dbs["h1"], dbs["h2"]
    o1 = ovs_map(h1, "interface", "nwv0", "options")
    o2 = ovs_map(h2, "interface", "nwv0", "options")
    assert o1["remote_ip"] == o2["local_ip"] and o1["local_ip"] == o2["remote_ip"]
    assert o1["key"] == o2["key"] == str(2**23 + gold.legs[0].slot)
    assert o1["psk"] == o2["psk"] and len(o1["psk"]) == 64
    assert o1["ipsec_esp"] == "aes256gcm16-x25519!"
    assert iface(h1, "ofport_request") == "10000"
    assert ovs_map(h1, "interface", "nwv0", "external_ids")["nwc-weave"] == gold.id
    assert ovs_map(h1, "open_vswitch", ".", "other_config")["ipsec_skb_mark"] == "0/1"
    assert "nwv0" in h1.vsctl("list-ports", "br-int").split()
    status = LegStatus.from_json(external_ids(h1)[f"{STATUS_PREFIX}{gold.id}-s0"])
    assert status.phase is Phase.DELEGATED  # no IKE daemon to see an SA here

    controller.call(controller.weaver.terminate, gold.id)
    wait_for(part.drained, 20, "ovs-ipsec teardown")
    for ovs in dbs.values():
        assert ovs.vsctl("list-ports", "br-int") == ""
        assert ovs.vsctl("get", "open_vswitch", ".", "other_config") == "{}"
        # Only the records version, the agent's ack and heartbeat stay: they only grow.
        assert set(external_ids(ovs)) == {RECORDS_VERSION_KEY, AGENT_ACK_KEY, AGENT_ALIVE_KEY}

    silver = controller.call(controller.weaver.create,
                             WeaveRequest("acme-web", "initech-app", 600, 5, "silver"))
    assert isinstance(silver, Weave)
    wait_for(lambda: ovs_map(h1, "interface", "nwv0", "options").get("remote_name")
             == "h2.host.nwc", 20,
             "the x509 interface")
    config = ovs_map(h1, "open_vswitch", ".", "other_config")
    key_file = Path(config["private_key"])
    assert key_file.parent.parent == agents["h1"]
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert "psk" not in iface(h1, "options")
    controller.call(controller.weaver.terminate, silver.id)
    wait_for(part.drained, 20, "x509 ovs-ipsec teardown")
    assert not key_file.exists()
    assert h1.vsctl("get", "open_vswitch", ".", "other_config") == "{}"

    # A userspace-datapath bridge bypasses kernel XFRM, so the drop policy could not hold:
    # the agent refuses to build there, and the weave fails instead of running unprotected.
    h1.vsctl("--no-wait", "set", "bridge", "br-int", "datapath_type=netdev")
    refused = controller.call(controller.weaver.create,
                              WeaveRequest("acme-web", "globex-db", 600, 5, "gold"))
    assert isinstance(refused, Weave)

    def ended() -> bool:
        return controller.call(lambda: refused.id not in controller.weaver.live)

    wait_for(ended, 20, "the weave on a netdev bridge to fail")
    assert controller.store.weave(refused.id).state is State.FAILED
    assert any(r.get("weave_id") == refused.id and "netdev" in r.get("detail", "")
               for r in controller.store.audit_records())
    wait_for(part.drained, 20, "teardown of the refused weave")
    assert "nwv0" not in h1.vsctl("list-ports", "br-int").split()


def _pem_pair(ca: CertificateAuthority, identity: str, directory: Path) -> tuple[Path, Path]:
    """A key and a certificate for `identity` signed by `ca`, as 0600 PEM files."""
    key = LegKey.generate(identity)
    now = dt.datetime.now(dt.UTC)
    cert = ca.sign_request(key.csr_pem(), identity, now=now, not_after=now + dt.timedelta(1))
    paths = directory / f"{identity}.key", directory / f"{identity}.crt"
    for path, data in zip(paths, (key.private_pem().reveal(), cert), strict=True):
        path.touch(mode=0o600)
        path.write_bytes(data)
    return paths


def _ssl_ovsdb(lab: Lab, name: str, key: Path, cert: Path, ca: Path,
               port: int | None = None) -> tuple[str, str]:
    """A private ovsdb-server listening only with TLS on loopback (plus a unix socket for
    ovs-vsctl): its ssl: target for NWC, and its unix one for the test's own checks. Given
    the port of one stopped before, it starts again on the same database."""
    rundir = lab.directory(f"ssl-{name}")
    env = {**os.environ, "OVS_RUNDIR": str(rundir), "OVS_DBDIR": str(rundir),
           "OVS_LOGDIR": str(rundir)}
    db, sock = rundir / "conf.db", rundir / "db.sock"
    if port is None:
        subprocess.run(["ovsdb-tool", "create", str(db),
                        "/usr/share/openvswitch/vswitch.ovsschema"],
                       check=True, env=env, capture_output=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["ovsdb-server", str(db), f"--remote=punix:{sock}", f"--remote=pssl:{port}:127.0.0.1",
         f"--private-key={key}", f"--certificate={cert}", f"--ca-cert={ca}",
         f"--unixctl={rundir}/ovsdb-server.ctl", f"--pidfile={rundir}/ovsdb-server.pid",
         f"--log-file={rundir}/ovsdb-server.log"], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.process(proc, f"ovsdb-server {name}")
    wait_for(sock.exists, 10, f"ovsdb-server {name}")
    unix = f"unix:{sock}"
    subprocess.run(["ovs-vsctl", f"--db={unix}", "--no-wait", "init"], check=True, env=env,
                   capture_output=True, timeout=20)
    return f"ssl:127.0.0.1:{port}", unix


def test_the_tunnel_part_writes_records_over_ssl(tmp_path: Path) -> None:
    """Both hosts' OVSDBs answer only TLS with client certificates: with the key, certificate
    and CA configured the part writes each leg end's record (key included) over it; a client
    certificate from another CA is turned away. Each server's certificate names its host
    (subjectAltName DNS), as NWC requires."""
    tls_ca = CertificateAuthority.load_or_create(tmp_path / "ovsdb-ca", name="OVSDB CA")
    ca_file = tmp_path / "ovsdb-ca" / "ca.crt"
    ca_file.write_bytes(tls_ca.cert_pem)
    client_key, client_cert = _pem_pair(tls_ca, "controller.nwc.test", tmp_path)
    topo = parse_topology_text(TWO_HOSTS, POLICY)
    with Lab(unique_prefix("t")) as lab:
        servers = {name: _ssl_ovsdb(lab, name, *_pem_pair(tls_ca, name, tmp_path), ca_file)
                   for name in ("h1", "h2")}
        events: list[tuple[str, ...]] = []

        class Reports:
            def ready(self, weave_id: str) -> None:
                events.append(("ready", weave_id))

            def failed(self, weave_id: str, detail: str) -> None:
                events.append(("failed", weave_id, detail))

            def security(self, weave_id: str, kind: str, detail: str) -> None:
                events.append(("security", weave_id, kind))

            def down(self, weave_id: str) -> None:
                events.append(("down", weave_id))

            def host(self, host: str, kind: str, up: bool, detail: str) -> None:
                events.append(("host", host, kind))

        configure_ssl(ssl_files(client_key, client_cert, ca_file))
        part = Tunnels(topology=topo, policy=lambda: POLICY,
                       ca=CertificateAuthority.load_or_create(tmp_path / "pki"),
                       reports=Reports(), ovsdb_targets={n: s[0] for n, s in servers.items()},
                       poll_interval=0.05)
        try:
            now = dt.datetime.now(dt.UTC)
            weave = h1_h2_weave(now)
            part.weave_up(weave)
            part.start()

            def record(host: str) -> LegRecord | None:
                text = ovs_map(_Vsctl(servers[host][1]), "open_vswitch", ".",
                               "external_ids").get(f"{RECORD_PREFIX}wv-000001-s0")
                return LegRecord.from_json(text) if text else None

            wait_for(lambda: record("h1") is not None and record("h2") is not None, 20,
                     "the records, written over TLS")
            r1, r2 = record("h1"), record("h2")
            assert r1 is not None and r2 is not None and r1.psk is not None
            assert r1.psk == r2.psk and r1.spec.host == "h1" and r2.spec.host == "h2"
            assert not [e for e in events if e[0] != "ready"]
        finally:
            part.stop()
        # Someone with a certificate from another CA gets nothing.
        rogue_ca = CertificateAuthority.load_or_create(tmp_path / "rogue-ca", name="Rogue")
        rogue_key, rogue_cert = _pem_pair(rogue_ca, "rogue.test", tmp_path)
        try:
            configure_ssl(ssl_files(rogue_key, rogue_cert, ca_file))
            with pytest.raises(ConnectionError):
                HostDb(servers["h1"][0], timeout=5).open()
        finally:
            configure_ssl(None)


def _ovs_pki(directory: Path) -> Path:
    """docs/deploy.md's management PKI, made with ovs-pki itself: one switchca signs both
    hosts and the fabric switch ("NAME id:<uuid>" as CN and DNS name), controllerca NWC."""
    pki = directory / "pki"
    subprocess.run(["ovs-pki", f"--dir={pki}", "init"], check=True, capture_output=True,
                   timeout=120)
    for name, kind in (("h1", "switch"), ("h2", "switch"), ("fabric", "switch"),
                       ("nwc", "controller")):
        subprocess.run(["ovs-pki", f"--dir={pki}", "req+sign", name, kind], cwd=directory,
                       check=True, capture_output=True, timeout=120)
    return directory


def _present(certs: Path, whose: str, key: Path, cert: Path) -> None:
    """Make a server's key and certificate files `whose` (ovsdb-server reloads them when
    they change; it uses them for its next connections)."""
    for source, path in ((certs / f"{whose}-privkey.pem", key),
                         (certs / f"{whose}-cert.pem", cert)):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(source.read_bytes())
        tmp.chmod(0o600)
        os.replace(tmp, path)


def test_an_ovsdb_server_must_present_its_own_hosts_certificate(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With ovs-pki's one switchca for hosts and switches, a host's OVSDB server that
    presents another host's certificate, or the fabric switch's (both valid, same CA), is
    refused: nothing is written to it and the refusal is logged once. Once each presents its
    own, the records are written. A server that switches to another's certificate and is
    reconnected to gets no record again, while the other host's is put back."""
    certs = _ovs_pki(tmp_path)
    server_ca = certs / "pki" / "controllerca" / "cacert.pem"
    files = {h: (tmp_path / f"{h}-server.key", tmp_path / f"{h}-server.crt")
             for h in ("h1", "h2")}
    _present(certs, "h2", *files["h1"])  # h1's server with h2's certificate
    _present(certs, "fabric", *files["h2"])  # h2's with the fabric switch's
    topo = parse_topology_text(TWO_HOSTS, POLICY)
    with Lab(unique_prefix("t")) as lab:
        servers = {h: _ssl_ovsdb(lab, h, *files[h], server_ca) for h in ("h1", "h2")}

        def records(host: str) -> dict[str, str]:
            ids = ovs_map(_Vsctl(servers[host][1]), "open_vswitch", ".", "external_ids")
            return {k: v for k, v in ids.items() if k.startswith("nwc-")}

        def refusals(host: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
                    and f"refusing the OVSDB server of {host} " in r.getMessage()]

        class Reports:
            def __getattr__(self, _name: str) -> Any:
                return lambda *args: None

        configure_ssl(ssl_files(certs / "nwc-privkey.pem", certs / "nwc-cert.pem",
                                certs / "pki" / "switchca" / "cacert.pem"))
        part = Tunnels(topology=topo, policy=lambda: POLICY,
                       ca=CertificateAuthority.load_or_create(tmp_path / "weave-ca"),
                       reports=Reports(), ovsdb_targets={h: s[0] for h, s in servers.items()},
                       poll_interval=0.05)
        now = dt.datetime.now(dt.UTC)

        weave = h1_h2_weave(now)
        try:
            with caplog.at_level(logging.INFO, logger="nwc.tunnels"):
                part.weave_up(weave)
                part.start()
                wait_for(lambda: (refusals("h1") and refusals("h2")) or records("h1")
                         or records("h2"), 20, "both refusals")
                time.sleep(RECONNECT_S * 2)  # the part retries, and says it only once
                assert records("h1") == {} and records("h2") == {}
                assert len(refusals("h1")) == 1 and len(refusals("h2")) == 1
                assert "DNS:h2 id:" in refusals("h1")[0]
                assert "DNS:fabric id:" in refusals("h2")[0]

                _present(certs, "h1", *files["h1"])
                _present(certs, "h2", *files["h2"])
                wait_for(lambda: f"{RECORD_PREFIX}wv-000001-s0" in records("h1")
                         and f"{RECORD_PREFIX}wv-000001-s0" in records("h2"), 30,
                         "the records, once each server presents its own certificate")

                # h1's server now presents h2's certificate, and drops its connections: the
                # IDL's reconnection meets it, and so does every reopening after.
                _present(certs, "h2", *files["h1"])
                time.sleep(0.5)
                subprocess.run(["ovs-appctl", "-t",
                                str(Path(servers["h1"][1][5:]).parent / "ovsdb-server.ctl"),
                                "ovsdb-server/reconnect"], check=True, capture_output=True,
                               timeout=10)
                wait_for(lambda: len(refusals("h1")) == 2, 20, "h1's server refused again")
                # Both records go missing: the part puts back h2's, and not h1's (which, PSK
                # included, would go to whoever holds h2's certificate).
                key = f"{RECORD_PREFIX}wv-000001-s0"
                for host in ("h1", "h2"):
                    _Vsctl(servers[host][1]).vsctl("--no-wait", "remove", "open_vswitch", ".",
                                                   "external_ids", key)
                wait_for(lambda: key in records("h2"), 20, "h2's record, put back")
                time.sleep(RECONNECT_S * 2)
                assert key not in records("h1") and len(refusals("h1")) == 2
        finally:
            part.stop()
            configure_ssl(None)


@dataclass
class _Vsctl:
    """ovs-vsctl against one OVSDB, shaped as ovs_map() expects."""

    db: str

    def vsctl(self, *args: str) -> str:
        return subprocess.run(["ovs-vsctl", f"--db={self.db}", "--timeout=10", *args],
                              check=True, capture_output=True, text=True,
                              timeout=20).stdout.strip()
