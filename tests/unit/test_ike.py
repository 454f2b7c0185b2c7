"""nwc.ike's VICI session against local sockets (no charon): which failures mean "not
running, holds nothing" and which mean "may be running and still hold everything"."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwc.ike import IkeDaemon, IkeNoAnswer, IkeUnavailable, _sa_info

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
