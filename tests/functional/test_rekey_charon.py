"""IPsec rekeys against real charons: a CHILD SA or IKE SA rekey is neither an outage nor a gap
in the encryption, and both agents count every one.

How the agent reads a rekey (nwc.ike picking the SA that carries traffic while an old and a
new CHILD SA coexist, REKEY_STATES, the counter in nwc.agent) was worked out against fakes;
here charon itself shows the states. A profile's `rekey_s` becomes charon's `rekey_time` for
the IKE SA and the CHILD SA, with charon's defaults around it (life 10% longer, a random
0..10% taken off), and policy allows no less than 60 s: timed rekeys would come only every
54-60 s. So the test asks charon for each rekey over VICI (`rekey`), from either end, which
runs the same exchanges a timed rekey does.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import vici
from weave_world import PING_PATTERN, World, external_ids, ping

from nwc.ike import IkeNoAnswer, IkeUnavailable
from nwc.lab.capture import Capture, cleartext, contains, summarize
from nwc.lab.netns import wait_for
from nwc.pki import CertificateAuthority, new_psk
from nwc.tunnel import RECORD_PREFIX, STATUS_PREFIX, LegRecord, LegStatus, Phase, SaInfo
from nwc.weave import State, Weave

pytestmark = pytest.mark.functional

log = logging.getLogger(__name__)

# Who asks for which rekey: CHILD SA and IKE SA rekeys, each from both ends. Several IKE SA
# rekeys: the moment when charon lists only the old IKE SA, its CHILD SAs already handed on,
# lasts a few milliseconds, and the test should meet it.
REKEYS = (("h1", "child"), ("h2", "child"), ("h1", "ike"), ("h1", "child"), ("h2", "ike"),
          ("h2", "child"), ("h1", "ike"), ("h2", "ike"))


@contextmanager
def vici_session(path: Path) -> Iterator[vici.Session]:
    """A VICI session with a lab host's charon, for what nwc.ike has no use for: `rekey`,
    the connection as loaded, events."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(str(path))
        yield vici.Session(sock)
    finally:
        sock.close()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _states(sa: dict[str, Any]) -> str:
    return f"{_text(sa.get('uniqueid', '?'))}:{_text(sa.get('state', '?'))}"


@dataclass
class CharonEvents:
    """charon's own account of one host's SAs: its rekey and up/down events (VICI), each as
    (kind, what it says), with the old and new SA's unique id and state at that moment."""

    path: Path
    events: list[tuple[str, str]] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    KINDS = ("ike-rekey", "child-rekey", "ike-updown", "child-updown")

    def start(self) -> CharonEvents:
        self._thread = threading.Thread(target=self._run, name="charon-events", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), f"listening to {self.path}"
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in list(self.events) if k == kind)

    def _run(self) -> None:
        with vici_session(self.path) as s:
            # The first answer (an event or a timeout) comes after the registration.
            for kind, event in s.listen(list(self.KINDS), timeout=0.2):
                self._ready.set()
                if self._stop.is_set():
                    break
                if kind is not None:
                    self.events.append((_text(kind), self._describe(_text(kind), event)))

    @staticmethod
    def _describe(kind: str, event: dict[str, Any]) -> str:
        parts = []
        for ike in event.values():
            if kind == "ike-rekey":
                parts.append(f"IKE {_states(ike['old'])} -> {_states(ike['new'])}")
            elif kind == "child-rekey":
                for child in ike.get("child-sas", {}).values():
                    parts.append(f"CHILD {_states(child['old'])} -> {_states(child['new'])} "
                                 f"(IKE {_states(ike)})")
            else:
                up = "up" if _text(event.get("up", b"no")) == "yes" else "down"
                parts.append(f"{up}: IKE {_states(ike)} CHILD "
                             + ", ".join(_states(c) for c in ike.get("child-sas", {}).values()))
        return "; ".join(parts)


@dataclass
class SaWatch:
    """Samples, as fast as charon answers, what nwc.ike makes of each host's SAs for one
    connection (what the agent goes by): the distinct readings in the order seen."""

    world: World
    name: str
    seen: dict[str, list[str]] = field(default_factory=dict)
    not_carrying: dict[str, list[SaInfo | None]] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> SaWatch:
        self._thread = threading.Thread(target=self._run, name="sa-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, host in self.world.tl.hosts.items():
                try:
                    sa = host.ike.sas().get(self.name)
                except (IkeUnavailable, IkeNoAnswer):
                    continue  # a busy machine: the next sample will do
                self.samples += 1
                if sa is None or not sa.installed:
                    self.not_carrying.setdefault(name, []).append(sa)
                reading = "none" if sa is None else (
                    f"IKE {sa.ike_id}:{sa.ike_state} CHILD {sa.child_id}:{sa.child_state}"
                    + (" rekeying" if sa.rekeying else ""))
                seen = self.seen.setdefault(name, [])
                if not seen or seen[-1] != reading:
                    seen.append(reading)


def phase_changes(world: World, key: str) -> dict[str, list[str]]:
    """Each agent's phase changes for a leg, from its log (it logs every one)."""
    pattern = re.compile(rf"leg {re.escape(key)}: (\S+ -> \S+)")
    return {h: pattern.findall((world.lab.directory("logs") / f"agent-{h}.log").read_text())
            for h in world.tl.hosts}


def test_rekeys_keep_the_leg_up_encrypted_and_counted(world: World) -> None:
    tl = world.tl
    weave = world.up()
    slot = weave.legs[0].slot
    key = f"{weave.id}-s{slot}"
    name = f"nwc-{key}"
    db1 = str(tl.topology.vms["db1"].ip)
    assert ping(tl.vm("web1"), db1, count=2)

    # The profile's interval is what charon was given, for both SAs.
    rekey_s = world.controller.config.policy.profiles[weave.profile].rekey_s
    with vici_session(tl.hosts["h1"].charon.vici_socket) as s:
        (conn,) = [c[name] for c in s.list_conns({"ike": name}) if name in c]
    assert int(conn["rekey_time"]) == rekey_s
    assert int(conn["children"][name]["rekey_time"]) == rekey_s

    def stats() -> dict[str, Any]:
        return world.controller.weave_stats(world.weave(weave.id))

    def reported_rekeys() -> dict[str, int]:
        return {h: e["rekeys"] for h, e in stats()["tunnel_legs"][0]["ends"].items()}

    def current(host: str) -> SaInfo:
        sa = tl.hosts[host].ike.sas().get(name)
        assert sa is not None and sa.installed, f"{host}: {sa}"
        return sa

    wait_for(lambda: stats().get("sa_state") == "established", 10, "the leg established")
    counts = reported_rekeys()
    changes = phase_changes(world, key)
    assert all(c and c[-1].endswith("-> installed") for c in changes.values()), changes
    down_before = len(world.security("sa_down"))
    charon = {h: CharonEvents(host.charon.vici_socket).start() for h, host in tl.hosts.items()}
    capture = Capture(world.lab, tl.hosts["h1"].ns, "ul0", "rekeys").start()
    watch = SaWatch(world, name).start()
    try:
        for number, (host, kind) in enumerate(REKEYS, 1):
            what = f"rekey {number} ({kind} SA, asked of {host})"
            before = {h: current(h) for h in tl.hosts}
            with vici_session(tl.hosts[host].charon.vici_socket) as s:
                answer = s.request("rekey", {kind: name})
            assert answer.get("success") == b"yes", (what, answer)
            done = sum(1 for _, k in REKEYS[:number] if k == kind)
            wait_for(lambda k=kind, n=done: all(e.count(f"{k}-rekey") == n
                                                for e in charon.values()), 15,
                     f"charon at both ends to complete {what}")

            def rekeyed(h: str, kind: str = kind, before: dict[str, SaInfo] = before) -> bool:
                sa = current(h)
                return (sa.child_id, sa.ike_id)[kind == "ike"] != \
                    (before[h].child_id, before[h].ike_id)[kind == "ike"]

            for h in tl.hosts:
                wait_for(lambda h=h: rekeyed(h), 15, f"{what} to show in {h}'s SA list")
                # What the agents' counting relies on: a CHILD SA rekey keeps the IKE SA,
                # an IKE SA rekey keeps the CHILD SA.
                after = current(h)
                kept = (after.ike_id, before[h].ike_id) if kind == "child" \
                    else (after.child_id, before[h].child_id)
                assert kept[0] == kept[1], (what, h, before[h], after)
            wanted = {h: counts[h] + number for h in tl.hosts}
            wait_for(lambda w=wanted: reported_rekeys() == w, 15,
                     f"both agents to report {what}: wanted {wanted}")
            # The SA now in use carries the leg's VXLAN.
            sent = {h: current(h) for h in tl.hosts}
            assert ping(tl.vm("web1"), db1, count=2), f"no traffic after {what}"
            wait_for(lambda s=sent: current("h1").packets_out > s["h1"].packets_out
                     and current("h2").packets_in > s["h2"].packets_in, 10,
                     f"the pings to pass through the SA after {what}")
    finally:
        watch.stop()
        for events in charon.values():
            events.stop()
        frames = capture.stop()
    for h in tl.hosts:
        log.info("charon on %s during the rekeys: %s", h, charon[h].events)
        log.info("nwc.ike's reading on %s during the rekeys: %s", h, watch.seen.get(h))

    # charon itself saw every rekey as a rekey (one event each, at both ends), and no SA
    # going down or coming up.
    child_rekeys = sum(1 for _, k in REKEYS if k == "child")
    for h, events in charon.items():
        assert (events.count("child-rekey"), events.count("ike-rekey")) == \
            (child_rekeys, len(REKEYS) - child_rekeys), (h, events.events)
        assert not events.count("child-updown") and not events.count("ike-updown"), \
            (h, events.events)
    # Never down: not in either agent's phase, not to the tenant, not as nwc.ike reads charon
    # (what the agents go by, sampled far more often than they look).
    assert phase_changes(world, key) == changes, "an agent's phase changed during a rekey"
    assert len(world.security("sa_down")) == down_before
    assert watch.samples > 0
    gaps = watch.not_carrying
    assert not gaps, f"read as not carrying traffic during a rekey: {gaps}"
    assert stats()["sa_state"] in ("established", "rekeying")
    # Every rekey counted once at each end.
    assert reported_rekeys() == {h: counts[h] + len(REKEYS) for h in tl.hosts}
    assert stats()["rekeys"] == sum(counts.values()) + 2 * len(REKEYS)
    # The underlay saw the rekeys' IKE exchanges and ESP, nothing in clear.
    kinds = summarize(frames)
    assert not cleartext(frames), f"cleartext on the underlay: {kinds}"
    assert kinds["esp-in-udp"] > 0 and kinds["ike"] > 0, kinds
    assert contains(frames, bytes.fromhex(PING_PATTERN)) == 0

    world.end(weave)
    world.assert_pristine()


def ike_ids(world: World, host: str, name: str) -> set[str]:
    """The unique ids of every IKE SA a host's charon holds for a connection."""
    return world.tl.hosts[host].ike.ike_sa_ids(name)


@dataclass
class LiveLeg:
    """A weave's leg up between the two real charons, one IKE SA at each end, whose key
    material the test is about to change under traffic."""

    world: World
    weave: Weave
    dst: str  # the address web1 pings over the leg
    key: str
    name: str
    old: dict[str, set[str]]  # each host's IKE SA unique ids before the change

    @classmethod
    def up(cls, world: World, dst_vm: str, **weave: str) -> LiveLeg:
        tl = world.tl
        up = world.up(dst_vm=dst_vm, **weave)
        key = f"{up.id}-s{up.legs[0].slot}"
        name = f"nwc-{key}"
        dst = str(tl.topology.vms[dst_vm].ip)
        assert ping(tl.vm("web1"), dst, count=2)
        old = {h: ike_ids(world, h, name) for h in tl.hosts}
        assert all(len(ids) == 1 for ids in old.values()), old
        return cls(world, up, dst, key, name, old)

    @contextmanager
    def under_traffic(self, label: str, what: str, seconds: int) -> Iterator[Path]:
        """Pings over the leg and a capture of h1's underlay around the block (yields the
        pings' log); once it is done, the underlay saw IKE and ESP only, no ping in clear."""
        lab = self.world.lab
        capture = Capture(lab, self.world.tl.hosts["h1"].ns, "ul0", label).start()
        ping_log = lab.directory("logs") / f"{label}-ping-{self.weave.id}.out"
        pinger = self.world.tl.vm("web1").popen(
            ["ping", "-n", "-i", "0.05", "-w", str(seconds), "-p", PING_PATTERN, self.dst],
            log=ping_log)
        lab.process(pinger, f"ping during the {what}")
        try:
            yield ping_log
        finally:
            pinger.terminate()
            pinger.wait(10)
            frames = capture.stop()
        kinds = summarize(frames)
        assert not cleartext(frames), f"cleartext on the underlay: {kinds}"
        assert kinds["esp-in-udp"] > 0 and kinds["ike"] > 0, kinds
        assert contains(frames, bytes.fromhex(PING_PATTERN)) == 0

    def ike_ids(self) -> dict[str, set[str]]:
        return {h: ike_ids(self.world, h, self.name) for h in self.world.tl.hosts}

    def wait_replaced(self, timeout: float, what: str) -> dict[str, LegRecord]:
        """Wait until both charons hold one IKE SA, none of the old ones, and both agents
        report it `installed` for the record they now hold; then traffic must pass. Returns
        each host's record."""
        tl = self.world.tl

        def replaced() -> bool:
            for h in tl.hosts:
                ids = ike_ids(self.world, h, self.name)
                sa = tl.hosts[h].ike.sas().get(self.name)
                if ids & self.old[h] or len(ids) != 1 or sa is None or not sa.installed:
                    return False
            return True

        wait_for(replaced, timeout, f"both charons to hold only an SA made with the {what}")
        records: dict[str, LegRecord] = {}
        for h, host in tl.hosts.items():
            record = records[h] = LegRecord.from_json(
                external_ids(host.ovs)[RECORD_PREFIX + self.key])
            wait_for(lambda h=h, r=record: (lambda s: s.phase is Phase.INSTALLED
                                            and s.extra.get("sa_of") == r.tunnel_id())(
                LegStatus.from_json(external_ids(tl.hosts[h].ovs)[STATUS_PREFIX + self.key])),
                10, f"{h}'s agent to report the new SA installed")
        assert ping(tl.vm("web1"), self.dst, count=2), "no traffic over the new SA"
        return records


def replies(ping_log: Path) -> set[int]:
    """The sequence numbers of the echo requests a `ping -n` log shows answered."""
    return {int(n) for n in re.findall(r" bytes from .*icmp_seq=(\d+)", ping_log.read_text())}


def test_a_new_key_under_a_live_leg_replaces_its_sa_and_nothing_leaves_in_clear(
        world: World) -> None:
    """A restarted controller that finds the hosts' records disagreeing draws a new key for
    a leg whose SA is up. The SA built from the old key must not go on encrypting: both
    charons end up with one IKE SA, made with the new key, the old one terminated, and the
    underlay sees only IKE and ESP meanwhile."""
    leg = LiveLeg.up(world, "db1")
    with leg.under_traffic("new-key", "key change", 20):
        # What the restarted controller decided (its keys are in memory only): a new key,
        # and no start until the responder reports it loaded.
        part = world.part
        with part._lock:
            (held,) = part._weaves[leg.weave.id].legs.values()
            held.psk, held.start = new_psk(), False
            fresh = part._record(held, held.requester)
        part._wake.set()
        records = leg.wait_replaced(30, "new key")
    for record in records.values():
        assert record.psk == fresh.psk
    assert world.weave(leg.weave.id).state is State.ACTIVE
    world.end(leg.weave)
    world.assert_pristine()


def test_a_new_key_refused_at_the_peer_keeps_the_old_sa_and_is_reported(world: World) -> None:
    """The replacement of a live SA fails authentication (the initiator is handed another
    key than the responder). charon's reauthentication leaves the old SA, which still
    encrypts: it stays, the initiator's agent reports `auth_failed` (what charon logged,
    followed over VICI events, since `rekey` itself says nothing of the outcome), the
    controller an `ike_failure`, and the weave goes on. A new record is tried again."""
    tl = world.tl
    weave = world.up()
    key = f"{weave.id}-s{weave.legs[0].slot}"
    name = f"nwc-{key}"
    db1 = str(tl.topology.vms["db1"].ip)
    old = {h: ike_ids(world, h, name) for h in tl.hosts}
    part = world.part
    record = part._record
    wrong = new_psk()

    def skewed(leg: Any, end: Any) -> LegRecord:
        mine = record(leg, end)
        return dataclasses.replace(mine, psk=wrong) if end is leg.requester else mine

    with part._lock:
        (leg,) = part._weaves[weave.id].legs.values()
        part._record = skewed  # type: ignore[method-assign]
        leg.psk, leg.start = new_psk(), False
    part._wake.set()
    initiator = tl.hosts[leg.requester.host]

    def status() -> LegStatus:
        return LegStatus.from_json(external_ids(initiator.ovs)[STATUS_PREFIX + key])

    wait_for(lambda: status().phase is Phase.AUTH_FAILED, 30,
             "the initiator's agent to report the refused key")
    assert "AUTHENTICATION_FAILED" in status().detail, status()
    assert status().sa is not None and status().sa.installed  # type: ignore[union-attr]
    assert {h: ike_ids(world, h, name) for h in tl.hosts} == old
    assert ping(tl.vm("web1"), db1, count=2), "no traffic over the old SA"
    wait_for(lambda: world.security("ike_failure"), 10, "the controller's ike_failure")
    assert world.weave(weave.id).state is State.ACTIVE
    with part._lock:
        part._record = record  # type: ignore[method-assign]
    part._wake.set()
    wait_for(lambda: status().phase is Phase.INSTALLED
             and not ike_ids(world, initiator.name, name) & old[initiator.name], 30,
             "the SA replaced once the initiator has the responder's key")
    assert ping(tl.vm("web1"), db1, count=2), "no traffic over the new SA"
    world.end(weave)
    world.assert_pristine()


@pytest.mark.parametrize("ca", ["same CA", "new CA"])
def test_new_certificates_under_a_live_x509_leg_replace_its_sa_and_nothing_leaves_in_clear(
        world: World, ca: str) -> None:
    """The certificate counterpart of the key change above. A restarted controller keeps no
    certificate it finds in records that disagree (`_materialize`), nor one from a CA other
    than its own (its pki directory lost: a new CA): it writes records without a leaf, each
    agent asks again with the CSR of the key it already holds, and the controller signs anew.
    The agent replaces the SA make-before-break (a new IKE SA negotiated with the new
    certificates beside the old one, which carries the traffic until the new one is
    installed at both ends, then is deleted): both charons end up with one IKE SA, not the
    old one, both agents report it `installed` for the new record, pings sent every 50 ms
    through the whole replacement are all answered, and the underlay sees only IKE and ESP
    meanwhile."""
    leg = LiveLeg.up(world, "app1", target="initech-app", profile="silver")
    part = world.part
    with part._lock:
        (held,) = part._weaves[leg.weave.id].legs.values()
        old_certs = dict(held.certs)
    assert set(old_certs) == set(world.tl.hosts), old_certs
    with leg.under_traffic("new-certs", "certificate change", 60) as ping_log:
        wait_for(lambda: replies(ping_log), 10, "the first pings over the old SA")
        # What the restarted controller holds (certificates, like keys, in memory only):
        # no leaf, no CSR signed yet, no start until the responder reports the new material.
        with part._lock:
            if ca == "new CA":
                part.ca = CertificateAuthority.load_or_create(
                    world.lab.directory(f"pki-{leg.weave.id}"))
            held.certs.clear()
            held.csrs.clear()
            held.start = False
        part._wake.set()
        records = leg.wait_replaced(40, "new certificates")
        # The pings go on over the new SA: so they spanned the whole replacement.
        after = max(replies(ping_log))
        wait_for(lambda: max(replies(ping_log)) > after + 5, 10, "pings after the replacement")
    answered = replies(ping_log)
    lost = sorted(set(range(1, max(answered) + 1)) - answered)
    log.info("pings during the certificate change: %d answered, lost %s", len(answered), lost)
    assert not lost, f"{len(lost)} pings lost across the replacement: icmp_seq {lost}"
    # Only the new IKE SA is left at both ends, once both agents report it installed.
    now = leg.ike_ids()
    assert all(len(ids) == 1 and not ids & leg.old[h] for h, ids in now.items()), \
        (leg.old, now)
    for h, record in records.items():
        assert record.cert_pem is not None and record.cert_pem != old_certs[h], h
        assert record.ca_pem == part.ca.cert_pem
    # The path under test was taken: each agent took its SA as built from earlier material
    # and saw it replaced.
    for h in world.tl.hosts:
        text = (world.lab.directory("logs") / f"agent-{h}.log").read_text()
        log.info("agent on %s: %s", h, [line for line in text.splitlines() if leg.key in line])
        assert f"leg {leg.key}: key material changed; replacing" in text, h
    assert world.weave(leg.weave.id).state is State.ACTIVE
    world.end(leg.weave)
    world.assert_pristine()
