"""`nwc audit verify` on a log the API wrote, after each kind of tampering; `nwc token`."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from api_harness import Harness

from nwc import audit as audit_module
from nwc.auth import TOKEN_SHAPE, TokenStore
from nwc.cli import main
from nwc.store import Store

pytestmark = pytest.mark.unit


@pytest.fixture
def audit_lines(harness: Harness) -> list[str]:
    """A real log: a weave created, read, extended, refused, deleted; an anonymous call."""
    wid = harness.create().json()["id"]
    harness.request("GET", f"/v1/weaves/{wid}")
    harness.request("POST", f"/v1/weaves/{wid}/extend", json={"duration_s": 60})
    harness.create(bandwidth_mbps=500)
    harness.request("GET", "/v1/weaves", None)
    harness.request("DELETE", f"/v1/weaves/{wid}")
    harness.audit()  # flushed
    lines = (harness.state_dir / "audit.jsonl").read_text().splitlines()
    assert len(lines) >= 6
    return lines


def verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def tampered(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "tampered.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_an_intact_log_verifies(harness: Harness, audit_lines: list[str],
                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out = verify(capsys, "--state-dir", str(harness.state_dir))
    assert code == 0 and f"{len(audit_lines)} records, chain intact" in out


def test_an_edited_record_is_named(tmp_path: Path, audit_lines: list[str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    record = json.loads(audit_lines[2])
    record["outcome"] = "denied" if record["outcome"] != "denied" else "admitted"
    lines = [*audit_lines[:2], json.dumps(record, sort_keys=True), *audit_lines[3:]]
    code, out = verify(capsys, "--file", tampered(tmp_path, lines))
    assert code == 1
    assert "line 3: record 3: contents do not match its hash (edited)" in out
    assert "record 4" not in out  # the records after it are still linked to it


def test_a_deleted_record_is_named(tmp_path: Path, audit_lines: list[str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    lines = [*audit_lines[:2], *audit_lines[3:]]
    code, out = verify(capsys, "--file", tampered(tmp_path, lines))
    assert code == 1
    assert "line 3: record 4: record 3 before it is missing (deleted)" in out


def test_reordered_records_are_named(tmp_path: Path, audit_lines: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    lines = [audit_lines[0], audit_lines[2], audit_lines[1], *audit_lines[3:]]
    code, out = verify(capsys, "--file", tampered(tmp_path, lines))
    assert code == 1
    assert "line 2: record 3: out of order: record 2 should come before it (reordered)" in out
    assert "line 3: record 2: out of order" in out


def test_records_cut_from_the_end_are_named_against_the_database(
        harness: Harness, audit_lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A file that ends where the database's chain passes may only lag behind it (a full
    disk: the controller appends at its next commit): it is not called "deleted"."""
    path = harness.state_dir / "audit.jsonl"
    path.write_text("\n".join(audit_lines[:-2]) + "\n")
    n = len(audit_lines)
    code, out = verify(capsys, "--state-dir", str(harness.state_dir))
    assert code == 1
    assert (f"after line {n - 2} (the last): records {n - 1}..{n} are in the database but not "
            "yet in the file") in out
    assert "deleted" not in out and "chain broken" not in out
    assert f"the file is behind the database ({n - 2} records, chain intact" in out


def test_records_cut_from_a_file_that_disagrees_with_the_database_are_deleted(
        harness: Harness, audit_lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The file's last record, forged with a valid hash and link, is not the database's."""
    from nwc.audit import seal

    last = json.loads(audit_lines[-3])
    _, forged = seal({**last, "outcome": "forged"}, last["prev"])
    path = harness.state_dir / "audit.jsonl"
    path.write_text("\n".join([*audit_lines[:-3], forged]) + "\n")
    n = len(audit_lines)
    code, out = verify(capsys, "--state-dir", str(harness.state_dir))
    assert code == 1
    assert (f"after line {n - 2} (the last): records {n - 1}..{n} are missing from the end "
            "of the file (deleted): the database holds them, and the file's last record "
            "differs") in out
    assert "chain broken" in out


def test_a_record_committed_between_the_two_reads_is_no_problem(
        harness: Harness, audit_lines: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Found in review: verify reads the file, then the database; a running controller that
    commits (database first, file next) in between made it report the record deleted."""
    path = harness.state_dir / "audit.jsonl"
    path.write_text("\n".join(audit_lines[:-1]) + "\n")
    read_head = audit_module.database_head

    def controller_appends_meanwhile(db_path: Path) -> tuple[int, str] | None:
        head = read_head(db_path)
        if len(path.read_text().splitlines()) < len(audit_lines):
            path.write_text("\n".join(audit_lines) + "\n")  # its append, after the commit
        return head

    monkeypatch.setattr(audit_module, "database_head", controller_appends_meanwhile)
    n = len(audit_lines)
    code, out = verify(capsys, "--state-dir", str(harness.state_dir))
    assert (code, out.strip()) == (0, f"audit verify: {n} records, chain intact, up to the "
                                      f"database's last record ({n})")


def test_a_cut_last_line_names_no_line_past_the_end(
        harness: Harness, audit_lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Found by a tester: a 7-line file cut to 6 was reported at "line 8"."""
    path = harness.state_dir / "audit.jsonl"
    path.write_text("\n".join(audit_lines[:-1]) + "\n")
    n = len(audit_lines)
    code, out = verify(capsys, "--state-dir", str(harness.state_dir))
    assert code == 1
    assert f"after line {n - 1} (the last): record {n} is in the database but not yet" in out
    assert f"line {n}:" not in out and f"line {n + 1}" not in out


def test_a_cut_file_checked_alone_is_intact_only_up_to_its_last_record(
        harness: Harness, audit_lines: list[str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A truncation at the end leaves an intact chain: without the database, say that the
    end could not be checked rather than just "chain intact"."""
    n = len(audit_lines)
    copy = tampered(tmp_path, audit_lines[:-1])
    code, out = verify(capsys, "--file", copy)
    assert code == 0
    assert (f"{n - 1} records, chain intact up to record {n - 1}; the file alone cannot show "
            "records cut from its end") in out
    # With the controller's database named, the cut is found.
    code, out = verify(capsys, "--file", copy, "--state-dir", str(harness.state_dir))
    assert code == 1 and f"record {n} is in the database but not yet in the file" in out
    # And with the database gone, the state directory's own file is checked alone too.
    (harness.state_dir / "audit.jsonl").write_text("\n".join(audit_lines[:-1]) + "\n")
    (harness.state_dir / "nwc.db").rename(tmp_path / "nwc.db")
    code, out = verify(capsys, "--state-dir", str(harness.state_dir))
    assert code == 0 and "the file alone cannot show records cut from its end" in out


def test_an_intact_log_says_it_ends_where_the_database_does(
        harness: Harness, audit_lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    n = len(audit_lines)
    code, out = verify(capsys, "--state-dir", str(harness.state_dir))
    assert code == 0
    assert f"{n} records, chain intact, up to the database's last record ({n})" in out


def test_records_added_past_the_database_are_named(
        harness: Harness, audit_lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A forged record with a correct hash and link verifies as a chain; the database, which
    never held it, does not."""
    from nwc.audit import seal

    last = json.loads(audit_lines[-1])
    body = {**last, "seq": last["seq"] + 1, "outcome": "admitted"}
    _, text = seal(body, last["hash"])
    (harness.state_dir / "audit.jsonl").write_text("\n".join([*audit_lines, text]) + "\n")
    n = len(audit_lines)
    code, out = verify(capsys, "--state-dir", str(harness.state_dir))
    assert code == 1
    assert (f"line {n + 1}: record {n + 1}: not in the database, whose last record is {n}"
            in out)


# -- nwc token -------------------------------------------------------------------------------

def test_token_issue_prints_only_the_token(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "issue", "acme", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert out.out == token + "\n" and TOKEN_SHAPE.fullmatch(token)
    assert "issued tk-" in out.err and token not in out.err
    store = TokenStore(tmp_path)
    principal = store.authenticate(token)
    assert principal is not None and principal.tenant == "acme"
    tokens_file = tmp_path / "tokens"
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    assert token not in tokens_file.read_text()  # only its hash is kept


def test_admin_tokens_and_listing_without_secrets(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "issue", "admin", "--state-dir", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    principal = TokenStore(tmp_path).authenticate(token)
    assert principal is not None and principal.is_admin
    assert main(["token", "list", "--json", "--state-dir", str(tmp_path)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["principal"] for t in listed] == ["admin"]
    assert set(listed[0]) == {"id", "principal", "created_at"}
    assert main(["token", "revoke", listed[0]["id"], "--state-dir", str(tmp_path)]) == 0
    assert TokenStore(tmp_path).authenticate(token) is None


def test_token_issue_refuses_a_state_dir_that_does_not_exist(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "typo"
    assert main(["token", "issue", "acme", "--state-dir", str(typo)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and f"state directory {typo} does not exist" in out.err
    assert not typo.exists()
    # A directory made for the controller but not yet used by it (a first install) gets
    # its token, with a warning.
    assert main(["token", "issue", "acme", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("nwc_") and "warning" in out.err and "no nwc.db" in out.err
    Store(tmp_path).close()
    assert main(["token", "issue", "acme", "--state-dir", str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_token_issue_refuses_unknown_tenants(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "issue", "umbrella", "--state-dir", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "umbrella" in out.err
    assert not (tmp_path / "tokens").exists()
    # Checked against the shipped examples by default: the message says so, and how not to.
    assert "shipped example policy" in out.err and "--policy" in out.err


def test_token_issue_takes_policy_and_state_dir_from_the_run_config_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A deploy-guide tester's own tenant was refused (checked against the shipped policy)
    and the shipped tenant acme was issued a token their controller did not know: `--config-
    file` takes the policy and state directory `nwc run` uses."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "red.yaml").write_text(
        "tenants:\n  red: {}\n"
        "ivns:\n  red-app:\n    tenant: red\n    vni: 7001\n"
        "    cidrs: [10.71.0.0/24]\n    gateway: 10.71.0.1\n")
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "nwc.conf"
    config.write_text(f"[nwc]\npolicy = {policies}\nstate-dir = {state}\n"
                      "api-port = 8443\n")  # a run-only option is no problem here
    assert main(["token", "issue", "red", "--config-file", str(config)]) == 0
    token = capsys.readouterr().out.strip()
    principal = TokenStore(state).authenticate(token)
    assert principal is not None and principal.tenant == "red"
    assert main(["token", "issue", "acme", "--config-file", str(config)]) == 1
    err = capsys.readouterr().err
    assert "'acme' is neither 'admin' nor a tenant of the policy (tenants: red)" in err


def test_a_loose_tokens_file_is_tightened(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, _ = store.issue("globex")
    os.chmod(tmp_path / "tokens", 0o644)
    assert TokenStore(tmp_path).authenticate(token) is not None
    assert stat.S_IMODE((tmp_path / "tokens").stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_root_managing_tokens_gives_the_files_to_the_state_directory_owner(
        tmp_path: Path) -> None:
    """As docs/deploy.md sets it up: the state directory is the controller user's, and the
    operator may run `nwc token` as root. Found writing that guide: the file was root's."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 4242, 4343)
    token, _ = TokenStore(state).issue("acme")
    for name in ("tokens", "tokens.lock"):
        st = (state / name).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4343, 0o600)
    assert TokenStore(state).authenticate(token) is not None


def make_tokens_unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the tokens file fails as it does for a controller that is not its owner
    (tests run as root, whom file modes do not stop)."""
    real_read = Path.read_text

    def unreadable(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "tokens":
            raise PermissionError(13, "Permission denied")
        return real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", unreadable)


def test_an_unreadable_tokens_file_is_said_once_and_accepts_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Before, every request raised PermissionError: a 500 per request and no word on why."""
    token, _ = TokenStore(tmp_path).issue("acme")
    store = TokenStore(tmp_path)
    make_tokens_unreadable(monkeypatch)
    assert store.authenticate(token) is None
    assert store.authenticate(token) is None
    said = [r for r in caplog.records if "cannot read the tokens file" in r.getMessage()]
    assert len(said) == 1 and "nwc token" in said[0].getMessage()
    monkeypatch.undo()
    time.sleep(0.02)  # file times move in clock ticks: let the fix's ctime differ
    os.chmod(tmp_path / "tokens", 0o600)  # fixed (a chown or chmod changes the ctime)
    assert store.authenticate(token) is not None


def test_a_token_revoked_into_an_unreadable_file_is_not_accepted_any_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running controller had the token loaded; the file was then rewritten (the token
    revoked) by someone whose file the controller cannot read. What it holds now is
    unknown: keeping the tokens loaded before would keep accepting the revoked one."""
    token, record = TokenStore(tmp_path).issue("acme")
    store = TokenStore(tmp_path)
    assert store.authenticate(token) is not None
    time.sleep(0.02)  # file times move in clock ticks
    assert TokenStore(tmp_path).revoke(record.token_id)
    make_tokens_unreadable(monkeypatch)
    assert store.authenticate(token) is None
    assert not store.is_valid(record.token_id)


@pytest.mark.parametrize("presented", ["", "nwc_short", "Bearer nwc_" + "a" * 43,
                                       "nwc_" + "a" * 42 + "!", "x" * 10_000])
def test_malformed_tokens_are_refused(tmp_path: Path, presented: str) -> None:
    store = TokenStore(tmp_path)
    store.issue("acme")
    assert store.authenticate(presented) is None
