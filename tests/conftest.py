"""Shared test fixtures. Functional and lab tiers need root (namespaces, OVS, charon); on a
machine without root they are skipped with a reason, in CI (root) they always run."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, OVS, charon)")
    for item in items:
        if "functional" in item.keywords or "lab" in item.keywords:
            item.add_marker(skip)
