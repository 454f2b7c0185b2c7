"""OpenFlow peers that are not well-behaved switches, against the real os-ken listener."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TOPOLOGY, Nwc
from rawswitch import RawSwitch

from nwc import ofapp
from nwc.controller import Controller
from nwc.lab.netns import wait_for
from nwc.ofapp import FlowsPart

pytestmark = pytest.mark.functional


@pytest.fixture
def bare(ofp_port: int, tmp_path: Path) -> Iterator[tuple[Controller, FlowsPart, int]]:
    """A controller on the process's OpenFlow listener with no switches of its own."""
    topology_path = tmp_path / "topology.yaml"
    topology_path.write_text(TOPOLOGY)
    controller, part = Nwc.start_controller(tmp_path / "state", topology_path, ofp_port)
    try:
        yield controller, part, ofp_port
    finally:
        controller.stop()


def test_a_slow_reader_neither_stalls_the_weaver_nor_queues_without_bound(
        bare: tuple[Controller, FlowsPart, int], monkeypatch: pytest.MonkeyPatch) -> None:
    controller, part, port = bare
    monkeypatch.setattr(ofapp, "MAX_OUTBOX_BYTES", 256 * 1024)
    h1 = controller.config.topology.hosts["h1"].dpid
    peer = RawSwitch(port, h1, rcvbuf=4096)
    stop = threading.Event()
    try:
        assert peer.handshake()
        wait_for(lambda: h1 in part.switches, 10, "h1 to be registered")
        # No room in the kernel either: what the peer does not read waits in NWC.
        part.switches[h1].datapath.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        def trickle() -> None:  # reads, but far slower than NWC writes
            while not stop.wait(0.5):
                try:
                    if not peer.sock.recv(64):
                        return
                except (TimeoutError, OSError):
                    return
        reader = threading.Thread(target=trickle, daemon=True)
        reader.start()
        for _ in range(400):
            # Every call is served (a hung loop would time out here), while h1 is behind.
            controller.call(part.resync, h1, timeout=10)
            if h1 not in part.switches:
                break
        assert h1 not in part.switches  # dropped once its queue passed the bound
    finally:
        stop.set()
        peer.close()

