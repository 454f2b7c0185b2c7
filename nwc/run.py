"""`nwc run`: start the controller (os-ken 4 ships no ryu-manager; this is NWC's launcher).

It loads the policy and topology (the shipped ones by default), recovers state from the state
directory, then starts each shell that is available: the OpenFlow controller (`nwc.ofapp`), the
tunnel part (`nwc.tunnels`, which drives each host's OVSDB and agent) and the REST API
(`nwc.api`). Logs go to stderr. SIGTERM or SIGINT stop it cleanly; SIGHUP reloads
the policy (a policy with errors is refused and the running one kept).
"""

from __future__ import annotations

import argparse
import configparser
import faulthandler
import importlib
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from nwc.cli import EXIT_ERROR, EXIT_OK, add_state_dir, counted, state_dir, tcp_port
from nwc.config import DEFAULT_TOPOLOGY, SHIPPED_POLICIES
from nwc.controller import Controller, PolicyReloads
from nwc.hostwatch import AGENT_SILENT_S, MIN_AGENT_SILENT_S
from nwc.ofguard import parse_networks
from nwc.yamlsource import ConfigError

log = logging.getLogger("nwc.run")

# Shells started by `nwc run`, in order; each module has `serve(controller, args)`, which
# starts it (in threads) and registers its stopper with `controller.on_stop`.
STOP_GRACE_S = 10.0

# The certificate check comes first: its start-up report is logged even when a later shell
# refuses to start (often over the very files it reports on).
SHELLS = ("nwc.certexpiry", "nwc.ofapp", "nwc.tunnels", "nwc.api")


# Set on the namespace by the actions below: the options given on the command line, which the
# config file must not override even where their value equals the default.
GIVEN_ON_COMMAND_LINE = "_given_on_command_line"


class _RecordsGiven(argparse.Action):
    """Mixed into an argparse action: also notes that the command line set this option."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        vars(namespace).setdefault(GIVEN_ON_COMMAND_LINE, set()).add(self.dest)


class _StoreGiven(_RecordsGiven, argparse._StoreAction):
    pass


class _AppendGiven(_RecordsGiven, argparse._AppendAction):
    pass


def given_on_command_line(args: argparse.Namespace) -> set[str]:
    """The dests of the `nwc run` options the command line set."""
    return set(getattr(args, GIVEN_ON_COMMAND_LINE, None) or ())


def ofp_cert_names(text: str) -> str:
    """`--ofp-cert-names`, checked the same from the command line and the config file (which
    argparse's `choices` would not cover)."""
    if text not in ("match", "any"):
        raise argparse.ArgumentTypeError(f"expected match or any, not {text!r}")
    return text


def add_run_options(p: argparse.ArgumentParser) -> None:
    # Comparing a value with its default cannot tell `--api-host 127.0.0.1` from no option
    # at all: these actions record which options were given.
    p.register("action", None, _StoreGiven)  # what add_argument uses without action=
    p.register("action", "store", _StoreGiven)
    p.register("action", "append", _AppendGiven)
    p.add_argument("--config-file", type=Path, default=None,
                   help="an INI file whose [nwc] section sets any of these options "
                        "(command-line options win)")
    p.add_argument("--policy", type=Path, action="append", default=None,
                   help=f"policy file or directory (repeatable; default {SHIPPED_POLICIES})")
    p.add_argument("--topology", default=None,
                   help=f"topology file or shipped name (default {DEFAULT_TOPOLOGY.stem})")
    p.add_argument("--ofp-listen-host", default="0.0.0.0",
                   help="address for OpenFlow connections from switches")
    p.add_argument("--ofp-tcp-listen-port", type=tcp_port, default=6653)
    p.add_argument("--ofp-allowed-peers", default=None, metavar="CIDR[,CIDR...]",
                   help="accept OpenFlow connections only from these networks (closed before "
                        "anything is read); default: from anywhere. Hosts with a "
                        "management_ip in the topology are also accepted only from it")
    p.add_argument("--ctl-privkey", default=None,
                   help="private key (PEM) NWC presents to switches: with --ctl-cert and "
                        "--ca-certs, OpenFlow connections must be TLS")
    p.add_argument("--ctl-cert", default=None, help="certificate (PEM) for --ctl-privkey")
    p.add_argument("--ca-certs", default=None,
                   help="CA certificate(s) (PEM) that switch certificates must chain to (use a "
                        "CA that signs only switches)")
    p.add_argument("--ofp-cert-names", type=ofp_cert_names, default="match",
                   metavar="{match,any}",
                   help="with TLS: 'match' (default) accepts a switch only if its certificate "
                        "names the topology switch whose datapath id it announces "
                        "(switches.NAME.cert_name, hosts.NAME.ovsdb_cert_name); 'any' lets "
                        "every certificate from --ca-certs claim any switch")
    p.add_argument("--api-host", default="127.0.0.1",
                   help="address for the REST API (loopback unless you mean otherwise)")
    p.add_argument("--api-port", type=tcp_port, default=8181)
    p.add_argument("--api-ssl-key", default=None,
                   help="private key (PEM) for serving the REST API over https")
    p.add_argument("--api-ssl-cert", default=None,
                   help="certificate (PEM, chain allowed) for --api-ssl-key")
    # The API's limits: unset options keep nwc.api.ApiSettings' defaults (docs/api.md).
    p.add_argument("--api-max-live-weaves", type=int, default=None, metavar="N",
                   help="live weaves one tenant may have requested at once (429 beyond)")
    p.add_argument("--api-rate", type=float, default=None, metavar="PER_S",
                   help="requests per second per tenant, sustained (429 beyond)")
    p.add_argument("--api-rate-burst", type=int, default=None, metavar="N",
                   help="requests per tenant in a burst")
    p.add_argument("--api-max-body", type=int, default=None, metavar="BYTES",
                   help="largest request body (413 beyond)")
    p.add_argument("--provision-timeout", type=float, default=30.0,
                   help="seconds a weave may stay provisioning before it fails")
    p.add_argument("--ovsdb-ssl-key", default=None,
                   help="private key (PEM) NWC presents to hosts' OVSDB at ssl: targets")
    p.add_argument("--ovsdb-ssl-cert", default=None,
                   help="certificate (PEM) for --ovsdb-ssl-key")
    p.add_argument("--ovsdb-ssl-ca", default=None,
                   help="CA certificate (PEM) the hosts' OVSDB server certificates must chain "
                        "to; ssl: targets are refused without these three")
    p.add_argument("--agent-unresponsive-after", type=float, default=AGENT_SILENT_S,
                   metavar="SECONDS",
                   help="call a host's agent unresponsive when its heartbeat has not changed "
                        "for this long, and a host's OVSDB unreachable when it could not be "
                        f"read for this long (default {AGENT_SILENT_S:g}, at least "
                        f"{MIN_AGENT_SILENT_S:g}; give at least 3 times the agents' "
                        "--heartbeat-interval)")
    p.add_argument("--cert-warn-days", type=int, default=30, metavar="DAYS",
                   help="warn (log, /metrics, nwc check-certs) when a certificate expires "
                        "within this many days (default 30, at most 3650)")
    add_state_dir(p)


class StartRefused(Exception):
    """A shell cannot start as configured; the message says why (no traceback needed)."""


def _config_error(parser: argparse.ArgumentParser, path: Path,
                  exc: configparser.Error | UnicodeDecodeError) -> NoReturn:
    if isinstance(exc, configparser.DuplicateOptionError):
        parser.error(f"{path}: {exc.option} is set twice in [{exc.section}] "
                     f"(line {exc.lineno})")
    if isinstance(exc, configparser.DuplicateSectionError):
        parser.error(f"{path}: [{exc.section}] appears twice (line {exc.lineno})")
    if isinstance(exc, configparser.MissingSectionHeaderError):
        parser.error(f"{path}: line {exc.lineno} comes before any section header "
                     "(start the file with [nwc])")
    if isinstance(exc, UnicodeDecodeError):
        parser.error(f"{path}: not UTF-8 text")
    # Other parse errors: the first line names the file and the line.
    parser.error(f"{path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Options from --config-file fill in whatever the command line did not give."""
    if not args.config_file:
        return
    path = args.config_file
    # No interpolation: a '%' in a path or a value means itself.
    ini = configparser.ConfigParser(interpolation=None)
    try:
        if not ini.read(path, encoding="utf-8"):
            parser.error(f"cannot read {path}")
    except (configparser.Error, UnicodeDecodeError) as exc:
        _config_error(parser, path, exc)
    if not ini.has_section("nwc"):
        parser.error(f"{path} has no [nwc] section")
    # Only the options themselves: other namespace attributes (func, command...) are not
    # settable from a file.
    options = {a.dest: a for a in parser._actions
               if a.option_strings and a.dest not in ("help", "config_file")}
    given = given_on_command_line(args)
    # configparser sees `api-port` and `api_port` as two keys; they set one option, and a
    # file setting both would silently keep whichever came last.
    spelled: dict[str, str] = {}
    for key, raw in ini.items("nwc"):
        dest = key.replace("-", "_")
        action = options.get(dest)
        if action is None:
            parser.error(f"{path}: unknown option {key!r}")
        if spelled.setdefault(dest, key) != key:
            parser.error(f"{path}: {spelled[dest]} is set twice in [nwc] (also as {key})")
        if dest in given:
            continue  # the command line said otherwise
        if dest == "policy":
            value: object = [Path(p.strip()) for p in raw.split(",") if p.strip()]
        else:  # converted as the command line would have
            try:
                value = action.type(raw) if action.type else raw
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                parser.error(f"{path}: {key} = {raw!r} is not valid")
        setattr(args, dest, value)


# Ten years, as long as NWC's weave CA lives: a longer warning would warn of every
# certificate from the day it is made.
MAX_CERT_WARN_DAYS = 3650


def check_run_options(args: argparse.Namespace,
                      parser: argparse.ArgumentParser) -> None:
    """Refuse option values the shells would only trip over after the state is open."""
    if len({bool(args.ctl_privkey), bool(args.ctl_cert), bool(args.ca_certs)}) > 1:
        parser.error("--ctl-privkey, --ctl-cert and --ca-certs go together")
    if bool(args.api_ssl_key) != bool(args.api_ssl_cert):
        parser.error("--api-ssl-key and --api-ssl-cert go together")
    # inf would never fail a stuck weave, nan compares false with every deadline.
    if not (math.isfinite(args.provision_timeout) and args.provision_timeout > 0):
        parser.error("--provision-timeout must be a finite number of seconds above 0")
    # nan would never call an agent unresponsive, inf likewise; a bound below a couple of
    # seconds would call healthy agents unresponsive over one slow pass (nwc.hostwatch).
    silent = args.agent_unresponsive_after
    if not (math.isfinite(silent) and silent >= MIN_AGENT_SILENT_S):
        parser.error(f"--agent-unresponsive-after must be a finite number of seconds, at least "
                     f"{MIN_AGENT_SILENT_S:g} (not {silent:g}); give at least 3 times the "
                     "agents' --heartbeat-interval")
    for option in ("api_max_live_weaves", "api_rate", "api_rate_burst", "api_max_body"):
        if getattr(args, option) is not None and not getattr(args, option) > 0:
            parser.error(f"--{option.replace('_', '-')} must be positive")
    if args.cert_warn_days < 0:
        parser.error("--cert-warn-days must be 0 or more")
    if args.cert_warn_days > MAX_CERT_WARN_DAYS:
        # A billion days overflowed the date arithmetic (OverflowError, found in review).
        parser.error(f"--cert-warn-days must be at most {MAX_CERT_WARN_DAYS} (ten years)")
    if args.ofp_allowed_peers is not None:
        try:
            parse_networks(args.ofp_allowed_peers)
        except ValueError as exc:
            parser.error(f"--ofp-allowed-peers: {exc}")


def cmd_run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args._parser
    apply_config_file(args, parser)
    check_run_options(args, parser)
    os.umask(0o077)  # keys, the database and the audit log are for root's eyes only
    try:
        controller = Controller.from_paths(state_dir(args), args.policy, args.topology,
                                           provision_timeout_s=args.provision_timeout)
    except ConfigError as exc:
        print(f"nwc run: configuration refused:\n{exc}", file=sys.stderr)
        return EXIT_ERROR
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    reloads = PolicyReloads(controller.reload_policy)
    signal.signal(signal.SIGHUP, lambda *_: reloads.request())
    controller.start(parts_to_attach=True)
    topo = controller.config.topology
    log.info("NWC controller up: topology %s (%s, %s), %s, state in %s", topo.name,
             counted(len(topo.switches), "switch", "switches"), counted(len(topo.hosts), "host"),
             counted(len(controller.weaver.live), "live weave"), controller.state_dir)
    code = EXIT_OK
    try:
        for name in SHELLS:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name != name:
                    raise
                log.debug("%s is not part of this build", name)
                continue
            module.serve(controller, args)
        controller.parts_attached()
        stop.wait()
    except StartRefused as exc:
        log.error("NWC controller cannot start: %s", exc)
        code = EXIT_ERROR
    except Exception:
        log.exception("NWC controller failed")
        code = EXIT_ERROR
    finally:
        log.info("NWC controller stopping")
        # A shell that does not let go shows where it hangs instead of hanging silently.
        faulthandler.dump_traceback_later(STOP_GRACE_S, exit=True)
        controller.stop()
        faulthandler.cancel_dump_traceback_later()
        log.info("NWC controller stopped")
        # os-ken's hub threads (listener, per-switch loops) are not daemon threads and have
        # no stop: with every shell stopped and the state closed, leave without waiting.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code  # not reached


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="start the controller", description=__doc__)
    add_run_options(p)
    p.set_defaults(func=cmd_run, _parser=p)
