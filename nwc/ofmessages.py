"""Plain-data flows and meters (`pipeline.py`) as os-ken OpenFlow 1.3 messages, and as
`ovs-ofctl` text (the benchmark installs exactly the same flows both ways; humans read it).

Pure: building a message needs no connection; `datapath` is only carried along by os-ken.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from nwc.pipeline import (
    KIND_SHIFT,
    KIND_WEAVE,
    OFPP_IN_PORT,
    OWNER_MASK,
    DecTtl,
    Flow,
    Meter,
    Move,
    Output,
    Program,
    SetField,
)

BUNDLE_FLAGS = ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED


def _action(action: Any) -> Any:
    if isinstance(action, Output):
        return parser.OFPActionOutput(action.port, 0)
    if isinstance(action, SetField):
        return parser.OFPActionSetField(**{action.field: action.value})
    if isinstance(action, Move):
        return parser.NXActionRegMove(src_field=action.src, dst_field=action.dst,
                                      n_bits=action.bits)
    if isinstance(action, DecTtl):
        return parser.OFPActionDecNwTtl()
    raise TypeError(f"unknown action {action!r}")


def instructions(flow: Flow) -> list[Any]:
    out: list[Any] = []
    if flow.meter is not None:
        out.append(parser.OFPInstructionMeter(flow.meter, ofp.OFPIT_METER))
    if flow.actions:
        out.append(parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS,
                                                [_action(a) for a in flow.actions]))
    if flow.metadata is not None:
        out.append(parser.OFPInstructionWriteMetadata(flow.metadata, 2**64 - 1))
    if flow.goto is not None:
        out.append(parser.OFPInstructionGotoTable(flow.goto))
    return out


def flow_mod(datapath: Any, flow: Flow, command: int = ofp.OFPFC_ADD) -> Any:
    return parser.OFPFlowMod(
        datapath, cookie=flow.cookie, cookie_mask=0, table_id=flow.table, command=command,
        idle_timeout=0, hard_timeout=flow.hard_timeout, priority=flow.priority,
        buffer_id=ofp.OFP_NO_BUFFER, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
        flags=0, match=parser.OFPMatch(**dict(flow.match)), instructions=instructions(flow))


def delete_owner_mod(datapath: Any, cookie: int) -> Any:
    """Delete every flow of one owner (all tables), whatever its role byte."""
    return parser.OFPFlowMod(
        datapath, cookie=cookie & OWNER_MASK, cookie_mask=OWNER_MASK, table_id=ofp.OFPTT_ALL,
        command=ofp.OFPFC_DELETE, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
        match=parser.OFPMatch())


def delete_kind_mod(datapath: Any, kind: int) -> Any:
    """Delete every flow whose owner is of one kind (`KIND_WEAVE`: every weave's), all tables."""
    mask = 0xFF << KIND_SHIFT
    return parser.OFPFlowMod(
        datapath, cookie=kind << KIND_SHIFT, cookie_mask=mask, table_id=ofp.OFPTT_ALL,
        command=ofp.OFPFC_DELETE, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
        match=parser.OFPMatch())


def delete_all_mod(datapath: Any) -> Any:
    return parser.OFPFlowMod(datapath, table_id=ofp.OFPTT_ALL, command=ofp.OFPFC_DELETE,
                             out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
                             match=parser.OFPMatch())


def meter_mod(datapath: Any, meter: Meter, command: int = ofp.OFPMC_ADD) -> Any:
    band = parser.OFPMeterBandDrop(rate=meter.kbps, burst_size=meter.burst_kbits)
    return parser.OFPMeterMod(datapath, command=command,
                              flags=ofp.OFPMF_KBPS | ofp.OFPMF_BURST | ofp.OFPMF_STATS,
                              meter_id=meter.meter_id, bands=[band])


def meter_delete(datapath: Any, meter_id: int) -> Any:
    return parser.OFPMeterMod(datapath, command=ofp.OFPMC_DELETE, flags=0, meter_id=meter_id,
                              bands=[])


def bundle(datapath: Any, bundle_id: int, messages: Sequence[Any]) -> list[Any]:
    """Open, add every message, commit: one atomic, ordered change. A failing message fails
    the commit and the switch keeps its tables as they were."""
    out = [parser.ONFBundleCtrlMsg(datapath, bundle_id, ofp.ONF_BCT_OPEN_REQUEST, BUNDLE_FLAGS,
                                   [])]
    out += [parser.ONFBundleAddMsg(datapath, bundle_id, BUNDLE_FLAGS, m, []) for m in messages]
    out.append(parser.ONFBundleCtrlMsg(datapath, bundle_id, ofp.ONF_BCT_COMMIT_REQUEST,
                                       BUNDLE_FLAGS, []))
    return out


# -- ovs-ofctl text ----------------------------------------------------------------------------

OFCTL_FIELD = {"tun_ipv4_dst": "tun_dst", "tun_ipv4_src": "tun_src", "icmpv4_type": "icmp_type",
               "ipv4_src": "nw_src", "ipv4_dst": "nw_dst", "eth_type": "dl_type",
               "eth_src": "dl_src", "eth_dst": "dl_dst", "ip_proto": "nw_proto",
               "tunnel_id": "tun_id"}


def _value(value: Any) -> str:
    if isinstance(value, tuple):
        if isinstance(value[0], int):
            return f"{value[0]:#x}/{value[1]:#x}"
        return f"{value[0]}/{value[1]}"
    return str(value)


def _ofctl_action(action: Any) -> str:
    if isinstance(action, Output):
        return "in_port" if action.port == OFPP_IN_PORT else f"output:{action.port}"
    if isinstance(action, SetField):
        return f"set_field:{_value(action.value)}->{OFCTL_FIELD.get(action.field, action.field)}"
    if isinstance(action, Move):
        src = OFCTL_FIELD.get(action.src, action.src)
        dst = OFCTL_FIELD.get(action.dst, action.dst)
        return f"move:{src}[0..{action.bits - 1}]->{dst}[0..{action.bits - 1}]"
    if isinstance(action, DecTtl):
        return "dec_ttl"
    raise TypeError(f"unknown action {action!r}")


def ofctl_flow(flow: Flow) -> str:
    """One line of `ovs-ofctl add-flows` input."""
    parts = [f"table={flow.table}", f"priority={flow.priority}", f"cookie={flow.cookie:#x}"]
    if flow.hard_timeout:
        parts.append(f"hard_timeout={flow.hard_timeout}")
    parts += [f"{OFCTL_FIELD.get(k, k)}={_value(v)}" for k, v in flow.match]
    acts = [f"meter:{flow.meter}"] if flow.meter is not None else []
    acts += [_ofctl_action(a) for a in flow.actions]
    if flow.metadata is not None:
        acts.append(f"write_metadata:{flow.metadata:#x}")
    if flow.goto is not None:
        acts.append(f"goto_table:{flow.goto}")
    return ",".join(parts) + " actions=" + (",".join(acts) if acts else "drop")


def ofctl_meter(meter: Meter) -> str:
    """The argument of `ovs-ofctl add-meter`."""
    return (f"meter={meter.meter_id},kbps,burst,stats,"
            f"bands=type=drop,rate={meter.kbps},burst_size={meter.burst_kbits}")


def ofctl_flows(flows: Iterable[Flow]) -> str:
    return "".join(ofctl_flow(f) + "\n" for f in flows)


# -- the orders in which changes reach a switch ------------------------------------------------


def _meter_mods(datapath: Any, meters: Iterable[Meter], present: set[int]) -> list[Any]:
    return [meter_mod(datapath, m, ofp.OFPMC_MODIFY if m.meter_id in present else ofp.OFPMC_ADD)
            for m in meters]


def sync_messages(datapath: Any, program: Program, present_meters: set[int],
                  bundle_id: int) -> list[Any]:
    """Make a switch equal to `program` with no window: meters first (flows refer to them),
    then one atomic bundle that deletes every flow and adds every desired one, then the
    meters nothing wants any more (after the flows that used them are gone)."""
    return _replace(datapath, delete_all_mod(datapath), program, present_meters, bundle_id)


def weaves_sync_messages(datapath: Any, program: Program, present_meters: set[int],
                         bundle_id: int) -> list[Any]:
    """`sync_messages` for the weaves alone, every other flow left as it is: one bundle
    deletes every weave's flows (by the kind in their cookies, so also those of weaves NWC no
    longer knows) and adds those of `program`. Only weaves have meters, so every meter
    `program` does not want goes too."""
    return _replace(datapath, delete_kind_mod(datapath, KIND_WEAVE), program, present_meters,
                    bundle_id)


def _replace(datapath: Any, delete: Any, program: Program, present_meters: set[int],
             bundle_id: int) -> list[Any]:
    msgs = _meter_mods(datapath, program.meters, present_meters)
    msgs += bundle(datapath, bundle_id,
                   [delete, *(flow_mod(datapath, f) for f in program.flows)])
    wanted = {m.meter_id for m in program.meters}
    msgs += [meter_delete(datapath, mid) for mid in sorted(present_meters - wanted)]
    return msgs


def install_messages(datapath: Any, program: Program, owner_cookie: int,
                     present_meters: set[int], bundle_id: int) -> list[Any]:
    """Install (or replace) one owner's flows: its meters, then one bundle that removes the
    owner's old flows and adds the new ones, so a moved or extended weave never has a gap."""
    msgs = _meter_mods(datapath, program.meters, present_meters)
    msgs += bundle(datapath, bundle_id,
                   [delete_owner_mod(datapath, owner_cookie),
                    *(flow_mod(datapath, f) for f in program.flows)])
    return msgs


def refresh_messages(datapath: Any, program: Program, bundle_id: int) -> list[Any]:
    """Restart the hard timeouts of one owner's flows, with no gap and without losing their
    counters: an ADD identical to an installed flow replaces it, restarting its timeouts and
    keeping its counters (no OFPFF_RESET_COUNTS; checked on OVS 3.1). One bundle, so a
    refused flow leaves the table as it was. Meters do not expire and are left alone."""
    return bundle(datapath, bundle_id, [flow_mod(datapath, f) for f in program.flows])


def remove_messages(datapath: Any, owner_cookie: int, meter_ids: Iterable[int],
                    bundle_id: int) -> list[Any]:
    """Remove one owner: its flows (bundle) first, then its meters."""
    msgs = bundle(datapath, bundle_id, [delete_owner_mod(datapath, owner_cookie)])
    msgs += [meter_delete(datapath, mid) for mid in sorted(meter_ids)]
    return msgs
