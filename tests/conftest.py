"""Shared test fixtures. Functional and lab tiers need root (namespaces, OVS, charon); on a
machine without root they are skipped with a reason, in CI (root) they always run."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nwc.config import SHIPPED_POLICIES, SHIPPED_TOPOLOGIES
from nwc.lease import ManualClock
from nwc.policy import Policy, load_policy
from nwc.store import Store
from nwc.topology import Topology, load_topology
from nwc.weaver import Weaver


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, OVS, charon)")
    for item in items:
        if "functional" in item.keywords or "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shipped_policy() -> Policy:
    return load_policy([SHIPPED_POLICIES])


@pytest.fixture(scope="session")
def small(shipped_policy: Policy) -> Topology:
    return load_topology(SHIPPED_TOPOLOGIES / "small.yaml", shipped_policy)


@pytest.fixture(scope="session")
def leaf_spine(shipped_policy: Policy) -> Topology:
    return load_topology(SHIPPED_TOPOLOGIES / "leaf-spine.yaml", shipped_policy)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def make_weaver(tmp_path: Path, clock: ManualClock,
                shipped_policy: Policy) -> Iterator[Callable[..., Weaver]]:
    """Build a Weaver on a state directory under tmp_path (the same one on every call, so a
    second call is a controller restart)."""
    stores: list[Store] = []

    def make(topology: Topology, policy: Policy | None = None, **kw: object) -> Weaver:
        store = Store(tmp_path / "state")
        stores.append(store)
        weaver = Weaver(policy=policy or shipped_policy, topology=topology, store=store,
                        clock=clock, **kw)  # type: ignore[arg-type]
        weaver.recover()
        return weaver

    yield make
    for store in stores:
        store.close()
