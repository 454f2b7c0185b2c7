"""The two emulated compute hosts the weave tunnel tests run on (`TunnelLab`'s TWO_HOSTS:
own OVS, charon and `nwc agent` each), with the controller and its tunnel part in this
process, and what those tests do with them. The `world` fixture (conftest.py) is one of these
per test module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nwc.admission import WeaveRequest
from nwc.config import SHIPPED_POLICIES, Config
from nwc.controller import Controller
from nwc.lab.netns import Lab, Netns, wait_for
from nwc.lab.tunnel_lab import TWO_HOSTS, TunnelLab
from nwc.policy import load_policy
from nwc.topology import parse_topology_text
from nwc.tunnels import Tunnels, tunnels_for
from nwc.weave import State, Weave

POLICY = load_policy([SHIPPED_POLICIES])
PING_PATTERN = "6e77632d74656e616e74"  # "nwc-tenant", repeated in every ping payload


@dataclass
class World:
    lab: Lab
    tl: TunnelLab
    controller: Controller
    part: Tunnels
    events: list[dict[str, Any]] = field(default_factory=list)
    pristine: dict[str, dict[str, Any]] = field(default_factory=dict)

    def create(self, requester: str, target: str, profile: str) -> Weave:
        c = self.controller
        weave = c.call(c.weaver.create, WeaveRequest(requester, target, 600, 5, profile))
        assert isinstance(weave, Weave), weave
        return weave

    def up(self, src_vm: str = "web1", dst_vm: str = "db1", target: str = "globex-db",
           profile: str = "gold") -> Weave:
        """An active weave from acme-web to `target`, with `src_vm` and `dst_vm` plugged into
        its leg."""
        weave = self.create("acme-web", target, profile)
        self.tl.connect(src_vm, dst_vm, weave.legs[0].slot)
        return self.wait_state(weave.id, State.ACTIVE)

    def weave(self, weave_id: str) -> Weave:
        c = self.controller
        return c.call(lambda: c.weaver.live.get(weave_id) or c.store.weave(weave_id))

    def wait_state(self, weave_id: str, *states: State, timeout: float = 30) -> Weave:
        wait_for(lambda: self.weave(weave_id).state in states, timeout,
                 f"{weave_id} to become {'/'.join(states)} (now {self.weave(weave_id).state})")
        return self.weave(weave_id)

    def end(self, weave: Weave) -> None:
        c = self.controller
        c.call(c.weaver.terminate, weave.id)
        for leg in weave.legs:
            if leg.slot is not None:
                self.tl.disconnect(leg.slot)
        wait_for(self.part.drained, 30, "the agents to remove every leg")
        # ...which the part reports, and the weave goes from terminating to terminated.
        wait_for(lambda: self.weave(weave.id).state is State.TERMINATED, 10,
                 "the weave to be terminated")

    def security(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("type") == "security"
                and e.get("kind") == kind]

    def assert_pristine(self) -> None:
        for name, host in self.tl.hosts.items():
            assert host.snapshot() == self.pristine[name], f"{name} kept something"


@contextmanager
def running_world() -> Iterator[World]:
    """Both hosts built and their agents running, the controller and its tunnel part
    started; everything removed on the way out."""
    topo = parse_topology_text(TWO_HOSTS, POLICY)
    with Lab() as lab:
        tl = TunnelLab(lab, topo).build()
        tl.start_agents()
        config = Config(POLICY, topo, (SHIPPED_POLICIES,), Path("tunnel-lab.yaml"))
        controller = Controller(config, lab.directory("controller"))
        part = tunnels_for(controller, tl.ovsdb_targets(), poll_interval=0.05)
        controller.add_part(part)
        w = World(lab, tl, controller, part)
        controller.weaver.subscribe(w.events.append)
        controller.start()
        part.start()
        try:
            w.pristine = {name: host.snapshot() for name, host in tl.hosts.items()}
            yield w
        finally:
            part.stop()
            controller.stop()


def ping(vm: Netns, address: str, count: int = 3, size: int = 56, df: bool = False,
         timeout: int = 2) -> bool:
    args = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(timeout), "-s", str(size),
            "-p", PING_PATTERN]
    if df:
        args += ["-M", "do"]
    return vm.run(*args, address, check=False, timeout=30).returncode == 0


def ovs_map(ovs: Any, table: str, record: str, column: str) -> dict[str, str]:
    """A map column, read with ovs-vsctl (JSON output, so keys and values are exact); {} if
    the row does not exist."""
    try:
        raw = ovs.vsctl("--format=json", f"--columns={column}", "list", table, record)
    except RuntimeError:
        return {}
    cell = json.loads(raw)["data"][0][0]
    return dict(cell[1]) if cell[0] == "map" else {}


def external_ids(ovs: Any) -> dict[str, str]:
    return ovs_map(ovs, "open_vswitch", ".", "external_ids")
