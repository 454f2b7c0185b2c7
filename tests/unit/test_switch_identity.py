"""Whose switch it is: over TLS, a connection is taken for the topology switch whose datapath id
it announces only if its certificate names that switch (`nwc.ofapp.switch_identity`, on
`nwc.certnames`' rule). The rule on certificates shaped as `ovs-pki` writes them, then the flows
part with connections carrying certificates: a compute host's certificate claiming a fabric
switch's dpid is refused before anything is sent, even while the real switch is away, and
cannot lock the real one out."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from certfiles import named_der
from flowsim import FlowsSim
from netsim import TRIANGLE

from nwc.admission import WeaveRequest
from nwc.config import SHIPPED_POLICIES
from nwc.ofapp import switch_identity
from nwc.policy import load_policy
from nwc.topology import parse_topology_text
from nwc.weave import State, Weave

pytestmark = pytest.mark.unit

OVS_PKI_ID = "7e2028b8-14b3-4786-b3eb-a466e8d9390d"


def ovs_pki(name: str) -> bytes:
    """What `ovs-pki req+sign NAME switch` makes: CN and DNS name "NAME id:<uuid>"."""
    return named_der(f"{name} id:{OVS_PKI_ID}", (f"{name} id:{OVS_PKI_ID}",))


FABRIC = TRIANGLE.replace("switches: {s1: {}, s2: {}, s3: {}}",
                          "switches: {s1: {cert_name: fabric}, s2: {cert_name: fabric}, "
                          "s3: {}}")
HOSTS = TRIANGLE.replace(
    "h1: {switch: s1, uplink_mbps: 1000, underlay_ip: 100.64.0.1}",
    "h1: {switch: s1, uplink_mbps: 1000, underlay_ip: 100.64.0.1, "
    "management_ip: 198.51.100.11, ovsdb: 'ssl:198.51.100.21:6640'}").replace(
    "h2: {switch: s2, uplink_mbps: 1000, underlay_ip: 100.64.0.2}",
    "h2: {switch: s2, uplink_mbps: 1000, underlay_ip: 100.64.0.2, "
    "ovsdb_cert_name: h2.mgmt.example}")


def topology(text: str) -> Any:
    assert text != TRIANGLE
    return parse_topology_text(text, load_policy([SHIPPED_POLICIES]))


# -- the rule ---------------------------------------------------------------------------------

def test_a_fabric_switch_is_named_by_its_own_certificate_only() -> None:
    topo = topology(FABRIC)
    assert switch_identity(topo, "fabric", "s3").problem(ovs_pki("s3")) is None
    assert switch_identity(topo, "fabric", "s3").problem(named_der("S3")) is None  # CN only
    problem = switch_identity(topo, "fabric", "s3").problem(ovs_pki("h2"))
    assert problem is not None
    # Both names, so that an operator sees who claimed what.
    assert f"DNS:h2 id:{OVS_PKI_ID}" in problem and "not switch s3's: expected s3" in problem
    assert problem.startswith("the switch's certificate")
    for other in ("s1", "s30", "fabric", "h1"):
        assert switch_identity(topo, "fabric", "s3").problem(ovs_pki(other)) is not None, other


def test_switches_sharing_an_ovs_are_named_by_its_certificate() -> None:
    topo = topology(FABRIC)
    assert topo.switches["s1"].cert_name == "fabric"
    for name in ("s1", "s2"):
        assert switch_identity(topo, "fabric", name).problem(ovs_pki("fabric")) is None
    # The explicit name replaces the switch's own, as hosts.NAME.ovsdb_cert_name does.
    problem = switch_identity(topo, "fabric", "s1").problem(ovs_pki("s1"))
    assert problem is not None and "switches.NAME.cert_name" in problem
    assert switch_identity(topo, "fabric", "s1").problem(ovs_pki("h1")) is not None


def test_a_hosts_switch_presents_the_hosts_certificate() -> None:
    topo = topology(HOSTS)
    h1 = switch_identity(topo, "host", "h1")
    assert h1.problem(ovs_pki("h1")) is None
    assert h1.problem(named_der("h1-mgmt", ips=("198.51.100.11",))) is None  # management_ip
    assert h1.problem(named_der(None, ips=("198.51.100.21",))) is None  # its OVSDB address
    for other in (ovs_pki("h2"), ovs_pki("fabric"), ovs_pki("s1"),
                  named_der(None, ips=("198.51.100.12",))):
        problem = h1.problem(other)
        assert problem is not None and "not host h1's" in problem
    h2 = switch_identity(topo, "host", "h2")
    assert h2.problem(named_der(None, ("h2.mgmt.example",))) is None
    assert h2.problem(ovs_pki("h2")) is not None  # the explicit name replaces the host's


@pytest.mark.parametrize(("cn", "kind", "name"), [
    ("\u017f1", "fabric", "s1"),  # LATIN SMALL LETTER LONG S: casefold() gives "s1"
    ("\u017f1 id:" + OVS_PKI_ID, "fabric", "s1"),
    ("\u212a1", "host", "k1"),  # KELVIN SIGN: casefold() and lower() give "k1"
])
def test_a_lookalike_unicode_name_is_nobodys(cn: str, kind: str, name: str) -> None:
    """Found in review: names were compared after str.casefold(), which maps some non-ASCII
    letters onto ASCII ones, so a certificate for `ſ1` passed as switch s1's."""
    topo = topology(TRIANGLE.replace("h1:", "k1:").replace("host: h1", "host: k1"))
    identity = switch_identity(topo, kind, name)
    assert identity.problem(named_der(name)) is None  # the real name still passes
    problem = identity.problem(named_der(cn))
    assert problem is not None and f"not {'switch' if kind == 'fabric' else 'host'} {name}'s" \
        in problem


def test_a_switch_certificate_name_is_checked_when_the_topology_loads() -> None:
    with pytest.raises(Exception, match="DNS name"):
        topology(TRIANGLE.replace("s3: {}", "s3: {cert_name: '*.example'}"))


# -- the flows part ---------------------------------------------------------------------------

@pytest.fixture
def fsim(tmp_path: Path) -> Iterator[FlowsSim]:
    with FlowsSim.build(tmp_path, TRIANGLE) as sim:
        yield sim


def _security_events(sim: FlowsSim) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    sim.loop.call(sim.weaver.subscribe, seen.append)
    return seen


def test_a_hosts_certificate_cannot_take_a_fabric_switchs_place(
        fsim: FlowsSim, caplog: pytest.LogCaptureFixture) -> None:
    events = _security_events(fsim)
    for name in ("h1", "h2", "h3", "s2", "s3"):
        fsim.connect(name, settle=False, certificate=ovs_pki(name))
    fsim.settle()
    s1 = fsim.dpid("s1")
    # s1's management link is down: h2 adds a bridge with s1's dpid, with h2's certificate.
    with caplog.at_level(logging.WARNING, logger="nwc.ofapp"):
        fake = fsim.connect("s1", address=("198.51.100.12", 40001), certificate=ovs_pki("h2"))
        again = fsim.connect("s1", address=("198.51.100.12", 40002), certificate=ovs_pki("h2"))
    for dp in (fake, again):
        assert dp.closed.is_set()
        assert not dp.sent  # refused before any flow (or anything) was sent
    assert s1 not in fsim.part.switches
    refusals = [r.getMessage() for r in caplog.records if "refusing switch s1" in r.getMessage()]
    # Logged once, not at each retry (an impostor retries about once a second: a re-walk of
    # the deploy guide saw a warning a second); a minute later again, with the count between.
    assert len(refusals) == 1 and "h2 id:" in refusals[0] and "expected s1" in refusals[0]
    fsim.advance(61)
    with caplog.at_level(logging.WARNING, logger="nwc.ofapp"):
        third = fsim.connect("s1", address=("198.51.100.12", 40004), certificate=ovs_pki("h2"))
    assert third.closed.is_set() and not third.sent
    refusals = [r.getMessage() for r in caplog.records if "refusing switch s1" in r.getMessage()]
    assert len(refusals) == 2 and "(1 more refusals of it since the last line)" in refusals[1]
    fsim.loop.call(lambda: None)
    kinds = [e for e in events if e["type"] == "security"]
    # One event for one claimant retrying with one certificate, naming both.
    assert len(kinds) == 1 and kinds[0]["kind"] == "switch_identity"
    assert "198.51.100.12" in kinds[0]["detail"] and "h2 id:" in kinds[0]["detail"]
    assert kinds[0]["weave_id"] is None  # for admins: it concerns no tenant
    # The real s1 comes back and is taken; it is not refused as a second connection.
    real = fsim.connect("s1", certificate=ovs_pki("s1"))
    assert fsim.part.switches[s1].datapath is real
    assert fsim.reaches("web1", "web2")
    fsim.weave("acme-web", "globex-db")
    assert fsim.reaches("web1", "db2")  # h1 -> s1 -> ... -> h3: through the real s1
    # The impostor again, now that s1 is live: refused for its certificate, as before.
    late = fsim.connect("s1", address=("198.51.100.12", 40003), certificate=ovs_pki("h2"))
    assert late.closed.is_set() and not late.sent
    assert fsim.part.switches[s1].datapath is real
    audit = (fsim.state_dir / "audit.jsonl").read_text()
    assert "switch_identity" in audit


def test_a_switch_refused_for_its_certificate_is_named_by_a_provision_timeout(
        fsim: FlowsSim) -> None:
    """Found deploying: with both fabric switches refused for their certificate, a weave's
    timeout named only the flows part (and the tunnel part's host legs)."""
    for name in ("h1", "h2", "h3", "s2", "s3"):
        fsim.connect(name, settle=False, certificate=ovs_pki(name))
    fsim.settle()
    refused = fsim.connect("s1", certificate=ovs_pki("h2"))
    assert refused.closed.is_set()
    weave = fsim.loop.call(fsim.weaver.create,
                           WeaveRequest("acme-web", "globex-db", 600, 5, None))
    assert isinstance(weave, Weave)
    fsim.settle()
    fsim.advance(fsim.weaver.provision_timeout.total_seconds() + 1)
    fsim.loop.call(fsim.weaver.tick)
    failed = fsim.loop.call(fsim.weaver.store.weave, weave.id)
    assert failed is not None and failed.state is State.FAILED
    detail = next(r["detail"] for r in reversed(fsim.loop.call(fsim.weaver.store.audit_records))
                  if r.get("weave_id") == weave.id and r.get("action") == "weave.fail")
    timeout = fsim.weaver.provision_timeout.total_seconds()
    # Not whose certificate it was: the detail goes to tenants (the security event says it).
    assert detail == (f"not ready after {timeout:g} s: "
                      "flows (s1: not connected: refused for its certificate)")
    # The fabric view says the same, switch by switch.
    connections = fsim.part.switch_connections()
    assert connections["s1"].detail == "not connected: refused for its certificate"
    assert not connections["s1"].connected and connections["s2"].connected


def test_a_host_certificate_cannot_claim_another_hosts_bridge(fsim: FlowsSim) -> None:
    fake = fsim.connect("h1", certificate=ovs_pki("h2"))
    assert fake.closed.is_set() and fsim.dpid("h1") not in fsim.part.switches
    real = fsim.connect("h1", certificate=ovs_pki("h1"))
    assert fsim.part.switches[fsim.dpid("h1")].datapath is real


def test_without_the_binding_or_without_tls_any_peer_may_claim_any_dpid(tmp_path: Path) -> None:
    off = FlowsSim.build(tmp_path / "off", TRIANGLE, cert_names="any")
    try:
        fake = off.connect("s1", certificate=ovs_pki("h2"))
        assert off.part.switches[off.dpid("s1")].datapath is fake
    finally:
        off.close()
    plain = FlowsSim.build(tmp_path / "plain", TRIANGLE)
    try:
        anyone = plain.connect("s1")  # plain TCP: no certificate to check
        assert plain.part.switches[plain.dpid("s1")].datapath is anyone
    finally:
        plain.close()


def test_an_address_in_a_certificate_is_compared_as_an_address() -> None:
    topo = topology(HOSTS)
    identity = switch_identity(topo, "host", "h1")
    assert ipaddress.ip_address("198.51.100.11") in identity.addresses
    assert identity.problem(named_der("198.51.100.11")) is None
    assert identity.problem(named_der("198.51.100.111")) is not None
