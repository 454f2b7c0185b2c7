"""`nwc demo` (the README's main job) and `nwc lab TOPOLOGY` (a lab to explore).

The demo builds the small lab (VMs of two tenants, two compute hosts, a thin fabric link),
then tells what NWC does, checking each claim as it goes: the tenants are isolated; requests
that break a policy or exceed the fabric are refused with their reasons; an admitted weave
carries ping and iperf3 each way, UDP at its reserved rate, with nothing but ESP on the fabric;
its lease runs out and traffic stops; every resource is released and the audit chain
verifies. It ends by checking that nothing of the lab is left running (`--keep` opens the
Mininet CLI on the lab first, and tears down on exit).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nwc.cli import counted, silence_stdout, tcp_port
from nwc.config import SHIPPED_POLICIES
from nwc.lab.provider import ClientError, ProviderLab
from nwc.topology import Topology
from nwc.yamlsource import ConfigError

RATE_MBPS = 10
LEASE_S = 50  # long enough for the traffic of steps 4-6 (about 30 s) with room to spare


class Story:
    def __init__(self, out: Any = None) -> None:
        self.out = out or sys.stdout  # looked up now: whatever stdout is when the story runs
        self.start = time.monotonic()
        self.failures: list[str] = []

    def say(self, text: str) -> None:
        self.print_line(f"[{time.monotonic() - self.start:6.1f}s] {text}")

    def step(self, title: str) -> None:
        self.print_line(f"\n== {title}")

    def print_line(self, line: str) -> None:
        """A reader that went away (`scripts/demo | head`) must not stop the story before
        the teardown: the rest goes nowhere, the lab is still removed."""
        try:
            print(line, file=self.out, flush=True)
        except (BrokenPipeError, ValueError):
            silence_stdout()
            self.out = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the story

    def check(self, ok: bool, claim: str) -> bool:
        self.say(f"{'ok  ' if ok else 'FAIL'} {claim}")
        if not ok:
            self.failures.append(claim)
        return ok


@contextlib.contextmanager
def ended_cleanly_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (a CI timeout, a closed terminal) end the lab through its normal
    teardown instead of killing the process with everything still running."""
    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def tell(lab: ProviderLab, story: Story) -> None:
    web1, db1 = "web1", "db1"
    acme = lab.client("acme")

    story.step("1. Tenants are isolated")
    story.check(lab.ping(web1, lab.ip_of("web2")),
                "web1 reaches web2 (same IVN acme-web, same host)")
    story.check(not lab.ping(web1, lab.ip_of(db1), count=2, wait_s=0.5),
                "web1 (acme-web) cannot reach db1 (globex-db): default deny between IVNs")
    story.check(not lab.ping(db1, lab.ip_of(web1), count=2, wait_s=0.5),
                "db1 cannot reach web1 either")

    story.step("2. Requests that break a policy or exceed the fabric are refused")
    for label, kw in (("acme asks globex-db for 2 hours (globex-db allows 1)",
                       {"target": "globex-db", "bandwidth_mbps": 5, "duration_s": 7200}),
                      ("acme asks for globex-lab, which nobody may weave with (so acme is not "
                       "told it exists)",
                       {"target": "globex-lab", "bandwidth_mbps": 5, "duration_s": 60}),
                      ("acme asks for 35 Mbit/s to globex-db",
                       {"target": "globex-db", "bandwidth_mbps": 35, "duration_s": 60})):
        try:
            lab.weave("acme", "acme-web", kw["target"],  # type: ignore[arg-type]
                      duration_s=kw["duration_s"],  # type: ignore[arg-type]
                      bandwidth_mbps=kw["bandwidth_mbps"])  # type: ignore[arg-type]
            story.check(False, f"{label}: refused")
        except ClientError as exc:
            story.check(True, f"{label}: HTTP {exc.status} {exc.body['error']}: "
                              f"{exc.body['detail']}")

    story.step(f"3. acme weaves acme-web with globex-db: {RATE_MBPS} Mbit/s for {LEASE_S} s")
    asked = time.monotonic()
    weave = lab.weave("acme", "acme-web", "globex-db", duration_s=LEASE_S,
                      bandwidth_mbps=RATE_MBPS)
    story.say(f"{weave['id']} {weave['state']} after {time.monotonic() - asked:.2f} s: path "
              f"{' > '.join(weave['path'])}, profile {weave['security_profile']}, until "
              f"{weave['expires_at']}")
    story.check(weave["state"] == "active", "the weave is active (IPsec up, flows installed)")
    expires = datetime.strptime(weave["expires_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)

    story.step("4. Traffic crosses, both ways, with no change to any VM")
    story.check(lab.ping(web1, lab.ip_of(db1), count=3), "web1 -> db1 ping")
    story.check(lab.ping(db1, lab.ip_of("web2"), count=3), "db1 -> web2 ping")
    story.check(not lab.ping("web3", lab.ip_of(db1), count=2, wait_s=0.5),
                "web3 (192.0.2.40) still cannot: globex-db accepts only 192.0.2.0/27")

    story.step("5. Only ESP on the fabric link s1-s2")
    from nwc.lab.capture import Capture, cleartext, summarize

    capture = Capture(lab.lab, lab.fabric.ns, "s1-s2", "demo-fabric").start()
    udp = {(a, b): lab.iperf(a, b, "-u", "-b", f"{2 * RATE_MBPS}M", seconds=5)["end"]["sum"]
           for a, b in ((web1, db1), (db1, web1))}
    frames = capture.stop()
    kinds = summarize(frames)
    story.say(f"captured on s1-s2 while UDP crossed both ways: {frame_counts(kinds)}")
    story.check(not cleartext(frames) and kinds["esp-in-udp"] > 0,
                "no VXLAN, no tenant packet in clear: ESP (in UDP 4500) only")

    story.step(f"6. The meters hold the reserved {RATE_MBPS} Mbit/s, each way")
    for (a, b), result in udp.items():
        delivered = result["bits_per_second"] * (1 - result["lost_percent"] / 100) / 1e6
        story.check(abs(delivered - RATE_MBPS) <= 0.1 * RATE_MBPS,
                    f"{a} -> {b} UDP offered at {2 * RATE_MBPS} Mbit/s: {delivered:.2f} "
                    "Mbit/s delivered")
    for a, b in ((web1, db1), (db1, web1)):
        tcp = lab.iperf(a, b, seconds=5)["end"]["sum_received"]["bits_per_second"] / 1e6
        story.check(tcp >= 0.8 * RATE_MBPS, f"{a} -> {b} TCP: {tcp:.2f} Mbit/s")
    stats = acme.call("GET", f"/v1/weaves/{weave['id']}/stats")["measured"]
    for way, label in (("requester_to_target", "acme -> globex"),
                       ("target_to_requester", "globex -> acme")):
        story.say(f"NWC's counters, {label}: {stats.get(f'bytes_{way}', 0):,} bytes "
                  f"delivered, {stats.get(f'meter_dropped_bytes_{way}', 0):,} dropped by the "
                  "meter")
    story.say(f"SA {stats.get('sa_state')}")

    story.step("7. The lease runs out")
    wait = (expires - datetime.now(UTC)).total_seconds()
    story.say(f"waiting {max(0.0, wait):.0f} s for {weave['expires_at']}")
    ended = lab.wait_state("acme", weave["id"], {"terminating", "terminated", "failed"},
                           timeout=wait + 30)
    released = (datetime.now(UTC) - expires).total_seconds()
    if ended["state"] == "terminating":  # released; flows and tunnels being removed
        story.say(f"{weave['id']} terminating (expired), {released:.2f} s after expiry: "
                  "reservation released, data plane being torn down")
        ended = lab.wait_state("acme", weave["id"], {"terminated", "failed"}, timeout=30)
    late = (datetime.now(UTC) - expires).total_seconds()
    story.check(ended["state"] == "terminated" and ended["reason"] == "expired",
                f"{weave['id']} {ended['state']} ({ended['reason']}), {late:.2f} s after "
                "expiry: every switch and both hosts confirmed it gone")
    story.check(not lab.ping(web1, lab.ip_of(db1), count=2, wait_s=0.5),
                "web1 -> db1 stops")
    left = _settle(lab.leftovers)
    story.check(left == {}, "every flow, meter, port, SA, key and reservation is released"
                + (f": left {left}" if left else ""))

    story.step("8. The audit trail")
    from nwc.audit import describe, intact

    records, broken = audit_trail(lab.state_dir)
    story.check(broken is None, f"hash-chained audit: {intact(records, database_checked=True)}"
                if broken is None else f"audit chain: {broken}")
    decisions = {"weave.create", "weave.extend", "weave.terminate", "weave.expire",
                 "weave.fail", "weave.state", "weave.reroute"}
    for r in records:
        if r.get("action") in decisions:
            story.say(f"  {describe(r)}")


def audit_trail(state_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The controller's audit records, and what is wrong with their chain or with the file's
    end as the database has it (None: nothing), as `nwc audit verify` reads them: the
    controller is still running and may commit a record between the two reads."""
    from nwc.audit import compare_with_database, verify_chain
    from nwc.store import DATABASE_FILE

    records, tail = compare_with_database(state_dir / "audit.jsonl", state_dir / DATABASE_FILE)
    breaks = [*verify_chain(records), *([tail] if tail is not None else [])]
    return records, "; ".join(map(str, breaks)) or None


def frame_counts(kinds: Counter[str]) -> str:
    """A capture's summary for a reader: `1,204 esp-in-udp, 6 ike, 2 arp`, most first."""
    return ", ".join(f"{n:,} {kind}" for kind, n in kinds.most_common()) or "nothing"


def lab_heading(lab: ProviderLab) -> str:
    """What the lab holds, counted from its files (a count written by hand went stale: it
    said 2 tenants of a policy that has 3)."""
    topo, policy = lab.topo, lab.policy
    with_vms = sorted({policy.ivns[vm.ivn].tenant for vm in topo.vms.values()})
    return (f"topology {topo.name}: {len(topo.hosts)} compute hosts, {len(topo.switches)} "
            f"fabric switches, {len(topo.vms)} VMs of tenants {' and '.join(with_vms)} "
            f"({len(policy.tenants)} tenants in the policy)")


def _settle(read: Callable[[], dict], timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def cli(lab: ProviderLab) -> None:
    tokens = {who: lab.token(who) for who in (*sorted(lab.policy.tenants), "admin")}
    for line in connection_help(lab.api_url, lab.state_dir, tokens):
        print(line)
    print(cli_banner(lab.topo))
    lab_cli_class(lab)(lab.net)


def cli_banner(topo: Topology) -> str:
    """What the Mininet CLI of the lab offers, named from the topology."""
    a, b = next(((link.a, link.b) for link in sorted(topo.links, key=lambda k: k.key)
                 if link.a in topo.switches and link.b in topo.switches),
                next((link.a, link.b) for link in topo.links))
    return ("Mininet CLI: VMs are " + ", ".join(sorted(topo.vms)) + "; compute hosts "
            + ", ".join(sorted(topo.hosts)) + " (e.g. `web1 ping 192.0.2.70`, "
            "`h1 ovs-ofctl -O OpenFlow13 dump-flows br-int`); fabric switches "
            + ", ".join(sorted(topo.switches)) + f", not Mininet nodes: `fabric-link {a} {b} "
            "down` (or up) cuts a fabric link at both ends. exit tears the lab down.")


def lab_cli_class(lab: ProviderLab) -> type:
    """Mininet's CLI with `fabric-link` for the lab's fabric (Mininet is imported here: the
    unit tier must not need it)."""
    from mininet.cli import CLI
    from mininet.log import error, output

    from nwc.lab import fabriclink
    from nwc.lab.netns import run

    def fabric_link(line: str) -> str:
        return fabriclink.fabric_link(line, lab.topo, lab.fabric.ns.name,
                                      {name: h.ns.name for name, h in lab.hosts.items()}, run)

    class LabCli(CLI):  # type: ignore[misc]
        def precmd(self, line: str) -> str:
            return fabriclink.command_line(super().precmd(line))

        def do_fabric_link(self, line: str) -> None:
            """Take a fabric link down (or up) at both ends, as a cut cable would.
            Usage: fabric-link NODE NODE down|up (switches, or a switch and a compute host)"""
            try:
                output(fabric_link(line) + "\n")
            except (ValueError, RuntimeError) as exc:  # a bad line, a command that failed
                error(f"{exc}\n")

        def do_link(self, line: str) -> None:
            hint = fabriclink.mininet_link_hint(line, lab.topo)
            if hint is None:
                super().do_link(line)
            else:
                error(hint + "\n")

    return LabCli


EXAMPLE_TENANT = "acme"  # owns acme-web, the requester in the example command


def connection_help(api_url: str, state_dir: Path, tokens: dict[str, str]) -> list[str]:
    """How to reach the lab's NWC from another shell: one token per principal, each on its
    own line with its name, then one export to paste (four `export NWC_TOKEN=` lines pasted
    together left the last tenant's token in force)."""
    width = max(map(len, tokens))
    who = EXAMPLE_TENANT if EXAMPLE_TENANT in tokens else sorted(tokens)[0]
    return [f"\nNWC REST API: {api_url}  (state: {state_dir})",
            "Tokens, one per tenant, and admin for the operator:",
            *(f"  {name:<{width}}  {token}" for name, token in tokens.items()),
            f"In another shell, as {who} (or put another's token in NWC_TOKEN):",
            f"  export NWC_API_URL={api_url} NWC_TOKEN={tokens[who]}",
            "  .venv/bin/nwc weave create acme-web globex-db --duration 300 --bandwidth 10"]


def cmd_demo(args: argparse.Namespace) -> int:
    story = Story()
    lab = ProviderLab(args.topology).load()
    story.step(f"Building the lab: {lab_heading(lab)}")
    with ended_cleanly_on_signals():
        try:
            lab.start(progress=story.say)
            tell(lab, story)
            if args.keep:
                cli(lab)
        finally:
            story.step("Tearing down")
            tear_down(lab, story)
    if story.failures:
        story.print_line(f"\n{len(story.failures)} claim(s) did not hold: "
                         + "; ".join(story.failures))
        return 1
    story.print_line("\nEvery claim held.")
    return 0


def tear_down(lab: ProviderLab, story: Story) -> None:
    """Stop the lab, then look for what is left of it (by its prefix and pids, in the
    system): "nothing left running" is a claim checked like the others."""
    try:
        removed = lab.stop()
    except RuntimeError as exc:  # Lab.close went on past it: what remains is listed below
        story.say(str(exc))
        removed = []
    left = lab.remains()
    if removed:
        story.say(f"removed {removal_summary(removed)}")
    story.check(not left, f"nothing of lab {lab.lab.prefix} left running" if not left else
                f"left behind by lab {lab.lab.prefix}: {', '.join(left)}")


def removal_summary(removed: list[str]) -> str:
    """`Lab.close`'s list, counted: `7 namespaces, 3 links, 9 directories, 15 processes`."""
    kinds = Counter({"netns": "namespace", "link": "link", "dir": "directory"}
                    .get(what.split(" ", 1)[0], "process") for what in removed)
    plurals = {"namespace": None, "link": None, "directory": "directories",
               "process": "processes"}
    return ", ".join(counted(kinds[k], k, plural) for k, plural in plurals.items() if kinds[k])


def cmd_lab(args: argparse.Namespace) -> int:
    keep: Path | None = args.keep_state
    if keep is not None and keep.exists() and not keep.is_dir():
        print(f"lab: {keep} is not a directory: give --keep-state a new or empty directory",
              file=sys.stderr)
        return 1
    if keep is not None and keep.exists() and any(keep.iterdir()):
        print(f"lab: {keep} is not empty: give --keep-state a new or empty directory",
              file=sys.stderr)
        return 1
    if args.api_port is not None and not port_is_free(args.api_port):
        print(f"lab: 127.0.0.1:{args.api_port} is in use: choose another --api-port",
              file=sys.stderr)
        return 1
    # Checked as `nwc run` checks them, before anything is built.
    policy = [p.resolve() for p in args.policy] if args.policy else [SHIPPED_POLICIES]
    lab = ProviderLab(args.topology, policy_paths=policy, api_port=args.api_port)
    try:
        lab.load()
    except ConfigError as exc:
        print(f"lab: configuration refused:\n{exc}", file=sys.stderr)
        return 1
    story = Story()
    with ended_cleanly_on_signals():
        try:
            lab.start(progress=lambda text: story.print_line(f"lab: {text}"))
            cli(lab)
        finally:
            try:
                removed = lab.stop(keep_state=keep)
            except RuntimeError as exc:
                story.print_line(f"lab: {exc}")
                removed = []
            left = lab.remains()
            story.print_line(f"lab {lab.lab.prefix}: removed {removal_summary(removed)}"
                             if removed else f"lab {lab.lab.prefix}: removed")
            if keep is not None and (keep / "nwc.db").exists():
                audit = f"; nwc audit verify --state-dir {keep}" if \
                    (keep / "audit.jsonl").exists() else " (no audit records were written)"
                story.print_line(f"lab: kept the controller's state and logs in {keep}{audit}")
            elif keep is None:
                story.print_line("lab: its state and audit log went with it (--keep-state DIR "
                                 "keeps them)")
            story.print_line("lab: nothing left running" if not left else
                             "lab: left behind: " + ", ".join(left))
    return 0 if not left else 1


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the demo: NWC end to end on the small lab",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--keep", action="store_true",
                   help="after the story, open the Mininet CLI on the lab (exit tears down)")
    p.add_argument("--topology", default="small", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("lab", help="start a topology with NWC and open the Mininet CLI")
    p.add_argument("topology", help="a shipped topology name (small, leaf-spine) or a file")
    p.add_argument("--keep-state", type=Path, default=None, metavar="DIR",
                   help="on exit, copy the controller's state (nwc.db, audit.jsonl, logs) to "
                        "DIR (new or empty; made mode 0700) before the lab is removed")
    p.add_argument("--api-port", type=tcp_port, default=None,
                   help="the REST API's port on 127.0.0.1 (default: a free one)")
    p.add_argument("--policy", type=Path, action="append", default=None,
                   help=f"policy file or directory for the lab's NWC, checked as nwc run "
                        f"checks it (repeatable; default {SHIPPED_POLICIES})")
    p.set_defaults(func=cmd_lab)
