"""Packet captures on lab links, and what is on the wire: is anything there in clear?

`Capture` runs tcpdump (by pid) in a namespace, writing a pcap into the lab directory;
`read_pcap` and `classify` tell ARP, IKE, ESP (raw or in UDP 4500), VXLAN and everything else
apart, so a test can say "the underlay carried only IKE and ESP" and "these bytes never
appeared".
"""

from __future__ import annotations

import signal
import struct
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nwc.lab.netns import Lab, Netns, kill_pid, wait_for

ETH_ARP = 0x0806
ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
IKE_PORTS = (500, 4500)
VXLAN_PORT = 4789
# What may cross an underlay that carries weaves: address resolution, IKE, and ESP.
# An ICMP error about an ESP or IKE packet (a host whose charon stopped answers its peer's ESP
# with "port unreachable") quotes only the outer headers and encrypted bytes.
ENCRYPTED_OR_CONTROL = frozenset({"arp", "ike", "esp", "esp-in-udp", "icmp-about-ipsec"})


@dataclass
class Capture:
    lab: Lab
    ns: Netns
    device: str
    name: str
    path: Path = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.path = self.lab.directory("captures") / f"{self.name}.pcap"

    def start(self) -> Capture:
        log = self.path.with_suffix(".log")
        log.unlink(missing_ok=True)
        # --immediate-mode: a capture stopped right after traffic still holds that traffic
        # (buffered packets are lost at SIGINT, which made "nothing in clear" vacuous).
        self._proc = self.ns.popen(["tcpdump", "-n", "-U", "--immediate-mode", "-s", "0",
                                    "-i", self.device,
                                    "-w", str(self.path)], log=log)
        self.lab.process(self._proc, f"tcpdump {self.name}")
        wait_for(lambda: "listening on" in _read(log) or self._proc.poll() is not None, 10,
                 f"tcpdump on {self.device}")
        if self._proc.poll() is not None:
            raise RuntimeError(f"tcpdump on {self.device} failed: {_read(log)}")
        return self

    def stop(self) -> list[bytes]:
        """Stop (SIGINT flushes the file) and return the captured frames."""
        if self._proc is not None:
            try:
                self._proc.send_signal(signal.SIGINT)
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                kill_pid(self._proc.pid)
            self._proc = None
        return read_pcap(self.path)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def read_pcap(path: Path) -> list[bytes]:
    """The frames of a classic pcap file (Ethernet link type)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic == b"\xd4\xc3\xb2\xa1":
        endian = "<"
    elif magic == b"\xa1\xb2\xc3\xd4":
        endian = ">"
    else:
        raise ValueError(f"{path} is not a pcap file")
    frames, offset = [], 24
    while offset + 16 <= len(data):
        _, _, caplen, _ = struct.unpack(endian + "IIII", data[offset:offset + 16])
        offset += 16
        frames.append(data[offset:offset + caplen])
        offset += caplen
    return frames


def classify(frame: bytes) -> str:
    """What one Ethernet frame carries: arp, ike, esp, esp-in-udp, vxlan, ipv6, udp:<port>,
    tcp, icmp, ip:<proto> or other."""
    if len(frame) < 14:
        return "other"
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == ETH_ARP:
        return "arp"
    if ethertype == ETH_IPV6:
        return "ipv6"
    if ethertype != ETH_IPV4 or len(frame) < 34:
        return "other"
    ip = frame[14:]
    header = (ip[0] & 0x0F) * 4
    proto = ip[9]
    if struct.unpack("!H", ip[6:8])[0] & 0x1FFF:  # a non-first fragment: no L4 header
        return f"ip-fragment:{proto}"
    if proto == 50:
        return "esp"
    if proto == 1:
        return _icmp(ip[header:])
    if proto == 6:
        return "tcp"
    if proto != 17:
        return f"ip:{proto}"
    sport, dport = struct.unpack("!HH", ip[header:header + 4])
    payload = ip[header + 8:]
    if VXLAN_PORT in (sport, dport):
        return "vxlan"
    if sport == 4500 or dport == 4500:
        # RFC 3948: a zero "non-ESP marker" means IKE; a one-byte 0xff is a NAT keepalive.
        if payload[:4] == b"\x00\x00\x00\x00" or payload == b"\xff":
            return "ike"
        return "esp-in-udp"
    if sport == 500 or dport == 500:
        return "ike"
    return f"udp:{dport}"


def _icmp(icmp: bytes) -> str:
    if len(icmp) < 8 + 20 or icmp[0] not in (3, 11):  # unreachable, time exceeded
        return "icmp"
    quoted = icmp[8:]
    inner_header = (quoted[0] & 0x0F) * 4
    if quoted[9] == 50:
        return "icmp-about-ipsec"
    if quoted[9] == 17 and len(quoted) >= inner_header + 4:
        sport, dport = struct.unpack("!HH", quoted[inner_header:inner_header + 4])
        if {sport, dport} & set(IKE_PORTS):
            return "icmp-about-ipsec"
    return "icmp"


def summarize(frames: Iterable[bytes]) -> Counter[str]:
    return Counter(classify(f) for f in frames)


def cleartext(frames: Iterable[bytes]) -> Counter[str]:
    """Frames that are neither encrypted nor key exchange/address resolution."""
    return Counter(kind for kind in map(classify, frames) if kind not in ENCRYPTED_OR_CONTROL)


def contains(frames: Iterable[bytes], needle: bytes) -> int:
    """How many frames carry `needle` anywhere (e.g. a tenant payload marker)."""
    return sum(1 for f in frames if needle in f)
