"""`nwc weave|fabric|ivns|events` against the REST API served by uvicorn on a loopback port
in this process (`nwc.api.serve`, as `nwc run` starts it). The token always travels in
NWC_TOKEN, never on a command line."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from api_harness import EagerPart, Harness, ManualPart
from certfiles import certificate_and_key_pem

import nwc.api as api_module
from nwc.api import ApiServer, ApiSettings, serve
from nwc.cli import build_parser, main
from nwc.client import (
    EXIT_DENIED,
    EXIT_FAILED,
    EXIT_UNAUTHENTICATED,
    EXIT_UNREACHABLE,
    ApiClient,
    event_line,
    stats_lines,
)
from nwc.ofapp import SwitchConnection

pytestmark = pytest.mark.unit


@dataclass
class Served:
    harness: Harness
    server: ApiServer
    url: str


@pytest.fixture
def make_served(make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
                ) -> Callable[..., Served]:
    def make(who: str = "acme", **kw: object) -> Served:
        h = make_harness(**kw)
        if kw.get("settings") is not None:  # the served API gets the harness's limits too
            monkeypatch.setattr(api_module, "settings_from", lambda args: kw["settings"])
        server = serve(h.controller, argparse.Namespace(api_host="127.0.0.1", api_port=0))
        url = f"http://127.0.0.1:{server.port}"
        monkeypatch.setenv("NWC_API_URL", url)
        monkeypatch.setenv("NWC_TOKEN", h.tokens[who])
        return Served(h, server, url)
    return make


@pytest.fixture
def served(make_served: Callable[..., Served]) -> Served:
    return make_served(parts=(EagerPart(),))


def nwc(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_create_list_show_extend_delete(served: Served,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration",
                         "600", "--bandwidth", "20")
    assert code == 0
    assert "wv-000001: admitted, provisioning" in err  # progress on stderr...
    assert "state      active" in out and "h1 > s1 > s2 > h2" in out  # ...the result on stdout
    code, out, _ = nwc(capsys, "weave", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "REQUESTER"]
    assert row.split()[:4] == ["wv-000001", "active", "acme-web", "globex-db"]
    code, out, _ = nwc(capsys, "weave", "show", "wv-000001", "--json")
    assert code == 0 and json.loads(out)["security_profile"] == "gold"
    code, out, _ = nwc(capsys, "weave", "extend", "wv-000001", "--duration", "60", "--json")
    assert code == 0 and json.loads(out)["expires_at"].startswith("2026-01-01T00:11:00")
    code, out, _ = nwc(capsys, "weave", "delete", "wv-000001")
    assert code == 0 and out.strip() == "wv-000001: terminated (requested)"
    code, out, _ = nwc(capsys, "weave", "list", "--json", "--state", "active")
    assert code == 0 and json.loads(out) == []


def test_json_output_is_the_api_answer(served: Served,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration",
                         "600", "--bandwidth", "5", "--json")
    assert code == 0 and err == ""  # nothing but JSON: scripts parse stdout
    weave = json.loads(out)
    assert weave["id"] == "wv-000001" and weave["state"] == "active"


def test_denied_exits_3_with_the_reason(served: Served,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration",
                         "600", "--bandwidth", "35")
    assert code == EXIT_DENIED
    assert out == "" and "denied: insufficient_bandwidth: link s1-s2" in err
    code, _, err = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration",
                       "600", "--bandwidth", "5", "--profile", "silver")
    assert code == EXIT_DENIED and "policy_violation" in err
    # An IVN the tenant may not see is denied as one that does not exist.
    code, _, err = nwc(capsys, "weave", "create", "acme-web", "globex-lab", "--duration",
                       "600", "--bandwidth", "5")
    assert code == EXIT_DENIED and "unknown_ivn: target IVN 'globex-lab' does not exist" in err


def test_failed_exits_4(make_served: Callable[..., Served],
                        capsys: pytest.CaptureFixture[str]) -> None:
    make_served(parts=(EagerPart(fail_with="IKE_SA_INIT refused"),))
    code, out, err = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration",
                         "600", "--bandwidth", "5")
    assert code == EXIT_FAILED
    assert "failed (provision_failed)" in out
    # Which part failed and why, not only the reason's name (a deploy-guide tester had to
    # read the controller's log for it).
    assert "wv-000001 failed: provision_failed: eager: IKE_SA_INIT refused" in err
    assert "IKE_SA_INIT refused" in out  # `weave show`'s state line says it too


def test_still_provisioning_after_the_wait_exits_4(make_served: Callable[..., Served],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    make_served(parts=(ManualPart(),))
    code, _, err = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration", "600",
                       "--bandwidth", "5", "--wait-timeout", "0.3")
    assert code == EXIT_FAILED and "still provisioning" in err


def test_no_wait_answers_once_admitted(make_served: Callable[..., Served],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    make_served(parts=(ManualPart(),))
    code, out, _ = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration", "600",
                       "--bandwidth", "5", "--no-wait", "--json")
    assert code == 0 and json.loads(out)["state"] == "provisioning"


def test_unreachable_exits_5(monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NWC_TOKEN", "nwc_" + "a" * 43)
    code, _, err = nwc(capsys, "weave", "list", "--api-url", f"http://127.0.0.1:{port}")
    assert code == EXIT_UNREACHABLE and "unreachable" in err


def test_unauthenticated_exits_6(served: Served, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NWC_TOKEN", "nwc_" + "a" * 43)
    code, _, err = nwc(capsys, "weave", "list")
    assert code == EXIT_UNAUTHENTICATED and "not valid" in err
    monkeypatch.delenv("NWC_TOKEN")
    code, _, err = nwc(capsys, "fabric")
    assert code == EXIT_UNAUTHENTICATED and "NWC_TOKEN" in err


def test_bad_input_exits_1_field_by_field(served: Served,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = nwc(capsys, "weave", "create", "Acme", "globex-db", "--duration", "60",
                       "--bandwidth", "5")
    assert code == 1 and "body.requester" in err
    assert err.count("body.requester") == 1, err  # the field line, not the detail as well
    assert err.splitlines()[0] == "nwc: error: invalid_request:"
    code, _, err = nwc(capsys, "weave", "show", "wv-000404")
    assert code == 1 and "unknown_weave" in err


def test_fabric_and_ivns_tables(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration", "600",
        "--bandwidth", "20")
    code, out, _ = nwc(capsys, "fabric")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["s1-s2"] == ["s1-s2", "60", "30", "20", "10", "up"]
    code, out, _ = nwc(capsys, "ivns")
    assert code == 0
    assert any(line.split()[:3] == ["acme-web", "acme", "yes"] for line in out.splitlines())


def test_fabric_lists_each_switchs_connection(
        make_served: Callable[..., Served], capsys: pytest.CaptureFixture[str]) -> None:
    """Found deploying: with s1 and s2 refused, `nwc fabric` showed every link up and nothing
    else; a link's state is its last known port state, the switches' table says the rest."""
    served = make_served(who="admin", parts=(EagerPart(),))
    served.harness.controller.switch_sources.append(lambda: {
        "s1": SwitchConnection("fabric", False, "not connected: refused for its certificate"),
        "h1": SwitchConnection("host", True, "connected")})
    code, out, _ = nwc(capsys, "fabric")
    assert code == 0
    links, switches = out.split("\n\n")
    assert "s1-s2" in links
    assert switches.splitlines() == [
        "SWITCH  KIND    CONNECTED  DETAIL",
        "h1      host    yes        connected",
        "s1      fabric  NO         not connected: refused for its certificate"]


def test_token_file_instead_of_the_environment(served: Served, tmp_path: object,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    token_file = Path(str(tmp_path)) / "token"
    token_file.write_text(served.harness.tokens["admin"] + "\n")
    monkeypatch.delenv("NWC_TOKEN")
    code, out, _ = nwc(capsys, "fabric", "--token-file", str(token_file))
    assert code == 0 and "WEAVES" in out  # the operator's view


def test_events_follow_changes_live(served: Served,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    result: dict[str, int] = {}
    follower = threading.Thread(
        target=lambda: result.setdefault("code", main(["events", "--count", "2"])))
    follower.start()
    deadline = time.monotonic() + 10  # bounds a broken run; nothing is asserted on time
    while served.server.api.hub.count() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.server.api.hub.count() == 1  # subscribed: what happens next is streamed
    served.harness.create()
    follower.join(10)
    assert result.get("code") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1:3] for line in lines] == [
        ["weave.state", "wv-000001"], ["weave.state", "wv-000001"]]
    assert "provisioning" in lines[0] and "active" in lines[1]


def test_an_event_line_says_who_ended_a_weave_and_why() -> None:
    weave = {"id": "wv-000007", "state": "failed", "reason": "policy_withdrawn",
             "requester": "acme-web", "target": "globex-db", "ended_by": "operator"}
    line = event_line("weave.state", {"ts": "T", "weave": weave,
                                      "detail": "IVN acme-web no longer allows profile gold"})
    assert line == ("T  weave.state      wv-000007 failed (policy_withdrawn) acme-web <-> "
                    "globex-db, ended by operator: IVN acme-web no longer allows profile gold")
    live = {**weave, "state": "active", "reason": None, "ended_by": None}
    assert event_line("weave.state", {"ts": "T", "weave": live, "detail": None}).endswith(
        "wv-000007 active acme-web <-> globex-db")


def test_waiting_when_the_server_holds_no_answer_asks_with_a_pause(
        make_served: Callable[..., Served], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # No wait slots: every ?wait=true is answered at once, still provisioning.
    make_served(parts=(ManualPart(),), settings=ApiSettings(max_waiters=0))
    asks: list[float] = []
    ask = ApiClient.weave

    def counted(self: ApiClient, *args: Any, **kw: Any) -> dict[str, Any]:
        asks.append(time.monotonic())
        answer = ask(self, *args, **kw)
        return answer

    monkeypatch.setattr(ApiClient, "weave", counted)
    code, _, err = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration", "600",
                       "--bandwidth", "5", "--wait-timeout", "1.2")
    assert code == EXIT_FAILED and "still provisioning" in err  # not rate_limited (3)
    assert 2 <= len(asks) <= 4  # 0.5 s, then 1 s between asks: not a tight loop


def test_over_the_rate_while_waiting_waits_retry_after_and_goes_on(
        make_served: Callable[..., Served], capsys: pytest.CaptureFixture[str]) -> None:
    # Two requests in the burst: the create and one ask; the next ask is rate_limited.
    part = ManualPart()
    served = make_served(parts=(part,), settings=ApiSettings(max_waiters=0, rate_burst=2))

    def becomes_active() -> None:
        while not part.up:
            time.sleep(0.01)
        time.sleep(0.3)
        served.harness.tick(5)  # the tenant's bucket refills
        part.report_ready(part.up[0])

    threading.Thread(target=becomes_active, daemon=True).start()
    code, out, err = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration",
                         "600", "--bandwidth", "5", "--wait-timeout", "10", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "active"


def test_a_weave_ended_by_the_other_party_while_waiting_exits_4(
        make_served: Callable[..., Served], capsys: pytest.CaptureFixture[str]) -> None:
    part = ManualPart()
    served = make_served(parts=(part,))

    def target_ends_it() -> None:
        while not part.up:
            time.sleep(0.01)
        served.harness.request("DELETE", f"/v1/weaves/{part.up[0]}", "globex")

    threading.Thread(target=target_ends_it, daemon=True).start()
    code, out, err = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration",
                         "600", "--bandwidth", "5", "--wait-timeout", "10", "--json")
    assert json.loads(out)["state"] == "terminated"
    assert code == EXIT_FAILED and "ended before it became active" in err


def one_answer_server(reply: bytes) -> str:
    """A loopback listener that answers one connection with `reply`, then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(reply)

    threading.Thread(target=answer, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_an_event_stream_that_drops_before_count_exits_5(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ready = b'event: ready\ndata: {"principal": "acme"}\n\n'
    url = one_answer_server(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                            b"transfer-encoding: chunked\r\n\r\n"
                            + f"{len(ready):x}\r\n".encode() + ready + b"\r\n")
    monkeypatch.setenv("NWC_TOKEN", "nwc_" + "a" * 43)
    code, _, err = nwc(capsys, "events", "--count", "3", "--api-url", url)
    assert code == EXIT_UNREACHABLE and "ended after 0 events" in err


def test_a_service_that_does_not_speak_http_exits_5(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = one_answer_server(b"SSH-2.0-OpenSSH_9.6\r\n")
    monkeypatch.setenv("NWC_TOKEN", "nwc_" + "a" * 43)
    code, _, err = nwc(capsys, "fabric", "--api-url", url)
    assert code == EXIT_UNREACHABLE and "unreachable" in err


def test_argument_errors_name_no_internal_function(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["weave", "extend", "wv-000001", "--duration", "1.5"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "argument --duration: expected a whole number, got '1.5'" in err
    assert "_positive" not in err
    with pytest.raises(SystemExit):
        main(["weave", "list", "--timeout", "soon"])
    assert "argument --timeout: expected a number, got 'soon'" in capsys.readouterr().err


def test_help_describes_the_command_not_the_code() -> None:
    text = build_parser().format_help()
    assert "Network Weaver Controller" in text and "COMMAND_MODULES" not in text


def test_list_shows_when_an_ended_weave_ended(served: Served,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration", "600",
        "--bandwidth", "5")
    served.harness.clock.advance(30)
    nwc(capsys, "weave", "delete", "wv-000001")
    _, out, _ = nwc(capsys, "weave", "show", "wv-000001", "--json")
    weave = json.loads(out)
    code, out, _ = nwc(capsys, "weave", "list")
    assert code == 0
    header, row = (line.split() for line in out.splitlines())
    assert header[6] == "ENDS" and row[6] == weave["ended_at"] != weave["expires_at"]


def test_stats_are_lines_not_a_python_repr() -> None:
    end = {"phase": "up", "ike_state": "ESTABLISHED", "child_state": "INSTALLED",
           "encryption": "AES_GCM_16", "key_bits": 256, "dh_group": "CURVE_25519",
           "bytes_in": 10, "bytes_out": 20, "rekeys": 0}
    measured = {"sa_state": "established", "rekeys": 0, "bytes_requester_to_target": 5,
                "tunnel_legs": [{"slot": 0, "device": "nwv0", "requester_host": "h1",
                                 "target_host": "h2", "auth": "psk", "installed": True,
                                 "rekeying": False, "ends": {"h2": end, "h1": end}}]}
    lines = stats_lines(measured)
    assert lines[:3] == ["bytes_requester_to_target  5", "rekeys                     0",
                         "sa_state                   established"]
    assert lines[3] == "leg 0: h1 <-> h2 (nwv0, psk, installed yes, rekeying no)"
    assert lines[4].startswith("  h1: phase up, ike_state ESTABLISHED, child_state INSTALLED,")
    assert lines[5].startswith("  h2: ") and len(lines) == 6
    assert not any("{" in line or "'" in line for line in lines)


def test_an_untrusted_api_certificate_is_named_not_called_unreachable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A deploy-guide tester was told "unreachable: no answer" by a controller that answered
    with a certificate from a CA they had not given: say that, and what to give."""
    now = dt.datetime.now(dt.UTC)
    cert, key = certificate_and_key_pem("nwc-api", now - dt.timedelta(days=1),
                                        now + dt.timedelta(days=1), dns_name="localhost")
    (tmp_path / "api.crt").write_bytes(cert)
    (tmp_path / "api.key").write_bytes(key)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "api.crt", tmp_path / "api.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def handshake_once() -> None:
        with listener:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), tls.wrap_socket(conn, server_side=True):
                pass  # the client gives up in the handshake

    threading.Thread(target=handshake_once, daemon=True).start()
    monkeypatch.setenv("NWC_TOKEN", "nwc_" + "a" * 43)
    monkeypatch.delenv("NWC_API_CA", raising=False)
    url = f"https://localhost:{listener.getsockname()[1]}"
    code, _, err = nwc(capsys, "fabric", "--api-url", url)
    assert code == EXIT_UNREACHABLE
    assert "not trusted" in err and "--ca-file" in err and "no answer" not in err
