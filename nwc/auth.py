"""API tokens: one or more bearer tokens per tenant, plus operator (admin) tokens.

A token is 256 random bits, shown once, when it is issued. NWC keeps only its SHA-256 (the
tokens are random and long, so a fast hash is enough: there is nothing to guess a dictionary
from) in `STATE_DIR/tokens`, a JSON file of mode 0600 replaced atomically, so a stolen copy of
the state directory does not let anyone in. The server re-reads the file when it changes:
`nwc token issue` and `nwc token revoke` take effect on a running controller.

`nwc token issue TENANT|admin` prints the new token, and nothing else, on stdout.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nwc.cli import EXIT_ERROR, EXIT_OK, add_state_dir, state_dir
from nwc.config import SHIPPED_POLICIES
from nwc.lease import iso
from nwc.policy import load_policy
from nwc.store import DATABASE_FILE, private_dir
from nwc.weaver import Actor
from nwc.yamlsource import ConfigError

log = logging.getLogger(__name__)

ADMIN = "admin"
TOKEN_PREFIX = "nwc_"
TOKENS_FILE = "tokens"
# What a presented token may look like; anything else is refused before hashing.
TOKEN_SHAPE = re.compile(r"nwc_[A-Za-z0-9_-]{43}")
TOKEN_ID_SHAPE = re.compile(r"tk-[0-9a-f]{8}")


class TokenError(Exception):
    pass


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for: a tenant, or the operator (tenant None)."""

    token_id: str
    tenant: str | None

    @property
    def is_admin(self) -> bool:
        return self.tenant is None

    @property
    def name(self) -> str:
        return ADMIN if self.tenant is None else self.tenant

    def actor(self) -> Actor:
        """The weaver's view: recorded in every audit record the request causes."""
        return Actor(f"{self.name}/{self.token_id}", self.tenant)


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    principal: str  # a tenant name, or "admin"
    sha256: str
    created_at: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.token_id, "principal": self.principal, "sha256": self.sha256,
                "created_at": self.created_at}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The hashed tokens of one state directory. Thread-safe; cheap to ask on every request
    (a stat, and a re-read only when the file changed)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / TOKENS_FILE
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._by_digest: dict[str, TokenRecord] = {}
        self._ids: frozenset[str] = frozenset()  # the issued token ids, for is_valid

    # -- reading --------------------------------------------------------------------------

    def _load(self) -> list[TokenRecord]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(raw)
            return [TokenRecord(t["id"], t["principal"], t["sha256"], t["created_at"])
                    for t in doc["tokens"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenError(f"{self.path} is not a token file NWC wrote: {exc}") from exc

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._by_digest, self._ids = None, {}, frozenset()
            return
        # ctime, not mtime: a chown or chmod that makes the file readable must be seen too.
        key = (st.st_ino, st.st_ctime_ns, st.st_size)
        if key == self._seen:
            return
        try:
            if st.st_mode & 0o077:
                # Hashes are not secrets, but a writable file would let anyone add a token.
                log.warning("%s was mode %o; setting 0600", self.path, st.st_mode & 0o777)
                os.chmod(self.path, 0o600)
            records = self._load()
        except TokenError:
            log.exception("keeping the tokens loaded before")
            return
        except PermissionError as exc:
            # Said once per state of the file, not on every request. What the file holds
            # now is unknown (a token may have been revoked in it): no token is accepted.
            self._seen, self._by_digest, self._ids = key, {}, frozenset()
            log.error("cannot read the tokens file (%s; owner uid %d, mode %o): it must "
                      "belong to the user NWC runs as (run `nwc token` as that user, or chown "
                      "it); no token is accepted until it can be read", exc.strerror,
                      st.st_uid, st.st_mode & 0o777)
            return
        self._by_digest = {r.sha256: r for r in records}
        self._ids = frozenset(r.token_id for r in records)
        self._seen = key

    def authenticate(self, token: str) -> Principal | None:
        """The principal a presented token speaks for, or None."""
        if not TOKEN_SHAPE.fullmatch(token):
            return None
        digest = token_digest(token)
        with self._lock:
            self._refresh()
            # Lookup by digest, then a constant-time comparison of the digests: the digest of
            # an attacker's guess tells them nothing about stored ones.
            record = self._by_digest.get(digest)
        if record is None or not hmac.compare_digest(record.sha256, digest):
            return None
        return Principal(record.token_id, None if record.principal == ADMIN
                         else record.principal)

    def is_valid(self, token_id: str) -> bool:
        """Whether a token with this id is still issued (not revoked)."""
        with self._lock:
            self._refresh()  # one stat when nothing changed: open streams ask often
            return token_id in self._ids

    def records(self) -> list[TokenRecord]:
        with self._lock:
            return self._load()

    # -- writing (the `nwc token` commands) ----------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        private_dir(self.dir)
        fd = os.open(self.dir / f"{TOKENS_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._give_to_owner(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _give_to_owner(self, fd: int) -> None:
        """Root managing the tokens of a state directory that belongs to the controller's
        user (docs/deploy.md): a file root makes there would be root's and 0600, which the
        controller cannot read. It goes to the directory's owner instead."""
        if os.geteuid() != 0:
            return
        owner = os.stat(self.dir)
        if owner.st_uid != 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)

    def _write(self, records: list[TokenRecord]) -> None:
        tmp = self.path.with_name(f".{TOKENS_FILE}.{os.getpid()}.tmp")
        data = json.dumps({"version": 1, "tokens": [r.to_dict() for r in records]},
                          indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            self._give_to_owner(fd)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def issue(self, principal: str, now: datetime | None = None) -> tuple[str, TokenRecord]:
        """Make a token for a tenant (or "admin"); returns it with its record."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._locked():
            records = self._load()
            taken = {r.token_id for r in records}
            token_id = f"tk-{secrets.token_hex(4)}"
            while token_id in taken:
                token_id = f"tk-{secrets.token_hex(4)}"
            record = TokenRecord(token_id, principal, token_digest(token),
                                 iso(now or datetime.now(UTC)))
            self._write([*records, record])
        return token, record

    def revoke(self, token_id: str) -> bool:
        with self._locked():
            records = self._load()
            kept = [r for r in records if r.token_id != token_id]
            if len(kept) == len(records):
                return False
            self._write(kept)
        return True


def describe(record: TokenRecord) -> dict[str, Any]:
    """A token record without its hash: what may be shown to an operator."""
    return {"id": record.token_id, "principal": record.principal,
            "created_at": record.created_at}


# -- `nwc token` -----------------------------------------------------------------------------

def _known_tenants(args: argparse.Namespace) -> set[str]:
    return set(load_policy(args.policy or [SHIPPED_POLICIES]).tenants)


def _take_run_config(args: argparse.Namespace) -> None:
    """`--config-file`: the policy and state directory of the `nwc run` configuration, so a
    token is checked against the policy that controller runs with and lands where it reads
    (options given on the command line win, as for `nwc run`)."""
    # Imported here: nwc.run imports the controller, which a plain `token list` never needs.
    from nwc.run import add_run_options, apply_config_file

    parser = argparse.ArgumentParser(prog="nwc token issue --config-file")
    add_run_options(parser)
    run_args = parser.parse_args([])
    run_args.config_file = args.config_file
    apply_config_file(run_args, parser)
    args.policy = args.policy or run_args.policy
    args.state_dir = args.state_dir or run_args.state_dir


def cmd_token_issue(args: argparse.Namespace) -> int:
    principal = args.principal
    if args.config_file is not None:
        _take_run_config(args)
    if principal != ADMIN:
        try:
            tenants = _known_tenants(args)
        except ConfigError as exc:
            print(f"token issue: the policy does not load:\n{exc}", file=sys.stderr)
            return EXIT_ERROR
        if principal not in tenants:
            # Checked against the shipped examples unless told otherwise: say so, or an
            # operator with their own policy reads a list of tenants they never wrote.
            which = ("the policy" if args.policy else
                     f"the shipped example policy ({SHIPPED_POLICIES}; give the controller's "
                     "with --policy or --config-file)")
            print(f"token issue: {principal!r} is neither 'admin' nor a tenant of {which} "
                  f"(tenants: {', '.join(sorted(tenants)) or 'none'})", file=sys.stderr)
            return EXIT_ERROR
    directory = state_dir(args)
    # A mistyped --state-dir must not quietly get a tokens file no controller reads. A first
    # install may issue tokens before the first start, into the directory it made for the
    # controller (docs/deploy.md): so a missing directory is refused, one without a
    # database only warned about.
    if not directory.is_dir():
        print(f"token issue: state directory {directory} does not exist: give the one the "
              "controller uses (--state-dir, $NWC_STATE_DIR), or create it first",
              file=sys.stderr)
        return EXIT_ERROR
    if not (directory / DATABASE_FILE).exists():
        print(f"token issue: warning: {directory} has no {DATABASE_FILE}: no controller has "
              "run with this state directory yet; the token works once one does",
              file=sys.stderr)
    store = TokenStore(directory)
    token, record = store.issue(principal)
    # Only the token on stdout, so `NWC_TOKEN=$(nwc token issue acme)` works; the id (which
    # `nwc token revoke` takes) goes to stderr.
    print(token)
    print(f"issued {record.token_id} for {principal}", file=sys.stderr)
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    records = TokenStore(state_dir(args)).records()
    if args.json:
        print(json.dumps([describe(r) for r in records], indent=1))
        return EXIT_OK
    print(f"{'ID':<12} {'PRINCIPAL':<20} CREATED")
    for r in records:
        print(f"{r.token_id:<12} {r.principal:<20} {r.created_at}")
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    if not TOKEN_ID_SHAPE.fullmatch(args.token_id):
        print(f"token revoke: {args.token_id!r} is not a token id (tk-xxxxxxxx)",
              file=sys.stderr)
        return EXIT_ERROR
    if not TokenStore(state_dir(args)).revoke(args.token_id):
        print(f"token revoke: no token {args.token_id}", file=sys.stderr)
        return EXIT_ERROR
    print(f"revoked {args.token_id}", file=sys.stderr)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    token = sub.add_parser("token", help="API tokens (stored hashed in the state directory)")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    p = actions.add_parser("issue", help="make a token for a tenant or the operator; prints "
                                         "only the token")
    p.add_argument("principal", metavar="TENANT|admin",
                   help="a tenant of the policy, or 'admin' for an operator token")
    p.add_argument("--policy", type=Path, action="append", default=None,
                   help="policy files to check the tenant against (default: shipped)")
    p.add_argument("--config-file", type=Path, default=None,
                   help="the `nwc run` config file: its policy and state-dir are used unless "
                        "given here")
    add_state_dir(p)
    p.set_defaults(func=cmd_token_issue)

    p = actions.add_parser("list", help="token ids and whom they speak for (never the tokens)")
    p.add_argument("--json", action="store_true")
    add_state_dir(p)
    p.set_defaults(func=cmd_token_list)

    p = actions.add_parser("revoke", help="withdraw a token by its id (takes effect at once)")
    p.add_argument("token_id", metavar="ID")
    add_state_dir(p)
    p.set_defaults(func=cmd_token_revoke)
