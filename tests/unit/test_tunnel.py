"""Tunnel specs: what each host builds for a leg, the VICI connection, the records in OVSDB,
and the MTU arithmetic."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tunnel_fakes import POLICY, TOPO, one_leg_weave
from vici.protocol import Message

from nwc.lab.tunnel_lab import TWO_HOSTS
from nwc.mtu import esp_overhead, mtu_plan
from nwc.pki import Secret, new_psk
from nwc.topology import Topology, parse_topology_text
from nwc.tunnel import (
    MAX_COUNT,
    MAX_COUNTER,
    MAX_DETAIL_CHARS,
    MAX_NAME_CHARS,
    LegRecord,
    LegStatus,
    Phase,
    SaInfo,
    TunnelError,
    TunnelSpec,
    host_text,
    leg_specs,
    weave_specs,
)
from nwc.weave import Weave

pytestmark = pytest.mark.unit

def weave(number: int, slot: int | None, **kw: Any) -> Weave:
    return one_leg_weave(number, slot, kbps=10_000, **kw)


def ends(number: int = 1, slot: int = 0, profile: str = "gold",
         topo: Topology = TOPO) -> tuple[TunnelSpec, TunnelSpec]:
    w = weave(number, slot, profile=profile)
    return leg_specs(w, w.legs[0], POLICY.profiles[profile], topo)


def test_the_two_ends_of_a_leg_mirror_each_other() -> None:
    req, tgt = ends(slot=3)
    addrs = TOPO.weave_addresses(3)
    assert (req.host, req.peer_host, tgt.host, tgt.peer_host) == ("h1", "h2", "h2", "h1")
    assert req.vni == tgt.vni == addrs.vni == 2**23 + 3
    assert req.device == tgt.device == "nwv3" and req.ofport == tgt.ofport == 10003
    assert (req.local_endpoint, req.remote_endpoint) == (addrs.requester_endpoint,
                                                         addrs.target_endpoint)
    assert (tgt.local_endpoint, tgt.remote_endpoint) == (addrs.target_endpoint,
                                                         addrs.requester_endpoint)
    assert (req.local_vtep, req.remote_vtep) == (tgt.remote_vtep, tgt.local_vtep)
    assert (req.local_id, req.remote_id) == (tgt.remote_id, tgt.local_id)
    assert req.local_id == "h1.s3.wv-000001.nwc"
    assert req.initiator and not tgt.initiator  # one side starts IKE: no duplicate SAs


def test_a_host_gets_addresses_and_a_blackhole_for_the_peer_vtep() -> None:
    req, _ = ends()
    assert {(str(a.address), a.device) for a in req.addresses()} == {
        (str(req.local_endpoint), "@underlay"), (str(req.local_vtep), "lo")}
    routes = {(str(r.destination), r.kind, r.device, str(r.source)) for r in req.routes()}
    assert routes == {(str(req.remote_endpoint), "link", "@underlay", str(req.local_endpoint)),
                      (str(req.remote_vtep), "blackhole", None, "None")}


def test_the_vici_connection_carries_the_profile_and_no_secret() -> None:
    req, tgt = ends(profile="gold")
    gold = POLICY.profiles["gold"]
    conn = req.vici_connection()
    (name, body), = conn.items()
    assert name == req.connection_name == "nwc-wv-000001-s0"
    assert body["local_addrs"] == [str(req.local_endpoint)]
    assert body["remote_addrs"] == [str(req.remote_endpoint)]
    assert body["proposals"] == list(gold.ike_proposals)
    assert body["rekey_time"] == f"{gold.rekey_s}s"
    assert body["local-nwc"] == {"auth": "psk", "id": req.local_id}
    assert body["remote-nwc"] == {"auth": "psk", "id": req.remote_id}
    child = body["children"][name]
    assert child["mode"] == "tunnel"
    assert child["local_ts"] == [f"{req.local_vtep}/32[udp]"]
    assert child["remote_ts"] == [f"{req.remote_vtep}/32[udp]"]
    assert child["esp_proposals"] == list(gold.esp_proposals)
    assert child["start_action"] == "trap"
    assert tgt.vici_connection()[name]["children"][name]["start_action"] == "none"
    # It is a valid VICI message, and no key material can be in it.
    wire = Message.serialize(conn)
    assert b"psk" in wire and b"data" not in wire


def test_an_x509_connection_names_its_certificate_and_the_ca() -> None:
    req, _ = ends(profile="silver")
    with pytest.raises(TunnelError, match="certificate"):
        req.vici_connection()
    body = req.vici_connection(cert_pem=b"CERT", ca_pem=b"CA")[req.connection_name]
    assert body["local-nwc"] == {"auth": "pubkey", "id": req.local_id, "certs": [b"CERT"]}
    assert body["remote-nwc"] == {"auth": "pubkey", "id": req.remote_id, "cacerts": [b"CA"]}
    assert body["proposals"] == list(POLICY.profiles["silver"].ike_proposals)


def test_two_weaves_between_the_same_hosts_share_nothing() -> None:
    a, _ = ends(number=1, slot=0, profile="gold")
    b, _ = ends(number=2, slot=1, profile="silver")
    for field in ("key", "device", "ofport", "vni", "local_endpoint", "remote_endpoint",
                  "local_vtep", "remote_vtep", "local_id", "remote_id", "connection_name"):
        assert getattr(a, field) != getattr(b, field), field
    assert (a.auth, b.auth) == ("psk", "x509")
    assert a.esp_proposals != b.esp_proposals


def test_hosts_with_different_backends_cannot_share_a_leg() -> None:
    mixed = parse_topology_text(TWO_HOSTS.replace(
        "h2: {switch: s1,", "h2: {backend: ovs-ipsec, switch: s1,"), POLICY)
    with pytest.raises(TunnelError, match="different tunnel backends"):
        ends(topo=mixed)


def test_a_leg_inside_one_host_has_no_tunnel() -> None:
    local = weave(1, None, hosts=("h1", "h1"))
    assert weave_specs(local, POLICY.profiles["gold"], TOPO) == []


@pytest.mark.parametrize("proposal, overhead", [
    ("aes256gcm16-x25519", 20 + 8 + 8 + 8 + 3 + 2 + 16),
    ("aes128gcm12", 20 + 8 + 8 + 8 + 3 + 2 + 12),
    ("chacha20poly1305-ecp256", 20 + 8 + 8 + 8 + 3 + 2 + 16),
    ("aes256-sha512-modp4096", 20 + 8 + 8 + 16 + 15 + 2 + 32),
    ("aes128ctr-sha256", 20 + 8 + 8 + 8 + 3 + 2 + 16),
])
def test_esp_overhead_per_proposal(proposal: str, overhead: int) -> None:
    assert esp_overhead(proposal) == overhead


def test_mtu_plan_keeps_vm_mtu_and_checks_the_underlay() -> None:
    plan = mtu_plan(("aes128gcm16", "aes256-sha512"), underlay_mtu=9000)
    assert plan.vm_mtu == 1500
    assert plan.vxlan_packet == 1550  # 1500 + inner Ethernet 14 + VXLAN 8 + UDP 8 + IPv4 20
    assert plan.esp_overhead == esp_overhead("aes256-sha512")  # the worst proposal counts
    assert plan.kernel_esp_packet == 1550 + plan.esp_overhead
    assert plan.fits_underlay
    # kernel-libipsec's TUN is 1400: full frames are split in two inside ESP.
    assert plan.libipsec_fragments and plan.libipsec_esp_packet == 1400 + plan.esp_overhead
    thin = mtu_plan(("aes256gcm16",), underlay_mtu=1500)
    assert not thin.fits_underlay
    assert mtu_plan(("aes256gcm16",), underlay_mtu=1615).fits_underlay
    assert not mtu_plan(("aes256gcm16",), underlay_mtu=1614).fits_underlay


def test_a_record_round_trips_and_its_secret_stays_out_of_sight() -> None:
    req, _ = ends()
    psk = new_psk()
    record = LegRecord(req, psk, start=True)
    text = record.to_json()
    assert psk.to_text() in text  # it is the key's only way to the host...
    back = LegRecord.from_json(text)
    assert back == record and back.same_material(record)
    assert psk.to_text() not in repr(back)  # ...but printing the record never shows it
    assert not back.same_material(LegRecord(req, new_psk()))


@pytest.mark.parametrize("mangle, why", [
    (lambda d: "not json", "not JSON"),
    (lambda d: {**d, "v": 99}, "version"),
    (lambda d: {**d, "spec": {**d["spec"], "local_vtep": "300.1.1.1"}}, "IPv4"),
    (lambda d: {**d, "spec": {**d["spec"], "weave": "wv-1; rm -rf /"}}, "weave"),
    (lambda d: {**d, "spec": {**d["spec"], "bridge": "a-very-long-bridge-name"}}, "bridge"),
    (lambda d: {**d, "spec": {**d["spec"], "ike": ["aes256gcm16 x"]}}, "proposals"),
    (lambda d: {k: v for k, v in d.items() if k != "psk"}, "pre-shared key"),
    (lambda d: {**d, "psk": "***"}, "base64"),
    (lambda d: {**d, "spec": {k: v for k, v in d["spec"].items() if k != "vni"}}, "vni"),
])
def test_a_garbled_record_is_refused_whole(mangle, why: str) -> None:
    req, _ = ends()
    d = json.loads(LegRecord(req, new_psk()).to_json())
    mangled = mangle(d)
    with pytest.raises(TunnelError, match=why):
        LegRecord.from_json(mangled if isinstance(mangled, str) else json.dumps(mangled))


def test_a_status_round_trips() -> None:
    req, _ = ends()
    status = LegStatus(Phase.INSTALLED, "", SaInfo("ESTABLISHED", "INSTALLED", "7", "3",
                                                    "AES_GCM_16", bytes_in=10), 2,
                       None, req, {"key_id": "ab"})
    back = LegStatus.from_json(status.to_json())
    assert back == status and back.sa is not None and back.sa.installed
    with pytest.raises(TunnelError):
        LegStatus.from_json('{"phase": "dancing"}')


def test_a_tunnel_id_names_the_weave_leg_and_key_but_not_the_start_signal() -> None:
    psk = new_psk()
    req, tgt = ends()
    reused, _ = ends(number=2)  # another weave on the same slot: same endpoints, VNI, port
    assert (reused.local_endpoint, reused.vni, reused.device) == (
        req.local_endpoint, req.vni, req.device)
    ids = {LegRecord(req, psk).tunnel_id(), LegRecord(tgt, psk).tunnel_id(),
           LegRecord(reused, psk).tunnel_id(), LegRecord(req, new_psk()).tunnel_id()}
    assert len(ids) == 4
    assert LegRecord(req, psk, start=True).tunnel_id() == LegRecord(req, psk).tunnel_id()
    assert psk.reveal().hex() not in LegRecord(req, psk).tunnel_id()


GOOD_STATUS = json.loads(LegStatus(
    Phase.INSTALLED, "", SaInfo("ESTABLISHED", "INSTALLED", "7", "3", "AES_GCM_16",
                                key_bits=256, bytes_in=10), 2, b"CSR", ends()[0],
    {"key_id": "ab", "ovs_keys": ["ipsec_skb_mark"]}).to_json())


@pytest.mark.parametrize("text", [
    "x", "", "null", '"installed"', "[]", "1e999999",
    "[" * 50_000,  # json raises RecursionError for this
    '{"phase": ' * 5_000 + '"installed"' + "}" * 5_000,
    " " * 70_000 + "{}",  # too large
    json.dumps({**GOOD_STATUS, "rekeys": "x"}),
    json.dumps({**GOOD_STATUS, "rekeys": [1]}),
    json.dumps({**GOOD_STATUS, "rekeys": -1}),
    json.dumps({**GOOD_STATUS, "rekeys": True}),
    json.dumps({**GOOD_STATUS, "phase": {"a": 1}}),
    json.dumps({**GOOD_STATUS, "phase": None}),
    json.dumps({**GOOD_STATUS, "detail": {"a": 1}}),
    json.dumps({**GOOD_STATUS, "csr": 7}),
    json.dumps({**GOOD_STATUS, "sa": "established"}),
    json.dumps({**GOOD_STATUS, "sa": {**GOOD_STATUS["sa"], "bytes_in": "x"}}),
    json.dumps({**GOOD_STATUS, "sa": {**GOOD_STATUS["sa"], "key_bits": "256"}}),
    json.dumps({**GOOD_STATUS, "sa": {**GOOD_STATUS["sa"], "rekeying": "no"}}),
    json.dumps({**GOOD_STATUS, "sa": {**GOOD_STATUS["sa"], "ike_state": 1}}),
    json.dumps({**GOOD_STATUS, "extra": []}),
    json.dumps({**GOOD_STATUS, "extra": {"ovs_keys": 5}}),
    json.dumps({**GOOD_STATUS, "extra": {"key_id": {}}}),
    json.dumps({**GOOD_STATUS, "extra": {"sa_of": 5}}),
    # Past their bounds (found by a security test: a 400-digit rekeys made /metrics fail).
    json.dumps({**GOOD_STATUS, "rekeys": int("9" * 400)}),
    json.dumps({**GOOD_STATUS, "rekeys": MAX_COUNT + 1}),
    json.dumps({**GOOD_STATUS, "sa": {**GOOD_STATUS["sa"], "bytes_in": MAX_COUNTER + 1}}),
    json.dumps({**GOOD_STATUS, "sa": {**GOOD_STATUS["sa"], "packets_out": 10**400}}),
    json.dumps({**GOOD_STATUS, "sa": {**GOOD_STATUS["sa"], "key_bits": MAX_COUNT + 1}}),
    json.dumps({**GOOD_STATUS, "sa": {**GOOD_STATUS["sa"], "installed_s": MAX_COUNT + 1}}),
    json.dumps({**GOOD_STATUS, "sa": {**GOOD_STATUS["sa"], "bytes_out": -1}}),
])
def test_a_malformed_status_is_a_tunnel_error_and_nothing_else(text: str) -> None:
    with pytest.raises(TunnelError):
        LegStatus.from_json(text)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted({*GOOD_STATUS, *GOOD_STATUS["sa"], "extra.key_id",
                                     "extra.ovs_keys"})), value=JSON)
def test_any_value_in_any_status_field_parses_or_is_refused(field: str, value: object) -> None:
    d = json.loads(json.dumps(GOOD_STATUS))
    if field in d["sa"]:
        d["sa"][field] = value
    elif field.startswith("extra."):
        d["extra"][field.split(".")[1]] = value
    else:
        d[field] = value
    try:
        status = LegStatus.from_json(json.dumps(d))
    except TunnelError:
        return
    assert isinstance(status.rekeys, int) and 0 <= status.rekeys <= MAX_COUNT
    assert isinstance(status.detail, str) and len(status.detail) <= MAX_DETAIL_CHARS
    assert not {unicodedata.category(ch) for ch in status.detail} & UNSAFE
    if status.sa is not None:
        assert all(isinstance(getattr(status.sa, k), int | None) for k in
                   ("key_bits", "bytes_in", "bytes_out", "packets_in", "packets_out"))
        assert all(0 <= getattr(status.sa, k) <= MAX_COUNTER for k in
                   ("bytes_in", "bytes_out", "packets_in", "packets_out"))


def test_the_largest_counters_an_sa_can_have_are_read() -> None:
    """charon's counters are 64-bit: the bounds refuse only what no agent reports."""
    sa = {**GOOD_STATUS["sa"], "bytes_in": MAX_COUNTER, "packets_in": MAX_COUNTER,
          "installed_s": MAX_COUNT}
    status = LegStatus.from_json(json.dumps({**GOOD_STATUS, "rekeys": MAX_COUNT, "sa": sa}))
    assert status.rekeys == MAX_COUNT and status.sa is not None
    assert (status.sa.bytes_in, status.sa.packets_in) == (MAX_COUNTER, MAX_COUNTER)


FORGED = "x\n2026-01-01 00:00:00,000 INFO nwc.weaver: weave wv-000099: active\x1b[2J\u202eok"


def test_a_statuss_text_is_cleaned_where_it_is_read() -> None:
    """An agent's text reaches the log, events and audit: a newline there forged a log line
    and ESC drove the reader's terminal (found by a security test)."""
    sa = {**GOOD_STATUS["sa"], "encryption": "AES\nGCM", "ike_state": "ESTABLISHED\u2028"}
    status = LegStatus.from_json(json.dumps({**GOOD_STATUS, "detail": FORGED, "sa": sa}))
    assert status.detail == ("x\\x0a2026-01-01 00:00:00,000 INFO nwc.weaver: weave wv-000099: "
                             "active\\x1b[2J\\u202eok")
    assert status.sa is not None and status.sa.encryption == "AES\\x0aGCM"
    assert status.sa.ike_state == "ESTABLISHED\\u2028" and not status.sa.installed


def test_a_statuss_text_is_cut_short_saying_so() -> None:
    """65,000 characters of detail made a 65 kB audit record (found by a security test)."""
    sa = {**GOOD_STATUS["sa"], "dh_group": "G" * 1000}
    status = LegStatus.from_json(json.dumps({**GOOD_STATUS, "detail": "A" * 63_000, "sa": sa}))
    assert len(status.detail) == MAX_DETAIL_CHARS
    assert status.detail.startswith("AAAA") and status.detail.endswith(
        "... [cut, 63000 characters]")
    assert status.sa is not None and status.sa.dh_group is not None
    assert len(status.sa.dh_group) == MAX_NAME_CHARS
    assert status.sa.dh_group.endswith("... [cut, 1000 characters]")
    # An escape is cut whole or not at all, and escapes count towards the limit.
    escaped = LegStatus.from_json(json.dumps({**GOOD_STATUS, "detail": "\x1b" * 600}))
    assert len(escaped.detail) <= MAX_DETAIL_CHARS
    assert escaped.detail.split("...")[0].replace("\\x1b", "") == ""


def test_ordinary_text_passes_unchanged() -> None:
    for text in ("", "charon: IKE_SA_INIT failed: NO_PROPOSAL_CHOSEN", "Grüße, 日本 — ok",
                 "a" * MAX_DETAIL_CHARS):
        assert host_text(text) == text


UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}
ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def unescaped(clean: str) -> str:
    """What a reader of cleaned text recovers: every escape read back as its character."""
    def one(m: re.Match[str]) -> str:
        return "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16))
    assert re.sub(ESCAPE, "", clean).count("\\") == 0, "a backslash that starts no escape"
    return ESCAPE.sub(one, clean)


def test_a_backslash_a_host_wrote_cannot_pass_for_an_escape() -> None:
    """Found in review: a host writing the four characters `\\x1b` read exactly like an ESC
    that NWC had escaped."""
    assert host_text("\x1b[2J") == "\\x1b[2J"
    assert host_text("\\x1b[2J") == "\\\\x1b[2J"
    assert host_text("\x1b[2J") != host_text("\\x1b[2J")


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=700), limit=st.integers(min_value=40, max_value=600))
def test_host_text_is_short_safe_and_says_exactly_what_the_host_wrote(text: str,
                                                                      limit: int) -> None:
    """Not idempotent (a second pass doubles backslashes: text is cleaned once, where it is
    read), but unambiguous: uncut, it reads back as exactly the host's text."""
    clean = host_text(text, limit)
    assert len(clean) <= limit
    assert not {unicodedata.category(ch) for ch in clean} & UNSAFE
    marker = f"... [cut, {len(text)} characters]"
    if len(host_text(text, 10**6)) <= limit:
        assert unescaped(clean) == text
    else:  # whole escapes only before the marker: what is left is the start of the text
        assert clean.endswith(marker) and text.startswith(unescaped(clean[:-len(marker)]))
    if clean == text:  # nothing to escape: a second pass changes nothing either
        assert host_text(clean, limit) == clean


def test_a_deeply_nested_record_is_a_tunnel_error() -> None:
    with pytest.raises(TunnelError, match="nested"):
        LegRecord.from_json("[" * 50_000)


def test_ovs_ipsec_interface_options() -> None:
    topo = parse_topology_text(TWO_HOSTS.replace("underlay_ip: 100.64.0.1}",
                                                 "underlay_ip: 100.64.0.1, backend: ovs-ipsec}")
                               .replace("underlay_ip: 100.64.0.2}",
                                        "underlay_ip: 100.64.0.2, backend: ovs-ipsec}"), POLICY)
    req, _ = ends(topo=topo)
    assert req.local_id == "h1.host.nwc"  # ovs-monitor-ipsec: one certificate per host
    psk = Secret(b"\x01" * 32)
    row = req.ovs_interface(psk=psk)
    assert (row["name"], row["type"], row["ofport_request"]) == ("nwv0", "vxlan", 10000)
    opts = row["options"]
    assert opts["remote_ip"] == str(req.remote_endpoint)
    assert opts["local_ip"] == str(req.local_endpoint)
    assert opts["key"] == str(req.vni) and opts["psk"] == "01" * 32
    assert opts["ipsec_esp"] == "aes256gcm16-x25519!"
    assert row["external_ids"]["nwc-weave"] == "wv-000001"
    assert [a.device for a in req.addresses()] == ["@underlay"]  # no VTEPs: OVS tunnels
    assert [r.kind for r in req.routes()] == ["link"]
    with pytest.raises(TunnelError):
        req.ovs_interface()
    silver_req, _ = leg_specs(weave(2, 1, profile="silver"), weave(2, 1).legs[0],
                              POLICY.profiles["silver"], topo)
    opts = silver_req.ovs_interface()["options"]
    assert opts["remote_name"] == "h2.host.nwc" and "psk" not in opts
