"""The `nwc` command's own behaviour: only a reader of stdout that left ends it quietly."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import io
import subprocess
import sys

import pytest

from nwc import cli, client

pytestmark = pytest.mark.unit


class ReaderGone(io.StringIO):
    """A stdout whose reader has left (`nwc ... | head`): every write fails with EPIPE."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no file")  # silence_stdout has nothing to redirect


def socket_broke(_args: argparse.Namespace) -> int:
    raise BrokenPipeError(errno.EPIPE, "Broken pipe")  # as a socket's send would


def printing(_args: argparse.Namespace) -> int:
    print("a line the reader will never see")
    return 0


def test_a_broken_socket_is_not_taken_for_a_reader_of_stdout_that_left(monkeypatch) -> None:
    # Found in review: any BrokenPipeError ended nwc with 141 and nothing on stderr.
    monkeypatch.setattr(cli, "cmd_check_policy", socket_broke)
    with pytest.raises(BrokenPipeError):
        cli.main(["check-policy"])


def test_a_reader_of_stdout_that_left_ends_quietly_with_141(monkeypatch) -> None:
    monkeypatch.setattr(cli, "cmd_check_policy", printing)
    gone = ReaderGone()
    monkeypatch.setattr("sys.stdout", gone)
    assert cli.main(["check-policy"]) == cli.EXIT_BROKEN_PIPE
    assert sys.stdout is gone  # main leaves stdout as it found it


def test_a_client_command_reports_a_broken_socket_as_an_error(capsys) -> None:
    assert client._run(socket_broke)(argparse.Namespace()) == cli.EXIT_ERROR
    assert capsys.readouterr().err == "nwc: [Errno 32] Broken pipe\n"


def test_no_eventlet_deprecation_block_opens_the_logs() -> None:
    """A deploy-guide tester found eventlet's eight-line deprecation warning (raised when the
    `ovs` library probes for eventlet) at the start of every controller and agent log."""
    probe = ("import sys, nwc.cli as cli\n"
             "if sys.argv[1] == 'quiet': cli.main(['check-policy'])\n"
             "import ovs.poller\n")
    runs = {mode: subprocess.run([sys.executable, "-W", "default", "-c", probe, mode],
                                 capture_output=True, text=True, check=True).stderr
            for mode in ("loud", "quiet")}
    if importlib.util.find_spec("eventlet") is not None:
        assert "Eventlet is deprecated" in runs["loud"]  # the probe can see the warning
    assert "Eventlet is deprecated" not in runs["quiet"]
    assert runs["quiet"] == ""
