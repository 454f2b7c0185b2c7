"""Holding the weaver's loop busy in a test, so that calls from other threads queue up behind
it (as they do while it waits for a commit) and are then taken together."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from nwc.weaver import WeaverLoop


class HeldLoop:
    def __init__(self, loop: WeaverLoop) -> None:
        self.loop = loop

    def queued(self) -> int:
        return self.loop._queue.qsize()

    def wait_queued(self, n: int, timeout: float = 10.0) -> None:
        """Until at least `n` calls wait in the queue."""
        deadline = time.monotonic() + timeout
        while self.queued() < n:
            assert time.monotonic() < deadline, f"{self.queued()} of {n} calls queued"
            time.sleep(0.001)


@contextmanager
def held(loop: WeaverLoop) -> Iterator[HeldLoop]:
    """The loop runs nothing until the block ends (at most 10 s)."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(10)

    loop.post(hold)
    assert holding.wait(5), "the loop did not start the holding call"
    try:
        yield HeldLoop(loop)
    finally:
        release.set()
