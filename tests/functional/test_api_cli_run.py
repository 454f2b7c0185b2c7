"""`nwc run` as operators start it, on a free loopback port with its own state directory:
a token issued with `nwc token issue`, a weave created, listed and deleted with the `nwc`
CLI, the audit chain verified, and the controller stopped with SIGTERM. The token reaches
the CLI through NWC_TOKEN, never through a command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.functional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nwc(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nwc", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[Path, str, subprocess.Popen[bytes]]]:
    state = tmp_path / "state"
    port = free_port()
    log = (tmp_path / "nwc-run.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nwc", "run", "--state-dir", str(state),
         "--api-host", "127.0.0.1", "--api-port", str(port),
         # Should an OpenFlow shell be part of this build, keep it on loopback too.
         "--ofp-listen-host", "127.0.0.1", "--ofp-tcp-listen-port", str(free_port())],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # bounds a broken start; nothing asserts on time
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v1/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "nwc-run.log").read_text()
            assert time.monotonic() < deadline, "nwc run did not answer on /v1/health"
            time.sleep(0.2)
        yield state, url, proc
    finally:
        if proc.poll() is None:
            proc.kill()  # only if the test failed before its own SIGTERM
            proc.wait(10)
        log.close()


def test_nwc_run_serves_the_cli(controller: tuple[Path, str, subprocess.Popen[bytes]],
                                tmp_path: Path) -> None:
    state, url, proc = controller
    issued = nwc("token", "issue", "acme", "--state-dir", str(state))
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    assert issued.stdout == token + "\n"
    env = {**os.environ, "NWC_TOKEN": token, "NWC_API_URL": url}

    # With no switch connected a data-plane shell may keep the weave provisioning, so do not
    # wait for active here: admitted is what this test is about.
    created = nwc("weave", "create", "acme-web", "globex-db", "--duration", "600",
                  "--bandwidth", "10", "--no-wait", "--json", env=env)
    assert created.returncode == 0, created.stderr
    weave = json.loads(created.stdout)
    assert weave["state"] in ("provisioning", "active")
    assert token not in created.stdout + created.stderr

    listed = nwc("weave", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:1] == [weave["id"]] for line in listed.stdout.splitlines())

    denied = nwc("weave", "create", "acme-web", "globex-lab", "--duration", "60",
                 "--bandwidth", "1", env=env)
    assert denied.returncode == 3 and "policy_violation" in denied.stderr

    deleted = nwc("weave", "delete", weave["id"], "--json", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["state"] == "terminated"

    verified = nwc("audit", "verify", "--state-dir", str(state))
    assert verified.returncode == 0, verified.stderr
    audit = (state / "audit.jsonl").read_text()
    assert token not in audit
    assert '"action": "weave.create"' in audit and '"action": "weave.terminate"' in audit

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    log = (tmp_path / "nwc-run.log").read_text()
    assert "REST API on http://127.0.0.1:" in log and token not in log
    unreachable = nwc("weave", "list", env=env)
    assert unreachable.returncode == 5
