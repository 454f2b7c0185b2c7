"""OpenFlow peers that are not well-behaved switches, against the real os-ken listener: one that
reads too slowly, one that claims a connected switch's datapath id, ones from addresses that
`--ofp-allowed-peers` leaves out."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TOPOLOGY, Nwc
from rawswitch import PORT_STATUS, RawSwitch

from nwc import ofapp
from nwc.controller import Controller
from nwc.lab.netns import free_port, wait_for
from nwc.ofapp import FlowsPart
from nwc.topology import Topology

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



def _greeting(port: int) -> bytes:
    """What the listener says to a new peer before the peer says anything ('' if it hung
    up without a word)."""
    deadline = time.monotonic() + 30  # bounds a listener that never comes up
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "nwc run is not listening"
            time.sleep(0.2)
    with sock:
        try:
            return sock.recv(8)
        except ConnectionResetError:
            return b""


@pytest.mark.parametrize(("allowed", "greeted"), [("198.51.100.0/24", False),
                                                  ("198.51.100.0/24,127.0.0.0/8", True)])
def test_nwc_run_refuses_peers_outside_ofp_allowed_peers(tmp_path: Path, allowed: str,
                                                         greeted: bool) -> None:
    port = free_port()
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nwc", "run", "--state-dir", str(tmp_path / "state"),
         "--api-host", "127.0.0.1", "--api-port", str(free_port()),
         "--ofp-listen-host", "127.0.0.1", "--ofp-tcp-listen-port", str(port),
         "--ofp-allowed-peers", allowed], stdout=log, stderr=subprocess.STDOUT)
    try:
        hello = _greeting(port)
        if greeted:
            assert hello[:2] == bytes([4, 0])  # OpenFlow 1.3 hello
        else:
            assert hello == b""
            assert "not in --ofp-allowed-peers" in (tmp_path / "run.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def _port_down(port_no: int, name: str) -> bytes:
    """PORT_STATUS body: reason MODIFY, the port with OFPPS_LINK_DOWN."""
    port = struct.pack("!I4x6s2x16sIIIIIIII", port_no, b"\x02\0\0\0\0\x01",
                       name.encode(), 0, 1, 0, 0, 0, 0, 0, 0)
    return struct.pack("!B7x", 2) + port


def test_a_second_connection_for_a_live_switch_is_refused_and_learns_nothing(nwc: Nwc) -> None:
    topo: Topology = nwc.controller.config.topology
    weave = nwc.weave("acme-web", "globex-db")
    path = next(leg.path for leg in weave.legs if leg.slot is not None)
    assert path == ("h1", "s1", "s2", "h2")
    s1 = topo.switches["s1"].dpid
    live = nwc.part.switches[s1].datapath
    impostor = RawSwitch(nwc.port, s1)
    try:
        assert impostor.handshake()
        # It claims the weave's link went down.
        impostor.send(PORT_STATUS, 0, _port_down(topo.ports("s1")["s2"], "s1-s2"))
        assert impostor.serve(until=time.monotonic() + 20)  # the controller hung up on it
        assert not impostor.programmed()  # and sent it none of s1's flows
    finally:
        impostor.close()
    assert nwc.part.switches[s1].datapath is live
    nwc.wait_connected()
    after = nwc.live(weave.id)
    assert after is not None
    assert next(leg.path for leg in after.legs if leg.slot is not None) == path  # not moved
    assert nwc.net.ping("web1", "192.0.2.70", count=2)
