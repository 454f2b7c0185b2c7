"""The OVSDB client's limits, against plain sockets on loopback (no ovsdb-server): opening a
host's OVSDB ends with an error when the other end never answers or is not there."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from nwc.hostdb import HostDb

pytestmark = pytest.mark.unit


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP listener that never accepts nor answers; the kernel completes the handshake from
    its backlog, so a client sees an open connection that stays silent."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def open_in_thread(db: HostDb) -> BaseException | None:
    """Open on a thread, so code that would wait for ever fails this test instead of
    hanging it (the join is a watchdog far beyond the open deadline, not a measurement)."""
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            db.open()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    assert outcome, "opening the OVSDB never ended"
    return outcome[0]


def test_a_server_that_accepts_and_never_answers_is_given_up(silent_server: str) -> None:
    error = open_in_thread(HostDb(silent_server, timeout=0.3))
    assert isinstance(error, ConnectionError) and "no answer" in str(error)


def test_a_port_nobody_listens_on_is_an_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    error = open_in_thread(HostDb(f"tcp:127.0.0.1:{port}", timeout=5))
    assert isinstance(error, ConnectionError) and "refused" in str(error).lower()
