"""Byte strings the malformed-OpenFlow functional test sends (no tests here). What real
ovs-vswitchd sends is captured live: see the bundle-reply test in test_flows_ovs.py."""

from __future__ import annotations

import struct

GARBAGE = b"GET / HTTP/1.1\r\nHost: nwc\r\n\r\n" + bytes(range(256))
# Ryu issue tracker reproducer: a hello element of length 0 loops the unguarded parser.
HELLO_ZERO_ELEMENT = bytes.fromhex("04000010000000130001000000000010")
# A flow-stats multipart reply whose first entry has length 0.
MULTIPART_ZERO_LENGTH_BODY = struct.pack("!BBHIHH4x", 4, 19, 16 + 8, 7, 1, 0) + b"\x00" * 8
