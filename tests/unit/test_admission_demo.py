"""`nwc admission-demo`: what it prints is the story, and every path it names exists."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from nwc.cli import main

pytestmark = pytest.mark.unit


def test_it_names_no_temporary_path_and_logs_no_info_lines(
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by a tester: it named an audit file in a temporary directory deleted on exit,
    and the weaver's INFO line ("recovered 0 live weaves") came out on stderr."""
    caplog.set_level(logging.INFO)  # as `nwc` sets it without -v
    assert main(["admission-demo"]) == 0
    out = capsys.readouterr().out
    assert "removed on exit; --state-dir DIR keeps it" in out
    for path in re.findall(r"/\S+audit\.jsonl", out):
        assert Path(path).exists(), path
    assert [r.getMessage() for r in caplog.records if r.name.startswith("nwc")] == []
    assert logging.getLogger("nwc").level == logging.NOTSET  # restored for what runs next


def test_with_a_state_dir_it_names_the_audit_log_it_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["admission-demo", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"chain intact in {tmp_path / 'audit.jsonl'}" in out
    assert "#8 weave.expire: expired, wv-000001, by nwc" in out
