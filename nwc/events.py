"""The live event stream behind `GET /v1/events` (server-sent events).

Sources: the weaver's events (`Weaver.subscribe`: weave state changes, denials, reroutes,
security events from the data plane) and the API's own (authentication failures, requests
refused before they reach the weaver). The weaver calls its listeners on its own thread, which
must never wait for a slow HTTP client: `publish` only hands each event to the subscribers'
event loops (`call_soon_threadsafe`), where it lands in a bounded per-client queue. A client
that falls behind by more than the queue holds gets an `overflow` event and is disconnected,
rather than silently missing events or holding memory.

Each event has an audience: the tenants it concerns (both parties of a weave, the tenant whose
request was refused). An admin sees everything; events that concern no tenant (authentication
failures, fabric links) are for admins only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nwc.weaver import Weaver

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 256
KEEPALIVE_S = 15.0

_CLOSED = object()  # the hub is shutting down
_OVERFLOW = object()  # this client fell behind


@dataclass(eq=False)
class Subscription:
    """One client's stream: who it is (tenant None: admin) and its bounded queue."""

    tenant: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    dead: bool = field(default=False)

    def sees(self, audience: frozenset[str]) -> bool:
        return self.tenant is None or self.tenant in audience

    def offer(self, item: Any) -> None:
        """Runs on the subscriber's event loop."""
        if self.dead:
            return
        if item is _CLOSED or item is _OVERFLOW:
            self.dead = True
            while not self.queue.empty():  # make room: the client learns why it ends
                self.queue.get_nowait()
            self.queue.put_nowait(item)
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.offer(_OVERFLOW)


class EventHub:
    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._weaver: Weaver | None = None
        self.overflows = 0
        self.closed = False

    # -- sources ---------------------------------------------------------------------------

    def attach(self, weaver: Weaver) -> None:
        self._weaver = weaver
        weaver.subscribe(self.on_weaver_event)

    def on_weaver_event(self, event: dict[str, Any]) -> None:
        """Weaver listener, on the weaver's thread: find the audience, hand off, return."""
        self.publish(event, self._audience(event))

    def _audience(self, event: dict[str, Any]) -> frozenset[str]:
        weave = event.get("weave")
        if isinstance(weave, dict):
            return frozenset(t for t in (weave.get("requester_tenant"),
                                         weave.get("target_tenant")) if t)
        audience = event.get("audience")
        if isinstance(audience, list):
            # A refusal names its own: the weaver worded it for those tenants (an IVN one of
            # them may not see reads as missing), and its text may quote that tenant's own
            # policy, which the other party may not read.
            return frozenset(t for t in audience if isinstance(t, str))
        weaver = self._weaver
        if weaver is None:
            return frozenset()
        weave_id = event.get("weave_id")
        if isinstance(weave_id, str):
            # Safe: this runs on the weaver's thread, the only one that touches these.
            known = weaver.live.get(weave_id) or weaver.store.weave(weave_id)
            return known.tenants if known is not None else frozenset()
        return frozenset()

    def publish(self, event: dict[str, Any], audience: Iterable[str] = ()) -> None:
        """Send an event to every subscriber allowed to see it. Never blocks for long: safe
        on the weaver's thread and on API threads."""
        audience = frozenset(audience)
        # A denial may carry a `tenant_detail`: tenants read that, not the operator's detail
        # (which can name the other tenant's partners, caps or weaves).
        # A `tenant_view` replaces the whole denial (error, detail, side, rule, link) for
        # tenants: one about an IVN the tenant may not know exists reads as "unknown".
        # `audience` is the hub's to read, not a field of the event.
        operator_view = {k: v for k, v in event.items()
                         if k not in ("tenant_detail", "tenant_view", "audience")}
        # Every event has a `detail`, null when there is nothing to add: clients need not
        # tell a missing key from an empty one.
        operator_view.setdefault("detail", None)
        tenant_view = dict(operator_view)
        if "tenant_detail" in event:
            tenant_view["detail"] = event["tenant_detail"]
        if isinstance(event.get("tenant_view"), dict):
            for key in ("error", "detail", "side", "rule", "link"):
                tenant_view.pop(key, None)
            tenant_view.update(event["tenant_view"])
        with self._lock:
            if self.closed:
                return
            event_id = next(self._ids)
            subs = [s for s in self._subs if not s.dead and s.sees(audience)]
        for sub in subs:
            item = (event_id, operator_view if sub.tenant is None else tenant_view)
            try:
                sub.loop.call_soon_threadsafe(sub.offer, item)
            except RuntimeError:  # its event loop is gone
                sub.dead = True

    # -- subscribers ----------------------------------------------------------------------

    def subscribe(self, tenant: str | None) -> Subscription:
        """Call from the subscriber's event loop."""
        sub = self.reserve(tenant)
        assert sub is not None  # no limits given
        return sub

    def reserve(self, tenant: str | None, *,
                max_streams: int | None = None,
                max_per_principal: int | None = None) -> Subscription | None:
        """Subscribe if the limits allow, else None. Checking and subscribing under one lock
        is what makes the limits hold when many clients open streams at once. Call from the
        subscriber's event loop; the caller must `unsubscribe` however the stream ends,
        including when it never starts."""
        sub = Subscription(tenant, asyncio.get_running_loop(),
                           asyncio.Queue(maxsize=self.queue_size))
        with self._lock:
            if max_streams is not None and len(self._subs) >= max_streams:
                return None
            if max_per_principal is not None and \
                    self._count_for_locked(tenant) >= max_per_principal:
                return None
            if self.closed:
                sub.offer(_CLOSED)
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def count(self) -> int:
        """How many streams are open."""
        with self._lock:
            return len(self._subs)

    def count_for(self, tenant: str | None) -> int:
        """How many streams one principal (tenant None: admins) has open."""
        with self._lock:
            return self._count_for_locked(tenant)

    def _count_for_locked(self, tenant: str | None) -> int:
        return sum(1 for s in self._subs if s.tenant == tenant)

    def close(self) -> None:
        """End every stream (the server is stopping)."""
        with self._lock:
            self.closed = True
            subs = list(self._subs)
        for sub in subs:
            with contextlib.suppress(RuntimeError):  # its event loop is already gone
                sub.loop.call_soon_threadsafe(sub.offer, _CLOSED)


def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    """One server-sent event. json.dumps never emits a raw newline, so `data` is one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, sort_keys=True)}\n\n"


async def stream(hub: EventHub, sub: Subscription, *, ready: dict[str, Any],
                 max_events: int | None = None, keepalive_s: float = KEEPALIVE_S,
                 on_overflow: Any = None,
                 still_authorized: Callable[[], bool] | None = None) -> AsyncIterator[str]:
    """The text of one client's stream: `ready` first (the subscription is live from then on),
    then events, comments as keepalives, and `overflow`/`closing` when it must end.
    `still_authorized` is asked before each event and keepalive: a stream whose token was
    revoked ends there, as the token's next request would be refused."""
    sent = 0
    try:
        yield "retry: 3000\n\n" + sse("ready", ready)
        while max_events is None or sent < max_events:
            try:
                item = await asyncio.wait_for(sub.queue.get(), timeout=keepalive_s)
            except TimeoutError:
                item = None
            if still_authorized is not None and item is not _CLOSED \
                    and not still_authorized():
                yield sse("closing", {"detail": "the token this stream was opened with is no "
                                                "longer valid"})
                return
            if item is None:
                yield ": keepalive\n\n"
                continue
            if item is _OVERFLOW:
                hub.overflows += 1
                if on_overflow is not None:
                    on_overflow()
                yield sse("overflow", {"detail": "this client fell more than "
                                                 f"{hub.queue_size} events behind; reconnect"})
                return
            if item is _CLOSED:
                yield sse("closing", {"detail": "the controller is stopping"})
                return
            event_id, event = item
            yield sse(str(event.get("type", "event")), event, event_id)
            sent += 1
    finally:
        hub.unsubscribe(sub)
