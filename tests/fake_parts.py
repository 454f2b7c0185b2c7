"""A weaver part for tests: it builds nothing and remembers what the weaver told it, in order.
Whether it `confirms_teardown` (a terminated weave then stays terminating until it reports
part_down) is the test's choice."""

from __future__ import annotations

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
