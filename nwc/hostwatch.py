"""Whether each host's OVSDB answers and whether its agent is alive, as the controller sees it.

Pure: the tunnel part feeds it what each pass read and the time, and reports what changed.

The agent raises a counter in its host's OVSDB every `AGENT_HEARTBEAT_S` (`AGENT_ALIVE_KEY`;
`nwc agent --heartbeat-interval`).
The controller never compares the host's clock with its own: it notes, on its own monotonic
clock, when it last saw the value change, and calls the agent unresponsive once it has
watched the value for `silent_s` without a change. A host whose OVSDB cannot be read is a
different condition: nothing can be told of its agent then (the agent may be fine and only
its ovsdb-server down, or the network to the host), so its agent is judged again, with a
fresh `silent_s`, only once the OVSDB answers again. An agent judged unresponsive is back
when the value changes. An agent from before heartbeats never writes the value: it is judged
unresponsive all the same, and said to have never beaten, which tells the operator what to do.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from nwc.lease import iso
from nwc.tunnel import AGENT_ALIVE_KEY, AGENT_HEARTBEAT_S

# Four missed heartbeats. Also longer than python-ovs takes to notice a silent TCP peer (an
# inactivity probe after 5 s, dropped 5 s later): a powered-off host is called unreachable
# before its agent could be called unresponsive from the last contents its cache holds.
AGENT_SILENT_S = 4 * AGENT_HEARTBEAT_S
# The least `silent_s` `nwc run --agent-unresponsive-after` takes: the part reads each host
# every pass (0.1 s), but one slow pass waits up to its IO wait (0.5 s) and a busy host may
# miss a beat's write by a pass; below a couple of seconds healthy agents would flap. Agents
# beat every AGENT_HEARTBEAT_S by default, so `silent_s` should be at least 3 of their beats
# (docs/deploy.md): the controller cannot check that, it never learns the agents' interval.
MIN_AGENT_SILENT_S = 2.0

# What an agent that has never written a heartbeat is told apart by, in changes and health.
NEVER_BEAT = ("no heartbeat was ever seen from its agent (it is not running, or it is older "
              "than this controller: upgrade the agents before the controller)")

Kind = Literal["agent", "ovsdb"]


@dataclass(frozen=True)
class Change:
    """A host's agent or OVSDB stopped answering (`up` false) or answers again."""

    host: str
    kind: Kind
    up: bool
    detail: str


@dataclass(frozen=True)
class HostHealth:
    """One host now. `agent_up` is None while the OVSDB cannot be read (not known);
    `since` is when the OVSDB last answered (if it does not now), else when the agent's
    heartbeat last changed (if it is judged unresponsive): wall clock, for people."""

    ovsdb_up: bool
    agent_up: bool | None
    since: dt.datetime | None = None
    never_beat: bool = False  # judged unresponsive without a heartbeat ever read


    def problem(self) -> str | None:
        """Why what this host last reported may not be current, or None."""
        when = f" since {iso(self.since)}" if self.since is not None else ""
        if not self.ovsdb_up:
            return f"OVSDB unreachable{when}"
        if self.agent_up is False:
            return f"agent unresponsive, {NEVER_BEAT}" if self.never_beat \
                else f"agent unresponsive{when}"
        return None


@dataclass
class _Host:
    read_at: float  # the last read that answered (monotonic), or when watching began
    read_wall: dt.datetime
    quiet_from: float  # the agent's silence is counted from here
    beat: str | None = None
    beat_wall: dt.datetime | None = None  # when the value was first seen or last changed
    seen: bool = False  # whether any read answered yet
    beat_seen: bool = False  # whether any read held a heartbeat value
    ovsdb_up: bool = True  # both presumed until proved otherwise: a start says nothing
    agent_up: bool = True


class HostWatch:
    def __init__(self, silent_s: float = AGENT_SILENT_S) -> None:
        self.silent_s = silent_s
        self._hosts: dict[str, _Host] = {}

    def observe(self, host: str, ids: Mapping[str, str] | None, mono: float,
                wall: dt.datetime) -> list[Change]:
        """Take in one pass for a host: `ids`, its keys as read now, or None when the pass
        could not read it (unreachable, or still busy with an earlier job)."""
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Host(read_at=mono, read_wall=wall, quiet_from=mono)
        changes = []
        if ids is not None:
            h.read_at, h.read_wall = mono, wall
            if not h.ovsdb_up:
                h.ovsdb_up, h.quiet_from = True, mono  # unseen meanwhile: watched afresh
                changes.append(Change(host, "ovsdb", True, "its OVSDB answers again"))
            beat = ids.get(AGENT_ALIVE_KEY)
            if not h.seen or beat != h.beat:
                changed = h.seen
                h.seen, h.beat, h.quiet_from, h.beat_wall = True, beat, mono, wall
                h.beat_seen = h.beat_seen or beat is not None
                if changed and not h.agent_up:
                    h.agent_up = True
                    changes.append(Change(host, "agent", True,
                                          "its agent's heartbeat goes on again"))
        elif h.ovsdb_up and mono - h.read_at > self.silent_s:
            h.ovsdb_up = False
            changes.append(Change(host, "ovsdb", False,
                                  f"its OVSDB has not been read for {self.silent_s:g} s "
                                  f"(last at {iso(h.read_wall)})"))
        # Unchanged up to the last read that answered: passes that could not read the host
        # prove nothing about its agent.
        if h.ovsdb_up and h.agent_up and h.read_at - h.quiet_from > self.silent_s:
            h.agent_up = False
            if h.beat_seen:
                detail = (f"its agent's heartbeat has not changed for more than "
                          f"{self.silent_s:g} s{self._seen(h)}")
            else:
                detail = (f"{NEVER_BEAT}; {AGENT_ALIVE_KEY} has been absent from its OVSDB "
                          f"for more than {self.silent_s:g} s")
            changes.append(Change(host, "agent", False, detail))
        return changes

    @staticmethod
    def _seen(h: _Host) -> str:
        return f" (unchanged since {iso(h.beat_wall)})" if h.beat_wall is not None else ""

    def health(self, host: str) -> HostHealth | None:
        """None for a host never observed."""
        h = self._hosts.get(host)
        if h is None:
            return None
        if not h.ovsdb_up:
            return HostHealth(False, None, h.read_wall)
        if not h.agent_up:
            if not h.beat_seen:  # no heartbeat to date anything by
                return HostHealth(True, False, never_beat=True)
            return HostHealth(True, False, h.beat_wall)
        return HostHealth(True, True)
