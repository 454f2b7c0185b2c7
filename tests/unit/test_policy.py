"""The policy schema: every rule check-policy enforces, on inline YAML, with file/line/field."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nwc import yamlsource
from nwc.cli import main
from nwc.config import SHIPPED_POLICIES, SHIPPED_TOPOLOGIES
from nwc.policy import load_policy, parse_policy_text
from nwc.topology import load_topology, parse_topology_text
from nwc.yamlsource import ConfigError

pytestmark = pytest.mark.unit

BASE = """\
version: 1
tenants:
  acme: {}
  globex: {}
security_profiles:
  gold:
    ike: [aes256gcm16-prfsha256-x25519]
    esp: [aes256gcm16]
    auth: psk
    acl:
      - {from: either, protocol: any}
ivns:
  web:
    tenant: acme
    vni: 10
    cidrs: [192.0.2.0/26]
    gateway: 192.0.2.1
    weaving:
      partners: [{ivn: db}]
      max_weave_mbps: 10
      max_total_mbps: 20
      max_duration_s: 600
      profiles: [gold]
  db:
    tenant: globex
    vni: 20
    cidrs: [192.0.2.64/26]
    gateway: 192.0.2.65
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_policy_text(textwrap.dedent(text), "p.yaml")
    return [str(p) for p in exc.value.problems]


def one_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def test_base_policy_is_valid_and_modelled() -> None:
    policy = parse_policy_text(BASE)
    web = policy.ivns["web"]
    assert web.tenant == "acme" and web.vni == 10
    assert str(web.gateway) == "192.0.2.1"
    assert web.weaving.partners[0].ivn == "db"
    assert web.weaving.profiles == ("gold",)
    assert policy.ivns["db"].weaving.partners == ()  # no weaving section: nobody
    assert policy.profiles["gold"].rekey_s == 3600
    assert "standard" in policy.qos_classes


def test_shipped_policies_are_valid(shipped_policy) -> None:
    assert {"acme-web", "globex-db", "initech-app"} <= set(shipped_policy.ivns)


def test_duplicate_key_is_rejected_with_both_lines() -> None:
    text = BASE.replace("    vni: 10\n", "    vni: 10\n    vni: 11\n")
    msg = one_problem(text)
    assert msg.startswith("p.yaml:16: ivns.web.vni: duplicate key (first defined on line 15)")


def test_duplicate_mapping_entry_is_rejected() -> None:
    text = BASE + "  web:\n    tenant: acme\n"
    msg = problems(text)[0]
    assert "ivns.web: duplicate key" in msg


def test_unknown_key_names_field_and_line() -> None:
    text = BASE.replace("    vni: 10\n", "    vni: 10\n    colour: blue\n")
    msg = one_problem(text)
    assert msg.startswith("p.yaml:16: ivns.web.colour: unknown key 'colour'")


def test_wrong_type() -> None:
    msg = one_problem(BASE.replace("vni: 10", "vni: ten"))
    assert "ivns.web.vni: expected an integer, got string 'ten'" in msg


@pytest.mark.parametrize(("find", "replace", "expected"), [
    ("max_weave_mbps: 10", "max_weave_mbps: 30",
     "30 Mbit/s per weave exceeds the total cap of 20"),
    ("max_weave_mbps: 10", "max_weave_mbps: 0", "must be greater than 0"),
    ("max_duration_s: 600", "max_duration_s: -5", "must be at least 1"),
    ("max_duration_s: 600", "max_duration_s: 99999999999", "must be at most"),
    ("vni: 10", "vni: 16777215", "must be at most 8388607"),
    ("cidrs: [192.0.2.0/26]", "cidrs: [192.0.2.1/26]", "has host bits set"),
    ("cidrs: [192.0.2.0/26]", "cidrs: [192.0.2.0/26, 192.0.2.32/27]",
     "192.0.2.32/27 overlaps 192.0.2.0/26 in the same list"),
    ("gateway: 192.0.2.1", "gateway: 192.0.2.100", "not a usable address"),
    ("gateway: 192.0.2.1", "gateway: 192.0.2.0", "not a usable address"),
    ("partners: [{ivn: db}]", "partners: [{ivn: nosuch}]", "unknown partner IVN 'nosuch'"),
    ("partners: [{ivn: db}]", "partners: [{tenant: nosuch}]", "unknown partner tenant"),
    ("partners: [{ivn: db}]", "partners: [{ivn: web}]", "cannot list itself"),
    ("partners: [{ivn: db}]", "partners: [{ivn: db, tenant: globex}]", "exactly one of"),
    ("partners: [{ivn: db}]", "partners: [{ivn: db, prefixes: [203.0.113.0/24]}]",
     "is not inside partner db's prefixes"),
    ("profiles: [gold]", "profiles: [platinum]", "unknown security profile 'platinum'"),
    ("profiles: [gold]", "profiles: [gold, gold]", "lists a profile twice"),
    ("tenant: acme\n    vni: 10", "tenant: umbrella\n    vni: 10", "unknown tenant 'umbrella'"),
    ("vni: 20", "vni: 10", "VNI 10 is already used by IVN 'web'"),
    ("auth: psk", "auth: password", "must be 'psk' or 'x509'"),
    ("ike: [aes256gcm16-prfsha256-x25519]", "ike: [3des-md5-modp1024]",
     "unknown or disallowed algorithm '3des'"),
    ("ike: [aes256gcm16-prfsha256-x25519]", "ike: [aes256gcm16-x25519]", "needs a PRF"),
    ("ike: [aes256gcm16-prfsha256-x25519]", "ike: [aes256-prfsha256-x25519]",
     "needs an integrity algorithm"),
    ("ike: [aes256gcm16-prfsha256-x25519]", "ike: [aes256gcm16-prfsha256]",
     "needs a Diffie-Hellman group"),
    ("esp: [aes256gcm16]", "esp: [aes256gcm16-sha256]", "takes no integrity algorithm"),
    ("esp: [aes256gcm16]", "esp: []", "needs at least one proposal"),
    ("- {from: either, protocol: any}", "- {from: anyone, protocol: any}",
     "must be requester, target or either"),
    ("- {from: either, protocol: any}", "- {from: either, protocol: icmp, ports: [1]}",
     "ports only apply to tcp and udp"),
    ("- {from: either, protocol: any}", "- {from: either, protocol: tcp, ports: [70000]}",
     "must lie within 1-65535"),
    ("- {from: either, protocol: any}", "- {from: either, protocol: tcp, ports: ['90-80']}",
     "low end first"),
    ("    acl:\n      - {from: either, protocol: any}\n", "    acl: []\n",
     "an empty ACL lets nothing cross"),
    ("tenants:\n  acme: {}", "tenants:\n  Acme: {}", "is not a name"),
    ("version: 1", "version: 2", "only version 1"),
    # True == 1 and 1.0 == 1 in Python; neither is the integer 1 a schema version is.
    ("version: 1", "version: true", "version: expected an integer, got boolean True"),
    ("version: 1", "version: 1.0", "version: expected an integer, got float 1.0"),
])
def test_each_rule_gives_a_precise_problem(find: str, replace: str, expected: str) -> None:
    text = BASE.replace(find, replace, 1)
    assert text != BASE, "the test's search text must be in BASE"
    found = problems(text)
    assert any(expected in p for p in found), found
    assert all(p.startswith("p.yaml:") for p in found)


HUNDREDS_OF_DIGITS = "1" + "0" * 400  # beyond every float: float() raises OverflowError
TOO_MANY_DIGITS = "1" * 5000  # int() of it raises ValueError, and so does str() of the int
HUGE_HEX = "0x" + "f" * 5000  # YAML reads it, but Python cannot print it


@pytest.mark.parametrize(("find", "replace", "expected"), [
    pytest.param("max_weave_mbps: 10", "max_weave_mbps: 1.0e+306",
                 "max_weave_mbps: must be at most 1000000000 Mbit/s, got 1e+306", id="finite-cap"),
    pytest.param("max_total_mbps: 20", f"max_total_mbps: {HUNDREDS_OF_DIGITS}",
                 "max_total_mbps: must be at most 1000000000 Mbit/s, "
                 "got an integer of about 401 digits", id="cap-beyond-float"),
    pytest.param("vni: 10", f"vni: {HUGE_HEX}",
                 "ivns.web.vni: must be at most 8388607, got an integer of about 6021 digits",
                 id="integer-too-long-to-print"),
    pytest.param("vni: 10", f"vni: {TOO_MANY_DIGITS}",
                 "ivns.web.vni: an integer of 5000 characters is too large", id="int-limit"),
    pytest.param("protocol: any}", f"protocol: tcp, ports: [{HUGE_HEX}]}}",
                 "port range an integer of about 6021 digits must lie within 1-65535",
                 id="port-too-long-to-print"),
    pytest.param("gateway: 192.0.2.1", "gateway: [[0, 1, 2024-13-45]]",
                 "ivns.web.gateway[0][2]: cannot read this value: month must be in 1..12",
                 id="impossible-date"),
    pytest.param("tenants:\n", f"tenants:\n  {HUNDREDS_OF_DIGITS}: {{}}\n",
                 "tenants: an integer of about 401 digits is not a key", id="huge-key"),
])
def test_huge_or_unreadable_numbers_are_problems_not_tracebacks(find: str, replace: str,
                                                                expected: str) -> None:
    text = BASE.replace(find, replace, 1)
    assert text != BASE, "the test's search text must be in BASE"
    found = problems(text)
    assert any(expected in p for p in found), found
    assert all(p.startswith("p.yaml:") and len(p) < 300 for p in found), found


def test_an_integer_too_long_to_read_is_one_problem() -> None:
    # Not also "expected an integer, got nothing" about the value it could not read.
    assert problems(BASE.replace("vni: 10", f"vni: {TOO_MANY_DIGITS}", 1)) == [
        "p.yaml:15: ivns.web.vni: an integer of 5000 characters is too large"]


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("version: 1\nivns: {}\x00\n", "p.yaml:2: (document): character U+0000 may "
                 "not appear in YAML", id="nul"),
    pytest.param("version: 1\n\ntenants: {}  # \x1b[31m\n", "p.yaml:3: (document): "
                 "character U+001B may not appear in YAML", id="esc"),
])
def test_a_control_character_is_a_problem_with_its_line(text: str, expected: str) -> None:
    (msg,) = problems(text)
    assert msg.startswith(expected), msg
    assert "\x1b" not in msg and "\x00" not in msg


def test_a_file_not_in_utf8_is_a_problem_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_bytes(b"version: 1\ntenants:\n  caf\xe9: {}\n")
    with pytest.raises(ConfigError) as exc:
        load_policy([tmp_path])
    assert [str(p) for p in exc.value.problems] == [
        f"{tmp_path / 'p.yaml'}:3: (document): not UTF-8 (byte 0xe9 at offset 25)"]


def test_check_policy_reports_a_control_character_as_file_and_line(tmp_path: Path,
                                                                    capsys) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_bytes(BASE.encode() + b"# \x1b[31m\n")
    assert main(["check-policy", str(bad)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{bad}:29: (document): character U+001B may not appear in YAML (of the control "
        "characters, only tab and line breaks may)",
        "check-policy: 1 problem"]


@pytest.mark.parametrize("make", [
    pytest.param(lambda p: os.mkfifo(p), id="fifo"),  # opening it would wait for a writer
    pytest.param(lambda p: p.symlink_to("/dev/zero"), id="dev-zero"),  # never ends
    pytest.param(lambda p: p.symlink_to("/dev/urandom"), id="dev-urandom"),
    pytest.param(lambda p: p.mkdir(), id="directory"),
])
def test_only_regular_files_are_read(tmp_path: Path, make) -> None:
    (tmp_path / "a.yaml").write_text(BASE)
    odd = tmp_path / "b.yaml"
    make(odd)
    with pytest.raises(ConfigError) as exc:
        load_policy([tmp_path])
    (msg,) = [str(p) for p in exc.value.problems]
    assert msg.startswith(f"{odd}: (document): not a regular file ("), msg


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "real.txt").write_text(BASE)
    (tmp_path / "p.yaml").symlink_to(tmp_path / "real.txt")
    assert set(load_policy([tmp_path]).tenants) == {"acme", "globex"}


def test_a_file_over_the_size_limit_is_refused(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    padded = BASE + "#" * 100 + "\n"
    monkeypatch.setattr(yamlsource, "MAX_FILE_BYTES", len(padded))
    (tmp_path / "p.yaml").write_text(padded)
    assert set(load_policy([tmp_path]).tenants) == {"acme", "globex"}  # at the limit: read
    (tmp_path / "p.yaml").write_text(padded + "\n")
    with pytest.raises(ConfigError) as exc:
        load_policy([tmp_path])
    (msg,) = [str(p) for p in exc.value.problems]
    assert msg.startswith(f"{tmp_path / 'p.yaml'}: (document): larger than "), msg


def billion_laughs(levels: int) -> str:
    """Each level an alias list of ten of the one before: 10**levels values from ~60 bytes a
    level (seven levels took 17 s to expand)."""
    text = "x0: &a0 [l, l, l, l, l, l, l, l, l, l]\n"
    for level in range(1, levels):
        text += f"x{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]\n"
    return text


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("tenants: &t {a: *t}\n", "p.yaml:1: (document): YAML anchors (&t) are not "
                 "accepted; write each value out", id="alias-cycle"),
    pytest.param(billion_laughs(5), "p.yaml:1: (document): YAML anchors (&a0)",
                 id="billion-laughs"),
    pytest.param("tenants:\n  acme: *nosuch\n", "p.yaml:2: (document): YAML aliases (*nosuch) "
                 "are not accepted", id="alias"),
    pytest.param("tenants: " + "[" * 3000 + "]" * 3000 + "\n",
                 "p.yaml:1: (document): nested more than 64 levels deep", id="3000-deep"),
])
def test_aliases_and_deep_nesting_are_refused_cleanly(text: str, expected: str) -> None:
    (msg,) = problems(text)
    assert msg.startswith(expected), msg


def test_nesting_up_to_the_limit_is_read() -> None:
    # The root mapping is one level, so 63 lists inside it make 64.
    found = problems("x: " + "[" * 63 + "]" * 63 + "\n")
    assert found == ["p.yaml:1: x: unknown key 'x' (allowed: ivns, qos_classes, "
                     "security_profiles, tenants, version)"]


def test_recursion_error_is_a_problem_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # Should anything still recurse too deep, the answer is a problem, never a traceback.
    monkeypatch.setattr(yamlsource, "MAX_NESTING", 1_000_000)
    (msg,) = problems("tenants: " + "[" * 3000 + "]" * 3000 + "\n")
    assert msg == "p.yaml: (document): nested too deeply (the limit is 1000000)"


def test_yaml_syntax_error_has_a_line() -> None:
    msg = problems("tenants:\n  acme: {\n")[0]
    assert msg.startswith("p.yaml:") and "YAML syntax error" in msg


def test_several_problems_are_all_reported() -> None:
    text = BASE.replace("vni: 10", "vni: x").replace("gateway: 192.0.2.65", "gateway: nope")
    found = problems(text)
    assert len(found) == 2
    assert any("ivns.web.vni" in p for p in found) and any("ivns.db.gateway" in p for p in found)


WITH_QOS = BASE.replace("      profiles: [gold]\n",
                        "      profiles: [gold]\n      qos_class: premium\n") \
    + "qos_classes:\n  premium: {dscp: 46}\n"


@pytest.mark.parametrize(("find", "replace", "expected"), [
    # A bad field in a definition is reported once, not again at every reference to it.
    ("auth: psk", "auth: psk\n    rekey_s: 10", "security_profiles.gold.rekey_s: must be at least"),
    ("esp: [aes256gcm16]", "esp: [aes256gcm16-md5]", "unknown or disallowed algorithm 'md5'"),
    ("{dscp: 46}", "{dscp: 99}", "qos_classes.premium.dscp: must be at most 63"),
    ("gateway: 192.0.2.65", "gateway: nope", "ivns.db.gateway: expected an IPv4 address"),
])
def test_a_reference_to_an_invalid_definition_is_not_also_unknown(find: str, replace: str,
                                                                   expected: str) -> None:
    assert expected in one_problem(WITH_QOS.replace(find, replace))


def test_references_of_an_invalid_ivn_are_still_checked() -> None:
    found = problems(BASE.replace("vni: 10", "vni: x").replace("profiles: [gold]",
                                                               "profiles: [platinum]"))
    assert len(found) == 2, found
    assert any("ivns.web.weaving.profiles[0]: unknown security profile 'platinum'" in p
               for p in found)


def test_tenant_prefixes_are_not_judged_against_an_invalid_ivn() -> None:
    text = BASE.replace("partners: [{ivn: db}]",
                        "partners: [{tenant: globex, prefixes: [192.0.2.64/27]}]")
    load = parse_policy_text(textwrap.dedent(text), "p.yaml")
    assert load.ivns["web"].weaving.partners[0].tenant == "globex"
    # db (globex's only IVN) is invalid: its own problem is the only one reported.
    assert "ivns.db.vni" in one_problem(text.replace("vni: 20", "vni: -1"))


def test_a_partner_listed_twice_is_a_problem() -> None:
    msg = one_problem(BASE.replace("partners: [{ivn: db}]", "partners: [{ivn: db}, {tenant: "
                                   "globex}, {ivn: db, prefixes: [192.0.2.64/27]}]"))
    assert msg.startswith("p.yaml:19: ivns.web.weaving.partners[2]: ivn db is already listed "
                          "at partners[0]")


def test_a_dangling_partner_is_located_after_a_dropped_entry() -> None:
    found = problems(BASE.replace("partners: [{ivn: db}]",
                                  "partners: [{ivn: db, tenant: globex}, {ivn: nosuch}]"))
    assert any("ivns.web.weaving.partners[1]: unknown partner IVN 'nosuch'" in p
               for p in found), found


def test_a_dangling_partner_named_by_a_dropped_entry_too_is_located_at_its_own() -> None:
    # Found in review: the dropped first entry names the same IVN, and the rule was located
    # by the first entry naming its partner.
    found = problems(BASE.replace("partners: [{ivn: db}]",
                                  "partners: [{ivn: nosuch, tenant: globex}, {ivn: nosuch}]"))
    assert found == [
        "p.yaml:19: ivns.web.weaving.partners[0]: a partner names exactly one of `ivn` or "
        "`tenant`",
        "p.yaml:19: ivns.web.weaving.partners[1]: unknown partner IVN 'nosuch'"]


def test_check_policy_on_a_directory_without_policy_files_says_so(tmp_path: Path,
                                                                  capsys) -> None:
    assert main(["check-policy", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}: (directory): holds no *.yaml or *.yml files" in err
    assert "no policy files given" not in err


def test_definitions_merge_across_files_and_clash_is_located(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(BASE)
    (tmp_path / "b.yaml").write_text("tenants:\n  initech: {}\n")
    policy = load_policy([tmp_path])
    assert set(policy.tenants) == {"acme", "globex", "initech"}
    (tmp_path / "c.yaml").write_text("tenants:\n  acme: {}\n")
    with pytest.raises(ConfigError) as exc:
        load_policy([tmp_path])
    (msg,) = [str(p) for p in exc.value.problems]
    assert msg.startswith(f"{tmp_path / 'c.yaml'}:2: tenants.acme:")
    assert f"already defined at {tmp_path / 'a.yaml'}:3" in msg


def test_check_policy_cli_exit_codes_and_output(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    assert main(["check-policy", str(good)]) == 0
    assert "policy OK: 2 tenants, 2 IVNs" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("    vni: 10\n", "    vni: 10\n    vni: 10\n")
                   .replace("[{ivn: db}]", "[{ivn: gone}]"))
    assert main(["check-policy", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"{bad}:16: ivns.web.vni: duplicate key (first defined on line 15); "
                      "YAML would silently keep only the last one")
    assert any("ivns.web.weaving.partners[0]: unknown partner IVN 'gone'" in e for e in err)
    assert err[-1] == "check-policy: 2 problems"


def test_check_policy_counts_in_words(tmp_path: Path, capsys) -> None:
    (tmp_path / "p.yaml").write_text(BASE)
    (tmp_path / "t.yaml").write_text(TOPOLOGY)
    assert main(["check-policy", str(tmp_path / "p.yaml"), "--topology",
                 str(tmp_path / "t.yaml")]) == 0
    out = capsys.readouterr().out
    assert "policy OK: 2 tenants, 2 IVNs, 1 security profile, 1 QoS class (" in out
    assert "topology OK: t: 2 switches, 2 links, 1 host, 0 VMs (" in out


def test_output_cut_short_by_its_reader_is_not_an_error_message(tmp_path: Path) -> None:
    """`nwc ... | head -1`: the reader goes before nwc has written everything."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after `head` has exited
    try:
        done = subprocess.run([sys.executable, "-m", "nwc.cli", "check-policy"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
                              check=False)
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141  # as a command killed by SIGPIPE


def test_check_policy_validates_topologies_against_the_policy(tmp_path: Path, capsys) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text(textwrap.dedent("""\
        name: t
        underlay: {hosts: 100.64.0.0/24, weave_endpoints: 100.64.128.0/24,
                   weave_vteps: 100.100.0.0/24}
        switches: {s1: {}}
        links: []
        hosts:
          h1: {switch: s1, uplink_mbps: 100, underlay_ip: 100.64.0.1}
        vms:
          v1: {host: h1, ivn: acme-web, ip: 203.0.113.5}
        """))
    assert main(["check-policy", str(SHIPPED_POLICIES), "--topology", str(topo)]) == 1
    err = capsys.readouterr().err
    assert f"{topo}:9: vms.v1.ip: 203.0.113.5 is outside IVN acme-web's prefixes" in err


def test_check_policy_prints_the_wiring_the_bridges_need(capsys) -> None:
    """Datapath ids and port numbers come from NWC's model (neighbours in name order):
    docs/deploy.md has the operator set the bridges to exactly these."""
    topo = SHIPPED_TOPOLOGIES / "leaf-spine.yaml"
    assert main(["check-policy", str(SHIPPED_POLICIES), "--topology", str(topo),
                 "--wiring"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()
             if line.startswith("  ")]
    model = load_topology(topo, load_policy([SHIPPED_POLICIES]))
    assert len(lines) == len(model.switches) + len(model.hosts)
    for kind, name, dpid, _, *ports in lines:
        node = (model.switches if kind == "switch" else model.hosts)[name]
        assert dpid == f"datapath-id={node.dpid:016x}"
        assert dict(p.split("=") for p in ports) == \
            {str(port): peer for peer, port in model.ports(name).items()}


def test_check_policy_defaults_to_everything_shipped(capsys) -> None:
    assert main(["check-policy"]) == 0
    out = capsys.readouterr().out
    assert "topology OK: small" in out and "topology OK: leaf-spine" in out


TOPOLOGY = """\
version: 1
name: t
underlay: {hosts: 100.64.0.0/24, weave_endpoints: 100.64.128.0/24, weave_vteps: 100.100.0.0/24}
switches: {s1: {}, s2: {}}
links:
  - {between: [s1, s2], capacity_mbps: 100}
hosts:
  h1: {switch: s1, uplink_mbps: 100, underlay_ip: 100.64.0.1}
"""


def topology_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_topology_text(text, file="t.yaml")
    return [str(p) for p in exc.value.problems]


def test_underlay_mtu_must_hold_the_legs_of_every_allowed_profile() -> None:
    """BASE's gold (ESP aes256gcm16: 65 bytes) needs 1500 + 50 VXLAN + 65 = 1615."""
    policy = parse_policy_text(BASE)
    thin = TOPOLOGY.replace("weave_vteps: 100.100.0.0/24}", "weave_vteps: 100.100.0.0/24,\n"
                            "           mtu: 1614}")
    with pytest.raises(ConfigError) as exc:
        parse_topology_text(thin, policy, file="t.yaml")
    (msg,) = map(str, exc.value.problems)
    assert msg == ("t.yaml:4: underlay.mtu: underlay MTU 1614 is below the 1615 bytes a "
                   "full-size VM frame takes in a weave leg of security profile gold (1500 + 50 "
                   "VXLAN + 65 ESP); set it to at least 1615")
    assert parse_topology_text(thin.replace("1614", "1615"), policy).underlay.mtu == 1615
    # A profile no IVN allows carries no weave, so its bigger overhead does not count.
    unused = BASE.replace("security_profiles:\n", "security_profiles:\n  sha:\n"
                          "    ike: [aes256-sha512-prfsha512-x25519]\n    esp: [aes256-sha512]\n"
                          "    auth: psk\n    acl: [{from: either, protocol: any}]\n")
    assert parse_topology_text(thin.replace("1614", "1615"),
                               parse_policy_text(unused)).underlay.mtu == 1615


def test_underlay_mtu_must_hold_the_ivn_overlay_without_a_policy() -> None:
    thin = TOPOLOGY.replace("weave_vteps: 100.100.0.0/24}", "weave_vteps: 100.100.0.0/24,\n"
                            "           mtu: 1400}")
    (msg,) = topology_problems(thin)
    assert msg.startswith("t.yaml:4: underlay.mtu: underlay MTU 1400 is below the 1550 bytes")
    assert "set it to at least 1550" in msg


def test_base_topology_is_valid() -> None:
    assert parse_topology_text(TOPOLOGY).name == "t"


@pytest.mark.parametrize(("find", "replace", "expected"), [
    ("version: 1", "version: 2", "t.yaml:1: version: only version 1"),
    ("version: 1", "version: true", "t.yaml:1: version: expected an integer, got boolean True"),
    ("version: 1", "version: 1.0", "t.yaml:1: version: expected an integer, got float 1.0"),
    # Fabric() turns capacities into kbit/s integers: 1e306 overflowed it at start.
    ("capacity_mbps: 100", "capacity_mbps: 1.0e+306",
     "t.yaml:6: links[0].capacity_mbps: must be at most 1000000000 Mbit/s, got 1e+306"),
    pytest.param("uplink_mbps: 100", f"uplink_mbps: {HUNDREDS_OF_DIGITS}",
                 "t.yaml:8: hosts.h1.uplink_mbps: must be at most 1000000000 Mbit/s, "
                 "got an integer of about 401 digits", id="uplink-beyond-float"),
    pytest.param("s1: {}", f"s1: {{dpid: {HUGE_HEX}}}",
                 "t.yaml:4: switches.s1.dpid: must be at most 18446744073709551615, "
                 "got an integer of about 6021 digits", id="dpid-too-long-to-print"),
    # A VM's port defaults to its name; interface names stop at 15 characters.
    ("  h1: {switch: s1, uplink_mbps: 100, underlay_ip: 100.64.0.1}\n",
     "  h1: {switch: s1, uplink_mbps: 100, underlay_ip: 100.64.0.1}\n"
     "vms:\n  storefront-web-01: {host: h1, ivn: web, ip: 192.0.2.5}\n",
     "t.yaml:10: vms.storefront-web-01: VM name 'storefront-web-01' is longer than an "
     "interface name (15 characters) and there is no `port:`"),
])
def test_each_topology_rule_gives_a_precise_problem(find: str, replace: str,
                                                    expected: str) -> None:
    text = TOPOLOGY.replace(find, replace, 1)
    assert text != TOPOLOGY, "the test's search text must be in TOPOLOGY"
    found = topology_problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_a_vm_with_a_long_name_and_its_own_port_is_valid() -> None:
    text = TOPOLOGY + "vms:\n  storefront-web-01: {host: h1, ivn: web, ip: 192.0.2.5, port: sw1}\n"
    assert parse_topology_text(text).vms["storefront-web-01"].port == "sw1"


@pytest.mark.parametrize(("find", "replace", "expected"), [
    ("s1: {}, s2: {}", "s1: {dpid: 7}, s2: {dpid: 7}",
     "t.yaml:4: switches.s2: dpid 0x7 is also used by s1"),
    ("s1: {}, s2: {}", "s1: {dpid: 7}, s2: {}",
     "t.yaml:8: hosts.h1: dpid 0x7 is also used by switch s1"),
])
def test_a_duplicate_dpid_is_one_problem_on_the_right_entry(find: str, replace: str,
                                                            expected: str) -> None:
    text = TOPOLOGY.replace(find, replace)
    if "hosts.h1" in expected:
        text = text.replace("underlay_ip: 100.64.0.1}", "underlay_ip: 100.64.0.1, dpid: 7}")
    assert topology_problems(text) == [expected]


# -- one certificate identity per machine (nwc.certnames) ------------------------------------

TWO_HOSTS = TOPOLOGY + "  h2: {switch: s2, uplink_mbps: 100, underlay_ip: 100.64.0.2}\n"
H1 = "underlay_ip: 100.64.0.1"
H2 = "underlay_ip: 100.64.0.2"


@pytest.mark.parametrize(("edits", "expected"), [
    # Found in review: h2's certificate passed as h1's OVSDB server (given h1's PSKs) and br-int.
    ([(H1, f"{H1}, ovsdb_cert_name: h2")],
     "t.yaml:8: hosts.h1.ovsdb_cert_name: ovsdb_cert_name h2 also names host h2 (its name)"),
    ([(H1, f"{H1}, ovsdb_cert_name: s1")],
     "t.yaml:8: hosts.h1.ovsdb_cert_name: ovsdb_cert_name s1 also names switch s1 (its name)"),
    ([("s1: {}", "s1: {cert_name: fabric}"), (H1, f"{H1}, ovsdb_cert_name: Fabric")],
     "t.yaml:8: hosts.h1.ovsdb_cert_name: ovsdb_cert_name fabric also names switch s1 (its "
     "cert_name)"),
    ([("s2: {}", "s2: {cert_name: h1}")],  # a host named like a switch's certificate
     "t.yaml:4: switches.s2.cert_name: cert_name h1 also names host h1 (its name)"),
    ([(H1, f"{H1}, ovsdb_cert_name: ovsdb.example"), (H2, f"{H2}, ovsdb_cert_name: ovsdb.example")],
     "t.yaml:9: hosts.h2.ovsdb_cert_name: ovsdb_cert_name ovsdb.example also names host h1 (its "
     "ovsdb_cert_name)"),
    ([(H1, f"{H1}, management_ip: 198.51.100.5"), (H2, f"{H2}, management_ip: 198.51.100.5")],
     "t.yaml:9: hosts.h2.management_ip: management_ip 198.51.100.5 also names host h1 (its "
     "management_ip)"),
    ([(H1, f"{H1}, management_ip: 198.51.100.5"), (H2, f"{H2}, ovsdb: 'ssl:198.51.100.5:6640'")],
     "t.yaml:9: hosts.h2.ovsdb: OVSDB address 198.51.100.5 also names host h1 (its "
     "management_ip)"),
])
def test_two_machines_cannot_share_a_certificate_identity(edits: list[tuple[str, str]],
                                                          expected: str) -> None:
    text = TWO_HOSTS
    for find, replace in edits:
        assert find in text
        text = text.replace(find, replace)
    assert [p.split(": one certificate")[0] for p in topology_problems(text)] == [expected]


def test_fabric_switches_may_share_a_certificate_and_a_host_its_own_names() -> None:
    text = (TWO_HOSTS.replace("s1: {}, s2: {}", "s1: {cert_name: fabric}, s2: {cert_name: s1}")
            .replace(H1, f"{H1}, ovsdb_cert_name: h1.mgmt.example, management_ip: 198.51.100.5, "
                         "ovsdb: 'ssl:198.51.100.5:6640'"))
    topo = parse_topology_text(text)
    assert topo.hosts["h1"].ovsdb_cert_name == "h1.mgmt.example"
    assert topo.switches["s2"].cert_name == "s1"
