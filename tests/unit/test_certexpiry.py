"""Certificate expiry: the facts per certificate at a given `now`, the log notices (once per
change of state, renewals included), the files `nwc run` would read, and `nwc check-certs`.
Certificates are made in the test, short-lived, against a fake clock."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from certfiles import certificate_pem, key_pem, valid_for

from nwc.certexpiry import (
    CertFile,
    CertWatch,
    Status,
    certificate_facts,
    certificate_files,
    line,
    notices,
)
from nwc.cli import build_parser, main
from nwc.lease import ManualClock

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
THIRTY_DAYS = 30 * DAY


def facts_of(pem: bytes, now: dt.datetime = NOW, use: str = "openflow") -> list:
    return certificate_facts(use, "/etc/nwc/tls/nwc-cert.pem", pem, now, THIRTY_DAYS)


@pytest.mark.parametrize(("days", "status"), [
    (90, Status.OK),
    (10, Status.EXPIRING),
    (-1, Status.EXPIRED),
])
def test_each_certificate_gets_its_state_and_dates(days: float, status: Status) -> None:
    [fact] = facts_of(valid_for("nwc id:1234", NOW, days, serial=0xBEEF))
    assert fact.status is status
    assert fact.subject == "CN=nwc id:1234" and fact.serial == "beef"
    assert fact.use == "openflow" and fact.source == "/etc/nwc/tls/nwc-cert.pem"
    assert fact.not_after == NOW + days * DAY
    assert fact.seconds_left == days * 86400


def test_a_certificate_whose_validity_has_not_begun_is_not_taken_for_valid() -> None:
    [fact] = facts_of(certificate_pem("h1", NOW + DAY, NOW + 400 * DAY))
    assert fact.status is Status.NOT_YET_VALID
    assert "NOT YET VALID" in line(fact)


def test_the_threshold_is_inclusive_and_the_last_second_still_valid() -> None:
    pem = valid_for("api", NOW, 30)
    assert facts_of(pem)[0].status is Status.EXPIRING  # exactly 30 days left
    assert facts_of(pem, NOW - dt.timedelta(seconds=1))[0].status is Status.OK
    end = NOW + THIRTY_DAYS
    assert facts_of(pem, end)[0].status is Status.EXPIRING  # not_after itself is valid
    assert facts_of(pem, end + dt.timedelta(seconds=1))[0].status is Status.EXPIRED


def test_every_certificate_of_a_bundle_is_reported_and_a_key_in_it_never_shown() -> None:
    key = key_pem()
    pem = valid_for("leaf", NOW, 5) + key + valid_for("issuer", NOW, 900)
    facts = facts_of(pem, use="api")
    assert [(f.index, f.subject, f.status) for f in facts] == [
        (0, "CN=leaf", Status.EXPIRING), (1, "CN=issuer", Status.OK)]
    assert facts[1].where.endswith("nwc-cert.pem#1")
    body = key.split(b"\n")[1].decode()
    assert all(body not in line(f) for f in facts)


@pytest.mark.parametrize("content", [b"", b"not a certificate\n", "key"])
def test_a_file_without_a_certificate_is_unreadable_and_says_nothing_of_its_content(
        content: bytes | str) -> None:
    data = key_pem() if content == "key" else content
    assert isinstance(data, bytes)
    [fact] = facts_of(data)
    assert fact.status is Status.UNREADABLE and fact.not_after is None
    assert line(fact).endswith("unreadable: no PEM certificate in it")
    if content == "key":
        assert data.split(b"\n")[1].decode() not in line(fact)


def test_a_corrupt_certificate_block_is_unreadable_the_others_still_reported() -> None:
    good = valid_for("good", NOW, 100)
    broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    facts = facts_of(broken + good)
    assert [(f.index, f.status) for f in facts] == [(0, Status.UNREADABLE), (1, Status.OK)]


def test_notices_come_once_per_change_of_state() -> None:
    pem = valid_for("nwc", NOW, 40)
    seen: dict = {}
    logged = []
    for now in (NOW, NOW + DAY, NOW + 11 * DAY, NOW + 12 * DAY, NOW + 41 * DAY,
                NOW + 42 * DAY):
        facts = facts_of(pem, now)
        logged.append([(n.level, n.message.split(": ", 1)[1].split(" ")[0])
                       for n in notices(seen, facts)])
        seen = {f.key: f for f in facts}
    assert logged == [
        [(logging.INFO, "valid")],  # first sight: said once, at start
        [],
        [(logging.WARNING, "EXPIRES")],  # within 30 days
        [],  # still expiring: not said again
        [(logging.ERROR, "EXPIRED")],
        [],
    ]


def test_a_renewed_file_is_noticed_and_says_when_a_restart_is_needed() -> None:
    old = facts_of(valid_for("nwc", NOW, 10, serial=1))
    before = {f.key: f for f in old}
    renewed = facts_of(valid_for("nwc", NOW, 400, serial=2))
    [notice] = notices(before, renewed)
    assert notice.level == logging.INFO
    assert "replaced on disk" in notice.message and "serial 2" in notice.message
    assert "only after a restart" in notice.message  # the OpenFlow listener read it at start
    ovsdb_before = {f.key: f for f in facts_of(valid_for("nwc", NOW, 10, serial=1),
                                               use="ovsdb")}
    [notice] = notices(ovsdb_before, facts_of(valid_for("nwc", NOW, 400, serial=2),
                                              use="ovsdb"))
    assert "restart" not in notice.message  # python-ovs reads it at each connection


def test_the_files_are_those_nwc_run_reads_and_never_the_keys(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "check-certs", "--ctl-privkey", "/k/of.key", "--ctl-cert", "/c/of.crt",
        "--ca-certs", "/c/switchca.pem", "--ovsdb-ssl-key", "/k/db.key",
        "--ovsdb-ssl-cert", "/c/db.crt", "--ovsdb-ssl-ca", "/c/db-ca.pem",
        "--api-ssl-key", "/k/api.key", "--api-ssl-cert", "/c/api.crt"])
    files = certificate_files(args, tmp_path)
    assert [(f.use, str(f.path)) for f in files] == [
        ("openflow", "/c/of.crt"), ("openflow-ca", "/c/switchca.pem"), ("ovsdb", "/c/db.crt"),
        ("ovsdb-ca", "/c/db-ca.pem"), ("api", "/c/api.crt"),
        ("weave-ca", str(tmp_path / "pki" / "ca.crt"))]


def test_the_watch_reports_the_file_on_disk_after_rotation(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    cert = tmp_path / "nwc-cert.pem"
    cert.write_bytes(valid_for("nwc", NOW, 20, serial=1))
    clock = ManualClock(NOW)
    watch = CertWatch([CertFile("openflow", cert),
                       CertFile("weave-ca", tmp_path / "pki" / "ca.crt", optional=True)],
                      clock, THIRTY_DAYS)
    with caplog.at_level(logging.INFO, logger="nwc.certexpiry"):
        [fact] = watch.check()  # the weave CA does not exist yet: not a problem
        assert fact.status is Status.EXPIRING
        clock.advance(3600)
        watch.check()
        cert.write_bytes(valid_for("nwc", NOW, 400, serial=2))
        [fact] = watch.check()
    assert (fact.serial, fact.status) == ("2", Status.OK)
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(records) == 2
    assert records[0][0] == logging.WARNING and "EXPIRES at 2026-01-21T00:00:00Z" in records[0][1]
    assert records[1][0] == logging.INFO and "replaced on disk" in records[1][1]
    cert.unlink()
    [fact] = watch.check()
    assert fact.status is Status.UNREADABLE and fact.problem == "no such file"


def write_tls_files(tmp_path: Path, days: float) -> Path:
    """Files as deploy.md has them, and an nwc.ini naming them."""
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "nwc-privkey.pem").write_bytes(key_pem())
    (tls / "nwc-cert.pem").write_bytes(valid_for("nwc id:1", NOW, days))
    (tls / "switchca.pem").write_bytes(valid_for("switchca", NOW, 3000))
    (tmp_path / "state" / "pki").mkdir(parents=True)
    (tmp_path / "state" / "pki" / "ca.crt").write_bytes(valid_for("NWC weave CA", NOW, 3000))
    ini = tmp_path / "nwc.ini"
    ini.write_text(f"[nwc]\nstate-dir = {tmp_path / 'state'}\n"
                   f"ctl-privkey = {tls / 'nwc-privkey.pem'}\n"
                   f"ctl-cert = {tls / 'nwc-cert.pem'}\nca-certs = {tls / 'switchca.pem'}\n"
                   f"ovsdb-ssl-key = {tls / 'nwc-privkey.pem'}\n"
                   f"ovsdb-ssl-cert = {tls / 'nwc-cert.pem'}\n"
                   f"ovsdb-ssl-ca = {tls / 'switchca.pem'}\n")
    return ini


def check_certs(*argv: str) -> int:
    from nwc.certexpiry import cmd_check_certs

    args = build_parser().parse_args(["check-certs", *argv])
    return cmd_check_certs(args, ManualClock(NOW))


def test_check_certs_reads_the_config_file_and_fails_within_the_threshold(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ini = write_tls_files(tmp_path, days=20)
    assert check_certs("--config-file", str(ini)) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [ln.split()[:2] for ln in lines] == [
        ["expiring", "openflow"], ["ok", "openflow-ca"], ["expiring", "ovsdb"],
        ["ok", "ovsdb-ca"], ["ok", "weave-ca"]]
    assert "EXPIRES at 2026-01-21T00:00:00Z (in 20 days)" in lines[0]
    assert "2 of 5 certificate(s) need attention (warning 30 days" in err
    key_body = (tmp_path / "tls" / "nwc-privkey.pem").read_text().splitlines()[1]
    assert key_body not in out + err

    # A shorter threshold from the command line beats the file's (none here): all fine.
    assert check_certs("--config-file", str(ini), "--cert-warn-days", "14") == 0
    assert capsys.readouterr().err == ""


def test_check_certs_fails_on_an_expired_certificate(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ini = write_tls_files(tmp_path, days=-2)
    assert check_certs("--config-file", str(ini), "--cert-warn-days", "0") == 1
    assert capsys.readouterr().out.startswith("expired       openflow ")


def test_check_certs_with_nothing_configured_says_so(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert check_certs("--state-dir", str(tmp_path)) == 0
    assert "no certificate configured" in capsys.readouterr().out


def test_check_certs_refuses_what_nwc_run_refuses(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check-certs", "--state-dir", str(tmp_path), "--cert-warn-days", "-1"])
    assert exc.value.code == 2
    assert "--cert-warn-days must be 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check-certs", "--ctl-cert", "/c/of.crt"])  # without its key and CA
    assert "go together" in capsys.readouterr().err
