"""Helpers for the lab tier: starting a lab, waiting for teardown, iperf3 between VMs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from nwc.lab.provider import ProviderLab


def start_lab(topology: str) -> Iterator[ProviderLab]:
    lab = ProviderLab(topology, provision_timeout_s=20)
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


def settle_leftovers(lab: ProviderLab, timeout: float = 10) -> dict[str, list[str]]:
    """What ended weaves left behind, once the agents had a moment to tear down."""
    deadline = time.monotonic() + timeout
    while True:
        left = lab.leftovers()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def iperf(lab: ProviderLab, client: str, server: str, *args: str,
          seconds: int = 6) -> dict[str, Any]:
    """iperf3 from VM `client` to VM `server`; the JSON summary."""
    srv = lab.vm(server).popen(["iperf3", "-s", "-1", "-p", "5201"])
    try:
        time.sleep(0.5)
        out = lab.vm(client).cmd(f"iperf3 -c {lab.ip_of(server)} -p 5201 -t {seconds} -J "
                                 + " ".join(args))
        srv.wait(seconds + 15)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(5)
    return json.loads(out)
