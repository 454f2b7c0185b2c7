"""A weaver part for tests: it builds nothing and remembers what the weaver told it, in order.
Whether it `confirms_teardown` (a terminated weave then stays terminating until it reports
part_down) is the test's choice. And what the tunnel part reports, for tests that run one
without a weaver (`TunnelReports`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nwc.weave import Weave


class RecordingPart:
    def __init__(self, name: str = "flows", *, confirms_teardown: bool = False) -> None:
        self.name = name
        self.confirms_teardown = confirms_teardown
        self.told: list[tuple[str, str]] = []  # (up | down | moved, weave id)

    @property
    def up(self) -> list[str]:
        return [w for what, w in self.told if what == "up"]

    @property
    def down(self) -> list[str]:
        return [w for what, w in self.told if what == "down"]

    def weave_up(self, weave: Weave) -> None:
        self.told.append(("up", weave.id))

    def weave_down(self, weave: Weave) -> None:
        self.told.append(("down", weave.id))

    def weave_moved(self, weave: Weave, old: Weave) -> None:
        self.told.append(("moved", weave.id))


@dataclass
class TunnelReports:
    """The tunnel part's reports (nwc.tunnels.Reports), each as a tuple, in the order told."""

    log: list[tuple[Any, ...]] = field(default_factory=list)

    def ready(self, weave_id: str) -> None:
        self.log.append(("ready", weave_id))

    def failed(self, weave_id: str, detail: str) -> None:
        self.log.append(("failed", weave_id, detail))

    def security(self, weave_id: str, kind: str, detail: str) -> None:
        self.log.append(("security", weave_id, kind, detail))

    def down(self, weave_id: str) -> None:
        self.log.append(("down", weave_id))

    def host(self, host: str, kind: str, up: bool, detail: str) -> None:
        self.log.append(("host", host, kind, up, detail))

    def bridge(self, host: str, bridge: str, fixed: list[Any], detail: str) -> None:
        self.log.append(("bridge", host, bridge, fixed, detail))

    def hosts(self) -> list[tuple[str, str, bool]]:
        return [e[1:4] for e in self.log if e[0] == "host"]

    @property
    def bridges(self) -> list[tuple[str, str, list[Any], str]]:
        """The bridge corrections told: (host, bridge, fixes, detail) each."""
        return [e[1:] for e in self.log if e[0] == "bridge"]

    def kinds(self) -> list[str]:
        return [e[2] if e[0] == "security" else e[0] for e in self.log]
