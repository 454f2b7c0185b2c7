"""The host's IKE daemon (strongSwan's charon) over VICI, as the tunnel agent uses it.

A thin shell: one short-lived VICI session per call (charon may restart under us; a fresh
socket per call finds the new one), decoded results, and no key material anywhere but in the
request bytes. Failures are `IkeUnavailable` (the daemon is not running: it holds nothing),
`IkeNoAnswer` (it may be running, busy, and still hold everything) or `IkeError` (it refused).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import re
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vici
from vici.exception import CommandException, SessionException

from nwc.pki import Secret
from nwc.tunnel import CHILD_CARRYING_STATES, SaInfo

log = logging.getLogger(__name__)

# What charon says when the peer's (or our) authentication fails: wrong PSK, a certificate
# from another CA or for another identity. Anything else (timeouts, no proposal chosen, the
# peer not yet listening) is worth retrying; these are not.
AUTH_FAILURE = re.compile(
    r"AUTHENTICATION_FAILED|authentication of .* failed|MAC mismatched|"
    r"constraint check failed|no trusted .* public key found|"
    r"no issuer certificate found|certificate status is not available|"
    r"tried \d+ shared keys? for .* but MAC mismatched", re.IGNORECASE)


REKEY_STATES = frozenset({"REKEYING", "REKEYED"})

# An IKE SA a rekey replaced hands its CHILD SAs to its successor, then stays REKEYED (the
# responder) or DELETING (the initiator, deleting it) until it goes. list-sas is no atomic
# snapshot: seen with real charon, it may list that old IKE SA, already without CHILD SAs,
# but not yet the successor that holds them. Such a listing says nothing about the CHILD SA.
HANDED_OVER_STATES = frozenset({"REKEYED", "DELETING"})
SA_LISTINGS = 3  # at most, per sas() call: the next listing has the successor


# What connecting to the VICI socket fails with when no daemon listens on it: the socket file
# is missing (never started, or removed on a clean stop) or stale (the daemon died).
NOT_RUNNING = frozenset({errno.ENOENT, errno.ECONNREFUSED})


class IkeUnavailable(Exception):
    """The IKE daemon is not running, so it holds no SA, connection or key."""


class IkeNoAnswer(Exception):
    """The IKE daemon may be running but did not answer: a timeout, a session it closed half
    way, a socket this process may not use. Whatever it held, it may still hold."""


class IkeError(Exception):
    """The IKE daemon refused a command."""


@dataclass(frozen=True)
class InitiateResult:
    ok: bool
    auth_failed: bool = False
    detail: str = ""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class IkeDaemon:
    def __init__(self, socket_path: Path | str, timeout: float = 5.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        # (name, IKE SA id) of SAs a whole sas() call found handed over with no successor:
        # really going (a dead peer's DELETE can be retried for minutes), not caught mid
        # rekey, so later calls do not list again for them on every pass.
        self._lingering: set[tuple[str, str | None]] = set()

    @contextmanager
    def _session(self, timeout: float | None = None) -> Iterator[vici.Session]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout or self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            problem = f"{self.socket_path}: {exc.strerror or exc}"
            if exc.errno in NOT_RUNNING:
                raise IkeUnavailable(problem) from None
            raise IkeNoAnswer(problem) from None  # e.g. a full backlog: a busy daemon
        try:
            yield vici.Session(sock)
        except (OSError, SessionException) as exc:
            # Connected, so a daemon was there: a timeout or an end of stream says nothing
            # about what it still holds (the next call finds out whether it still runs).
            raise IkeNoAnswer(f"{self.socket_path}: {exc or type(exc).__name__}") from None
        except CommandException as exc:
            raise IkeError(str(exc)) from None
        finally:
            sock.close()

    def load_connection(self, conn: dict[str, Any]) -> None:
        with self._session() as s:
            s.load_conn(conn)

    def unload_connection(self, name: str) -> None:
        with self._session() as s:
            if name in self.connections(session=s):
                s.unload_conn({"name": name})

    def connections(self, session: vici.Session | None = None) -> set[str]:
        if session is not None:
            return {_text(c) for c in session.get_conns().get("conns", [])}
        with self._session() as s:
            return {_text(c) for c in s.get_conns().get("conns", [])}

    def load_shared(self, secret_id: str, secret: Secret, owners: list[str]) -> None:
        with self._session() as s:
            s.request("load-shared", {"id": secret_id, "type": "IKE", "data": secret.reveal(),
                                      "owners": owners})

    def unload_shared(self, secret_id: str) -> None:
        with self._session() as s:
            if secret_id in self.shared_ids(session=s):
                s.request("unload-shared", {"id": secret_id})

    def shared_ids(self, session: vici.Session | None = None) -> set[str]:
        if session is not None:
            return {_text(k) for k in session.request("get-shared", {}).get("keys", [])}
        with self._session() as s:
            return {_text(k) for k in s.request("get-shared", {}).get("keys", [])}

    def load_key(self, der: Secret, kind: str = "ECDSA") -> str:
        """Hand a private key to charon's memory; returns its id (a public key hash)."""
        with self._session() as s:
            return _text(s.request("load-key", {"type": kind, "data": der.reveal()})["id"])

    def unload_key(self, key_id: str) -> None:
        with self._session() as s:
            if key_id in self.key_ids(session=s):
                s.request("unload-key", {"id": key_id})

    def key_ids(self, session: vici.Session | None = None) -> set[str]:
        if session is not None:
            return {_text(k) for k in session.request("get-keys", {}).get("keys", [])}
        with self._session() as s:
            return {_text(k) for k in s.request("get-keys", {}).get("keys", [])}

    def daemon_id(self) -> str | None:
        """Which run of charon answers: its process id (the VICI socket's peer) and the time
        it started (`stats`, to the second). A restarted charon holds none of the SAs of
        before and numbers new ones from 1 again, so unique ids are only ever compared
        within one run. None when neither can be had."""
        with self._session() as s:
            since = s.stats().get("uptime", {}).get("since")
            try:
                pid = struct.unpack("3i", s.transport.socket.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
            except (OSError, AttributeError):  # not a Unix socket, or not Linux
                pid = None
        if since is None and pid is None:
            return None
        return f"pid {pid}, up since {_text(since) if since is not None else '?'}"

    # -- SAs --------------------------------------------------------------------------------

    def initiate(self, name: str, timeout_s: float = 10.0) -> InitiateResult:
        """Start the leg's IKE and CHILD SA and wait for the outcome. charon's log lines for
        this attempt tell an authentication failure from a transient one."""
        lines: list[str] = []
        try:
            with self._session(timeout=timeout_s + 5) as s:
                for event in s.initiate({"child": name, "ike": name,
                                         "timeout": str(int(timeout_s * 1000)),
                                         "loglevel": "1"}):
                    lines.append(_text(event.get("msg", b"")))
        except IkeError as exc:
            failed = [line for line in lines if AUTH_FAILURE.search(line)]
            if failed:
                return InitiateResult(False, True, failed[0])
            return InitiateResult(False, False, lines[-1] if lines else str(exc))
        return InitiateResult(True)

    def terminate(self, name: str, timeout_s: float = 0.5) -> None:
        """Delete the IKE SA (and its CHILD SAs): send the peer a DELETE and wait up to
        `timeout_s` for its answer, then delete it regardless (`force`). Both ends of a weave
        tear down at once, so the peer has often deleted its side already and would never
        answer: waiting out charon's retransmits would hold the teardown for seconds."""
        self._terminate({"ike": name}, timeout_s)

    def terminate_sa(self, ike_id: str, timeout_s: float = 0.5) -> None:
        """Delete one IKE SA by its unique id, as `terminate` does; the connection's other
        IKE SAs (the one replacing it) stay. One already gone is no error."""
        self._terminate({"ike-id": ike_id}, timeout_s)

    def _terminate(self, which: dict[str, str], timeout_s: float) -> None:
        try:
            with self._session(timeout=timeout_s + 5) as s:
                for _ in s.terminate({**which, "force": "yes",
                                      "timeout": str(int(timeout_s * 1000))}):
                    pass
        except IkeError as exc:
            if "no matching" in str(exc).lower():
                return
            # charon answers "terminating SA failed" when the peer did not confirm the
            # DELETE in time (often: it had deleted its side already), though `force` then
            # deleted the SA all the same. Whether it is gone is what counts, so ask.
            with self._session() as s:
                if any(True for _ in s.list_sas(which)):
                    raise
            log.debug("IKE SA %s: %s, but it is gone", which, exc)

    def reauthenticate(self, name: str, ike_id: str, timeout_s: float = 10.0
                       ) -> InitiateResult:
        """Have charon authenticate the IKE SA `ike_id` of connection `name` afresh with the
        credentials it holds now: a new IKE SA and new CHILD SAs, then the old one deleted
        (before, unless strongswan.conf sets `charon.make_before_break = yes`). The new IKE
        SA keeps the old one's connection as it was loaded, so only a key charon looks up at
        authentication (a pre-shared key) is new in it, never a certificate.

        `rekey` answers once charon has taken the job on and says nothing of how it went; a
        peer that refuses the new key leaves the old SA as it was. So charon's log and
        up/down events are followed meanwhile, until the new IKE SA is up, an
        authentication failure shows (told apart as for `initiate`), or `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._session(timeout=timeout_s + 5) as watch, \
                contextlib.closing(watch.listen(["log", "ike-updown"], timeout=0.2)) as events:
            # listen() registers when first asked for an event; what it answers first (an
            # event, or None after its timeout) comes after that.
            first = next(events)
            with self._session() as s:
                s.request("rekey", {"ike-id": ike_id, "reauth": "yes"})
            for kind, event in itertools.chain([first], events):
                outcome = _reauth_outcome(name, ike_id, kind, event)
                if outcome is not None:
                    return outcome
                if time.monotonic() >= deadline:
                    break
        return InitiateResult(False, False, f"no new IKE SA within {timeout_s:g} s")

    def ike_sa_ids(self, name: str) -> set[str]:
        """The unique ids of every IKE SA charon holds for connection `name` (`sas` gives
        one per name): while an SA is replaced, the old and the new one are both up."""
        with self._session() as s:
            return {_text(ike.get("uniqueid", b"")) for entry in s.list_sas({"ike": name})
                    for ike in entry.values()}

    def sas(self) -> dict[str, SaInfo]:
        """Every IKE SA by connection name (the best one where a name has several: one
        with an installed CHILD SA, then the newest). A listing caught in the middle of an
        IKE SA rekey, where a name has only an IKE SA that handed its CHILD SAs on, is
        taken again."""
        for _ in range(SA_LISTINGS):
            best: dict[str, SaInfo] = {}
            with self._session() as s:
                for entry in s.list_sas():
                    for ike_name, ike in entry.items():
                        name, info = _text(ike_name), _sa_info(ike)
                        if name not in best or _rank(info) > _rank(best[name]):
                            best[name] = info
            handed_over = {(name, info.ike_id) for name, info in best.items()
                           if is_handed_over(info)}
            if handed_over <= self._lingering:
                break
        self._lingering = handed_over
        return best


def _reauth_outcome(name: str, old_id: str, kind: Any, event: Any) -> InitiateResult | None:
    """What one VICI event says of a reauthentication of `name`'s IKE SA `old_id`: done (a
    new IKE SA of the connection is up), refused (an authentication failure logged for the
    connection), or nothing yet."""
    if kind is None or not isinstance(event, dict):
        return None
    if _text(kind) == "log":
        line = _text(event.get("msg", b""))
        if _text(event.get("ikesa-name", b"")) == name and AUTH_FAILURE.search(line):
            return InitiateResult(False, True, line)
    elif _text(kind) == "ike-updown" and _text(event.get("up", b"")) == "yes":
        for sa_name, sa in event.items():
            if _text(sa_name) == name and isinstance(sa, dict) \
                    and _text(sa.get("uniqueid", b"")) != old_id:
                return InitiateResult(True)
    return None


def is_handed_over(info: SaInfo) -> bool:
    """An IKE SA that handed its CHILD SAs to a rekey's successor and is going."""
    return info.ike_state in HANDED_OVER_STATES and info.child_state is None


def _rank(info: SaInfo) -> tuple[bool, int]:
    """Prefer an SA with an installed CHILD SA, then the newest."""
    return info.installed, int(info.ike_id or 0)


def _sa_info(ike: dict[str, Any]) -> SaInfo:
    children = [c for c in ike.get("child-sas", {}).values()]

    def preference(c: dict[str, Any]) -> tuple[bool, bool, int]:
        # The installed SA, else one still carrying traffic (the old SA during a rekey,
        # whose successor is not installed yet), else the newest.
        state = _text(c.get("state", b""))
        try:
            unique = int(_text(c.get("uniqueid", b"0")))
        except ValueError:
            unique = 0
        return state == "INSTALLED", state in CHILD_CARRYING_STATES, unique

    child = max(children, key=preference, default=None)

    def num(key: str) -> int:
        try:
            return int(_text(child.get(key, b"0"))) if child else 0
        except ValueError:
            return 0

    return SaInfo(
        ike_state=_text(ike.get("state", b"")),
        ike_id=_text(ike.get("uniqueid", b"")) or None,
        child_state=_text(child["state"]) if child else None,
        child_id=_text(child.get("uniqueid", b"")) if child else None,
        encryption=_text(child.get("encr-alg")) if child and "encr-alg" in child else None,
        key_bits=num("encr-keysize") or None,
        integrity=_text(child.get("integ-alg")) if child and "integ-alg" in child else None,
        # A CHILD SA lists a group only when it was made with PFS; the key exchange of an
        # SA without is the IKE SA's (charon's list-sas puts it there).
        dh_group=_text(child["dh-group"]) if child and "dh-group" in child
        else _text(ike["dh-group"]) if "dh-group" in ike else None,
        bytes_in=num("bytes-in"), bytes_out=num("bytes-out"),
        packets_in=num("packets-in"), packets_out=num("packets-out"),
        installed_s=num("install-time"),
        rekeying=_text(ike.get("state", b"")) in REKEY_STATES
        or any(_text(c.get("state", b"")) in REKEY_STATES for c in children))
