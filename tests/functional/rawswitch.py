"""A peer that speaks just enough OpenFlow 1.3 to pass os-ken's handshake as a switch of a
given datapath id: hello, features, an empty port description, an empty meter list. What it
does afterwards (read, read slowly, never read, lie) is up to the test."""

from __future__ import annotations

import socket
import struct
import time

HEADER = struct.Struct("!BBHI")
HELLO, ECHO_REQUEST, ECHO_REPLY, EXPERIMENTER, FEATURES_REQUEST, FEATURES_REPLY = 0, 2, 3, 4, 5, 6
FLOW_MOD, MULTIPART_REQUEST, MULTIPART_REPLY, BARRIER_REQUEST, BARRIER_REPLY = 14, 18, 19, 20, 21
PORT_STATUS = 12
MP_METER_CONFIG = 10


class RawSwitch:
    def __init__(self, port: int, dpid: int, *, host: str = "127.0.0.1",
                 rcvbuf: int | None = None, timeout: float = 10) -> None:
        self.dpid = dpid
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connecting, so the window it announces stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = b""
        self.received: list[tuple[int, int]] = []  # (type, xid) of everything read

    def close(self) -> None:
        self.sock.close()

    def send(self, msg_type: int, xid: int, body: bytes = b"") -> None:
        self.sock.sendall(HEADER.pack(4, msg_type, 8 + len(body), xid) + body)

    def read_message(self) -> tuple[int, int, bytes] | None:
        """One message (type, xid, body), or None at the end of the stream."""
        while True:
            if len(self.buf) >= 8:
                _v, msg_type, length, xid = HEADER.unpack_from(self.buf)
                if len(self.buf) >= length:
                    body, self.buf = self.buf[8:length], self.buf[length:]
                    self.received.append((msg_type, xid))
                    return msg_type, xid, body
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not data:
                return None
            self.buf += data

    def answer(self, msg_type: int, xid: int, body: bytes) -> bool:
        """Answer what a switch must answer; True once the meter list was asked for (the
        last step of NWC's handshake)."""
        if msg_type == HELLO:
            self.send(HELLO, xid)
        elif msg_type == FEATURES_REQUEST:
            self.send(FEATURES_REPLY, xid, struct.pack("!QIBB2xII", self.dpid, 0, 254, 0, 0, 0))
        elif msg_type == ECHO_REQUEST:
            self.send(ECHO_REPLY, xid, body)
        elif msg_type == BARRIER_REQUEST:
            self.send(BARRIER_REPLY, xid)
        elif msg_type == MULTIPART_REQUEST:
            (mp_type,) = struct.unpack_from("!H", body)
            self.send(MULTIPART_REPLY, xid, struct.pack("!HH4x", mp_type, 0))
            return mp_type == MP_METER_CONFIG
        return False

    def handshake(self) -> bool:
        """Through os-ken's handshake and NWC's meter query; False if the controller hung up
        first."""
        while True:
            msg = self.read_message()
            if msg is None:
                return False
            if self.answer(*msg):
                return True

    def serve(self, until: float) -> bool:
        """Read and answer until the controller hangs up (True) or `until` (monotonic) passes
        (False)."""
        while time.monotonic() < until:
            try:
                msg = self.read_message()
            except TimeoutError:
                continue
            if msg is None:
                return True
            self.answer(*msg)
        return False

    def programmed(self) -> bool:
        """Did the controller send this peer any flow or bundle message?"""
        return any(t in (FLOW_MOD, EXPERIMENTER) for t, _ in self.received)
