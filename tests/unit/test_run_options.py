"""`nwc run` options from the command line and --config-file: the command line always wins,
a malformed file is a usage error naming the file (never a traceback), and option values the
controller would only trip over later are refused up front."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nwc.cli import build_parser, main
from nwc.run import apply_config_file, check_run_options

pytestmark = pytest.mark.unit


def run_args(*argv: str) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    args = build_parser().parse_args(["run", *argv])
    return args, args._parser


def configured(tmp_path: Path, text: str, *argv: str) -> argparse.Namespace:
    ini = tmp_path / "nwc.ini"
    ini.write_text(text)
    args, parser = run_args("--config-file", str(ini), *argv)
    apply_config_file(args, parser)
    return args


def test_an_option_given_with_its_default_value_still_beats_the_file(tmp_path: Path) -> None:
    args = configured(tmp_path, "[nwc]\napi-host = 0.0.0.0\napi-port = 9000\n"
                      "provision-timeout = 5\n",
                      "--api-host", "127.0.0.1", "--provision-timeout", "30")
    assert (args.api_host, args.api_port, args.provision_timeout) == ("127.0.0.1", 9000, 30.0)


def test_the_file_fills_in_options_not_given(tmp_path: Path) -> None:
    args = configured(tmp_path, "[nwc]\nstate-dir = /srv/nwc%data\npolicy = a.yaml, b.yaml\n")
    assert args.state_dir == Path("/srv/nwc%data")  # '%' is not interpolation
    assert args.policy == [Path("a.yaml"), Path("b.yaml")]


@pytest.mark.parametrize(("text", "says"), [
    ("api-port = 8181\n", "before any section header"),
    ("[nwc]\napi-port = 1\napi-port = 2\n", "api-port is set twice"),
    ("[nwc]\napi-port = 1\napi_port = 2\n", "api-port is set twice in [nwc] (also as api_port)"),
    ("[nwc]\nfunc = x\n", "unknown option 'func'"),
    ("[nwc]\ncommand = x\n", "unknown option 'command'"),
    ("[nwc]\napi-port = eighty\n", "api-port = 'eighty' is not valid"),
    ("[nwc]\n[nwc]\n", "[nwc] appears twice"),
])
def test_a_malformed_file_is_a_usage_error_naming_file_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        configured(tmp_path, text)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nwc.ini") in err and says in err


@pytest.mark.parametrize("timeout", ["inf", "nan", "-5", "0"])
def test_a_provision_timeout_must_be_finite_and_positive(
        timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    args, parser = run_args("--provision-timeout", timeout)
    with pytest.raises(SystemExit):
        check_run_options(args, parser)
    assert "--provision-timeout" in capsys.readouterr().err


def test_a_provision_timeout_from_the_file_is_checked_too(tmp_path: Path) -> None:
    args = configured(tmp_path, "[nwc]\nprovision-timeout = inf\n")
    with pytest.raises(SystemExit):
        check_run_options(args, args._parser)


def test_the_certificate_warning_threshold_comes_from_the_file_and_is_checked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = configured(tmp_path, "[nwc]\ncert-warn-days = 7\n")
    check_run_options(args, args._parser)
    assert args.cert_warn_days == 7
    args = configured(tmp_path, "[nwc]\ncert-warn-days = -1\n")
    with pytest.raises(SystemExit):
        check_run_options(args, args._parser)
    assert "--cert-warn-days must be 0 or more" in capsys.readouterr().err


def test_a_huge_certificate_warning_is_a_usage_error_not_an_overflow(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Found in review: check-certs and run raised OverflowError on a billion days.
    with pytest.raises(SystemExit) as exc:
        main(["check-certs", "--state-dir", str(tmp_path), "--cert-warn-days", "1000000000"])
    assert exc.value.code == 2
    assert "--cert-warn-days must be at most 3650 (ten years)" in capsys.readouterr().err
    args = configured(tmp_path, "[nwc]\ncert-warn-days = 3650\n")
    check_run_options(args, args._parser)  # ten years is still a warning NWC can give


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path, port: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["run", "--api-port", port], ["run", "--ofp-tcp-listen-port", port],
                 ["lab", "small", "--api-port", port]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 2
        assert f"a port is 1 to 65535, not {port}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        configured(tmp_path, f"[nwc]\napi-port = {port}\n")
    assert f"api-port = '{port}' is not valid" in capsys.readouterr().err


def test_the_agent_bound_comes_from_the_command_line_or_the_file(tmp_path: Path) -> None:
    args, parser = run_args()
    check_run_options(args, parser)
    assert args.agent_unresponsive_after == 12.0  # four of the agents' default beats
    args = configured(tmp_path, "[nwc]\nagent-unresponsive-after = 30\n")
    check_run_options(args, args._parser)
    assert args.agent_unresponsive_after == 30.0
    args = configured(tmp_path, "[nwc]\nagent-unresponsive-after = 30\n",
                      "--agent-unresponsive-after", "2")
    check_run_options(args, args._parser)
    assert args.agent_unresponsive_after == 2.0  # the least taken


@pytest.mark.parametrize("seconds", ["inf", "nan", "-5", "0", "1.9"])
def test_an_agent_bound_that_is_not_finite_or_under_2_s_is_refused(
        tmp_path: Path, seconds: str, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (run_args("--agent-unresponsive-after", seconds)[0],
                 configured(tmp_path, f"[nwc]\nagent-unresponsive-after = {seconds}\n")):
        with pytest.raises(SystemExit) as exc:
            check_run_options(args, args._parser)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--agent-unresponsive-after must be a finite number of seconds, at least 2" in err
        assert "Traceback" not in err


def test_the_switch_certificate_binding_is_on_unless_turned_off(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_args()[0].ofp_cert_names == "match"
    assert run_args("--ofp-cert-names", "any")[0].ofp_cert_names == "any"
    assert configured(tmp_path, "[nwc]\nofp-cert-names = any\n").ofp_cert_names == "any"
    with pytest.raises(SystemExit):  # the file is checked as the command line is
        configured(tmp_path, "[nwc]\nofp-cert-names = off\n")
    assert "ofp-cert-names = 'off' is not valid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_args("--ofp-cert-names", "no")
