"""Fixtures for the REST API tests (the harness itself is api_harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from api_harness import PRINCIPALS, Harness, ManualPart
from fastapi.testclient import TestClient

from nwc.api import ApiSettings, create_app
from nwc.auth import TokenStore
from nwc.controller import Controller
from nwc.lease import ManualClock


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Build a harness: `parts` are attached before the controller starts; `settings` are
    the API's limits; `topology` a shipped topology name."""
    made: list[Harness] = []

    def make(*, parts: tuple[ManualPart, ...] = (), settings: ApiSettings | None = None,
             provision_timeout_s: float = 30.0, topology: str | None = None,
             raise_server_exceptions: bool = True) -> Harness:
        state = tmp_path / f"state{len(made)}"
        clock = ManualClock()
        controller = Controller.from_paths(state, topology=topology, clock=clock,
                                           provision_timeout_s=provision_timeout_s)
        for part in parts:
            part.controller = controller
            controller.add_part(part)
        harness_stats: dict[str, dict[str, Any]] = {}
        controller.stats_sources.append(lambda w: dict(harness_stats.get(w.id, {})))
        controller.start()
        store = TokenStore(state)
        tokens = {who: store.issue(who)[0] for who in PRINCIPALS}
        app = create_app(controller, store, settings or ApiSettings())
        client = TestClient(app, raise_server_exceptions=raise_server_exceptions)
        harness = Harness(controller, clock, client, tokens, state, list(parts), harness_stats)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.client.close()
        harness.controller.stop()


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()
