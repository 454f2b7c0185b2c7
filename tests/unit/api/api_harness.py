"""The REST API test harness: a real controller (weaver, loop, SQLite, audit chain) on the
shipped policies, a clock that moves only when told, tokens for three tenants and an operator,
the app under Starlette's in-process test client, and data-plane parts the test drives."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from nwc.api import NorthboundApi
from nwc.controller import Controller
from nwc.lease import ManualClock
from nwc.weave import Weave

PRINCIPALS = ("acme", "globex", "initech", "admin")


class ManualPart:
    """A data-plane part that reports only when the test says so (or never): the weave
    stays `provisioning` until then."""

    name = "manual"

    def __init__(self) -> None:
        self.controller: Controller | None = None
        self.up: list[str] = []
        self.down: list[str] = []

    def weave_up(self, weave: Weave) -> None:
        self.up.append(weave.id)

    def weave_down(self, weave: Weave) -> None:
        self.down.append(weave.id)

    def weave_moved(self, weave: Weave, old: Weave) -> None:
        pass

    def report_ready(self, weave_id: str) -> None:
        assert self.controller is not None
        self.controller.loop.post(self.controller.weaver.part_ready, weave_id, self.name)
        self.controller.call(_settled)  # the loop has handled the report

    def report_failed(self, weave_id: str, detail: str) -> None:
        assert self.controller is not None
        self.controller.loop.post(self.controller.weaver.part_failed, weave_id, self.name,
                                  detail)
        self.controller.call(_settled)

    def report_down(self, weave_id: str) -> None:
        assert self.controller is not None
        self.controller.loop.post(self.controller.weaver.part_down, weave_id, self.name)
        self.controller.call(_settled)


class TeardownPart(ManualPart):
    """A ManualPart that, like the real flows and tunnel parts, confirms teardown: a
    terminated weave stays `terminating` until the test reports it down."""

    name = "teardown"
    confirms_teardown = True


class EagerPart(ManualPart):
    """Reports each weave built (or failed) as soon as it is handed over, through the loop,
    as the real OpenFlow and tunnel parts do once their switches and charons answer."""

    name = "eager"

    def __init__(self, fail_with: str | None = None) -> None:
        super().__init__()
        self.fail_with = fail_with

    def weave_up(self, weave: Weave) -> None:
        super().weave_up(weave)
        assert self.controller is not None
        if self.fail_with:
            self.controller.loop.post(self.controller.weaver.part_failed, weave.id, self.name,
                                      self.fail_with)
        else:
            self.controller.loop.post(self.controller.weaver.part_ready, weave.id, self.name)


def _settled() -> None:
    return None


@dataclass
class Harness:
    controller: Controller
    clock: ManualClock
    client: TestClient
    tokens: dict[str, str]
    state_dir: Path
    parts: list[ManualPart] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def api(self) -> NorthboundApi:
        return self.client.app.state.nwc_api  # type: ignore[attr-defined, no-any-return]

    def auth(self, who: str | None) -> dict[str, str]:
        if who is None:
            return {}
        if who == "bogus":
            return {"Authorization": "Bearer nwc_" + "x" * 43}
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def request(self, method: str, path: str, who: str | None = "acme", **kw: Any) -> Any:
        headers = {**self.auth(who), **kw.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kw)

    def create(self, who: str = "acme", requester: str = "acme-web",
               target: str = "globex-db", duration_s: int = 600, bandwidth_mbps: float = 10,
               params: dict[str, str] | None = None, **extra: Any) -> Any:
        body = {"requester": requester, "target": target, "duration_s": duration_s,
                "bandwidth_mbps": bandwidth_mbps, **extra}
        return self.request("POST", "/v1/weaves", who, json=body, params=params)

    def audit(self) -> list[dict[str, Any]]:
        self.controller.call(_settled)  # every record written so far has reached the file
        path = self.state_dir / "audit.jsonl"
        if not path.exists():
            return []
        # Split on "\n" only: records may hold U+2028 and friends, which splitlines() breaks on.
        return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]

    def tick(self, seconds: float) -> None:
        """Move the clock and let the weaver act on it (leases, provisioning deadlines)."""
        self.clock.advance(seconds)
        self.controller.call(self.controller.weaver.tick)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample from /metrics (admin), or None when it is not exported."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.request("GET", "/metrics", "admin").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return float(sample.value)
        return None
