"""The lab's bookkeeping that needs no root: which processes `Lab.remains` blames."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nwc.lab import netns
from nwc.lab.netns import Lab, kill_pid, unique_prefix

pytestmark = pytest.mark.unit


def test_remains_does_not_blame_a_later_process_given_a_watched_pid(monkeypatch) -> None:
    # Found in review: a watched process that ended and whose pid went to an unrelated
    # process was reported as left behind by the lab.
    lab = Lab(unique_prefix("pr"))
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        lab.watch_pid(proc.pid, "a shell Mininet should have stopped")
        assert lab.remains() == [f"process {proc.pid} (a shell Mininet should have stopped)"]
        started = netns.stat_start_time(Path(f"/proc/{proc.pid}/stat").read_text())
        # The same pid, now a process that started later (what pid reuse looks like in /proc).
        monkeypatch.setattr(netns, "_start_time", lambda pid: started + 1, raising=False)
        assert lab.remains() == []
    finally:
        kill_pid(proc.pid, timeout=2)


def test_start_time_is_field_22_even_past_a_command_name_with_spaces() -> None:
    after_comm = ["S", *map(str, range(4, 22)), "4242", "99"]  # fields 3..23
    assert netns.stat_start_time(f"123 (a) b (c) {' '.join(after_comm)}\n") == 4242
    with pytest.raises(ValueError):
        netns.stat_start_time("123 (sleep) S 1 2")
