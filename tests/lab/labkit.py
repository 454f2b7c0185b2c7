"""Helpers for the lab tier: starting a lab, waiting for teardown, iperf3 between VMs."""

from __future__ import annotations

import time
from collections.abc import Iterator

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
