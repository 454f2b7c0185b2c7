"""nwc.ike's VICI session against local sockets (no charon): which failures mean "not
running, holds nothing" and which mean "may be running and still hold everything"."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from vici.exception import CommandException
from vici.protocol import Message, Packet

from nwc.ike import IkeDaemon, IkeError, IkeNoAnswer, IkeUnavailable, _sa_info

pytestmark = pytest.mark.unit


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "charon.vici"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    yield path, server
    server.close()


def test_no_socket_is_a_daemon_that_does_not_run(tmp_path: Path) -> None:
    with pytest.raises(IkeUnavailable):
        IkeDaemon(tmp_path / "missing.vici", timeout=0.5).terminate("nwc-x")


def test_a_stale_socket_is_a_daemon_that_does_not_run(tmp_path: Path) -> None:
    path = tmp_path / "charon.vici"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, never listening: connect is refused, as after a crash
    try:
        with pytest.raises(IkeUnavailable):
            IkeDaemon(path, timeout=0.5).unload_connection("nwc-x")
    finally:
        dead.close()


def test_a_daemon_that_does_not_answer_in_time_is_not_one_that_stopped(
        listening: tuple[Path, socket.socket]) -> None:
    path, _ = listening  # accepts (the backlog) and never answers, like a busy charon
    with pytest.raises(IkeNoAnswer):
        IkeDaemon(path, timeout=0.2).unload_connection("nwc-x")


def test_a_session_cut_short_is_not_a_daemon_that_stopped(
        listening: tuple[Path, socket.socket]) -> None:
    path, server = listening

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(4096)
        conn.close()  # end of stream before any answer

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    with pytest.raises(IkeNoAnswer):
        IkeDaemon(path, timeout=2.0).unload_shared("nwc-x")
    thread.join(2)


def child(state: str, unique: str) -> dict[str, bytes]:
    return {"state": state.encode(), "uniqueid": unique.encode()}


def test_the_old_child_sa_carries_the_traffic_while_its_rekey_runs() -> None:
    during = _sa_info({"state": b"ESTABLISHED", "uniqueid": b"3", "child-sas": {
        "nwc-x-7": child("REKEYING", "7"), "nwc-x-8": child("INSTALLING", "8")}})
    assert (during.child_state, during.child_id, during.installed) == ("REKEYING", "7", True)
    assert during.rekeying
    after = _sa_info({"state": b"ESTABLISHED", "uniqueid": b"3", "child-sas": {
        "nwc-x-7": child("REKEYED", "7"), "nwc-x-8": child("INSTALLED", "8")}})
    assert (after.child_state, after.child_id, after.installed) == ("INSTALLED", "8", True)


@pytest.mark.parametrize("state", ["INSTALLING", "ROUTED", "RETRYING", "DELETING", "DELETED"])
def test_a_child_sa_that_carries_nothing_is_not_installed(state: str) -> None:
    info = _sa_info({"state": b"ESTABLISHED", "uniqueid": b"3",
                     "child-sas": {"nwc-x-7": child(state, "7")}})
    assert not info.installed


class _Listings(IkeDaemon):
    """An IkeDaemon whose charon answers list-sas with the given listings, one per call."""

    def __init__(self, *listings: list[dict[str, Any]]) -> None:
        super().__init__("unused.vici")
        self.listings = list(listings)
        self.calls = 0

    @contextmanager
    def _session(self, timeout: float | None = None) -> Iterator[Any]:
        daemon = self

        class Session:
            def list_sas(self) -> list[dict[str, Any]]:
                daemon.calls += 1
                return daemon.listings.pop(0)

        yield Session()


def settled_listing() -> list[dict[str, Any]]:
    return [{b"nwc-x": {"state": b"ESTABLISHED", "uniqueid": b"2",
                        "child-sas": {"nwc-x-4": child("INSTALLED", "4")}}}]


@pytest.mark.parametrize("old_state", ["REKEYED", "DELETING"])
def test_a_listing_caught_mid_ike_rekey_is_taken_again(old_state: str) -> None:
    """What a real charon listed during an IKE SA rekey (the responder's old SA REKEYED, the
    initiator's DELETING): only the old IKE SA, its CHILD SA already moved to the new one."""
    caught = [{b"nwc-x": {"state": old_state.encode(), "uniqueid": b"1", "child-sas": {}}}]
    daemon = _Listings(caught, settled_listing())
    sa = daemon.sas()["nwc-x"]
    assert (sa.ike_id, sa.child_id, sa.installed) == ("2", "4", True)
    assert daemon.calls == 2


def test_an_ike_sa_that_keeps_going_without_children_is_reported_as_it_is() -> None:
    gone = [{b"nwc-x": {"state": b"DELETING", "uniqueid": b"1", "child-sas": {}}}]
    daemon = _Listings(*[gone] * 5)
    sa = daemon.sas()["nwc-x"]
    assert (sa.ike_state, sa.installed) == ("DELETING", False)
    assert daemon.calls == 3  # a few listings at most, then what charon says stands
    # Found in review: it was listed three times on every pass for as long as it lingered.
    assert daemon.sas()["nwc-x"].ike_state == "DELETING" and daemon.calls == 4
    renewed = [{b"nwc-x": {"state": b"DELETING", "uniqueid": b"9", "child-sas": {}}}]
    daemon.listings = [renewed, settled_listing()]
    assert daemon.sas()["nwc-x"].installed and daemon.calls == 6  # another SA: listed again


class _Requests(IkeDaemon):
    """An IkeDaemon whose charon records each command it is sent and answers as told."""

    def __init__(self, refusal: str | None = None,
                 events: list[tuple[str, dict[str, Any]]] | None = None,
                 sa_remains: bool = True) -> None:
        super().__init__("unused.vici")
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.refusal = refusal
        self.events = events or []  # what charon reports once a command is sent
        self.sa_remains = sa_remains  # whether list-sas still shows the SA after a refusal

    @contextmanager
    def _session(self, timeout: float | None = None) -> Iterator[Any]:
        daemon = self

        class Session:
            def request(self, command: str, message: dict[str, Any]) -> dict[str, Any]:
                daemon.sent.append((command, message))
                return {"success": b"yes"}

            def listen(self, kinds: list[str], timeout: float) -> Iterator[tuple[Any, Any]]:
                yield None, None  # registered, nothing yet
                while True:
                    for kind, event in list(daemon.events) if daemon.sent else []:
                        daemon.events.remove((kind, event))
                        if kind in kinds:
                            yield kind, event
                    yield None, None

            def terminate(self, message: dict[str, Any]) -> Iterator[dict[str, Any]]:
                daemon.sent.append(("terminate", message))
                if daemon.refusal is not None:
                    raise CommandException(daemon.refusal)
                yield {}

            def list_sas(self, filters: dict[str, Any]) -> Iterator[dict[str, Any]]:
                daemon.sent.append(("list-sas", filters))
                if daemon.sa_remains:
                    yield {b"nwc-x": {"state": b"DELETING", "uniqueid": b"7", "child-sas": {}}}

        try:
            yield Session()
        except CommandException as exc:
            raise IkeError(str(exc)) from None


def test_one_ike_sa_is_terminated_by_its_unique_id_not_the_connection() -> None:
    daemon = _Requests()
    daemon.terminate_sa("7", timeout_s=0.5)
    (command, message), = daemon.sent
    assert command == "terminate" and message["ike-id"] == "7"
    assert "ike" not in message and "child" not in message  # the new SA of the name stays
    assert message["force"] == "yes" and message["timeout"] == "500"


def test_terminating_an_ike_sa_already_gone_is_no_error() -> None:
    _Requests("no matching SAs found").terminate_sa("7")
    with pytest.raises(IkeError):
        _Requests("terminating IKE_SA failed: busy").terminate_sa("7")


@pytest.mark.parametrize(("terminate", "which"), [
    (lambda d: d.terminate_sa("7"), {"ike-id": "7"}),
    (lambda d: d.terminate("nwc-x"), {"ike": "nwc-x"})])
def test_a_terminate_charon_calls_failed_is_no_error_once_the_sa_is_gone(
        terminate: Any, which: dict[str, str]) -> None:
    """charon answers "terminating SA failed" when the peer did not confirm the DELETE within
    the timeout, and `force` deletes the SA anyway: gone is success, whatever it said."""
    daemon = _Requests("terminating SA failed", sa_remains=False)
    terminate(daemon)
    assert daemon.sent[-1] == ("list-sas", which)  # asked about that SA, after the terminate
    still = _Requests("terminating SA failed", sa_remains=True)
    with pytest.raises(IkeError, match="terminating SA failed"):
        terminate(still)  # an SA that really stayed is still reported


def test_the_ike_sas_of_a_connection_are_listed_by_its_name() -> None:
    """While an SA is replaced both IKE SAs are up: their ids, not only the best one's."""
    daemon = _Requests()
    assert daemon.ike_sa_ids("nwc-x") == {"7"}
    assert daemon.sent == [("list-sas", {"ike": "nwc-x"})]
    assert _Requests(sa_remains=False).ike_sa_ids("nwc-x") == set()


def test_a_reauthentication_is_asked_of_one_ike_sa_and_its_new_sa_waited_for() -> None:
    daemon = _Requests(events=[
        ("ike-updown", {"up": b"yes", "nwc-y": {"uniqueid": b"8"}}),  # another connection
        ("ike-updown", {"up": b"yes", "nwc-x": {"uniqueid": b"9"}})])
    assert daemon.reauthenticate("nwc-x", "7", timeout_s=5).ok
    assert daemon.sent == [("rekey", {"ike-id": "7", "reauth": "yes"})]
    assert not daemon.events  # it waited for the new IKE SA of its own connection


def test_a_reauthentication_the_peer_refuses_is_an_authentication_failure() -> None:
    """`rekey` says nothing of how it went: charon's log for the connection does."""
    refused = "received AUTHENTICATION_FAILED notify error"
    daemon = _Requests(events=[
        ("log", {"ikesa-name": b"nwc-y", "msg": refused.encode()}),  # another connection
        ("log", {"ikesa-name": b"nwc-x", "msg": b"sending packet"}),
        ("log", {"ikesa-name": b"nwc-x", "msg": refused.encode()})])
    result = daemon.reauthenticate("nwc-x", "7", timeout_s=5)
    assert (result.ok, result.auth_failed, result.detail) == (False, True, refused)
    assert not daemon.events


def test_a_reauthentication_nothing_comes_of_is_a_transient_failure() -> None:
    result = _Requests().reauthenticate("nwc-x", "7", timeout_s=0.05)
    assert not result.ok and not result.auth_failed


def test_a_run_of_the_daemon_is_named_by_its_pid_and_start(
        listening: tuple[Path, socket.socket]) -> None:
    """`stats` gives the start time only to the second (a charon restarted within it looks
    the same), so the socket's peer, the process that listens, is part of the name."""
    path, server = listening  # this process listens: the peer's pid is ours

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            payload = bytes([Packet.CMD_RESPONSE]) + Message.serialize(
                {"uptime": {"running": "5 seconds", "since": "Nov 25 09:06:44 2026"}})
            conn.sendall(struct.pack("!I", len(payload)) + payload)

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        assert IkeDaemon(path, timeout=2).daemon_id() == \
            f"pid {os.getpid()}, up since Nov 25 09:06:44 2026"
    finally:
        thread.join(5)


def test_the_dh_group_of_an_sa_without_pfs_is_the_ike_sas() -> None:
    """Found by a tester: the gold profile's legs (x25519, no PFS) showed no group at all.
    charon lists a CHILD SA's group only when it was made with PFS; the IKE SA's is listed
    with the IKE SA."""
    ike = {"state": b"ESTABLISHED", "uniqueid": b"3", "encr-alg": b"AES_GCM_16",
           "encr-keysize": b"256", "prf-alg": b"PRF_HMAC_SHA2_384",
           "dh-group": b"CURVE_25519"}
    plain = _sa_info({**ike, "child-sas": {"nwc-x-7": {
        **child("INSTALLED", "7"), "encr-alg": b"AES_GCM_16", "encr-keysize": b"256"}}})
    assert plain.dh_group == "CURVE_25519"
    with_pfs = _sa_info({**ike, "child-sas": {"nwc-x-7": {
        **child("INSTALLED", "7"), "dh-group": b"ECP_384"}}})
    assert with_pfs.dh_group == "ECP_384"  # the CHILD SA's own exchange, when it had one
    assert _sa_info({"state": b"CONNECTING", "uniqueid": b"3"}).dh_group is None
