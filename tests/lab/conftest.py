"""Lab tier: whole topologies emulated (Mininet VMs, private OVS and charon per host, NWC's
`nwc run`), driven through the REST API like tenants do."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from labkit import settle_leftovers

from nwc.lab.provider import ProviderLab


@pytest.fixture
def ends_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test ends its weaves; afterwards nothing of them may remain anywhere."""
    lab: ProviderLab = request.getfixturevalue("lab")
    yield
    admin = lab.client("admin")
    for weave in admin.call("GET", "/v1/weaves")["weaves"]:
        if weave["state"] in ("provisioning", "active"):
            admin.call("DELETE", f"/v1/weaves/{weave['id']}")
    assert settle_leftovers(lab) == {}
