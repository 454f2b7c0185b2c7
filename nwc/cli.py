"""The `nwc` command. Each feature module registers its own subcommands (see COMMAND_MODULES),
so this file only holds the commands that belong to no other module."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from nwc.config import SHIPPED_POLICIES, SHIPPED_TOPOLOGIES, default_state_dir
from nwc.policy import load_policy
from nwc.topology import Topology, load_topology
from nwc.yamlsource import ConfigError

# Modules with a `register(subparsers)` function adding their subcommands.
COMMAND_MODULES = (
    "nwc.admission_demo",
    "nwc.run",
    "nwc.certexpiry",
    "nwc.auth",
    "nwc.client",
    "nwc.agent",
    "nwc.lab.story",
)

# What `nwc --help` says (the module docstring is for developers).
DESCRIPTION = ("NWC, the Network Weaver Controller: weaves tenants' isolated virtual networks "
               "together on demand (encrypted, bandwidth-reserved, leased), and runs, checks "
               "and queries the controller.")

# Exit codes shared by every subcommand.
EXIT_OK = 0
EXIT_ERROR = 1  # bad input, invalid configuration, failed check
EXIT_USAGE = 2  # argparse's own
# As a command killed by SIGPIPE (128 + 13) ends: `set -o pipefail` sees it the same.
EXIT_BROKEN_PIPE = 141


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 link`, `3 links`: what a person expects to read."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the controller keeps SQLite, keys and the audit log "
                             f"(default: $NWC_STATE_DIR or {default_state_dir()})")


def tcp_port(text: str) -> int:
    """An argparse type: a TCP port, 1-65535 (a larger number crashed the socket call with
    an OverflowError instead of a usage message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, not {value}")
    return value


def state_dir(args: argparse.Namespace) -> Path:
    return args.state_dir or default_state_dir()


def cmd_check_policy(args: argparse.Namespace) -> int:
    policy_paths = args.paths or [SHIPPED_POLICIES]
    topologies = args.topology if args.topology is not None else \
        ([] if args.paths else sorted(SHIPPED_TOPOLOGIES.glob("*.yaml")))
    try:
        policy = load_policy(policy_paths)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"check-policy: {counted(len(exc.problems), 'problem')}", file=sys.stderr)
        return EXIT_ERROR
    print(f"policy OK: {counted(len(policy.tenants), 'tenant')}, "
          f"{counted(len(policy.ivns), 'IVN')}, "
          f"{counted(len(policy.profiles), 'security profile')}, "
          f"{counted(len(policy.qos_classes), 'QoS class', 'QoS classes')} "
          f"({', '.join(policy.sources)})")
    failed = 0
    for path in topologies:
        try:
            topo = load_topology(Path(path), policy)
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            failed += len(exc.problems)
            continue
        print(f"topology OK: {topo.name}: {counted(len(topo.switches), 'switch', 'switches')}, "
              f"{counted(len(topo.links), 'link')}, {counted(len(topo.hosts), 'host')}, "
              f"{counted(len(topo.vms), 'VM')} ({path})")
        if args.wiring:
            print_wiring(topo)
    if failed:
        print(f"check-policy: {counted(failed, 'problem')}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def print_wiring(topo: Topology) -> None:
    """What each bridge must be set to for NWC's model of it: its datapath id, and which
    OpenFlow port number leads to which neighbour (neighbours in name order get 1, 2, 3...;
    docs/deploy.md)."""
    for kind, nodes in (("switch", topo.switches), ("host", topo.hosts)):
        for name in sorted(nodes):
            ports = " ".join(f"{port}={peer}" for peer, port in
                             sorted(topo.ports(name).items(), key=lambda item: item[1]))
            print(f"  {kind} {name} datapath-id={nodes[name].dpid:016x} ports {ports}")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from nwc.audit import compare_with_database, intact, read_jsonl, verify_chain
    from nwc.store import DATABASE_FILE

    path = args.file or state_dir(args) / "audit.jsonl"
    if not path.exists():
        print(f"audit verify: {path} does not exist", file=sys.stderr)
        return EXIT_ERROR
    # A file given alone may come from anywhere: only a state directory named with it (or
    # the one it is in) is its database.
    database = state_dir(args) / DATABASE_FILE
    checked = (args.file is None or args.state_dir is not None) and database.exists()
    if checked:
        records, tail = compare_with_database(path, database)
    else:
        records, tail = list(read_jsonl(path)), None
    breaks = verify_chain(records)
    if tail is not None:
        breaks.append(tail)
    for b in breaks:
        print(f"{path}: {b}", file=sys.stderr)
    if breaks and all(b.behind for b in breaks):
        # Nothing is wrong with what the file holds; it lacks the database's newest records.
        print(f"audit verify: the file is behind the database ({len(records)} records, "
              "chain intact up to there)", file=sys.stderr)
        return EXIT_ERROR
    if breaks:
        print(f"audit verify: chain broken ({len(breaks)} problem(s) in {len(records)} records)",
              file=sys.stderr)
        return EXIT_ERROR
    print(f"audit verify: {intact(records, database_checked=checked)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nwc", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check-policy", help="validate policy files (and topologies)",
                       description="Validate a policy set; print one line per problem naming "
                                   "file, line and field; exit 1 if there is any.")
    p.add_argument("paths", nargs="*", type=Path,
                   help=f"policy files or directories (default: {SHIPPED_POLICIES})")
    p.add_argument("--topology", action="append", type=Path, default=None,
                   help="also check this topology against the policy (repeatable; default "
                        "with no PATH: every shipped topology)")
    p.add_argument("--wiring", action="store_true",
                   help="also print each topology's datapath ids and OpenFlow port numbers "
                        "(what the bridges must be set to)")
    p.set_defaults(func=cmd_check_policy)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION")
    p = audit.add_parser("verify", help="check the audit log's hash chain")
    add_state_dir(p)
    p.add_argument("--file", type=Path, default=None,
                   help="an audit.jsonl file to check (its end is compared with the "
                        "database only if --state-dir is given too)")
    p.set_defaults(func=cmd_audit_verify)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def silence_stdout() -> None:
    """After the reader of stdout left: later writes (and the interpreter's flush at exit)
    go nowhere instead of failing again."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: stdout has no file (tests)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


class WatchedStdout:
    """sys.stdout, remembering the BrokenPipeError a write to it raised, so that `main` can
    tell a reader of our output that left (`| head`) from a broken socket or subprocess pipe,
    which is a real failure and must not be hidden."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken: BrokenPipeError | None = None

    def _watch(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except BrokenPipeError as exc:
            self.broken = exc
            raise

    def write(self, text: str) -> int:
        return int(self._watch(self.stream.write, text))

    def writelines(self, lines: Iterable[str]) -> None:
        self._watch(self.stream.writelines, lines)

    def flush(self) -> None:
        self._watch(self.stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def stdout_reader_left(exc: BaseException) -> bool:
    """Whether `exc` is a write to stdout finding its reader gone (not a socket's or a
    subprocess pipe's broken pipe): only that one `main` ends quietly on."""
    return isinstance(sys.stdout, WatchedStdout) and exc is sys.stdout.broken


def quiet_dependency_warnings() -> None:
    """The `ovs` library imports eventlet, when installed, only to ask whether `select` is
    monkey-patched (NWC never patches it); eventlet answers with an eight-line deprecation
    warning that opened every controller and agent log, addressed to eventlet's users."""
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")


def main(argv: list[str] | None = None) -> int:
    quiet_dependency_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    stdout = WatchedStdout(sys.stdout)
    sys.stdout = stdout  # type: ignore[assignment]  # a TextIO in all but name
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so a reader gone early is caught below, not at exit
    except BrokenPipeError as exc:
        if not stdout_reader_left(exc):
            raise  # a socket or a subprocess's pipe: a failure to report
        # The reader of our output has gone (`nwc weave show X | head -3`): not a problem to
        # report.
        silence_stdout()
        return EXIT_BROKEN_PIPE
    finally:
        sys.stdout = stdout.stream
    return code


if __name__ == "__main__":
    raise SystemExit(main())
