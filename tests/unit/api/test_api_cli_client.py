"""`nwc weave|fabric|ivns|events` against the REST API served by uvicorn on a loopback port
in this process (`nwc.api.serve`, as `nwc run` starts it). The token always travels in
NWC_TOKEN, never on a command line."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from api_harness import EagerPart, Harness, ManualPart

from nwc.api import ApiServer, serve
from nwc.cli import main
from nwc.client import EXIT_DENIED, EXIT_FAILED, EXIT_UNAUTHENTICATED, EXIT_UNREACHABLE

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
    code, _, err = nwc(capsys, "weave", "create", "acme-web", "globex-lab", "--duration",
                       "600", "--bandwidth", "5")
    assert code == EXIT_DENIED and "policy_violation" in err


def test_failed_exits_4(make_served: Callable[..., Served],
                        capsys: pytest.CaptureFixture[str]) -> None:
    make_served(parts=(EagerPart(fail_with="IKE_SA_INIT refused"),))
    code, out, err = nwc(capsys, "weave", "create", "acme-web", "globex-db", "--duration",
                         "600", "--bandwidth", "5")
    assert code == EXIT_FAILED
    assert "failed (provision_failed)" in out and "wv-000001 failed" in err


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
