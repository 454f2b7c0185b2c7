"""nwc.ike's VICI session against local sockets (no charon): which failures mean "not
running, holds nothing" and which mean "may be running and still hold everything"."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from vici.exception import CommandException

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

    def __init__(self, refusal: str | None = None, sa_remains: bool = True) -> None:
        super().__init__("unused.vici")
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.refusal = refusal
        self.sa_remains = sa_remains  # whether list-sas still shows the SA after a refusal

    @contextmanager
    def _session(self, timeout: float | None = None) -> Iterator[Any]:
        daemon = self

        class Session:
            def request(self, command: str, message: dict[str, Any]) -> dict[str, Any]:
                daemon.sent.append((command, message))
                return {"success": b"yes"}

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


def test_a_reauthentication_is_asked_of_one_ike_sa() -> None:
    daemon = _Requests()
    daemon.reauthenticate("7")
    assert daemon.sent == [("rekey", {"ike-id": "7", "reauth": "yes"})]
