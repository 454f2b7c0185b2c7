"""Bandwidth in the provider fabric: constrained paths and the reservation ledger.

Capacities and reservations are integers in kbit/s so that releasing a weave returns exactly
what reserving it took (no floating-point residue). Links are full duplex: each direction
(an *arc*) has its own reservable capacity, and a weave reserves its rate on every arc of its
path in both directions.

Path choice is the shortest path in hops over links that are up and have the rate free in both
directions. Hosts are never transit nodes. The search is a bidirectional breadth-first search
over neighbours in name order, so the same fabric and ledger always give the same path; among
equal-length paths the first-named branch fills first (packing), which keeps the other branches
whole for large weaves.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nwc.topology import Topology, link_key

Arc = tuple[str, str]


def mbps_to_kbps(mbps: float) -> int:
    return round(mbps * 1000)


@dataclass(frozen=True)
class Reservation:
    """What one weave holds: its rate on every arc of every leg's path (a leg inside one host
    has a one-node path and holds nothing)."""

    weave_id: str
    paths: tuple[tuple[str, ...], ...]
    kbps: int

    @property
    def arcs(self) -> list[Arc]:
        return [arc for path in self.paths for arc in path_arcs(path)]

    @property
    def links(self) -> set[tuple[str, str]]:
        return {link_key(a, b) for path in self.paths
                for a, b in itertools.pairwise(path)}


def path_arcs(path: tuple[str, ...]) -> list[Arc]:
    """Both directions of every hop of a path."""
    forward = list(itertools.pairwise(path))
    return forward + [(b, a) for a, b in forward]


@dataclass(frozen=True)
class Bottleneck:
    """Why a rate does not fit: the tightest link on the best path that ignores capacity."""

    link: tuple[str, str] | None
    free_kbps: int
    reservable_kbps: int

    def describe(self, wanted_kbps: int, src: str, dst: str) -> str:
        if self.link is None:
            return f"no path between {src} and {dst}: the fabric is partitioned (links down)"
        a, b = self.link
        return (f"link {a}-{b} has {self.free_kbps / 1000:g} Mbit/s free of "
                f"{self.reservable_kbps / 1000:g} reservable; {wanted_kbps / 1000:g} requested")


class CapacityError(Exception):
    pass


class Fabric:
    """The fabric graph plus what is reserved on it. Mutated only by the weaver's loop."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.hosts = frozenset(topology.hosts)
        adjacency: dict[str, set[str]] = {n: set() for n in (*topology.switches, *topology.hosts)}
        self.reservable: dict[Arc, int] = {}
        self._link_index: dict[tuple[str, str], int] = {}
        for link in topology.links:
            adjacency[link.a].add(link.b)
            adjacency[link.b].add(link.a)
            cap = int(link.reservable_mbps * 1000)
            self.reservable[(link.a, link.b)] = cap
            self.reservable[(link.b, link.a)] = cap
            self._link_index.setdefault(link_key(link.a, link.b), len(self._link_index))
        self._links: list[tuple[str, str]] = list(self._link_index)  # by link number
        self.adjacency: dict[str, tuple[str, ...]] = {n: tuple(sorted(v))
                                                      for n, v in adjacency.items()}
        self.reserved: dict[Arc, int] = dict.fromkeys(self.reservable, 0)
        self.down: set[tuple[str, str]] = set()  # links, as link_key pairs
        self.by_weave: dict[str, Reservation] = {}
        # What the path search reads, kept beside the ledger so that its inner loop does no
        # tuple hashing (that made it 2.7x slower than a bare networkx search): per node its
        # switch neighbours in name order as (name, link number), and per link number the
        # room left, or -1 while the link is down. Reservations take both directions of a link
        # alike, so one number per link is the room of either direction.
        self._room: list[int] = [0] * len(self._link_index)
        for (a, b), i in self._link_index.items():
            self._room[i] = self.reservable[(a, b)]
        self._switch_neighbours: dict[str, tuple[tuple[str, int], ...]] = {
            n: tuple((v, self._link_index[link_key(n, v)]) for v in vs if v not in self.hosts)
            for n, vs in self.adjacency.items()}
        # Per host, its neighbours' link numbers: where a search may step onto it.
        self._host_links: dict[str, dict[str, int]] = {
            h: {v: self._link_index[link_key(h, v)] for v in self.adjacency[h]}
            for h in self.hosts}

    def _refresh_room(self, a: str, b: str) -> None:
        key = link_key(a, b)
        reserved = self.reserved
        self._room[self._link_index[key]] = -1 if key in self.down else \
            self.reservable[(a, b)] - max(reserved[(a, b)], reserved[(b, a)])

    # -- queries ---------------------------------------------------------------------------

    def free(self, a: str, b: str, pending: Mapping[Arc, int] | None = None) -> int:
        used = self.reserved[(a, b)] + (pending.get((a, b), 0) if pending else 0)
        return self.reservable[(a, b)] - used

    def usable(self, a: str, b: str, kbps: int, pending: Mapping[Arc, int] | None = None) -> bool:
        return (link_key(a, b) not in self.down and self.free(a, b, pending) >= kbps
                and self.free(b, a, pending) >= kbps)

    def find_path(self, src: str, dst: str, kbps: int = 0,
                  pending: Mapping[Arc, int] | None = None) -> tuple[str, ...] | None:
        """Shortest path (hops) whose every link is up with `kbps` free both ways, counting
        `pending` (arcs a caller is about to reserve) as taken."""
        if src == dst:
            return (src,)
        kbps = max(kbps, 0)  # a down link's room is -1: nothing may fit it
        neighbours, room, index = self._switch_neighbours, self._room, self._link_index
        # Pending arcs come in pairs (both directions, the same amount): one number per link.
        pend = {index[key]: amount for arc, amount in pending.items()
                if (key := link_key(*arc)) in index} if pending else None
        pred: dict[str, str | None] = {src: None}
        succ: dict[str, str | None] = {dst: None}
        forward, backward = [src], [dst]
        while forward and backward:
            grow_forward = len(forward) <= len(backward)
            frontier, seen, other = (forward, pred, succ) if grow_forward \
                else (backward, succ, pred)
            # Hosts are never transit: the only host a search may step onto is where the
            # other search started. (A node next to that host over a usable link is only
            # in this frontier while the other search has not moved yet, so checking it
            # after the node's switch neighbours finds the same path as name order would.)
            end = dst if grow_forward else src
            end_links = self._host_links.get(end)  # None: the end is a switch
            nxt: list[str] = []
            for u in frontier:
                for v, i in neighbours[u]:
                    if v in seen:
                        continue
                    if room[i] < kbps or (pend and room[i] - pend.get(i, 0) < kbps):
                        continue
                    seen[v] = u
                    if v in other:
                        return self._join(v, pred, succ)
                    nxt.append(v)
                if end_links is not None:
                    last = end_links.get(u)
                    if last is not None and room[last] >= kbps and \
                            not (pend and room[last] - pend.get(last, 0) < kbps):
                        seen[end] = u
                        return self._join(end, pred, succ)
            if grow_forward:
                forward = nxt
            else:
                backward = nxt
        return None

    @staticmethod
    def _join(meet: str, pred: dict[str, str | None],
              succ: dict[str, str | None]) -> tuple[str, ...]:
        left: list[str] = []
        node: str | None = meet
        while node is not None:
            left.append(node)
            node = pred[node]
        left.reverse()
        node = succ[meet]
        while node is not None:
            left.append(node)
            node = succ[node]
        return tuple(left)

    def bottleneck(self, src: str, dst: str, kbps: int,
                   pending: Mapping[Arc, int] | None = None) -> Bottleneck:
        path = self.find_path(src, dst, 0)
        if path is None:
            return Bottleneck(None, 0, 0)

        def room(arc: Arc) -> int:
            return min(self.free(*arc, pending), self.free(arc[1], arc[0], pending))

        worst = min(itertools.pairwise(path), key=lambda arc: (room(arc), link_key(*arc)))
        return Bottleneck(link_key(*worst), room(worst), self.reservable[worst])

    def weaves_on(self, a: str, b: str) -> list[str]:
        key = link_key(a, b)
        return sorted(w for w, r in self.by_weave.items() if key in r.links)

    # -- changes -----------------------------------------------------------------------------

    def reserve(self, weave_id: str, paths: Iterable[Iterable[str]], kbps: int) -> Reservation:
        """Take `kbps` on every arc of every path, all or nothing."""
        if weave_id in self.by_weave:
            raise CapacityError(f"weave {weave_id} already holds a reservation")
        if kbps < 0:
            raise CapacityError("a reservation cannot be negative")
        reservation = Reservation(weave_id, tuple(tuple(p) for p in paths), kbps)
        index, room = self._link_index, self._room
        need: dict[int, int] = {}  # per link: legs that share a link take it once each
        for path in reservation.paths:
            for a, b in itertools.pairwise(path):
                i = index.get((a, b) if a <= b else (b, a))
                if i is None:
                    raise CapacityError(f"{a}-{b} is not a fabric link")
                need[i] = need.get(i, 0) + kbps
        for i, amount in need.items():
            if room[i] < amount:
                a, b = self._links[i]
                if (a, b) in self.down:
                    raise CapacityError(f"link {a}-{b} is down")
                raise CapacityError(f"link {a}-{b} has {self.free(a, b)} kbit/s free, "
                                    f"{amount} needed")
        self._apply(reservation, +1)
        return reservation

    def release(self, weave_id: str) -> Reservation | None:
        reservation = self.by_weave.pop(weave_id, None)
        if reservation is not None:
            self._apply(reservation, -1)
        return reservation

    def restore(self, reservation: Reservation) -> None:
        """Put back exactly what `release` returned, whatever the links' state now (undoing
        a release whose change could not be recorded)."""
        if reservation.weave_id in self.by_weave:
            raise CapacityError(f"weave {reservation.weave_id} already holds a reservation")
        self._apply(reservation, +1)

    def _apply(self, reservation: Reservation, sign: int) -> None:
        """Add (+1) or take back (-1) a reservation on both directions of every hop."""
        amount, reserved, reservable = sign * reservation.kbps, self.reserved, self.reservable
        index, room, down = self._link_index, self._room, self.down
        for path in reservation.paths:
            for a, b in itertools.pairwise(path):
                ab, ba = (a, b), (b, a)
                reserved[ab] += amount
                reserved[ba] += amount
                key = ab if a <= b else ba
                # _refresh_room, inline: this runs for every hop of every admission.
                room[index[key]] = -1 if key in down else \
                    reservable[ab] - max(reserved[ab], reserved[ba])
        if sign > 0:
            self.by_weave[reservation.weave_id] = reservation

    def set_link(self, a: str, b: str, up: bool) -> bool:
        """Mark a link up or down; True if that changed anything."""
        key = link_key(a, b)
        if (a, b) not in self.reservable:
            raise KeyError(f"{a}-{b} is not a fabric link")
        was_down = key in self.down
        if up:
            self.down.discard(key)
        else:
            self.down.add(key)
        self._refresh_room(a, b)
        return was_down == up

    # -- the invariant ------------------------------------------------------------------------

    def violations(self) -> list[str]:
        """Every way the ledger disagrees with itself; empty when consistent."""
        out = []
        expected = dict.fromkeys(self.reservable, 0)
        for reservation in self.by_weave.values():
            for arc in reservation.arcs:
                expected[arc] += reservation.kbps
        for arc, got in self.reserved.items():
            if got != expected[arc]:
                out.append(f"{arc}: ledger says {got} kbit/s, weaves hold {expected[arc]}")
            if got > self.reservable[arc]:
                out.append(f"{arc}: {got} kbit/s reserved of {self.reservable[arc]} reservable")
            if got < 0:
                out.append(f"{arc}: negative reservation {got}")
        return out
