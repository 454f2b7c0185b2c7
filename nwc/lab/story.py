"""`nwc demo` (the README's main job) and `nwc lab TOPOLOGY` (a lab to explore).

The demo builds the small lab (two tenants, two compute hosts, a thin fabric link), then tells
what NWC does, checking each claim as it goes: the tenants are isolated; requests that break a
policy or exceed the fabric are refused with their reasons; an admitted weave carries ping and
iperf3 both ways at its reserved rate, with nothing but ESP on the fabric; its lease runs out
and traffic stops; every resource is released and the audit chain verifies. It ends leaving
nothing running (`--keep` opens the Mininet CLI on the lab instead, and tears down on exit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from nwc.lab.provider import ClientError, ProviderLab

RATE_MBPS = 10
LEASE_S = 40


class Story:
    def __init__(self, out: Any = sys.stdout) -> None:
        self.out = out
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
            _silence_stdout()
            self.out = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the story

    def check(self, ok: bool, claim: str) -> bool:
        self.say(f"{'ok  ' if ok else 'FAIL'} {claim}")
        if not ok:
            self.failures.append(claim)
        return ok


def _silence_stdout() -> None:
    """After the reader of stdout left: later writes (and the flush at exit) go nowhere."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


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
    for label, kw in (("acme asks to weave acme-web with globex-lab",
                       {"target": "globex-lab", "bandwidth_mbps": 5}),
                      ("acme asks for 35 Mbit/s to globex-db",
                       {"target": "globex-db", "bandwidth_mbps": 35})):
        try:
            lab.weave("acme", "acme-web", kw["target"], duration_s=60,  # type: ignore[arg-type]
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
    udp = lab.iperf(web1, db1, "-u", "-b", f"{2 * RATE_MBPS}M", seconds=5)["end"]["sum"]
    frames = capture.stop()
    kinds = summarize(frames)
    story.say(f"captured on s1-s2: {dict(kinds)}")
    story.check(not cleartext(frames) and kinds["esp-in-udp"] > 0,
                "no VXLAN, no tenant packet in clear: ESP (in UDP 4500) only")

    story.step(f"6. The meter holds the reserved {RATE_MBPS} Mbit/s")
    delivered = udp["bits_per_second"] * (1 - udp["lost_percent"] / 100) / 1e6
    story.check(abs(delivered - RATE_MBPS) <= 0.1 * RATE_MBPS,
                f"UDP offered at {2 * RATE_MBPS} Mbit/s: {delivered:.2f} Mbit/s delivered")
    tcp = lab.iperf(web1, db1)["end"]["sum_received"]["bits_per_second"] / 1e6
    story.check(tcp >= 0.8 * RATE_MBPS, f"TCP: {tcp:.2f} Mbit/s")
    stats = acme.call("GET", f"/v1/weaves/{weave['id']}/stats")["measured"]
    story.say(f"NWC's counters: {stats.get('bytes_requester_to_target', 0):,} bytes delivered "
              f"acme->globex, {stats.get('meter_dropped_bytes_requester_to_target', 0):,} "
              f"dropped by the meter; SA {stats.get('sa_state')}")

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
    records = [json.loads(line) for line in
               (lab.state_dir / "audit.jsonl").read_text().splitlines() if line.strip()]
    from nwc.audit import verify_chain

    story.check(verify_chain(records) == [],
                f"{len(records)} hash-chained audit records, chain intact")
    decisions = {"weave.create", "weave.extend", "weave.terminate", "weave.expire",
                 "weave.fail", "weave.state", "weave.reroute"}
    for r in records:
        if r["action"] in decisions:
            story.say(f"  #{r['seq']} {r['action']} {r['outcome']}"
                      f"{' ' + r['reason'] if r.get('reason') else ''}"
                      f"{' by ' + r['actor'] if r.get('actor') else ''}")


def _settle(read: Callable[[], dict], timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def cli(lab: ProviderLab) -> None:
    from mininet.cli import CLI

    print(f"\nNWC REST API: {lab.api_url}  (state: {lab.state_dir}); in another shell:")
    print(f"  export NWC_API_URL={lab.api_url}")
    for who in ("admin", *sorted(lab.policy.tenants)):
        print(f"  export NWC_TOKEN={lab.token(who)}   # {who}")
    print("  .venv/bin/nwc weave create acme-web globex-db --duration 300 --bandwidth 10")
    print("Mininet CLI: VMs are " + ", ".join(sorted(lab.topo.vms)) + "; compute hosts "
          + ", ".join(sorted(lab.topo.hosts)) + " (e.g. `web1 ping 192.0.2.70`, "
          "`h1 ovs-ofctl -O OpenFlow13 dump-flows br-int`). exit tears the lab down.")
    CLI(lab.net)


def cmd_demo(args: argparse.Namespace) -> int:
    story = Story()
    story.step("Building the lab: topology small (2 tenants, 2 compute hosts, 2 switches)")
    lab = ProviderLab(args.topology)
    with ended_cleanly_on_signals():
        try:
            lab.start(progress=story.say)
            tell(lab, story)
            if args.keep:
                cli(lab)
        finally:
            story.step("Tearing down")
            lab.stop()
            story.say("nothing left running")
    if story.failures:
        story.print_line(f"\n{len(story.failures)} claim(s) did not hold: "
                     + "; ".join(story.failures))
        return 1
    story.print_line("\nEvery claim held.")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    lab = ProviderLab(args.topology)
    story = Story()
    with ended_cleanly_on_signals():
        try:
            lab.start(progress=lambda text: story.print_line(f"lab: {text}"))
            cli(lab)
        finally:
            lab.stop()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the demo: NWC end to end on the small lab",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--keep", action="store_true",
                   help="after the story, open the Mininet CLI on the lab (exit tears down)")
    p.add_argument("--topology", default="small", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("lab", help="start a topology with NWC and open the Mininet CLI")
    p.add_argument("topology", help="a shipped topology name (small, leaf-spine) or a file")
    p.set_defaults(func=cmd_lab)
