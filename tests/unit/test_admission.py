"""Admission: every denial reason, both sides of every policy rule, legs and paths."""

from __future__ import annotations

import ipaddress
import textwrap
from datetime import timedelta

import pytest

from nwc.admission import Admission, Denial, LiveWeave, Reason, WeaveRequest, evaluate
from nwc.fabric import Fabric
from nwc.lease import ManualClock
from nwc.policy import Policy, parse_policy_text
from nwc.topology import Topology, parse_topology_text

pytestmark = pytest.mark.unit

NOW = ManualClock().now()


def decide(policy: Policy, topology: Topology, request: WeaveRequest,
           fabric: Fabric | None = None, live: list[LiveWeave] | None = None):
    return evaluate(request, policy=policy, topology=topology, fabric=fabric or Fabric(topology),
                    live=live or [], now=NOW)


def denied(decision, reason: Reason) -> Denial:
    assert isinstance(decision, Denial), decision
    assert decision.reason is reason, decision
    return decision


def test_admitted_weave_has_path_profile_rate_and_expiry(shipped_policy, small) -> None:
    d = decide(shipped_policy, small, WeaveRequest("acme-web", "globex-db", 600, 20))
    assert isinstance(d, Admission)
    assert [leg.path for leg in d.legs] == [("h1", "s1", "s2", "h2")]
    assert d.profile == "gold"  # acme prefers gold; globex allows only gold
    assert d.kbps == 20_000
    assert d.expires_at == NOW + timedelta(seconds=600)
    # globex-db narrows what acme may reach of... acme-web: only 192.0.2.0/27 of it.
    assert d.requester_prefixes == (ipaddress.IPv4Network("192.0.2.0/27"),)
    assert d.target_prefixes == (ipaddress.IPv4Network("192.0.2.64/26"),)


@pytest.mark.parametrize(("request_", "detail"), [
    (WeaveRequest("acme-web", "globex-db", 0, 20), "duration_s"),
    (WeaveRequest("acme-web", "globex-db", 60, -1), "bandwidth_mbps"),
    (WeaveRequest("acme-web", "globex-db", 60, float("nan")), "bandwidth_mbps"),
    (WeaveRequest("acme-web", "globex-db", 60, 0.0001), "at least 0.001"),
    (WeaveRequest("acme-web", "acme-web", 60, 1), "with itself"),
    (WeaveRequest("acme-web", "globex-db", 60, 1, "platinum"), "no security profile"),
    (WeaveRequest("acme-web", "globex-db", True, 1), "duration_s"),  # type: ignore[arg-type]
])
def test_invalid_request(shipped_policy, small, request_, detail) -> None:
    assert detail in denied(decide(shipped_policy, small, request_),
                            Reason.INVALID_REQUEST).detail


@pytest.mark.parametrize("role", ["requester", "target"])
def test_unknown_ivn_names_the_side(shipped_policy, small, role) -> None:
    names = {"requester": "acme-web", "target": "globex-db", role: "nosuch"}
    d = denied(decide(shipped_policy, small, WeaveRequest(names["requester"], names["target"],
                                                          60, 1)), Reason.UNKNOWN_IVN)
    assert d.detail == f"{role} IVN 'nosuch' does not exist"


TWO_SIDED = """\
tenants: {a: {}, b: {}}
qos_classes: {fast: {dscp: 46, burst_ms: 20}}
security_profiles:
  p1: {ike: [aes256gcm16-prfsha256-x25519], esp: [aes256gcm16], auth: psk,
       acl: [{from: either, protocol: any}]}
  p2: {ike: [aes128gcm16-prfsha256-ecp256], esp: [aes128gcm16], auth: x509,
       acl: [{from: either, protocol: any}]}
ivns:
  x:
    tenant: a
    vni: 1
    cidrs: [192.0.2.0/26]
    gateway: 192.0.2.1
    weaving: {partners: [{ivn: y}], max_weave_mbps: 50, max_total_mbps: 80,
              max_duration_s: 1000, profiles: [p1, p2], qos_class: fast}
  y:
    tenant: b
    vni: 2
    cidrs: [192.0.2.64/26]
    gateway: 192.0.2.65
    weaving: {partners: [{tenant: a}], max_weave_mbps: 50, max_total_mbps: 80,
              max_duration_s: 1000, profiles: [p1, p2]}
  z:
    tenant: b
    vni: 3
    cidrs: [203.0.113.0/26]
    gateway: 203.0.113.1
    weaving: {partners: [{tenant: a}], max_weave_mbps: 50, max_total_mbps: 80,
              max_duration_s: 1000, profiles: [p1]}
"""

TWO_HOSTS = """\
name: two
underlay: {hosts: 100.64.0.0/24, weave_endpoints: 100.64.128.0/24,
           weave_vteps: 100.100.0.0/24}
switches: {s1: {}, s2: {}}
links: [{between: [s1, s2], capacity_mbps: 1000, reservable_share: 1.0}]
hosts:
  h1: {switch: s1, uplink_mbps: 1000, uplink_share: 1.0, underlay_ip: 100.64.0.1}
  h2: {switch: s2, uplink_mbps: 1000, uplink_share: 1.0, underlay_ip: 100.64.0.2}
vms:
  x1: {host: h1, ivn: x, ip: 192.0.2.10}
  y1: {host: h2, ivn: y, ip: 192.0.2.70}
  z1: {host: h2, ivn: z, ip: 203.0.113.10}
"""


def policy_with(**edits: str) -> Policy:
    text = TWO_SIDED
    for find, replace in edits.items():
        assert find in text
        text = text.replace(find, replace)
    return parse_policy_text(text)


def two_hosts(policy: Policy) -> Topology:
    return parse_topology_text(TWO_HOSTS, policy)


# Each row edits one side's policy and expects that side to be named as the refuser.
SIDE_RULES = [
    ("partner", "requester", {"partners: [{ivn: y}]": "partners: [{ivn: z}]"},
     WeaveRequest("x", "y", 60, 10), "does not allow weaving with IVN y"),
    ("partner", "target", {"partners: [{tenant: a}], max_weave_mbps: 50, max_total_mbps: 80,\n"
                           "              max_duration_s: 1000, profiles: [p1, p2]}":
                           "partners: [], max_weave_mbps: 50, max_total_mbps: 80,\n"
                           "              max_duration_s: 1000, profiles: [p1, p2]}"},
     WeaveRequest("x", "y", 60, 10), "target IVN y (tenant b) does not allow weaving with IVN x"),
    ("profile", "requester", {"profiles: [p1, p2], qos_class": "profiles: [p1], qos_class"},
     WeaveRequest("x", "y", 60, 10, "p2"), "'p2' is not allowed by requester IVN x"),
    ("profile", "target", {"partners: [{ivn: y}]": "partners: [{ivn: z}]"},
     WeaveRequest("x", "z", 60, 10, "p2"), "'p2' is not allowed by target IVN z"),
    ("duration", "requester", {"max_duration_s: 1000, profiles: [p1, p2], qos":
                               "max_duration_s: 100, profiles: [p1, p2], qos"},
     WeaveRequest("x", "y", 200, 10), "duration 200 s exceeds requester IVN x's maximum of 100"),
    ("duration", "target", {"max_total_mbps: 80,\n              max_duration_s: 1000, "
                            "profiles: [p1, p2]}":
                            "max_total_mbps: 80,\n              max_duration_s: 100, "
                            "profiles: [p1, p2]}"},
     WeaveRequest("x", "y", 200, 10), "duration 200 s exceeds target IVN y's maximum of 100"),
    ("bandwidth", "requester", {}, WeaveRequest("x", "y", 60, 60),
     "60 Mbit/s exceeds requester IVN x's per-weave maximum of 50"),
    ("bandwidth", "target", {"max_weave_mbps: 50, max_total_mbps: 80,\n"
                             "              max_duration_s: 1000, profiles: [p1, p2]}":
                             "max_weave_mbps: 5, max_total_mbps: 80,\n"
                             "              max_duration_s: 1000, profiles: [p1, p2]}"},
     WeaveRequest("x", "y", 60, 10), "10 Mbit/s exceeds target IVN y's per-weave maximum of 5"),
]


@pytest.mark.parametrize(("rule", "side", "edits", "request_", "detail"), SIDE_RULES,
                         ids=[f"{r[0]}-{r[1]}" for r in SIDE_RULES])
def test_policy_violation_names_side_and_rule(rule, side, edits, request_, detail) -> None:
    policy = policy_with(**edits)
    d = denied(decide(policy, two_hosts(policy), request_), Reason.POLICY_VIOLATION)
    assert (d.rule, d.side) == (rule, side)
    assert detail in d.detail


def test_both_sides_must_allow_each_other() -> None:
    # y allows tenant a (so x); x allows only y. z allows tenant a, but x does not list z.
    policy = policy_with()
    topo = two_hosts(policy)
    assert isinstance(decide(policy, topo, WeaveRequest("x", "y", 60, 10)), Admission)
    d = denied(decide(policy, topo, WeaveRequest("x", "z", 60, 10)), Reason.POLICY_VIOLATION)
    assert (d.side, d.rule) == ("requester", "partner")
    d = denied(decide(policy, topo, WeaveRequest("z", "x", 60, 10)), Reason.POLICY_VIOLATION)
    assert (d.side, d.rule) == ("target", "partner")


def test_profile_negotiation_takes_requesters_preference_that_target_allows() -> None:
    policy = policy_with(**{"profiles: [p1, p2], qos_class": "profiles: [p2, p1], qos_class"})
    topo = two_hosts(policy)
    assert decide(policy, topo, WeaveRequest("x", "y", 60, 10)).profile == "p2"
    assert decide(policy, topo, WeaveRequest("y", "x", 60, 10)).profile == "p1"


def test_no_common_profile_is_a_policy_violation() -> None:
    policy = policy_with(**{"profiles: [p1, p2], qos_class": "profiles: [p2], qos_class"})
    # z allows only p1
    policy = parse_policy_text(TWO_SIDED.replace("partners: [{ivn: y}]",
                                                 "partners: [{ivn: y}, {ivn: z}]")
                               .replace("profiles: [p1, p2], qos_class",
                                        "profiles: [p2], qos_class"))
    d = denied(decide(policy, two_hosts(policy), WeaveRequest("x", "z", 60, 10)),
               Reason.POLICY_VIOLATION)
    assert d.rule == "profile" and "no security profile is allowed by both" in d.detail


def test_total_cap_counts_every_live_weave_of_the_ivn() -> None:
    policy = parse_policy_text(TWO_SIDED.replace("partners: [{ivn: y}]",
                                                 "partners: [{ivn: y}, {ivn: z}]"))
    topo = two_hosts(policy)
    live = [LiveWeave("wv-000001", "x", "y", 50_000, (), ())]
    d = denied(decide(policy, topo, WeaveRequest("x", "z", 60, 40), live=live),
               Reason.POLICY_VIOLATION)
    assert (d.side, d.rule) == ("requester", "total_bandwidth")
    assert "already has 50 Mbit/s in live weaves; 40 Mbit/s more exceeds its total of 80" \
        in d.detail
    assert isinstance(decide(policy, topo, WeaveRequest("x", "z", 60, 30), live=live), Admission)
    # The target's total counts weaves it is party to whichever side asked.
    live = [LiveWeave("wv-000001", "q", "z", 75_000, (), ())]
    d = denied(decide(policy, topo, WeaveRequest("x", "z", 60, 10), live=live),
               Reason.POLICY_VIOLATION)
    assert (d.side, d.rule) == ("target", "total_bandwidth")


def test_cidr_overlap_with_own_prefixes(shipped_policy, leaf_spine) -> None:
    d = denied(decide(shipped_policy, leaf_spine,
                      WeaveRequest("acme-web", "initech-legacy", 60, 5)), Reason.CIDR_OVERLAP)
    assert "192.0.2.0/27 (of the partner) overlaps 192.0.2.0/26 of IVN acme-web" in d.detail


def test_cidr_overlap_with_another_live_weave_and_the_same_pair_twice() -> None:
    text = TWO_SIDED.replace("partners: [{ivn: y}]", "partners: [{ivn: y}, {ivn: z}]") \
        .replace("cidrs: [203.0.113.0/26]\n    gateway: 203.0.113.1",
                 "cidrs: [192.0.2.64/27]\n    gateway: 192.0.2.65")
    policy = parse_policy_text(text)
    topo = parse_topology_text(TWO_HOSTS.replace("ip: 203.0.113.10", "ip: 192.0.2.80"), policy)
    net = ipaddress.IPv4Network
    live = [LiveWeave("wv-000007", "x", "y", 1000, (net("192.0.2.0/26"),),
                      (net("192.0.2.64/26"),))]
    d = denied(decide(policy, topo, WeaveRequest("x", "z", 60, 1), live=live),
               Reason.CIDR_OVERLAP)
    assert "already reaches 192.0.2.64/26 through weave wv-000007" in d.detail
    d = denied(decide(policy, topo, WeaveRequest("y", "x", 60, 1), live=live),
               Reason.CIDR_OVERLAP)
    assert "already woven by wv-000007" in d.detail


def test_insufficient_bandwidth_names_the_bottleneck(shipped_policy, small) -> None:
    d = denied(decide(shipped_policy, small, WeaveRequest("acme-web", "globex-db", 60, 35)),
               Reason.INSUFFICIENT_BANDWIDTH)
    assert d.link == ("s1", "s2")
    assert d.detail == "link s1-s2 has 30 Mbit/s free of 30 reservable; 35 requested"


def test_insufficient_bandwidth_counts_existing_reservations(shipped_policy, small) -> None:
    fabric = Fabric(small)
    fabric.reserve("wv-000001", [("h1", "s1", "s2", "h2")], 25_000)
    d = denied(decide(shipped_policy, small, WeaveRequest("acme-web", "globex-db", 60, 10),
                      fabric=fabric), Reason.INSUFFICIENT_BANDWIDTH)
    assert d.detail == "link s1-s2 has 5 Mbit/s free of 30 reservable; 10 requested"


def test_partitioned_fabric(shipped_policy, small) -> None:
    fabric = Fabric(small)
    fabric.set_link("s1", "s2", up=False)
    d = denied(decide(shipped_policy, small, WeaveRequest("acme-web", "globex-db", 60, 1),
                      fabric=fabric), Reason.INSUFFICIENT_BANDWIDTH)
    assert d.link is None and "partitioned" in d.detail


def test_denial_order_is_fixed(shipped_policy, small) -> None:
    # Wrong in three ways at once: the earliest check in the documented order wins.
    d = decide(shipped_policy, small, WeaveRequest("acme-web", "nosuch", 0, 1))
    assert d.reason is Reason.INVALID_REQUEST
    d = decide(shipped_policy, small, WeaveRequest("acme-web", "nosuch", 60, 1000))
    assert d.reason is Reason.UNKNOWN_IVN


def test_ivn_without_vms_cannot_be_woven_after_policy_passes(shipped_policy, small) -> None:
    # initech-app allows acme and acme allows initech, but small places no initech VM.
    d = denied(decide(shipped_policy, small, WeaveRequest("acme-web", "initech-app", 60, 1)),
               Reason.INVALID_REQUEST)
    assert "IVN initech-app has no VMs" in d.detail


def test_legs_one_per_host_pair_and_caps_charge_every_leg(shipped_policy, leaf_spine) -> None:
    # acme-web has VMs on h1 and h2; globex-db on h3: two legs.
    d = decide(shipped_policy, leaf_spine, WeaveRequest("acme-web", "globex-db", 60, 10))
    assert [(leg.requester_host, leg.target_host) for leg in d.legs] == [("h1", "h3"),
                                                                        ("h2", "h3")]
    assert [len(leg.path) for leg in d.legs] == [5, 5]
    d = denied(decide(shipped_policy, leaf_spine, WeaveRequest("acme-web", "globex-db", 60, 30)),
               Reason.POLICY_VIOLATION)
    assert "2 host pairs x 30 Mbit/s = 60 Mbit/s exceeds requester IVN acme-web's per-weave" \
        in d.detail


def test_local_leg_when_both_ivns_share_a_host() -> None:
    policy = policy_with()
    topo = parse_topology_text(TWO_HOSTS.replace("y1: {host: h2", "y1: {host: h1"), policy)
    d = decide(policy, topo, WeaveRequest("x", "y", 60, 10))
    assert [leg.path for leg in d.legs] == [("h1",)]


def test_paths_avoid_full_links_and_are_deterministic(shipped_policy, leaf_spine) -> None:
    fabric = Fabric(leaf_spine)
    request = WeaveRequest("initech-app", "acme-web", 60, 10)
    first = decide(shipped_policy, leaf_spine, request, fabric=fabric)
    again = decide(shipped_policy, leaf_spine, request, fabric=fabric)
    assert first.legs == again.legs
    assert all(leg.path[2] == "spine1" for leg in first.legs)  # first-named spine packs first
    # Fill spine1's link to leaf4 (32 reservable): the next weave goes over spine2.
    fabric.reserve("filler", [("leaf4", "spine1")], 32_000 - 5_000)
    moved = decide(shipped_policy, leaf_spine, request, fabric=fabric)
    assert all(leg.path[2] == "spine2" for leg in moved.legs)


def test_nothing_is_reserved_by_evaluate(shipped_policy, small) -> None:
    fabric = Fabric(small)
    before = dict(fabric.reserved)
    assert isinstance(decide(shipped_policy, small, WeaveRequest("acme-web", "globex-db", 60, 5),
                             fabric=fabric), Admission)
    assert fabric.reserved == before


def test_topology_rejects_vm_outside_ivn(shipped_policy) -> None:
    from nwc.yamlsource import ConfigError

    bad = textwrap.dedent(TWO_HOSTS).replace("x1: {host: h1, ivn: x, ip: 192.0.2.10}",
                                             "x1: {host: h1, ivn: acme-web, ip: 203.0.113.9}")
    with pytest.raises(ConfigError, match="outside IVN acme-web's prefixes"):
        parse_topology_text(bad, shipped_policy)


def test_a_tenant_rules_prefixes_apply_only_to_the_ivn_that_holds_them() -> None:
    """Found in review: a tenant-wide partner rule's prefixes were handed to a weave with any
    IVN of that tenant, even one owning none of them."""
    # x allows tenant b, but only y's 192.0.2.64/28: none of z's 203.0.113.0/26.
    policy = policy_with(**{"partners: [{ivn: y}]":
                            "partners: [{tenant: b, prefixes: [192.0.2.64/28]}]"})
    topology = two_hosts(policy)
    refused = denied(decide(policy, topology, WeaveRequest("x", "z", 60, 1)),
                     Reason.POLICY_VIOLATION)
    assert (refused.side, refused.rule) == ("requester", "partner")
    assert "none of IVN z's prefixes" in refused.detail
    admitted = decide(policy, topology, WeaveRequest("x", "y", 60, 1))
    assert isinstance(admitted, Admission)
    assert admitted.target_prefixes == (ipaddress.IPv4Network("192.0.2.64/28"),)


# -- IVNs a tenant may not see ------------------------------------------------------------

SEEN_THROUGH_ANOTHER = """\
tenants: {acme: {}, globex: {}}
security_profiles:
  p1: {ike: [aes256gcm16-prfsha256-x25519], esp: [aes256gcm16], auth: psk,
       acl: [{from: either, protocol: any}]}
ivns:
  a1:  # weaves with nobody
    {tenant: acme, vni: 1, cidrs: [192.0.2.0/26], gateway: 192.0.2.1}
  a2:
    tenant: acme
    vni: 2
    cidrs: [192.0.2.64/26]
    gateway: 192.0.2.65
    weaving: {partners: [{ivn: g1}], max_weave_mbps: 10, max_total_mbps: 10,
              max_duration_s: 60, profiles: [p1]}
  g1:
    tenant: globex
    vni: 3
    cidrs: [198.51.100.0/26]
    gateway: 198.51.100.1
    weaving: {partners: [{tenant: acme}], max_weave_mbps: 10, max_total_mbps: 10,
              max_duration_s: 60, profiles: [p1]}
  g2:  # weaves with nobody: no IVN of acme may see it
    {tenant: globex, vni: 4, cidrs: [198.51.100.64/26], gateway: 198.51.100.65}
"""


def decide_as(policy: Policy, topology: Topology, request: WeaveRequest, asker: str | None):
    return evaluate(request, policy=policy, topology=topology, fabric=Fabric(topology),
                    live=[], now=NOW, asker=asker)


@pytest.mark.parametrize("request_", [
    WeaveRequest("acme-web", "globex-lab", 60, 1),  # globex-lab refuses (and acme-web too)
    WeaveRequest("acme-web", "globex-lab", 60, 1000),  # would also be over the caps
])
def test_a_refusal_about_an_ivn_the_tenant_may_not_see_reads_as_unknown(
        shipped_policy, small, request_) -> None:
    hidden = denied(decide_as(shipped_policy, small, request_, "acme"), Reason.POLICY_VIOLATION)
    missing = denied(decide_as(shipped_policy, small, WeaveRequest(
        request_.requester, "nosuch", request_.duration_s, request_.bandwidth_mbps), "acme"),
        Reason.UNKNOWN_IVN)
    # The operator's view keeps the true reason; the tenant's is that of a missing IVN.
    assert "globex-lab" in hidden.detail and hidden.seen_by(operator=True) is hidden
    told = hidden.seen_by(operator=False)
    assert told.as_dict(operator=False) == {
        "error": "unknown_ivn", "detail": "target IVN 'globex-lab' does not exist"}
    assert hidden.as_dict(operator=False) == told.as_dict(operator=False)
    assert {**missing.as_dict(operator=False), "detail": "X"} == \
        {**told.as_dict(operator=False), "detail": "X"}
    assert missing.detail.replace("nosuch", "globex-lab") == told.detail
    # An operator asking is told the truth.
    assert decide_as(shipped_policy, small, request_, None).tenant_view is None


def test_refusals_about_visible_ivns_keep_their_precise_reasons(small) -> None:
    policy = parse_policy_text(SEEN_THROUGH_ANOTHER)
    # g1 is visible to acme (a2 and g1 weave with each other): a1's own refusal is precise.
    own_side = denied(decide_as(policy, small, WeaveRequest("a1", "g1", 60, 1), "acme"),
                      Reason.POLICY_VIOLATION)
    assert own_side.tenant_view is None and own_side.side == "requester"
    assert own_side.as_dict(operator=False)["detail"].startswith(
        "requester IVN a1 (tenant acme) does not allow weaving with IVN g1 of tenant globex")
    # g2 is no partner of any IVN of acme: even a1's own-side refusal reads as unknown.
    hidden = denied(decide_as(policy, small, WeaveRequest("a1", "g2", 60, 1), "acme"),
                    Reason.POLICY_VIOLATION)
    assert hidden.as_dict(operator=False) == {"error": "unknown_ivn",
                                              "detail": "target IVN 'g2' does not exist"}
    assert policy.visible_to("acme", "g1") and not policy.visible_to("acme", "g2")
    assert policy.visible_to("globex", "a2") and not policy.visible_to("globex", "a1")


def test_invalid_requests_come_before_hidden_ivns_as_before_missing_ones(shipped_policy,
                                                                           small) -> None:
    for target in ("globex-lab", "nosuch"):
        d = denied(decide_as(shipped_policy, small, WeaveRequest("acme-web", target, 60, 1,
                                                                 "platinum"), "acme"),
                   Reason.INVALID_REQUEST)
        assert d.tenant_view is None and "no security profile" in d.detail
