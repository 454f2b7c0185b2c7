"""The integration bridge guard: what NWC changes given a host's Bridge, Controller and Manager
rows (pure), and the tunnel part doing it on every host it reads, with events and warnings."""

from __future__ import annotations

import datetime as dt
import logging
import time
import unicodedata
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from fake_parts import TunnelReports
from tunnel_fakes import POLICY, T0, TOPO, FakeHostDb

from nwc.bridgeguard import (
    MAX_LISTED,
    NOTICE_BURST,
    REPEAT_S,
    BridgeRows,
    Fix,
    Notice,
    Notices,
    RemoteRow,
    fixes,
    summary,
)
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


def part_on(tmp_path: Path, dbs: dict[str, FakeHostDb], told: TunnelReports,
            clock: Callable[[], float] = time.monotonic) -> Tunnels:
    return Tunnels(topology=TOPO, policy=lambda: POLICY,
                   ca=CertificateAuthority.load_or_create(tmp_path / "pki", now=T0),
                   reports=told, ovsdb_targets={h: f"unix:{h}" for h in dbs},
                   db_factory=lambda target: dbs[target.split(":")[1]],
                   now=lambda: T0 + dt.timedelta(seconds=1), io_wait_s=10, monotonic=clock)


def one_pass(tmp_path: Path, dbs: dict[str, FakeHostDb],
             caplog: pytest.LogCaptureFixture) -> TunnelReports:
    """One tunnel pass over these hosts, its warnings captured: what admins were told."""
    told = TunnelReports()
    part = part_on(tmp_path, dbs, told)
    try:
        with caplog.at_level(logging.WARNING):
            part.sync()
    finally:
        part.stop()
    return told


def test_the_part_corrects_a_hosts_bridge_warns_and_tells_admins_each_time(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h1, h2 = FakeHostDb(), FakeHostDb()
    h1.bridges["br-int"] = rows(fail_mode="standalone", controllers=(CTL,))
    told = TunnelReports()
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
    part = part_on(tmp_path, {"h1": h1, "h2": h2}, TunnelReports())
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


# -- what a host writes into its own OVSDB reaches the log and admins cleaned and spaced ----

FORGED = ("tcp:192.0.2.1:6653\n2026-11-25 12:00:00,000 WARNING nwc.tunnels: host h2 bridge "
          "br-int: all fine\x1b[2J\u202e")
UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def is_clean(text: str) -> bool:
    return not {unicodedata.category(ch) for ch in text} & UNSAFE


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "nwc.bridgeguard"]


def test_a_controller_target_the_host_wrote_is_cleaned_for_the_log_and_the_event(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: `ovs-vsctl set-controller br-int $'tcp:...\\n<fake log line>\\e[2J'`
    put a forged log line and a terminal escape into NWC's log and the admin event."""
    h1 = FakeHostDb()
    h1.bridges["br-int"] = rows(controllers=(replace(CTL, target=FORGED),))
    told = one_pass(tmp_path, {"h1": h1}, caplog)
    [warned] = warnings_of(caplog)
    [(_, _, fixed, detail)] = told.bridges
    assert is_clean(warned) and is_clean(detail) and is_clean(fixed[0].target or "")
    assert "tcp:192.0.2.1:6653\\x0a2026-11-25" in warned and "all fine\\x1b[2J\\u202e" in detail
    assert h1.bridges["br-int"].controllers[0].connection_mode == "out-of-band"  # still fixed


def test_a_host_with_many_rows_gets_them_all_fixed_and_a_bounded_message(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h1 = FakeHostDb()
    many = tuple(RemoteRow(f"u{i:03d}", f"tcp:192.0.2.{i}:6653", None) for i in range(1, 101))
    h1.bridges["br-int"] = rows(controllers=many)
    told = one_pass(tmp_path, {"h1": h1}, caplog)
    assert {c.connection_mode for c in h1.bridges["br-int"].controllers} == {"out-of-band"}
    [warned] = warnings_of(caplog)
    assert warned.count("connection_mode unset (in-band) -> out-of-band") == MAX_LISTED
    assert f"and {100 - MAX_LISTED} more rows" in warned
    assert len(told.bridges[0][2]) == MAX_LISTED


def test_a_correction_the_host_keeps_undoing_is_said_about_once_a_minute_with_a_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: the guard runs after every read (0.1 s), and a tool setting the old
    value back got a warning and an event each pass."""
    h1 = FakeHostDb()
    clock = [1000.0]
    told = TunnelReports()
    part = part_on(tmp_path, {"h1": h1}, told, clock=lambda: clock[0])
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(11):  # the tool sets it back before every pass
                h1.bridges["br-int"] = replace(h1.bridges["br-int"], fail_mode="standalone")
                part.sync()
                clock[0] += 0.1
            assert h1.journal.count("fix") == 11  # corrected every time
            assert len(told.bridges) == len(warnings_of(caplog)) == 1
            clock[0] = 1000.0 + REPEAT_S
            h1.bridges["br-int"] = replace(h1.bridges["br-int"], fail_mode="standalone")
            part.sync()
    finally:
        part.stop()
    assert len(told.bridges) == len(warnings_of(caplog)) == 2
    assert "the same 10 more times since it was last said" in told.bridges[1][3]
    assert "the same 10 more times" in warnings_of(caplog)[1]


def test_the_same_correction_is_the_same_whatever_the_rows_uuid() -> None:
    notices = Notices()
    fix = Fix("Controller", "uuid-1", "connection_mode", None, "out-of-band", "tcp:192.0.2.1:1")
    assert notices.due([fix], 0.0) == Notice()
    assert notices.due([replace(fix, record="uuid-2")], 1.0) is None  # the row made anew
    assert notices.due([replace(fix, target="tcp:192.0.2.1:2")], 2.0) == Notice()  # another
    assert notices.due([fix], REPEAT_S) == Notice(repeats=1)


def test_a_host_varying_what_it_sets_gets_a_burst_of_messages_then_a_count() -> None:
    """Each new target is a new correction: without a bound per host, varying the text
    would bring back a message per pass."""
    notices = Notices()

    def fix(i: int) -> list[Fix]:
        return [Fix("Manager", f"u{i}", "connection_mode", None, "out-of-band",
                    f"tcp:192.0.2.{i}:6640")]
    said = [notices.due(fix(i), i * 0.1) for i in range(NOTICE_BURST + 20)]
    assert said[:NOTICE_BURST] == [Notice()] * NOTICE_BURST and set(said[NOTICE_BURST:]) == {None}
    assert notices.due(fix(99), REPEAT_S + 0.05) == Notice(held=20)
    assert "20 further corrections on this host made without being said" in summary(
        "h1", "br-int", fix(99), Notice(held=20))


def test_an_error_quoting_the_hosts_text_is_logged_cleaned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h1 = FakeHostDb()

    def refuse(bridge: str) -> BridgeRows:
        raise RuntimeError(f"unexpected row {FORGED}")
    h1.bridge_rows = refuse  # type: ignore[method-assign]
    part = part_on(tmp_path, {"h1": h1}, TunnelReports())
    try:
        with caplog.at_level(logging.ERROR, logger="nwc.tunnels"):
            part.sync()
    finally:
        part.stop()
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "cannot check or correct bridge br-int" in error
    assert is_clean(error) and "all fine\\x1b[2J" in error


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
