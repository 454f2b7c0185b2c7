"""Packet sizes: how a VM's full-size frame fits the underlay, in the IVN overlay and in a weave
leg (VXLAN inside ESP). Pure arithmetic, shared by the topology check (`underlay.mtu` must hold
what the policy's profiles need) and the tunnel specs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A VM keeps MTU 1500. Its frame crosses the weave inside VXLAN (outer IPv4 20 + UDP 8 + VXLAN
# 8 + the inner Ethernet header 14 = 50 bytes) inside ESP in tunnel mode, UDP-encapsulated
# (outer IPv4 20 + UDP 8 + SPI/sequence 8 + IV + padding + pad length/next header 2 + ICV).
VM_MTU = 1500
VXLAN_OVERHEAD = 20 + 8 + 8 + 14
IPV4_HEADER = 20
UDP_HEADER = 8
ESP_HEADER = 8  # SPI + sequence number
ESP_TRAILER = 2  # pad length + next header
# kernel-libipsec's TUN device (ipsec0) has a fixed MTU of 1400 (strongSwan 5.9 has no option
# to change it, and its read buffer is sized from it, so raising it with `ip link` would
# truncate packets). VXLAN packets above it are fragmented *inside* the tunnel: the VXLAN
# outer header does not set DF, the peer reassembles before decapsulating, and the tenant's
# own packet is never fragmented.
LIBIPSEC_TUN_MTU = 1400

_IV = {"gcm": 8, "ccm": 8, "chacha20poly1305": 8, "ctr": 8, "cbc": 16}
_PAD_BLOCK = {"gcm": 4, "ccm": 4, "chacha20poly1305": 4, "ctr": 4, "cbc": 16}
_ICV = {"sha256": 16, "sha384": 24, "sha512": 32}


def _cipher_family(token: str) -> str | None:
    if token == "chacha20poly1305":
        return token
    m = re.fullmatch(r"aes(128|192|256)(gcm|ccm)(8|12|16)|aes(128|192|256)(ctr)?", token)
    if not m:
        return None
    return m.group(2) or m.group(5) or "cbc"


def esp_overhead(proposal: str) -> int:
    """Worst-case bytes ESP (tunnel mode, UDP-encapsulated) adds to a packet, for one
    strongSwan ESP proposal such as `aes256gcm16-x25519` or `aes128-sha256`."""
    tokens = proposal.lower().split("-")
    family, icv = None, 0
    for token in tokens:
        fam = _cipher_family(token)
        if fam:
            family = fam
            if fam in ("gcm", "ccm"):
                icv = int(re.search(r"(8|12|16)$", token).group(1))  # type: ignore[union-attr]
            elif fam == "chacha20poly1305":
                icv = 16
        elif token in _ICV:
            icv = _ICV[token]
    if family is None:
        raise ValueError(f"{proposal!r} names no cipher NWC knows")
    return (IPV4_HEADER + UDP_HEADER + ESP_HEADER + _IV[family] + (_PAD_BLOCK[family] - 1)
            + ESP_TRAILER + icv)


@dataclass(frozen=True)
class MtuPlan:
    """How a weave's packets fit the underlay. Nothing a tenant sends is fragmented or
    black-holed: the VM MTU stays 1500, the VXLAN device carries full 1500-byte frames, and the
    underlay must carry the encrypted result."""

    vm_mtu: int
    esp_overhead: int  # worst case over the profile's ESP proposals
    underlay_mtu: int

    @property
    def vxlan_packet(self) -> int:
        """The VXLAN packet (an IP packet between the VTEPs) of a full-size VM frame."""
        return self.vm_mtu + VXLAN_OVERHEAD

    @property
    def kernel_esp_packet(self) -> int:
        """On the underlay, with kernel ESP: the whole VXLAN packet in one ESP packet."""
        return self.vxlan_packet + self.esp_overhead

    @property
    def libipsec_fragments(self) -> bool:
        """Whether kernel-libipsec splits a full-size VXLAN packet in two inside ESP."""
        return self.vxlan_packet > LIBIPSEC_TUN_MTU

    @property
    def libipsec_esp_packet(self) -> int:
        return min(self.vxlan_packet, LIBIPSEC_TUN_MTU) + self.esp_overhead

    @property
    def underlay_mtu_needed(self) -> int:
        """The smallest underlay MTU that carries every ESP packet of this leg unfragmented."""
        return max(self.kernel_esp_packet, self.libipsec_esp_packet)

    @property
    def fits_underlay(self) -> bool:
        """No ESP packet is ever fragmented on the underlay (kernel ESP or kernel-libipsec)."""
        return self.underlay_mtu_needed <= self.underlay_mtu


def mtu_plan(esp_proposals: tuple[str, ...], underlay_mtu: int, vm_mtu: int = VM_MTU) -> MtuPlan:
    return MtuPlan(vm_mtu, max(esp_overhead(p) for p in esp_proposals), underlay_mtu)
