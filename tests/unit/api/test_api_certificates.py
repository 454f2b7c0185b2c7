"""The controller's certificates on /metrics, as `nwc run` wires them (`nwc.certexpiry.serve`):
one series per certificate, its state on the controller's clock, a renewed file reported at
the next scrape, and a big CA bundle kept to a few series."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from api_harness import Harness
from certfiles import valid_for

from nwc import certexpiry
from nwc.metrics import MAX_CERTS_PER_FILE

pytestmark = pytest.mark.unit


def run_args(**files: Path) -> argparse.Namespace:
    return argparse.Namespace(cert_warn_days=30, ctl_privkey=None, **files)


def test_certificates_appear_on_metrics_and_follow_the_clock_and_the_disk(
        make_harness: Callable[..., Harness], tmp_path: Path) -> None:
    h = make_harness()
    now = h.clock.now()
    cert = tmp_path / "nwc-cert.pem"
    cert.write_bytes(valid_for("nwc", now, 31, serial=0x1))
    watch = certexpiry.serve(h.controller, run_args(ctl_cert=cert))
    assert h.controller.cert_watch is watch

    not_after = (now + dt.timedelta(days=31)).timestamp()
    assert h.metric("nwc_certificate_not_after_timestamp_seconds", use="openflow",
                    subject="CN=nwc", serial="1") == not_after
    assert h.metric("nwc_certificate_state", use="openflow", state="ok") == 1

    h.clock.advance(2 * 86400)  # 29 days left: within the 30-day threshold
    assert h.metric("nwc_certificate_state", use="openflow", state="expiring") == 1
    assert h.metric("nwc_certificate_state", use="openflow", state="ok") is None

    cert.write_bytes(valid_for("nwc", h.clock.now(), 365, serial=0x2))  # renewed
    assert h.metric("nwc_certificate_state", use="openflow", serial="2", state="ok") == 1
    assert h.metric("nwc_certificate_not_after_timestamp_seconds", serial="1") is None

    cert.unlink()
    assert h.metric("nwc_certificate_state", use="openflow", subject="",
                    state="unreadable") == 1


def test_a_large_ca_bundle_exports_only_the_certificates_that_expire_first(
        make_harness: Callable[..., Harness], tmp_path: Path) -> None:
    h = make_harness()
    now = h.clock.now()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"".join(valid_for(f"ca{i}", now, 100 + i, serial=i + 1)
                                for i in reversed(range(MAX_CERTS_PER_FILE + 4))))
    certexpiry.serve(h.controller, run_args(ca_certs=bundle))
    text = h.request("GET", "/metrics", "admin").text
    series = [ln for ln in text.splitlines() if ln.startswith("nwc_certificate_state{")]
    assert len(series) == MAX_CERTS_PER_FILE
    assert h.metric("nwc_certificate_state", subject="CN=ca0") == 1  # the soonest is kept
    assert h.metric("nwc_certificate_state", subject=f"CN=ca{MAX_CERTS_PER_FILE}") is None
