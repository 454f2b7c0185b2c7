"""`nwc admission-demo`: the decision half of NWC, told as a story on the shipped policies.

It runs the real weaver (admission, fabric ledger, leases, SQLite, audit chain) against the
shipped policy set and a shipped topology, with a clock it fast-forwards, and prints what a
tenant would see: admitted weaves with their path, refusals with their exact reason, a lease
running out and its bandwidth coming back. Nothing touches the network.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from nwc.admission import Denial, WeaveRequest
from nwc.audit import describe, read_jsonl, verify_chain
from nwc.config import load_config
from nwc.lease import ManualClock, iso
from nwc.store import Store
from nwc.weave import Weave
from nwc.weaver import Actor, Weaver


def _show(label: str, outcome: Weave | Denial | None) -> None:
    print(f"\n> {label}")
    if outcome is None:
        print("  (no such live weave)")
    elif isinstance(outcome, Denial):
        print(f"  REFUSED {outcome.reason.value}: {outcome.detail}")
    else:
        paths = "; ".join(" > ".join(leg.path) for leg in outcome.legs)
        print(f"  {outcome.state.value.upper()} {outcome.id}: {paths}, "
              f"{outcome.bandwidth_mbps:g} Mbit/s, profile {outcome.profile}, "
              f"until {iso(outcome.expires_at)}")


def _ledger(weaver: Weaver) -> str:
    parts = []
    for link in weaver.topology.links:
        if link.a in weaver.topology.hosts or link.b in weaver.topology.hosts:
            continue
        used = weaver.fabric.reserved[(link.a, link.b)] / 1000
        parts.append(f"{link.a}-{link.b} {used:g}/{link.reservable_mbps:g} Mbit/s")
    return "  fabric reservations: " + ", ".join(parts)


def run(topology: str, state_dir: Path, *, keep: bool = True) -> int:
    config = load_config(topology=topology)
    clock = ManualClock()
    store = Store(state_dir)
    weaver = Weaver(policy=config.policy, topology=config.topology, store=store, clock=clock)
    weaver.recover()
    acme, globex = Actor("acme-ops", "acme"), Actor("globex-ops", "globex")
    print(f"NWC admission on topology {config.topology.name} with policies from "
          f"{', '.join(str(p) for p in config.policy_paths)}")
    print(_ledger(weaver))

    _show("acme asks: weave acme-web with globex-db, 35 Mbit/s for 10 min",
          weaver.create(WeaveRequest("acme-web", "globex-db", 600, 35), acme))
    _show("acme asks: weave acme-web with globex-lab (globex allows nobody there)",
          weaver.create(WeaveRequest("acme-web", "globex-lab", 600, 5), acme))
    _show("globex asks: weave globex-db with acme-web using profile silver",
          weaver.create(WeaveRequest("globex-db", "acme-web", 600, 5, "silver"), globex))
    _show("acme asks: weave acme-web with globex-db, 50 Mbit/s (over globex-db's cap)",
          weaver.create(WeaveRequest("acme-web", "globex-db", 600, 50), acme))
    first = weaver.create(WeaveRequest("acme-web", "globex-db", 600, 20), acme)
    _show("acme asks: weave acme-web with globex-db, 20 Mbit/s for 10 min", first)
    print(_ledger(weaver))
    _show("acme asks for a second weave to globex-db, 5 Mbit/s",
          weaver.create(WeaveRequest("acme-web", "globex-db", 600, 5), acme))
    if isinstance(first, Weave):
        _show(f"acme extends {first.id} by 5 min", weaver.extend(first.id, 300, acme))
        clock.advance(899)
        weaver.tick()
        print(f"\n  ... 899 s later: {first.id} is {weaver.live[first.id].state.value}")
        clock.advance(1)
        for ended in weaver.tick():
            print(f"  ... 900 s: {ended.id} {ended.state.value} ({ended.reason})")
        print(_ledger(weaver))
    store.close()
    records = list(read_jsonl(state_dir / "audit.jsonl"))
    breaks = verify_chain(records)
    # A temporary directory is gone when the command returns: naming it would send the
    # reader to a file that no longer exists.
    where = f"in {state_dir / 'audit.jsonl'}" if keep else \
        "(in a temporary directory removed on exit; --state-dir DIR keeps it)"
    print(f"\naudit log: {len(records)} records, "
          f"{'chain intact' if not breaks else 'CHAIN BROKEN'} {where}")
    for record in records:
        print(f"  {describe(record)}")
    return 0 if not breaks else 1


def cmd_admission_demo(args: argparse.Namespace) -> int:
    # The story is the output: the weaver's INFO lines (meant for `nwc run`'s log) would
    # interleave with it on the terminal. Warnings still show; -v shows everything.
    nwc_log = logging.getLogger("nwc")
    level = nwc_log.level
    if not getattr(args, "verbose", False):
        nwc_log.setLevel(logging.WARNING)
    try:
        if args.state_dir:
            return run(args.topology, args.state_dir, keep=True)
        with tempfile.TemporaryDirectory(prefix="nwc-admission-demo-") as tmp:
            return run(args.topology, Path(tmp), keep=False)
    finally:
        nwc_log.setLevel(level)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("admission-demo", help="admission on the shipped policies, as a story",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--topology", default="small", help="shipped topology name or a file")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="keep the SQLite state and audit log here (default: a temp dir)")
    p.set_defaults(func=cmd_admission_demo)
