"""`nwc run` as operators start it, on a free loopback port with its own state directory:
a token issued with `nwc token issue`, a weave created, listed and deleted with the `nwc`
CLI, the audit chain verified, and the controller stopped with SIGTERM. The token reaches
the CLI through NWC_TOKEN, never through a command line."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nwc.lab.labpki import LabCa
from nwc.lab.netns import free_port

pytestmark = pytest.mark.functional


def nwc(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nwc", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


@contextmanager
def running(tmp_path: Path, *extra: str, context: ssl.SSLContext | None = None
            ) -> Iterator[tuple[Path, str, subprocess.Popen[bytes]]]:
    state = tmp_path / "state"
    port = free_port()
    log = (tmp_path / "nwc-run.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nwc", "run", "--state-dir", str(state),
         "--api-host", "127.0.0.1", "--api-port", str(port),
         # Should an OpenFlow shell be part of this build, keep it on loopback too.
         "--ofp-listen-host", "127.0.0.1", "--ofp-tcp-listen-port", str(free_port()), *extra],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"{'https' if context else 'http'}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # bounds a broken start; nothing asserts on time
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v1/health", timeout=2,
                                            context=context) as r:
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


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[Path, str, subprocess.Popen[bytes]]]:
    with running(tmp_path) as started:
        yield started


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

    # globex-lab weaves with nobody: to acme it does not exist (docs/api.md).
    denied = nwc("weave", "create", "acme-web", "globex-lab", "--duration", "60",
                 "--bandwidth", "1", env=env)
    assert denied.returncode == 3 and "unknown_ivn" in denied.stderr

    deleted = nwc("weave", "delete", weave["id"], "--json", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["state"] == "terminated"

    verified = nwc("audit", "verify", "--state-dir", str(state))
    assert verified.returncode == 0, verified.stderr
    audit = (state / "audit.jsonl").read_text()
    assert token not in audit
    actions = {json.loads(line)["action"] for line in audit.splitlines()}
    assert {"weave.create", "weave.terminate"} <= actions

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    log = (tmp_path / "nwc-run.log").read_text()
    assert "REST API on http://127.0.0.1:" in log and token not in log
    unreachable = nwc("weave", "list", env=env)
    assert unreachable.returncode == 5


def _api_certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An operator's CA and the API's key and certificate for 127.0.0.1 from it."""
    return LabCa(tmp_path / "pki", "api-ca").issue("nwc-api", ("127.0.0.1",)).as_tuple()


def test_nwc_run_serves_https_with_the_limits_it_was_given(tmp_path: Path) -> None:
    key, cert, ca = _api_certificate(tmp_path)
    context = ssl.create_default_context(cafile=str(ca))
    config = tmp_path / "nwc.ini"
    config.write_text("[nwc]\napi-max-live-weaves = 1\n")  # limits from a config file too
    with running(tmp_path, "--api-ssl-key", str(key), "--api-ssl-cert", str(cert),
                 "--config-file", str(config), context=context) as (state, url, proc):
        token = nwc("token", "issue", "acme", "--state-dir", str(state)).stdout.strip()
        env = {**os.environ, "NWC_TOKEN": token, "NWC_API_URL": url}
        args = ("weave", "create", "acme-web", "globex-db", "--duration", "600",
                "--bandwidth", "10", "--no-wait", "--json")
        created = nwc(*args, "--ca-file", str(ca), env=env)
        assert created.returncode == 0, created.stderr
        first = json.loads(created.stdout)["id"]

        # The quota of one live weave from the config file: the next one is refused (429).
        over = nwc("weave", "create", "acme-web", "globex-lab", "--duration", "60",
                   "--bandwidth", "1", "--ca-file", str(ca), env=env)
        assert over.returncode == 3 and "quota_exceeded" in over.stderr, over.stderr

        # Without the operator's CA the certificate is not trusted: unreachable, not a
        # silent fallback to no verification.
        untrusted = nwc("weave", "list", env={**env, "NWC_API_CA": ""})
        assert untrusted.returncode == 5 and "certificate" in untrusted.stderr.lower()
        trusted = nwc("weave", "list", env={**env, "NWC_API_CA": str(ca)})
        assert trusted.returncode == 0 and first in trusted.stdout

        # Plain http to the TLS port gets no API answer.
        plain = nwc("weave", "list", env={**env, "NWC_API_URL": url.replace("https", "http")})
        assert plain.returncode != 0

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    log = (tmp_path / "nwc-run.log").read_text()
    assert "REST API on https://127.0.0.1:" in log
    # The start-up certificate check: the API's two-day certificate is within the default
    # 30 days, warned about once (not at each scrape), and no key material is logged.
    warned = [ln for ln in log.splitlines() if f"certificate api {cert} (CN=nwc-api" in ln]
    assert len(warned) == 1 and "WARNING" in warned[0] and "EXPIRES at" in warned[0], log
    assert key.read_text().splitlines()[1] not in log


def test_nwc_run_refuses_half_a_tls_configuration(tmp_path: Path) -> None:
    key, _, _ = _api_certificate(tmp_path)
    refused = nwc("run", "--state-dir", str(tmp_path / "state"), "--api-ssl-key", str(key))
    assert refused.returncode == 2 and "go together" in refused.stderr


def test_sighup_reloads_withdraw_what_the_new_policy_forbids_and_refuse_a_broken_one(
        tmp_path: Path) -> None:
    """SIGHUP against the real process, as operators send it (`systemctl reload nwc`): a
    policy that no longer lets acme-web weave with globex-db withdraws that weave, several
    signals at once reload one after another (never two at a time), and a file with a NUL
    in it is refused with the running policy kept and the process alive."""
    policies = tmp_path / "policies"
    shipped = Path(__file__).resolve().parents[2] / "policies"
    policies.mkdir()
    for source in shipped.glob("*.yaml"):
        (policies / source.name).write_text(source.read_text())
    ivns = policies / "20-ivns.yaml"
    with running(tmp_path, "--policy", str(policies)) as (state, url, proc):
        admin = nwc("token", "issue", "admin", "--state-dir", str(state)).stdout.strip()
        acme = nwc("token", "issue", "acme", "--state-dir", str(state)).stdout.strip()
        env = {**os.environ, "NWC_TOKEN": acme, "NWC_API_URL": url}
        created = nwc("weave", "create", "acme-web", "globex-db", "--duration", "600",
                      "--bandwidth", "10", "--no-wait", "--json", env=env)
        assert created.returncode == 0, created.stderr
        weave_id = json.loads(created.stdout)["id"]

        text = ivns.read_text()
        assert "        - ivn: globex-db" in text
        ivns.write_text(text.replace("        - ivn: globex-db", "        - ivn: globex-lab"))
        for _ in range(3):  # coalesced: the last one read is the file as it is now
            proc.send_signal(signal.SIGHUP)

        def shown() -> dict:
            out = nwc("weave", "show", weave_id, "--json", env=env)
            assert out.returncode in (0, 4), out.stderr  # 4: the weave failed
            return json.loads(out.stdout)

        deadline = time.monotonic() + 60  # bounds a broken reload; nothing asserts on time
        while shown()["state"] not in ("failed", "terminated"):
            assert time.monotonic() < deadline, "the reload did not withdraw the weave"
            time.sleep(0.3)
        ended = shown()
        assert ended["state"] == "failed" and ended["reason"] == "policy_withdrawn", ended
        assert ended["end_detail"]

        ivns.write_bytes(ivns.read_bytes().replace(b"tenant: acme", b"tenant: ac\x00me", 1))
        proc.send_signal(signal.SIGHUP)
        log_path = tmp_path / "nwc-run.log"
        deadline = time.monotonic() + 60
        while "policy reload refused" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        request = urllib.request.Request(f"{url}/metrics",
                                         headers={"Authorization": f"Bearer {admin}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            metrics = r.read().decode()
        assert 'nwc_policy_reloads_total{outcome="refused"} 1.0' in metrics, metrics
        assert "nwc_policy_last_reload_success 0.0" in metrics
        # The running policy is the one applied before the broken file: acme-web's own side
        # refuses globex-db (an operator reads the precise reason).
        again = nwc("weave", "create", "acme-web", "globex-db", "--duration", "60",
                    "--bandwidth", "1", "--no-wait", env={**env, "NWC_TOKEN": admin})
        assert again.returncode == 3 and "policy_violation" in again.stderr, again.stderr
        assert "requester IVN acme-web" in again.stderr, again.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    log = log_path.read_text()
    assert "Traceback" not in log, log
    applied = [ln for ln in log.splitlines() if "policy reload applied" in ln]
    assert 1 <= len(applied) <= 2, applied  # three signals, at most one coalesced reload more
    verified = nwc("audit", "verify", "--state-dir", str(state))
    assert verified.returncode == 0, verified.stderr
    actions = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    outcomes = [a["outcome"] for a in actions if a["action"] == "policy.reload"]
    assert outcomes.count("refused") == 1 and "applied" in outcomes
