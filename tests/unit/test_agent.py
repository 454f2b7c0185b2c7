"""The host agent's reconciliation, against fakes of OVSDB, charon and the kernel: what it
builds, in which order, what it tells the controller, and that teardown leaves nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import ANY

import pytest
from tunnel_fakes import (
    OVS_TOPO,
    POLICY,
    T0,
    TOPO,
    FakeClock,
    FakeHostDb,
    FakeIke,
    FakeNet,
    Journal,
    one_leg_weave,
    run_now,
)

from nwc import agent as agent_module
from nwc import hostdb as hostdb_module
from nwc import hostnet as hostnet_module
from nwc.agent import MAX_BUILDS_PER_PASS, Agent
from nwc.cli import build_parser
from nwc.ike import IkeError
from nwc.pki import CertificateAuthority, LegKey, new_psk
from nwc.tunnel import (
    AGENT_ACK_KEY,
    AGENT_ALIVE_KEY,
    RECORD_PREFIX,
    RECORDS_VERSION_KEY,
    STATUS_PREFIX,
    LegRecord,
    LegStatus,
    Phase,
    SaInfo,
    TunnelSpec,
    leg_specs,
)

pytestmark = pytest.mark.unit

def specs(profile: str = "gold", slot: int = 0, topo=TOPO) -> tuple[TunnelSpec, TunnelSpec]:
    w = one_leg_weave(7, slot, profile=profile)
    return leg_specs(w, w.legs[0], POLICY.profiles[profile], topo)


@dataclass
class Host:
    backend: str = "strongswan"
    journal: Journal = field(default_factory=Journal)
    clock: FakeClock = field(default_factory=FakeClock)
    db: FakeHostDb = field(init=False)
    ike: FakeIke = field(init=False)
    net: FakeNet = field(init=False)
    agent: Agent = field(init=False)
    compactions: int = 0
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        self.db = FakeHostDb(self.journal)
        self.ike = FakeIke(self.journal)
        self.net = FakeNet(self.journal)
        self.agent = self.new_agent()

    def new_agent(self) -> Agent:
        def compact() -> None:
            self.compactions += 1

        return Agent(db=self.db, ike=self.ike, net=self.net, backend=self.backend,
                     underlay_device="ul0", submit=run_now, clock=self.clock,
                     compact_db=compact, state_dir=self.state_dir)

    def want(self, record: LegRecord) -> None:
        self.db.ids[RECORD_PREFIX + record.spec.key] = record.to_json()

    def drop(self, spec: TunnelSpec) -> None:
        del self.db.ids[RECORD_PREFIX + spec.key]

    def status(self, spec: TunnelSpec) -> LegStatus:
        return LegStatus.from_json(self.db.ids[STATUS_PREFIX + spec.key])

    def steps(self, n: int = 3) -> None:
        for _ in range(n):
            self.agent.step()


def test_a_leg_is_built_blackhole_first_and_waits_for_the_start_signal() -> None:
    req, _ = specs()
    host = Host()
    psk = new_psk()
    host.want(LegRecord(req, psk))
    host.steps()
    j = host.journal
    assert j.index("add_blackhole", str(req.remote_vtep)) < j.index("add_vxlan", "nwv0")
    assert j.index("add_vxlan", "nwv0") < j.index("add_port", "nwv0")
    assert host.net.addresses == {(str(req.local_endpoint), "ul0"), (str(req.local_vtep), "lo")}
    assert host.net.link_routes == {(str(req.remote_endpoint), "ul0", str(req.local_endpoint))}
    vxlan = host.net.vxlans["nwv0"]
    assert (vxlan.vni, vxlan.local, vxlan.remote, vxlan.port, vxlan.mtu) == (
        req.vni, req.local_vtep, req.remote_vtep, 4789, 1500)
    port = host.db.ports["nwv0"]
    assert (port["bridge"], port["ofport_request"]) == ("br-int", 10000)
    assert port["external_ids"]["nwc-weave"] == "wv-000007"
    assert host.ike.shared[req.connection_name] == (psk, [req.local_id, req.remote_id])
    assert j.index("load_shared") < j.index("load_conn")
    assert set(host.ike.conns) == {req.connection_name}
    assert host.ike.initiations == 0  # the responder may not be listening yet
    status = host.status(req)
    assert status.phase is Phase.LISTENING and status.applied == req
    raw = host.db.ids[STATUS_PREFIX + req.key]
    assert psk.to_text() not in raw and psk.reveal().hex() not in raw

    host.want(LegRecord(req, psk, start=True))
    host.steps()
    assert host.ike.initiations == 1
    assert host.status(req).phase is Phase.INSTALLED
    host.steps(5)
    assert host.ike.initiations == 1  # installed: nothing more to do


def test_the_agent_acknowledges_a_records_version_with_what_its_pass_made_of_it() -> None:
    req, _ = specs()
    host = Host()
    host.db.ids[RECORDS_VERSION_KEY] = "7"
    host.want(LegRecord(req, new_psk()))
    written: list[tuple[int, dict[str, str]]] = []  # (changes made before, keys set)
    update = host.db.update_external_ids

    def recording(set_keys=None, delete_keys=()) -> None:
        written.append((len(host.journal.entries), dict(set_keys or {})))
        update(set_keys, delete_keys)

    host.db.update_external_ids = recording  # type: ignore[method-assign]
    host.steps(1)
    # First the mark that this agent acknowledges, before it does anything...
    assert written[0] == (0, {AGENT_ACK_KEY: "-1"})
    # ...then the version, in the one write that also carries what the pass did with it.
    # (With the first heartbeat, due at once.)
    assert written[1][1] == {AGENT_ACK_KEY: "7", STATUS_PREFIX + req.key: ANY,
                             AGENT_ALIVE_KEY: "1"}
    host.steps(3)
    assert len(written) == 2  # acknowledged once per version, not once per pass
    host.db.ids[RECORDS_VERSION_KEY] = "8"
    host.steps(1)
    assert written[2][1] == {AGENT_ACK_KEY: "8"}


def test_the_agent_beats_once_per_interval_with_the_pass_under_way() -> None:
    """The proof of life the controller watches: a counter raised every heartbeat interval,
    not every pass, in the pass's own transaction; a restarted agent counts on from what
    the host holds, so its first beat is a change too."""
    host = Host()
    host.steps(1)
    assert host.db.ids[AGENT_ALIVE_KEY] == "1"
    writes = host.db.writes
    for _ in range(29):  # 2.9 s of passes with nothing else to say
        host.clock.advance(0.1)
        host.steps(1)
    assert host.db.writes == writes and host.db.ids[AGENT_ALIVE_KEY] == "1"
    host.clock.advance(0.1)
    host.steps(1)
    assert host.db.writes == writes + 1 and host.db.ids[AGENT_ALIVE_KEY] == "2"
    host.agent = host.new_agent()  # restarted
    host.steps(1)
    assert host.db.ids[AGENT_ALIVE_KEY] == "3"


@pytest.mark.parametrize("option", ["--heartbeat-interval", "--interval",
                                    "--initiate-timeout"])
@pytest.mark.parametrize("seconds", ["inf", "nan", "0", "-1", "three"])
def test_a_duration_option_that_is_not_finite_and_positive_is_a_usage_error(
        option: str, seconds: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["agent", "--underlay-dev", "eth1", f"{option}={seconds}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "Traceback" not in err
    assert "finite number of seconds above 0" in err or "expected a number of seconds" in err


def test_duration_options_take_fractions_of_a_second() -> None:
    args = build_parser().parse_args(["agent", "--underlay-dev", "eth1", "--interval", "0.05",
                                      "--initiate-timeout", "2.5"])
    assert (args.interval, args.initiate_timeout) == (0.05, 2.5)


def test_the_agent_beats_at_the_interval_its_command_line_gives(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`nwc agent --heartbeat-interval` reaches the agent, and an interval the controller's
    default bound cannot follow is warned about (the controller never learns it)."""
    made: dict[str, Any] = {}

    class Made:
        def __init__(self, **kwargs: Any) -> None:
            made.update(kwargs)

        def run(self, stop: Any, interval: float) -> None:
            pass

        def close(self) -> None:
            pass

    # Only the command's wiring runs: no OVSDB, charon or netlink, and the test process's
    # signal handlers and umask stay as they are.
    monkeypatch.setattr(agent_module, "Agent", Made)
    monkeypatch.setattr(hostdb_module, "HostDb", lambda *a, **k: FakeHostDb(Journal()))
    monkeypatch.setattr(hostnet_module, "HostNetwork", lambda: SimpleNamespace(
        close=lambda: None))
    monkeypatch.setattr(agent_module.signal, "signal", lambda *a: None)
    monkeypatch.setattr(agent_module.os, "umask", lambda mask: 0o022)
    args = build_parser().parse_args(["agent", "--underlay-dev", "eth1", "--ovsdb",
                                      "unix:/nonexistent", "--heartbeat-interval", "5"])
    assert agent_module.cmd_agent(args) == 0
    assert made["heartbeat_s"] == 5.0
    assert "needs `nwc run --agent-unresponsive-after 15`" in caplog.text
    made.clear()
    caplog.clear()
    args = build_parser().parse_args(["agent", "--underlay-dev", "eth1", "--ovsdb",
                                      "unix:/nonexistent"])
    assert agent_module.cmd_agent(args) == 0
    assert made["heartbeat_s"] == 3.0
    assert "agent-unresponsive-after" not in caplog.text


def test_the_responder_never_initiates() -> None:
    _, tgt = specs()
    host = Host()
    host.want(LegRecord(tgt, new_psk(), start=True))
    host.steps(5)
    assert host.ike.initiations == 0
    assert host.status(tgt).phase is Phase.LISTENING
    host.ike.sa_table[tgt.connection_name] = SaInfo("ESTABLISHED", "INSTALLED", "4", "2")
    host.steps(1)
    assert host.status(tgt).phase is Phase.INSTALLED


def test_an_authentication_failure_is_reported_and_not_retried_with_the_same_key() -> None:
    req, _ = specs()
    host = Host()
    host.ike.outcome = "auth"
    host.want(LegRecord(req, new_psk(), start=True))
    host.steps(3)
    status = host.status(req)
    assert status.phase is Phase.AUTH_FAILED and "AUTHENTICATION_FAILED" in status.detail
    host.clock.advance(60)
    host.steps(5)
    assert host.ike.initiations == 1
    assert "nwv0" in host.net.vxlans and str(req.remote_vtep) in host.net.blackholes
    host.ike.outcome = "ok"  # the controller sends a new key: a new attempt
    host.want(LegRecord(req, new_psk(), start=True))
    host.steps(3)
    assert host.ike.initiations == 2 and host.status(req).phase is Phase.INSTALLED


def test_transient_ike_failures_back_off_and_retry() -> None:
    req, _ = specs()
    host = Host()
    host.ike.outcome = "timeout"
    host.want(LegRecord(req, new_psk(), start=True))
    host.steps(1)
    host.steps(4)
    assert host.ike.initiations == 1  # within the back-off: no storm
    assert host.status(req).phase is Phase.LISTENING
    host.clock.advance(0.6)
    host.steps(2)
    assert host.ike.initiations == 2
    host.ike.outcome = "ok"
    host.clock.advance(1.1)
    host.steps(3)
    assert host.status(req).phase is Phase.INSTALLED


def test_teardown_removes_everything_device_first_blackhole_last() -> None:
    host, req = psk_leg_installed()
    host.drop(req)
    host.steps(1)
    j = host.journal
    assert j.index("delete_port", "nwv0") < j.index("terminate")
    assert j.index("remove_vxlan", "nwv0") < j.index("terminate")
    last_ike = max(j.index("unload_conn"), j.index("unload_shared"), j.index("terminate"))
    assert last_ike < j.index("remove_blackhole", str(req.remote_vtep))
    assert j.entries[-1][0] == "remove_blackhole"
    assert host.net.empty()
    assert not host.db.ports and not host.db.leg_keys()
    assert not (host.ike.conns or host.ike.shared or host.ike.keys or host.ike.sa_table)
    assert host.compactions == 1  # the key's old value leaves OVSDB's on-disk log too


def test_a_restarted_charon_gets_everything_back(caplog: pytest.LogCaptureFixture) -> None:
    host, req = psk_leg_installed()
    host.ike.up = False
    host.steps(1)
    status = host.status(req)
    assert status.phase is Phase.IKE_DOWN
    # Nothing is torn down while charon is away: the blackhole keeps traffic from leaving.
    assert "nwv0" in host.net.vxlans and str(req.remote_vtep) in host.net.blackholes
    host.ike.restart()
    host.ike.up = True
    host.clock.advance(1)
    with caplog.at_level(logging.INFO, logger="nwc.agent"):
        host.steps(3)
    assert set(host.ike.conns) == {req.connection_name} and host.ike.shared
    assert host.status(req).phase is Phase.INSTALLED
    assert host.ike.initiations == 2
    # The way back is not reported with the reason it went down (a deploy-guide tester read
    # "ike_down -> connecting (the IKE daemon does not answer ...)").
    back = [r.getMessage() for r in caplog.records if "ike_down ->" in r.getMessage()]
    assert back and not any("does not answer" in line for line in back), back


def test_a_restarted_agent_takes_its_legs_back_and_can_remove_them() -> None:
    host, req = psk_leg_installed()
    host.agent = host.new_agent()  # the process restarted: no memory
    host.drop(req)  # and meanwhile the weave ended
    host.steps(1)
    assert host.net.empty() and not host.db.ports and not host.db.leg_keys()
    assert not (host.ike.conns or host.ike.shared)


def test_a_garbled_record_becomes_an_error_and_builds_nothing() -> None:
    req, _ = specs()
    host = Host()
    record = json.loads(LegRecord(req, new_psk()).to_json())
    record["spec"]["local_vtep"] = "not-an-address"
    host.db.ids[RECORD_PREFIX + req.key] = json.dumps(record)
    host.steps(2)
    status = host.status(req)
    assert status.phase is Phase.ERROR and "IPv4" in status.detail
    assert host.net.empty() and not host.db.ports


def test_a_record_for_another_backend_is_refused() -> None:
    req, _ = specs(topo=OVS_TOPO)
    host = Host()
    host.want(LegRecord(req, new_psk()))
    host.steps(1)
    assert host.status(req).phase is Phase.ERROR
    assert "backend" in host.status(req).detail and host.net.empty()


def test_an_x509_leg_asks_for_a_certificate_and_uses_it(tmp_path: Path) -> None:
    req, _ = specs(profile="silver")
    ca = CertificateAuthority.load_or_create(tmp_path / "pki", now=T0)
    host = Host()
    host.want(LegRecord(req, None, ca.cert_pem))
    host.steps(2)
    status = host.status(req)
    assert status.phase is Phase.WAITING_CERT and status.csr_pem is not None
    assert not host.ike.conns and not host.ike.keys
    cert = ca.sign_request(status.csr_pem, req.local_id, now=T0,
                           not_after=T0 + dt.timedelta(days=1))
    host.want(LegRecord(req, None, ca.cert_pem, cert, start=True))
    host.steps(3)
    assert len(host.ike.keys) == 1
    body = host.ike.conns[req.connection_name]
    assert body["local-nwc"]["certs"] == [cert] and body["remote-nwc"]["cacerts"] == [ca.cert_pem]
    assert host.status(req).phase is Phase.INSTALLED
    assert host.status(req).csr_pem is None
    # A certificate for some other key is not used.
    other = ca.sign_request(LegKey.generate(req.local_id).csr_pem(), req.local_id, now=T0,
                            not_after=T0 + dt.timedelta(days=1))
    host.want(LegRecord(req, None, ca.cert_pem, other, start=True))
    host.steps(1)
    assert host.status(req).phase is Phase.WAITING_CERT
    host.drop(req)
    host.steps(1)
    assert not host.ike.keys and not host.ike.conns and host.net.empty()


def test_rekeys_are_counted_and_counters_do_not_flood_ovsdb() -> None:
    req, _ = specs()
    host = Host()
    host.want(LegRecord(req, new_psk(), start=True))
    host.steps(3)
    name = req.connection_name
    writes = host.db.writes
    for n in range(1, 6):  # bytes move every step; nothing else does
        host.ike.sa_table[name] = SaInfo("ESTABLISHED", "INSTALLED", "1", "1", bytes_in=n)
        host.clock.advance(0.1)
        host.steps(1)
    assert host.db.writes == writes
    host.clock.advance(2)
    host.steps(1)
    assert host.db.writes == writes + 1 and host.status(req).sa.bytes_in == 5
    host.ike.sa_table[name] = SaInfo("ESTABLISHED", "INSTALLED", "2", "1")  # new CHILD SA
    host.steps(1)
    assert host.status(req).rekeys == 1


def test_ovs_ipsec_backend_writes_the_interface_and_cleans_up() -> None:
    req, _ = specs(topo=OVS_TOPO)
    host = Host(backend="ovs-ipsec")
    psk = new_psk()
    host.want(LegRecord(req, psk))
    host.steps(2)
    port = host.db.ports["nwv0"]
    assert port["type"] == "vxlan" and port["ofport_request"] == 10000
    assert port["options"]["psk"] == psk.reveal().hex()
    assert port["options"]["remote_ip"] == str(req.remote_endpoint)
    assert host.db.other["ipsec_skb_mark"] == "0/1"  # OVS drops unencrypted tunnel packets
    assert host.status(req).phase is Phase.DELEGATED
    assert host.net.addresses == {(str(req.local_endpoint), "ul0")} and not host.net.vxlans
    host.ike.sa_table["nwv0-in-1"] = SaInfo("ESTABLISHED", "INSTALLED", "1", "1")
    host.ike.sa_table["nwv0-out-1"] = SaInfo("ESTABLISHED", "INSTALLED", "2", "1")
    host.steps(1)
    assert host.status(req).phase is Phase.INSTALLED
    host.drop(req)
    host.steps(1)
    assert not host.db.ports and not host.db.other and not host.db.leg_keys() and host.net.empty()


def ovs_leg_after_an_earlier_one(earlier: dict[str, SaInfo],
                                 written: bool = True) -> tuple[Host, LegRecord]:
    """An ovs-ipsec host whose slot 0 carried a leg whose SAs (`earlier`) are still up when
    the leg of another weave takes the slot: that leg's record and, if `written`, the leg
    written and `delegated`."""
    host = Host(backend="ovs-ipsec")
    first, _ = specs(topo=OVS_TOPO)
    host.want(LegRecord(first, new_psk()))
    host.steps(1)
    host.ike.sa_table = dict(earlier)
    host.steps(1)
    assert host.status(first).phase is Phase.INSTALLED
    host.drop(first)
    host.steps(1)  # the leg is gone; ovs-monitor-ipsec has not taken its SAs down yet
    w = one_leg_weave(8, 0)
    second, _ = leg_specs(w, w.legs[0], POLICY.profiles["gold"], OVS_TOPO)
    record = LegRecord(second, new_psk())
    if written:
        host.want(record)
        host.steps(2)
        assert host.status(second).phase is Phase.DELEGATED
    return host, record


def test_ovs_ipsec_a_reused_slot_is_not_installed_on_the_earlier_tunnels_sa() -> None:
    """Found in review: ovs-monitor-ipsec names SAs after the port, and a slot reused after
    its weave ended repeats the port and the endpoints: the new leg reported installed on the
    earlier tunnel's SA, before ovs-monitor-ipsec had even taken it down."""
    host, record = ovs_leg_after_an_earlier_one({
        "nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "2", "1"),
        "nwv0-out-1": SaInfo("ESTABLISHED", "INSTALLED", "3", "1")})
    second = record.spec
    status = host.status(second)
    assert status.phase is Phase.DELEGATED and status.sa is None and "sa_of" not in status.extra
    host.ike.sa_table["nwv0-in-1"] = SaInfo("ESTABLISHED", "INSTALLED", "4", "1")  # its rekey
    host.steps(1)
    assert host.status(second).phase is Phase.DELEGATED
    host.ike.sa_table = {  # ovs-monitor-ipsec negotiates the tunnel the port asks for now
        "nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "6", "5"),
        "nwv0-out-1": SaInfo("ESTABLISHED", "INSTALLED", "7", "5")}
    host.steps(1)
    status = host.status(second)
    assert status.phase is Phase.INSTALLED and status.extra["sa_of"] == record.tunnel_id()


def test_ovs_ipsec_an_earlier_tunnels_sa_stays_stale_across_a_listing_mid_ike_rekey() -> None:
    """list-sas is no atomic snapshot: mid IKE SA rekey it can show only the old IKE SA,
    its CHILD SA already handed on (nwc.ike lists again, at most SA_LISTINGS times, so such
    a listing can still reach the agent). That listing must not make the agent forget the
    earlier tunnel's CHILD SA, or its successor IKE SA, which holds that CHILD SA, would be
    taken as the new leg's: the new weave ready on its predecessor's SA."""
    host, record = ovs_leg_after_an_earlier_one({
        "nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "2", "1"),
        "nwv0-out-1": SaInfo("ESTABLISHED", "INSTALLED", "3", "1")})
    second = record.spec
    # The earlier tunnel's IKE SA is rekeyed: a listing shows only the old one, handed over.
    host.ike.sa_table = {"nwv0-in-1": SaInfo("DELETING", None, None, "1"),
                         "nwv0-out-1": SaInfo("DELETING", None, None, "1")}
    host.steps(1)
    # Then its successor, holding the same (earlier tunnel's) CHILD SAs.
    host.ike.sa_table = {"nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "2", "4"),
                         "nwv0-out-1": SaInfo("ESTABLISHED", "INSTALLED", "3", "4")}
    host.steps(1)
    status = host.status(second)
    assert status.phase is Phase.DELEGATED and "sa_of" not in status.extra


def test_ovs_ipsec_a_new_sa_whose_ike_id_is_an_old_child_id_is_the_legs() -> None:
    """charon numbers IKE and CHILD SAs each on its own: the earlier tunnel's SA was IKE SA
    1 with CHILD SA 2, and the new tunnel's is IKE SA 2 with CHILD SA 3. With one set of ids
    for both, IKE SA 2 passed for the old CHILD SA 2 and the leg stayed `delegated`."""
    host, record = ovs_leg_after_an_earlier_one({
        "nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "2", "1")})
    host.ike.sa_table = {"nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "3", "2")}
    host.steps(1)
    status = host.status(record.spec)
    assert status.phase is Phase.INSTALLED and status.extra["sa_of"] == record.tunnel_id()


def test_ovs_ipsec_a_restarted_charon_repeating_old_ids_holds_nothing_old() -> None:
    """A restarted charon numbers its SAs from 1 again: the SA ovs-monitor-ipsec negotiates
    with it may repeat the ids of the earlier tunnel's, which went with the charon before.
    Marks kept across the restart held the new SA (and its rekeys) back for good."""
    host, record = ovs_leg_after_an_earlier_one({
        "nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "1", "1")})
    host.ike.restart()  # between two passes: the agent never saw it down
    host.ike.sa_table = {"nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "1", "1")}
    host.steps(1)
    status = host.status(record.spec)
    assert status.phase is Phase.INSTALLED and status.extra["sa_of"] == record.tunnel_id()


def test_ovs_ipsec_an_interface_written_while_charon_is_down_takes_the_next_sa() -> None:
    """A charon that does not run holds no SA: the first one it lists after the interface
    was written is the leg's, though the agent had not looked at the port before."""
    host, record = ovs_leg_after_an_earlier_one({
        "nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "2", "1")}, written=False)
    host.ike.restart()
    host.ike.up = False
    host.want(record)
    host.steps(2)
    assert host.status(record.spec).phase is Phase.DELEGATED
    host.ike.up = True
    host.ike.sa_table = {"nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "1", "1")}
    host.steps(1)
    assert host.status(record.spec).phase is Phase.INSTALLED


def test_ovs_ipsec_an_interface_is_not_written_while_charon_does_not_answer() -> None:
    """Found in review: an interface written on a pass where charon timed out (busy, still
    holding the earlier tunnel's SAs) had nothing noted, so the first listing after was
    taken as all old, and with it the SA ovs-monitor-ipsec negotiated for the interface
    meanwhile: the leg stayed `delegated` through that SA and its rekeys."""
    host, record = ovs_leg_after_an_earlier_one({
        "nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "2", "1")}, written=False)
    add_port = host.db.add_port

    def monitor_negotiates(bridge: str, columns: dict[str, object]) -> None:
        # ovs-monitor-ipsec takes the earlier tunnel's SA down and negotiates the new one
        # as soon as the interface is written, whether the agent's VICI calls answer or not.
        add_port(bridge, columns)
        host.ike.sa_table = {"nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "4", "3")}

    host.db.add_port = monitor_negotiates  # type: ignore[method-assign]
    host.ike.busy = True
    host.want(record)
    host.steps(2)
    status = host.status(record.spec)
    assert status.phase is Phase.BUILDING and "waiting for the IKE daemon" in status.detail
    host.ike.busy = False
    host.steps(2)
    status = host.status(record.spec)
    assert status.phase is Phase.INSTALLED and status.extra["sa_of"] == record.tunnel_id()
    host.ike.sa_table = {"nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "5", "3")}  # rekey
    host.steps(1)
    assert host.status(record.spec).phase is Phase.INSTALLED


def test_ovs_ipsec_a_restarted_agent_does_not_trust_an_earlier_tunnels_sa() -> None:
    """Found in review: the SAs up when a leg's interface is written were noted in memory
    only, so an agent restarted while the earlier tunnel's SA was still up took it for the
    new leg's: `installed`, for the new record, on its predecessor's SA."""
    host, record = ovs_leg_after_an_earlier_one({
        "nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "2", "1")})
    host.agent = host.new_agent()  # the process restarted: no memory
    host.steps(2)
    status = host.status(record.spec)
    assert status.phase is Phase.DELEGATED and "sa_of" not in status.extra
    host.ike.sa_table = {"nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "4", "3")}
    host.steps(1)
    status = host.status(record.spec)
    assert status.phase is Phase.INSTALLED and status.extra["sa_of"] == record.tunnel_id()


def test_ovs_ipsec_marks_read_back_by_a_restarted_agent_are_of_their_charons_run() -> None:
    """The noted SAs carry the charon run they are of: a charon that restarted while the
    agent was stopped holds none of them, though its new SA repeats their ids."""
    host, record = ovs_leg_after_an_earlier_one({
        "nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "1", "1")})
    host.ike.restart()
    host.ike.sa_table = {"nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "1", "1")}
    host.agent = host.new_agent()
    host.steps(2)
    assert host.status(record.spec).phase is Phase.INSTALLED


class AgentDied(BaseException):
    """The agent process ends here (no `except Exception` of its own catches it)."""


def test_ovs_ipsec_an_agent_stopped_right_after_writing_an_interface_knows_the_old_sas(
        ) -> None:
    """The SAs up before the interface was written are noted in OVSDB before it is written:
    an agent that stops right after writing it, and finds on its return that the earlier
    tunnel's SA went and the new one came, counts the new one (taking every SA it finds up
    as old would hold it back for good: its rekeys keep one of its ids)."""
    host, record = ovs_leg_after_an_earlier_one({
        "nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "2", "1")}, written=False)
    add_port = host.db.add_port

    def add_then_die(bridge: str, columns: dict[str, object]) -> None:
        add_port(bridge, columns)
        raise AgentDied

    host.db.add_port = add_then_die  # type: ignore[method-assign]
    host.want(record)
    with pytest.raises(AgentDied):
        host.agent.step()
    host.db.add_port = add_port  # type: ignore[method-assign]
    assert host.db.ports["nwv0"]["options"]["psk"] == record.psk.reveal().hex()  # type: ignore[union-attr]
    host.ike.sa_table = {"nwv0-in-1": SaInfo("ESTABLISHED", "INSTALLED", "4", "3")}
    host.agent = host.new_agent()
    host.steps(2)
    status = host.status(record.spec)
    assert status.phase is Phase.INSTALLED and status.extra["sa_of"] == record.tunnel_id()


def test_ovs_ipsec_x509_uses_a_host_certificate_kept_private(tmp_path: Path) -> None:
    req, _ = specs(profile="silver", topo=OVS_TOPO)
    ca = CertificateAuthority.load_or_create(tmp_path / "pki", now=T0)
    host = Host(backend="ovs-ipsec", state_dir=tmp_path / "agent")
    host.agent = host.new_agent()
    host.want(LegRecord(req, None, ca.cert_pem))
    host.steps(2)
    csr = host.status(req).csr_pem
    assert csr is not None and host.status(req).phase is Phase.WAITING_CERT
    cert = ca.sign_request(csr, "h1.host.nwc", now=T0, not_after=T0 + dt.timedelta(days=1))
    host.want(LegRecord(req, None, ca.cert_pem, cert))
    host.steps(2)
    files = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "agent/ovs-ipsec").iterdir()}
    assert files == {"host.key": 0o600, "host.crt": 0o600, "ca.crt": 0o600}
    assert host.db.other["private_key"].endswith("host.key")
    assert host.db.ports["nwv0"]["options"]["remote_name"] == "h2.host.nwc"
    host.drop(req)
    host.steps(1)
    assert not (tmp_path / "agent/ovs-ipsec").exists() and not host.db.other


def test_a_record_json_cannot_parse_spoils_only_its_own_leg() -> None:
    req, _ = specs(slot=0)
    other, _ = specs(slot=1)
    host = Host()
    host.db.ids[RECORD_PREFIX + req.key] = "[" * 50_000  # json's RecursionError
    host.want(LegRecord(other, new_psk(), start=True))
    host.steps()
    assert host.status(other).phase is Phase.INSTALLED
    status = host.status(req)
    assert status.phase is Phase.ERROR and "nested" in status.detail
    assert "nwv0" not in host.net.vxlans


def test_a_restarted_agent_skips_a_garbled_status_and_adopts_the_rest() -> None:
    req, _ = specs(slot=0)
    other, _ = specs(slot=1)
    host = Host()
    host.want(LegRecord(req, new_psk(), start=True))
    host.steps()
    garbled = json.loads(host.db.ids[STATUS_PREFIX + req.key])
    garbled["extra"] = {"ovs_keys": 5}  # once a TypeError in the middle of adoption
    host.db.ids[STATUS_PREFIX + other.key] = json.dumps(garbled)
    host.agent = host.new_agent()  # restarted, and meanwhile the weave ended
    host.drop(req)
    host.steps(2)
    assert host.net.empty() and not host.db.ports and not host.db.leg_keys()
    assert not (host.ike.conns or host.ike.shared)


@pytest.mark.parametrize("broken", ["delete_port", "remove_link", "remove_link_noop"])
def test_the_blackhole_stays_while_the_device_may_still_send(broken: str) -> None:
    host, req = psk_leg_installed()
    failing = host.db if broken == "delete_port" else host.net
    failing.failing.add(broken)
    host.drop(req)
    host.steps(2)
    # The SA is gone: for whatever is left of the port or device, the blackhole is all that
    # keeps its VXLAN from following the main table's route in clear.
    assert not host.ike.sa_table and not host.ike.shared
    assert str(req.remote_vtep) in host.net.blackholes
    status = host.status(req)
    assert status.phase is Phase.ERROR and "teardown incomplete" in status.detail
    failing.failing.clear()
    host.steps(1)  # the next pass finishes the job, blackhole last
    assert host.net.empty() and not host.db.ports and not host.db.leg_keys()
    j = host.journal
    assert j.entries[-1] == ("remove_blackhole", str(req.remote_vtep))
    assert j.count("remove_blackhole") == 1  # never while the device might still send


def test_ovs_ipsec_is_refused_on_a_userspace_datapath_bridge() -> None:
    req, _ = specs(topo=OVS_TOPO)
    host = Host(backend="ovs-ipsec")
    host.db.datapath_types["br-int"] = "netdev"
    host.want(LegRecord(req, new_psk()))
    host.steps(2)
    status = host.status(req)
    assert status.phase is Phase.ERROR and "netdev" in status.detail
    assert not host.db.ports and not host.db.other and host.net.empty()  # nothing built
    host.drop(req)
    host.steps(1)
    assert not host.db.leg_keys()


def test_routes_and_addresses_removed_by_someone_else_are_put_back() -> None:
    host, _ = psk_leg_installed()
    built = (set(host.net.blackholes), set(host.net.addresses), set(host.net.link_routes))
    # systemd-networkd restarting, or an operator's `ip route flush` / `ip addr flush`
    host.net.blackholes.clear()
    host.net.addresses.clear()
    host.net.link_routes.clear()
    host.ike.up = False  # and charon stops: nothing but the blackhole keeps VXLAN off the wire
    host.steps(1)
    assert (host.net.blackholes, host.net.addresses, host.net.link_routes) == built
    assert host.journal.count("add_vxlan") == 1  # the device was there: left alone


def test_a_blackhole_that_cannot_be_put_back_takes_the_device_away() -> None:
    host, req = psk_leg_installed()
    host.net.blackholes.clear()
    host.net.failing.add("ensure_blackhole")
    host.steps(1)
    # No blackhole and no SA later would mean VXLAN in clear: no device, no VXLAN at all.
    assert "nwv0" not in host.net.vxlans
    status = host.status(req)
    assert status.phase is Phase.ERROR and "blackhole" in status.detail
    host.net.failing.clear()
    host.steps(2)
    j = host.journal
    rebuilt_at = max(i for i, e in enumerate(j.entries) if e == ("add_vxlan", "nwv0"))
    restored_at = max(i for i, e in enumerate(j.entries) if e[0] == "add_blackhole")
    assert restored_at < rebuilt_at and str(req.remote_vtep) in host.net.blackholes
    assert host.status(req).phase is Phase.INSTALLED


def test_a_teardown_waits_for_a_busy_charon_instead_of_forgetting_what_it_holds() -> None:
    host, req = psk_leg_installed()
    host.ike.busy = True  # running, holding the SA, connection and key; VICI times out
    host.drop(req)
    host.steps(2)
    status = host.status(req)  # still reported: the leg is not gone
    assert status.phase is Phase.ERROR and "did not answer" in status.detail
    assert host.ike.shared and host.ike.conns and host.ike.sa_table
    assert "nwv0" not in host.net.vxlans  # nothing can send meanwhile
    host.ike.busy = False
    host.steps(1)
    assert not (host.ike.conns or host.ike.shared or host.ike.sa_table)
    assert host.net.empty() and not host.db.leg_keys()


def psk_leg_installed() -> tuple[Host, TunnelSpec]:
    """A host whose agent has built the initiator end of a psk leg and started IKE."""
    req, _ = specs()
    host = Host()
    host.want(LegRecord(req, new_psk(), start=True))
    host.steps()
    return host, req


def psk_responder_installed() -> tuple[Host, TunnelSpec]:
    """A host whose agent holds the responder end of a psk leg, installed once the peer
    started the SA (IKE and CHILD SA ids "1")."""
    _, res = specs()
    host = Host()
    host.want(LegRecord(res, new_psk()))
    host.steps(2)
    host.ike.sa_table[res.connection_name] = SaInfo("ESTABLISHED", "INSTALLED", "1", "1")
    host.steps(1)
    return host, res


def x509_leg_installed(tmp_path: Path) -> tuple[Host, TunnelSpec, CertificateAuthority]:
    req, _ = specs(profile="silver")
    ca = CertificateAuthority.load_or_create(tmp_path / "pki", now=T0)
    host = Host()
    host.want(LegRecord(req, None, ca.cert_pem))
    host.steps(2)
    host.want(LegRecord(req, None, ca.cert_pem, sign(ca, host.status(req), req), start=True))
    host.steps(3)
    assert host.status(req).phase is Phase.INSTALLED
    return host, req, ca


def sign(ca: CertificateAuthority, status: LegStatus, spec: TunnelSpec) -> bytes:
    assert status.csr_pem is not None
    return ca.sign_request(status.csr_pem, spec.local_id, now=T0,
                           not_after=T0 + dt.timedelta(days=1))


def test_a_restarted_agent_keeps_an_installed_x509_sa_and_asks_for_nothing(
        tmp_path: Path) -> None:
    host, req, _ = x509_leg_installed(tmp_path)
    phases: list[Phase] = []
    host.agent = host.new_agent()  # restarted: its key pair is gone with the process
    for _ in range(5):
        host.clock.advance(3)
        host.steps(1)
        phases.append(host.status(req).phase)
    # The SA charon holds still carries traffic: no certificate wait, so no false sa_down.
    assert set(phases) == {Phase.INSTALLED} and host.status(req).csr_pem is None


def test_a_restarted_agent_unloads_the_key_from_before_when_it_loads_a_new_one(
        tmp_path: Path) -> None:
    host, req, ca = x509_leg_installed(tmp_path)
    key_from_before, = host.ike.keys
    host.agent = host.new_agent()
    host.steps(2)
    del host.ike.sa_table[req.connection_name]  # the SA is lost: now a new key is needed
    host.steps(1)
    status = host.status(req)
    assert status.phase is Phase.WAITING_CERT
    host.want(LegRecord(req, None, ca.cert_pem, sign(ca, status, req), start=True))
    host.steps(3)
    assert host.status(req).phase is Phase.INSTALLED
    assert len(host.ike.keys) == 1 and key_from_before not in host.ike.keys
    host.drop(req)
    host.steps(1)
    assert not host.ike.keys and not host.ike.conns and host.net.empty()


def test_a_record_is_parsed_once_while_its_text_stays_and_again_when_it_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Records are read every pass; parsing them was most of a quiet pass's time. A record
    whose text changes (new key material) must still be acted on at the next pass."""
    host, req = psk_leg_installed()
    parses = []
    real = LegRecord.from_json.__func__  # type: ignore[attr-defined]

    def counted(cls: type[LegRecord], text: str) -> LegRecord:
        parses.append(text)
        return real(cls, text)

    monkeypatch.setattr(LegRecord, "from_json", classmethod(counted))
    host.steps(3)
    assert parses == []
    fresh = new_psk()
    host.want(LegRecord(req, fresh, start=True))
    host.steps(3)
    assert len(parses) == 1
    assert any(secret == fresh for secret, _ in host.ike.shared.values())


def many_specs(count: int, topo=TOPO) -> list[TunnelSpec]:
    out = []
    for i in range(count):
        w = one_leg_weave(20 + i, i)
        out.append(leg_specs(w, w.legs[0], POLICY.profiles["gold"], topo)[0])
    return out


def test_a_burst_of_new_legs_is_built_a_few_per_pass_after_the_built_ones_are_checked(
) -> None:
    """With many legs on a host each build costs tens of milliseconds; a burst of new legs
    must not hold the built legs' blackhole checks for seconds."""
    host = Host()
    first, *burst = many_specs(2 + MAX_BUILDS_PER_PASS)
    host.want(LegRecord(first, new_psk(), start=True))
    host.steps(1)
    assert first.device in host.net.vxlans
    host.net.blackholes.discard(str(first.remote_vtep))  # someone removed it
    for spec in burst:
        host.want(LegRecord(spec, new_psk(), start=True))
    mark = len(host.journal.entries)
    host.steps(1)
    built = [s for s in burst if s.device in host.net.vxlans]
    assert len(built) == MAX_BUILDS_PER_PASS
    waiting = [s for s in burst if s not in built]
    assert [host.status(s).phase for s in waiting] == [Phase.BUILDING]
    assert "waiting to be built" in host.status(waiting[0]).detail
    # The built leg's blackhole went back before any new leg was built.
    new = host.journal.entries[mark:]
    assert new.index(("add_blackhole", str(first.remote_vtep))) < \
        min(new.index(("add_vxlan", s.device)) for s in built)
    host.steps(1)
    assert all(s.device in host.net.vxlans for s in burst)


def test_ovs_ipsec_legs_are_never_held_back_by_the_build_budget() -> None:
    host = Host(backend="ovs-ipsec")
    legs = many_specs(MAX_BUILDS_PER_PASS + 2, topo=OVS_TOPO)
    for spec in legs:
        host.want(LegRecord(spec, new_psk()))
    host.steps(2)
    assert all(host.status(s).phase is Phase.DELEGATED for s in legs)


def test_new_key_material_replaces_the_sa_make_before_break() -> None:
    """A restarted controller drew a new key for a live leg: the old SA keeps the traffic
    until one built from the new key is up, then is terminated by its id; the leg is
    `installed` for the new record only then."""
    host, req = psk_leg_installed()
    name = req.connection_name
    old = host.ike.sa_table[name]
    host.ike.reauth_deletes_old = False  # the agent must see the old one go itself
    fresh = new_psk()
    host.want(LegRecord(req, fresh))  # the controller waits for the peer to load it
    host.steps(3)
    assert host.ike.shared[name][0] == fresh
    status = host.status(req)
    assert status.phase is Phase.CONNECTING and "waiting for the peer" in status.detail
    assert status.sa is not None and status.sa.installed  # the old SA still carries it
    assert "sa_of" not in status.extra and status.carrying
    assert host.journal.count("reauth") == 0
    host.want(LegRecord(req, fresh, start=True))
    host.steps(3)
    j = host.journal
    assert j.index("reauth", old.ike_id) < j.index("terminate_sa", old.ike_id)
    assert host.ike.ike_sa_ids(name) == {host.ike.sa_table[name].ike_id} != {old.ike_id}
    status = host.status(req)
    assert status.phase is Phase.INSTALLED and "carrying" not in status.extra
    assert status.extra["sa_of"] == LegRecord(req, fresh).tunnel_id()
    assert host.ike.initiations == 1  # the first one: nothing was torn down to swap
    assert j.count("remove_vxlan") == 0 and j.count("remove_blackhole") == 0


def test_a_new_key_the_peer_refuses_is_reported_and_the_old_sa_kept() -> None:
    """Found open: a reauthentication the peer refused (wrong PSK) left the old SA, as it
    should, but nothing said so: the leg stayed `connecting` and the agent asked again every
    timeout, each time an authentication failure at the peer."""
    host, req = psk_leg_installed()
    name = req.connection_name
    old = host.ike.sa_table[name]
    host.ike.outcome = "auth"  # the peer does not take the new key
    host.want(LegRecord(req, new_psk(), start=True))
    host.steps(3)
    status = host.status(req)
    assert status.phase is Phase.AUTH_FAILED and "AUTHENTICATION_FAILED" in status.detail
    assert "still carries the traffic" in status.detail
    assert status.sa is not None and status.sa.installed and "sa_of" not in status.extra
    assert status.carrying  # the controller counts it, and takes the end as up
    assert host.ike.ike_sa_ids(name) == {old.ike_id}  # it still encrypts: kept
    for _ in range(5):
        host.clock.advance(host.agent.initiate_timeout_s)
        host.steps(1)
    assert host.journal.count("reauth") == 1  # that key would fail again: not asked again
    assert host.status(req).phase is Phase.AUTH_FAILED
    host.ike.outcome = "ok"
    fresh = new_psk()
    host.want(LegRecord(req, fresh, start=True))  # another key is tried
    host.steps(3)
    status = host.status(req)
    assert status.phase is Phase.INSTALLED
    assert status.extra["sa_of"] == LegRecord(req, fresh).tunnel_id()
    assert old.ike_id not in host.ike.ike_sa_ids(name)


def responder_with_a_new_sa_beside_the_old() -> tuple[Host, TunnelSpec]:
    """A psk leg's responder end whose peer made an SA with new key material: the old IKE
    SA, rekeyed meanwhile (no new authentication: a new IKE id, the same CHILD SA, still
    old), and the new one ("3"), both up."""
    host, res = psk_responder_installed()
    name = res.connection_name
    assert host.status(res).phase is Phase.INSTALLED
    host.want(LegRecord(res, new_psk()))
    host.steps(2)
    assert host.status(res).phase is Phase.CONNECTING
    host.ike.sa_table[name] = SaInfo("ESTABLISHED", "INSTALLED", "1", "2")
    host.steps(2)
    assert host.status(res).phase is Phase.CONNECTING
    assert host.ike.initiations == 0 and host.journal.count("reauth") == 0
    host.ike.others[name] = [host.ike.sa_table[name]]
    host.ike.sa_table[name] = SaInfo("ESTABLISHED", "INSTALLED", "3", "3")
    return host, res


def test_a_responder_leaves_the_old_sa_to_the_peer_and_a_rekey_of_it_stays_old() -> None:
    """The responder's new CHILD SA is installed before the initiator has the answer that
    installs its own: a DELETE of the old SA from the responder could reach the initiator
    first and leave it without an SA. So the initiator deletes it; the responder is
    `installed` once it is gone."""
    host, res = responder_with_a_new_sa_beside_the_old()
    name = res.connection_name
    for _ in range(3):
        host.clock.advance(1)
        host.steps(1)
        status = host.status(res)
        assert status.phase is Phase.CONNECTING and "waiting for the peer" in status.detail
        assert status.carrying and "sa_of" not in status.extra
    assert host.journal.count("terminate_sa") == 0
    host.ike.others[name] = []  # the peer's DELETE of the old IKE SA
    host.steps(1)
    assert host.status(res).phase is Phase.INSTALLED
    assert host.journal.count("terminate_sa") == 0 and host.ike.ike_sa_ids(name) == {"3"}


def test_a_responder_deletes_the_old_sa_itself_if_the_peer_does_not() -> None:
    host, res = responder_with_a_new_sa_beside_the_old()
    name = res.connection_name
    host.steps(1)
    assert host.status(res).phase is Phase.CONNECTING
    host.clock.advance(host.agent.initiate_timeout_s)
    host.steps(1)
    assert host.journal.count("terminate_sa", "2") == 1
    assert host.ike.ike_sa_ids(name) == {"3"}
    assert host.status(res).phase is Phase.INSTALLED


def test_a_responder_deletes_the_old_sa_at_the_deadline_even_if_listing_sas_fails() -> None:
    """Found in review: a failed listing of the IKE SAs returned before the deadline was
    looked at, so a charon that kept failing it kept both SAs for ever."""
    host, res = responder_with_a_new_sa_beside_the_old()
    name = res.connection_name
    listing = host.ike.ike_sa_ids

    def failing(conn: str) -> set[str]:
        raise IkeError("fake charon: listing the SAs failed")

    host.ike.ike_sa_ids = failing  # type: ignore[method-assign]
    host.steps(1)
    status = host.status(res)
    assert status.phase is Phase.CONNECTING and "listing the IKE SAs" in status.detail
    host.clock.advance(host.agent.initiate_timeout_s)
    host.steps(1)
    assert host.journal.count("terminate_sa", "2") == 1
    assert listing(name) == {"3"}
    assert host.status(res).phase is Phase.INSTALLED


def test_an_agent_restarted_during_a_swap_still_knows_the_old_sa() -> None:
    """Found with the ovs-ipsec marks: the SAs built from earlier key material were noted in
    memory only, and the status already names the new material, so an agent restarted
    before they were replaced reported the old SA `installed` for the new record."""
    host, req = psk_leg_installed()
    name = req.connection_name
    old = host.ike.sa_table[name]
    host.ike.reauth_deletes_old = False
    fresh = new_psk()
    host.want(LegRecord(req, fresh))
    host.steps(2)
    assert host.status(req).phase is Phase.CONNECTING
    host.agent = host.new_agent()
    host.steps(2)
    status = host.status(req)
    assert status.phase is Phase.CONNECTING and "sa_of" not in status.extra
    host.want(LegRecord(req, fresh, start=True))
    host.steps(3)
    assert host.journal.index("reauth", old.ike_id) < host.journal.index("terminate_sa",
                                                                         old.ike_id)
    status = host.status(req)
    assert status.phase is Phase.INSTALLED and "old_sas" not in status.extra
    assert status.extra["sa_of"] == LegRecord(req, fresh).tunnel_id()


def test_an_agent_restarted_after_charon_timed_out_still_replaces_the_old_sa() -> None:
    """Found in review: a pass on which charon timed out dropped the status's `material`,
    and a restarted agent knew what its SAs were built from only by that field. After a new
    key from a restarted controller it started no swap: the SA built from the old key was
    `installed` for the new record."""
    host, req = psk_leg_installed()
    name = req.connection_name
    old = host.ike.sa_table[name]
    host.ike.busy = True  # it still holds the SA, but does not answer
    host.steps(2)
    assert host.status(req).phase is Phase.IKE_DOWN
    host.agent = host.new_agent()
    fresh = new_psk()
    host.want(LegRecord(req, fresh, start=True))
    host.ike.busy = False
    host.steps(3)
    assert host.journal.count("reauth", old.ike_id) == 1
    assert old.ike_id not in host.ike.ike_sa_ids(name)
    status = host.status(req)
    assert status.phase is Phase.INSTALLED
    assert status.extra["sa_of"] == LegRecord(req, fresh).tunnel_id()


def test_a_charon_restarted_during_a_swap_holds_nothing_old_though_its_ids_repeat() -> None:
    host, res = psk_responder_installed()
    name = res.connection_name
    host.want(LegRecord(res, new_psk()))
    host.steps(1)
    assert host.status(res).phase is Phase.CONNECTING
    host.ike.restart()
    host.steps(1)  # everything loaded again
    host.ike.sa_table[name] = SaInfo("ESTABLISHED", "INSTALLED", "1", "1")  # counted anew
    host.steps(1)
    assert host.status(res).phase is Phase.INSTALLED
    assert host.journal.count("terminate_sa") == 0


def new_certificate(host: Host, req: TunnelSpec, ca: CertificateAuthority) -> bytes:
    """What a restarted controller signs for the key the agent already holds: another
    certificate than the one its SA was made with."""
    record = LegRecord.from_json(host.db.ids[RECORD_PREFIX + req.key])
    key = host.agent.legs[req.key].key
    assert key is not None
    again = sign(ca, dataclasses.replace(host.status(req), csr_pem=key.csr_pem()), req)
    assert again != record.cert_pem
    return again


def test_new_certificates_replace_the_sa_make_before_break(tmp_path: Path) -> None:
    """charon's reauthentication would present the old certificate. The connection loaded
    with the new one is another connection to charon: initiated, it makes a new IKE SA
    beside the old one, which carries the traffic until the new one is installed and is
    then terminated by its id. The leg is `installed` for the new record only then."""
    host, req, ca = x509_leg_installed(tmp_path)
    name = req.connection_name
    old = host.ike.sa_table[name]
    again = new_certificate(host, req, ca)
    host.want(LegRecord(req, None, ca.cert_pem, again, start=True))
    j = host.journal
    for _ in range(4):
        host.steps(1)
        if j.count("initiate", name) == 2:
            break
    new = host.ike.sa_table[name]
    assert j.index("load_conn", name) < len(j.entries) - 1 - j.entries[::-1].index(
        ("initiate", name))
    assert host.ike.conns[name]["local-nwc"]["certs"] == [again]
    # The new SA came up while the old one still carried the traffic.
    assert host.ike.ike_sa_ids(name) == {old.ike_id, new.ike_id} and new.ike_id != old.ike_id
    assert j.count("terminate_sa") == 0
    assert host.status(req).phase is Phase.CONNECTING and host.status(req).carrying
    host.steps(1)
    assert j.entries[-1] == ("terminate_sa", old.ike_id)
    assert host.ike.ike_sa_ids(name) == {new.ike_id}
    status = host.status(req)
    assert status.phase is Phase.INSTALLED
    assert status.extra["sa_of"] == LegRecord(req, None, ca.cert_pem, again).tunnel_id()
    assert host.net.blackholes and j.count("remove_vxlan") == 0


def test_new_certificates_the_peer_refuses_keep_the_old_sa_and_are_reported(
        tmp_path: Path) -> None:
    host, req, ca = x509_leg_installed(tmp_path)
    name = req.connection_name
    old = host.ike.sa_table[name]
    host.ike.outcome = "auth"  # e.g. the peer does not trust the new certificate's CA
    host.want(LegRecord(req, None, ca.cert_pem, new_certificate(host, req, ca), start=True))
    host.steps(3)
    status = host.status(req)
    assert status.phase is Phase.AUTH_FAILED and "AUTHENTICATION_FAILED" in status.detail
    assert "still carries the traffic" in status.detail
    assert status.carrying and "sa_of" not in status.extra
    assert host.ike.ike_sa_ids(name) == {old.ike_id} and host.journal.count("terminate_sa") == 0
    for _ in range(3):
        host.clock.advance(host.agent.initiate_timeout_s)
        host.steps(1)
    assert host.journal.count("initiate", name) == 2  # the first SA's, and this one's, once
