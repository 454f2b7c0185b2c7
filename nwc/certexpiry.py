"""When NWC's TLS certificates expire, and telling operators before they do.

NWC presents or trusts certificates in several places, each named by a *use*:

| use | file | who reads it, when |
| --- | --- | --- |
| `openflow` | `--ctl-cert` | the OpenFlow listener, once at start |
| `openflow-ca` | `--ca-certs` | the OpenFlow listener, once at start |
| `ovsdb` | `--ovsdb-ssl-cert` | python-ovs, at every new connection to a host's OVSDB |
| `ovsdb-ca` | `--ovsdb-ssl-ca` | python-ovs, at every new connection |
| `api` | `--api-ssl-cert` (a chain: every certificate in it) | the REST server, once at start |
| `weave-ca` | `<state-dir>/pki/ca.crt` | NWC's weave CA, signing leaf certificates for x509 legs |

The weave CA's leaves are not watched one by one: each is signed for one leg of one weave and
is valid until the weave's whole-life cap, created_at + 366 days (`nwc.tunnels`), and no
extension carries a weave past that cap (`nwc.admission.life_ends_at`), so a leaf never
expires under a live weave; what can break them is the CA they chain to expiring, and that is
watched.

The pure part (`certificate_facts`, `notices`, `line`) takes PEM bytes and `now`. The shell
reads the files `nwc run` would (`certificate_files`), logs a notice once per change of a
certificate's state (`CertWatch`: at start, hourly and at each /metrics scrape, so a rotated
file is what is reported), and is `nwc check-certs`. Only certificates are ever parsed or
shown: key files are never opened, and a file's content never reaches a message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import enum
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from nwc.cli import EXIT_ERROR, EXIT_OK, state_dir
from nwc.lease import Clock, SystemClock
from nwc.pki import CA_CERT_FILE
from nwc.run import add_run_options, apply_config_file, check_run_options

if TYPE_CHECKING:
    from nwc.controller import Controller

log = logging.getLogger(__name__)

DEFAULT_WARN_DAYS = 30
CHECK_EVERY_S = 3600.0
# Uses whose file the running controller read once, at start: a renewed file is presented
# only after a restart (python-ovs reads the OVSDB files at every new connection).
READ_AT_START = frozenset({"openflow", "openflow-ca", "api"})
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----",
                              re.DOTALL)


class Status(enum.StrEnum):
    OK = "ok"
    EXPIRING = "expiring"  # valid, but for less than the warning threshold
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    UNREADABLE = "unreadable"  # missing, unreadable, or no certificate in it


# How loud each state is logged when a certificate enters it.
LEVELS = {Status.OK: logging.INFO, Status.EXPIRING: logging.WARNING,
          Status.EXPIRED: logging.ERROR, Status.NOT_YET_VALID: logging.WARNING,
          Status.UNREADABLE: logging.ERROR}


@dataclass(frozen=True)
class CertFacts:
    """One certificate of one file, as of `now`. A file that yields no certificate is one
    fact with status UNREADABLE, no dates, and `problem` saying why."""

    use: str
    source: str  # the file
    index: int  # position in the file (a chain or CA bundle holds several)
    subject: str  # RFC 4514
    serial: str  # hex
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    seconds_left: float | None  # until not_after; negative once expired
    status: Status
    problem: str = ""

    @property
    def key(self) -> tuple[str, str, int]:
        """Which slot this is: the same slot holds the renewed certificate after rotation."""
        return self.use, self.source, self.index

    @property
    def where(self) -> str:
        return self.source if self.index == 0 else f"{self.source}#{self.index}"


def certificate_facts(use: str, source: str, pem: bytes, now: dt.datetime,
                      warn_within: dt.timedelta) -> list[CertFacts]:
    """Every certificate in `pem` (anything else in it, keys included, is skipped unread),
    with its expiry state at `now`: EXPIRING when it ends within `warn_within`."""
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        return [unreadable(use, source, "no PEM certificate in it")]
    facts = []
    for index, block in enumerate(blocks):
        try:
            cert = x509.load_pem_x509_certificate(block)
            not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
            subject = cert.subject.rfc4514_string()
        except ValueError as exc:
            # The library's message names the structure that failed, never the bytes.
            facts.append(unreadable(use, source, f"not a valid certificate ({exc})", index))
            continue
        left = (not_after - now).total_seconds()
        if now > not_after:
            status = Status.EXPIRED
        elif now < not_before:
            status = Status.NOT_YET_VALID
        elif left <= warn_within.total_seconds():
            status = Status.EXPIRING
        else:
            status = Status.OK
        facts.append(CertFacts(use, source, index, subject or "(empty subject)",
                               format(cert.serial_number, "x"), not_before, not_after, left,
                               status))
    return facts


def unreadable(use: str, source: str, why: str, index: int = 0) -> CertFacts:
    return CertFacts(use, source, index, "", "", None, None, None, Status.UNREADABLE, why)


def span(seconds: float) -> str:
    """A duration as people say it: days, else hours, else minutes (rounded down)."""
    seconds = abs(seconds)
    if seconds >= 2 * 86400:
        return f"{int(seconds // 86400)} days"
    if seconds >= 2 * 3600:
        return f"{int(seconds // 3600)} hours"
    return f"{int(seconds // 60)} minutes"


def when(value: dt.datetime) -> str:
    """A certificate date: to the second, as certificates have them, in UTC."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def state_text(fact: CertFacts) -> str:
    """What a certificate's state means, with the dates that matter for it."""
    if fact.status is Status.UNREADABLE or fact.not_after is None or fact.not_before is None \
            or fact.seconds_left is None:
        return f"unreadable: {fact.problem}"
    until = when(fact.not_after)
    if fact.status is Status.EXPIRED:
        return f"EXPIRED at {until} ({span(fact.seconds_left)} ago)"
    if fact.status is Status.NOT_YET_VALID:
        return f"NOT YET VALID: valid from {when(fact.not_before)} until {until}"
    if fact.status is Status.EXPIRING:
        return f"EXPIRES at {until} (in {span(fact.seconds_left)})"
    return f"valid until {until} ({span(fact.seconds_left)} left)"


def line(fact: CertFacts) -> str:
    """One line of `nwc check-certs`: the state first, for grep and awk."""
    who = f"{fact.subject} serial {fact.serial}: " if fact.serial else ""
    return f"{fact.status.value:<13} {fact.use:<11} {fact.where}: {who}{state_text(fact)}"


@dataclass(frozen=True)
class Notice:
    level: int
    message: str


def notices(before: Mapping[tuple[str, str, int], CertFacts],
            facts: Iterable[CertFacts]) -> list[Notice]:
    """What to log after a check: one notice per certificate seen for the first time, whose
    state changed, or that was replaced on disk (another serial, or another problem). A
    certificate that stays as it was says nothing, so an expiring one warns once, not at
    every check."""
    out = []
    for fact in facts:
        prev = before.get(fact.key)
        if prev is not None and (prev.status, prev.serial, prev.problem) == \
                (fact.status, fact.serial, fact.problem):
            continue
        what = f"certificate {fact.use} {fact.where}"
        if fact.serial:
            what += f" ({fact.subject}, serial {fact.serial})"
        message = f"{what}: {state_text(fact)}"
        if prev is not None and prev.serial and fact.serial and prev.serial != fact.serial:
            message = f"{what} replaced on disk: {state_text(fact)}"
            if fact.use in READ_AT_START:
                message += "; the running controller presents it only after a restart"
        out.append(Notice(LEVELS[fact.status], message))
    return out


# -- the shell: which files, reading them, watching them --------------------------------------

@dataclass(frozen=True)
class CertFile:
    use: str
    path: Path
    optional: bool = False  # a missing file is not a problem (NWC creates it when needed)


# `nwc run` options naming a certificate file, and the use each one is.
CERT_OPTIONS = (("ctl_cert", "openflow"), ("ca_certs", "openflow-ca"),
                ("ovsdb_ssl_cert", "ovsdb"), ("ovsdb_ssl_ca", "ovsdb-ca"),
                ("api_ssl_cert", "api"))


def certificate_files(args: argparse.Namespace, state: Path) -> list[CertFile]:
    """The certificate files `nwc run` with these options reads (never a key file)."""
    files = [CertFile(use, Path(value)) for option, use in CERT_OPTIONS
             if (value := getattr(args, option, None))]
    # Created by the tunnel part on first start: absent until then, and that is fine.
    files.append(CertFile("weave-ca", state / "pki" / CA_CERT_FILE, optional=True))
    return files


def read_facts(files: Sequence[CertFile], now: dt.datetime, warn_within: dt.timedelta,
               read: Callable[[Path], bytes] = Path.read_bytes) -> list[CertFacts]:
    facts: list[CertFacts] = []
    for file in files:
        try:
            data = read(file.path)
        except FileNotFoundError:
            if not file.optional:
                facts.append(unreadable(file.use, str(file.path), "no such file"))
            continue
        except OSError as exc:
            facts.append(unreadable(file.use, str(file.path),
                                    f"cannot read it ({exc.strerror or type(exc).__name__})"))
            continue
        facts.extend(certificate_facts(file.use, str(file.path), data, now, warn_within))
    return facts


class CertWatch:
    """Re-reads the certificate files at every `check` and logs what changed. Checks run at
    `start`, every `every_s` on its own thread (file reads stay off the weaver's loop), and
    whenever /metrics is scraped."""

    def __init__(self, files: Sequence[CertFile], clock: Clock, warn_within: dt.timedelta,
                 read: Callable[[Path], bytes] = Path.read_bytes,
                 every_s: float = CHECK_EVERY_S) -> None:
        self.files = tuple(files)
        self.clock = clock
        self.warn_within = warn_within
        self.every_s = every_s
        self._read = read
        self._lock = threading.Lock()  # one check at a time: notices are logged once
        self._last: dict[tuple[str, str, int], CertFacts] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> tuple[CertFacts, ...]:
        with self._lock:
            facts = read_facts(self.files, self.clock.now(), self.warn_within, self._read)
            for notice in notices(self._last, facts):
                log.log(notice.level, "%s", notice.message)
            self._last = {f.key: f for f in facts}
            return tuple(facts)

    def start(self) -> None:
        self._check_logged()
        self._thread = threading.Thread(target=self._run, name="nwc-certs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._check_logged()

    def _check_logged(self) -> None:
        try:
            self.check()
        except Exception:  # a bug here must not stop the controller, nor go unseen
            log.exception("checking certificate expiry failed")


def serve(controller: Controller, args: argparse.Namespace) -> CertWatch:
    """`nwc run` hook: check the certificates now and hourly; /metrics exports them."""
    days = getattr(args, "cert_warn_days", DEFAULT_WARN_DAYS)
    watch = CertWatch(certificate_files(args, controller.state_dir), controller.clock,
                      dt.timedelta(days=days))
    controller.cert_watch = watch
    watch.start()
    controller.on_stop(watch.stop)
    return watch


# -- `nwc check-certs` ------------------------------------------------------------------------

def cmd_check_certs(args: argparse.Namespace, clock: Clock | None = None) -> int:
    parser: argparse.ArgumentParser = args._parser
    apply_config_file(args, parser)
    check_run_options(args, parser)
    facts = read_facts(certificate_files(args, state_dir(args)),
                       (clock or SystemClock()).now(), dt.timedelta(days=args.cert_warn_days))
    for fact in facts:
        print(line(fact))
    if not facts:
        print("check-certs: no certificate configured (no --ctl-cert, --ca-certs, "
              "--ovsdb-ssl-*, --api-ssl-cert, and no weave CA in the state directory yet)")
        return EXIT_OK
    bad = [f for f in facts if f.status is not Status.OK]
    if bad:
        print(f"check-certs: {len(bad)} of {len(facts)} certificate(s) need attention "
              f"(warning {args.cert_warn_days} days before expiry)", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-certs", help="report when the controller's certificates expire",
        description="Read the certificate files `nwc run` would read with the same options "
                    "(--config-file included), print one line per certificate, and exit 1 if "
                    "one is expired, not yet valid, unreadable, or expires within "
                    "--cert-warn-days. Run it as the controller's user: the weave CA in the "
                    "state directory is readable only by it.")
    add_run_options(p)
    p.set_defaults(func=cmd_check_certs, _parser=p)
