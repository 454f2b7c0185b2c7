"""The lab's bookkeeping that needs no root: which processes `Lab.remains` blames."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwc.lab import netns
from nwc.lab.netns import Lab, LabError, kill_pid, unique_prefix

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


# -- run directories: private, at a name anyone can guess ------------------------------------

@pytest.fixture
def planted(tmp_path: Path) -> Iterator[tuple[Lab, list[Path]]]:
    """A lab, and paths a test plants at the names its directories will take (removed after,
    by name: the lab refuses them and so never owns them)."""
    lab, made = Lab(unique_prefix("dr")), []
    try:
        yield lab, made
    finally:
        lab.close()
        for path in made:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                path.rmdir()


def test_a_directory_someone_else_opened_or_linked_first_is_refused(
        planted: tuple[Lab, list[Path]], tmp_path: Path) -> None:
    """Found in review: mkdir(exist_ok=True) used a pre-made 0777 directory (or a symlink)
    at the guessable /tmp name, where conf.db (PSKs) then landed."""
    lab, made = planted
    opened = Path(f"/tmp/{lab.prefix}-ovs-h1")
    opened.mkdir()
    opened.chmod(0o777)
    linked = Path(f"/tmp/{lab.prefix}-ovs-h2")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    linked.symlink_to(tmp_path / "elsewhere")
    made += [opened, linked]
    with pytest.raises(LabError, match="mode 0777, not 0700"):
        lab.directory("ovs-h1")
    with pytest.raises(LabError, match="is a symlink"):
        lab.directory("ovs-h2")
    assert lab.close() == []  # refused, so not the lab's to remove


def test_a_private_directory_is_made_or_taken_over(planted: tuple[Lab, list[Path]]) -> None:
    lab, made = planted
    fresh = lab.directory("ovs-h1")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700 and lab.directory("ovs-h1") == fresh
    left = Path(f"/tmp/{lab.prefix}-ovs-h2")  # an earlier lab's, of the same pid digits
    left.mkdir(mode=0o700)
    made.append(left)
    assert lab.directory("ovs-h2") == left
    lab.close()
    assert not fresh.exists() and not left.exists()


def test_a_directory_of_another_user_is_not_private() -> None:
    st = os.stat_result((stat.S_IFDIR | 0o700, 0, 0, 1, 1234, 1234, 0, 0, 0, 0))
    assert netns.not_private(st, 1234) is None
    assert netns.not_private(st, 0) == "belongs to uid 1234, not 0"
    regular = os.stat_result((stat.S_IFREG | 0o700, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    assert netns.not_private(regular, 0) == "is not a directory"
