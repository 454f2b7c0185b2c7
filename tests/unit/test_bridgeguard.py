"""The integration bridge guard: what NWC changes given a host's Bridge, Controller and Manager
rows (pure), and the tunnel part doing it on every host it reads, with events and warnings."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from tunnel_fakes import POLICY, T0, TOPO, FakeHostDb

from nwc.bridgeguard import BridgeRows, Fix, RemoteRow, fixes
from nwc.pki import CertificateAuthority
from nwc.tunnels import Tunnels

pytestmark = pytest.mark.unit

CTL = RemoteRow("0e996714-cfea-4621-8a74-e0cb73c46de1", "ssl:198.51.100.1:6653", None)
CTL2 = RemoteRow("66f52825-328d-49a5-887a-c075de077072", "tcp:127.0.0.1:6653", "in-band")
SAFE_CTL = replace(CTL, connection_mode="out-of-band")


def rows(fail_mode: str | None = "secure", controllers: tuple[RemoteRow, ...] = (SAFE_CTL,),
         managers: tuple[RemoteRow, ...] = ()) -> BridgeRows:
    return BridgeRows("br-int", fail_mode, controllers, managers)


def test_the_deploy_guides_bridge_gets_its_controller_out_of_band() -> None:
    """docs/deploy.md set fail_mode=secure but left connection_mode unset (in-band)."""
    assert fixes(rows(controllers=(CTL,))) == [
        Fix("Controller", CTL.uuid, "connection_mode", None, "out-of-band", CTL.target)]


def test_every_controller_not_out_of_band_is_set_in_order_of_target() -> None:
    wanted = fixes(rows(controllers=(CTL, CTL2, SAFE_CTL)))
    assert [(f.record, f.old) for f in wanted] == [(CTL.uuid, None), (CTL2.uuid, "in-band")]
    assert {f.new for f in wanted} == {"out-of-band"}


@pytest.mark.parametrize("mode", [None, "standalone"])
def test_a_bridge_that_would_fail_open_is_made_secure(mode: str | None) -> None:
    assert fixes(rows(fail_mode=mode)) == [Fix("Bridge", "br-int", "fail_mode", mode, "secure")]


def test_a_safe_bridge_needs_nothing() -> None:
    assert fixes(rows()) == []
    assert fixes(rows(controllers=())) == []


def test_active_managers_are_set_out_of_band_and_passive_ones_left_alone() -> None:
    """An active manager (tcp:, ssl:) puts in-band flows on every bridge; a listening one,
    as the guide's pssl:6640, puts none."""
    active = RemoteRow("a1", "ssl:198.51.100.9:6640", None)
    managers = (RemoteRow("p1", "pssl:6640:198.51.100.11", None),
                RemoteRow("p2", "ptcp:6640", "in-band"), active,
                RemoteRow("a2", "tcp:198.51.100.9:6641", "out-of-band"))
    assert fixes(rows(managers=managers)) == [
        Fix("Manager", "a1", "connection_mode", None, "out-of-band", active.target)]


def test_a_missing_bridge_is_left_to_whoever_creates_it() -> None:
    assert fixes(BridgeRows("br-int", None, (), (), exists=False)) == []


def test_a_fix_says_the_old_value_and_what_unset_means() -> None:
    assert Fix("Bridge", "br-int", "fail_mode", None, "secure").describe() == \
        "fail_mode unset (standalone) -> secure"
    assert Fix("Controller", "u", "connection_mode", "in-band", "out-of-band",
               "tcp:127.0.0.1:6653").describe() == \
        "controller tcp:127.0.0.1:6653 connection_mode in-band -> out-of-band"


# -- the tunnel part guards every host it reads -------------------------------------------


@dataclass
class Told:
    bridges: list[tuple[str, str, list[Fix], str]] = field(default_factory=list)

    def ready(self, weave_id: str) -> None: ...
    def failed(self, weave_id: str, detail: str) -> None: ...
    def security(self, weave_id: str, kind: str, detail: str) -> None: ...
    def down(self, weave_id: str) -> None: ...
    def host(self, host: str, kind: str, up: bool, detail: str) -> None: ...

    def bridge(self, host: str, bridge: str, fixed: list[Fix], detail: str) -> None:
        self.bridges.append((host, bridge, fixed, detail))


def part_on(tmp_path: Path, dbs: dict[str, FakeHostDb], told: Told) -> Tunnels:
    return Tunnels(topology=TOPO, policy=lambda: POLICY,
                   ca=CertificateAuthority.load_or_create(tmp_path / "pki", now=T0),
                   reports=told, ovsdb_targets={h: f"unix:{h}" for h in dbs},
                   db_factory=lambda target: dbs[target.split(":")[1]],
                   now=lambda: T0 + dt.timedelta(seconds=1), io_wait_s=10)


def test_the_part_corrects_a_hosts_bridge_warns_and_tells_admins_each_time(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h1, h2 = FakeHostDb(), FakeHostDb()
    h1.bridges["br-int"] = rows(fail_mode="standalone", controllers=(CTL,))
    told = Told()
    part = part_on(tmp_path, {"h1": h1, "h2": h2}, told)
    try:
        with caplog.at_level(logging.WARNING):
            part.sync()
            assert h1.bridges["br-int"] == rows(fail_mode="secure", controllers=(SAFE_CTL,))
            assert [(h, b, [f.column for f in fx]) for h, b, fx, _ in told.bridges] == [
                ("h1", "br-int", ["fail_mode", "connection_mode"])]
            warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warned) == 1
            assert "host h1 bridge br-int" in warned[0] and "standalone -> secure" in warned[0]
            assert f"{CTL.target} connection_mode unset (in-band) -> out-of-band" in warned[0]
            part.sync()  # nothing wrong any more: nothing said
            assert len(told.bridges) == 1
            # Someone sets it back while NWC runs: found on the next pass, and said again.
            h1.bridges["br-int"] = replace(h1.bridges["br-int"], fail_mode="standalone")
            part.sync()
        assert h1.bridges["br-int"].fail_mode == "secure"
        assert [f.old for f in told.bridges[1][2]] == ["standalone"]
        assert h2.journal.count("fix") == 0
    finally:
        part.stop()


def test_a_bridge_that_cannot_be_read_does_not_stop_the_tunnel_work(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h1, h2 = FakeHostDb(), FakeHostDb()
    h1.failing.add("bridge_rows")
    part = part_on(tmp_path, {"h1": h1, "h2": h2}, Told())
    try:
        with caplog.at_level(logging.INFO, logger="nwc.tunnels"):
            for _ in range(3):
                part.sync()
            h1.failing.clear()
            part.sync()
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "cannot check or correct bridge br-int" in errors[0]
        assert part.host_health()["h1"].ovsdb_up  # its keys were read all the same
        assert any("bridge br-int checked again" in r.getMessage() for r in caplog.records)
    finally:
        part.stop()


def set_controller_commands(markdown: str) -> list[str]:
    """Each `ovs-vsctl set-controller` in the guide's code, continuation lines joined."""
    joined = markdown.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines()
            if line.strip().startswith("ovs-vsctl set-controller")]


def test_every_set_controller_in_the_deploy_guide_is_out_of_band() -> None:
    """In the same command: a moment in-band is enough for OVS to add its flows."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    commands = set_controller_commands(guide)
    assert len(commands) >= 2  # the host's br-int and a fabric switch
    for command in commands:
        bridge = command.split()[2]
        assert f"-- set controller {bridge} connection_mode=out-of-band" in command, command
