"""Schemathesis against /openapi.json: generated requests (valid and invalid) for every
operation, as an operator, on a fresh controller per operation. Whatever it sends, the API
must never answer 5xx, and every answer must match the schema (status codes, content types,
bodies, headers). /v1/events is left out: it streams until told to stop (its contract tests
are in test_api_contract.py and test_api_events.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from api_harness import Harness
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.meta import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection

from nwc.api import ApiSettings, create_app
from nwc.audit import verify_chain
from nwc.auth import TokenStore
from nwc.controller import Controller
from nwc.weave import LIVE_STATES

pytestmark = pytest.mark.unit

# The schema cannot say "requester and target must differ" or "this profile must exist":
# such schema-valid requests are refused with 422, which is correct, so 422 counts as an
# acceptable answer to valid data. Every other default of the check stays.
CONFIG = SchemathesisConfig.from_dict({"checks": {"positive_data_acceptance": {
    "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]}}})

EXAMPLES_PER_OPERATION = 25


def _openapi_document() -> dict[str, Any]:
    """The schema as the app publishes it. Built from a controller that is never started
    (no threads) because test generation needs the schema when the module is collected."""
    with tempfile.TemporaryDirectory() as tmp:
        controller = Controller.from_paths(Path(tmp))
        try:
            return create_app(controller, TokenStore(Path(tmp))).openapi()
        finally:
            controller.store.close()


class CurrentApp:
    """The ASGI app schemathesis calls: whichever harness the running test made."""

    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


CURRENT = CurrentApp()
schema = schemathesis.openapi.from_dict(_openapi_document(), config=CONFIG).exclude(
    path="/v1/events")
schema.app = CURRENT


@pytest.fixture
def fuzzed(make_harness: Callable[..., Harness]) -> Iterator[Harness]:
    # Generous limits: the rate limiter and quotas have their own tests, and would otherwise
    # turn most generated requests into 429s.
    h = make_harness(settings=ApiSettings(rate_burst=100_000, max_live_weaves_per_tenant=1000))
    CURRENT.app = h.client.app
    yield h
    CURRENT.app = None
    # Whatever was sent, the state is whole: the ledger agrees with itself and with the live
    # weaves, and the audit chain is intact.
    weaver = h.controller.weaver
    assert h.controller.call(weaver.fabric.violations) == []
    held = h.controller.call(lambda: set(weaver.fabric.by_weave))
    assert held == {w.id for w in h.controller.call(weaver.store.weaves, states=LIVE_STATES)}
    assert verify_chain(h.audit()) == []


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_answers_match_the_schema(case: Any, fuzzed: Harness) -> None:
    # The only header the schema has is Authorization, and this test always sends it: a case
    # generated without it (to see it refused) is not invalid as sent, and judging it as
    # invalid data the API accepted failed the test now and then. Missing and bad tokens have
    # their own tests (test_api_authorization.py).
    excluded = [negative_data_rejection] if case.meta is not None and \
        case.meta.is_negative_at(ParameterLocation.HEADER) else []
    response = case.call_and_validate(headers=fuzzed.auth("admin"), excluded_checks=excluded)
    assert response.status_code < 500


def test_every_operation_but_the_event_stream_is_fuzzed() -> None:
    fuzzed_paths = {op.path for op in (r.ok() for r in schema.get_all_operations())}
    assert fuzzed_paths == set(_openapi_document()["paths"]) - {"/v1/events"}
