"""A compute host's OVSDB as NWC's tunnel code uses it, through ovsdbapp.

The controller and the host agent talk through one place: external_ids of the host's single
Open_vSwitch row. The controller sets `nwc-tunnel-*` keys (desired leg ends), the agent sets
`nwc-status-*` keys (what it built, SA state). Both write single keys with OVSDB mutations, so
the two writers never conflict and nothing else in that column is touched. The agent also adds
and removes its own Port/Interface rows on the integration bridge.

Transactions here do not wait for ovs-vswitchd to apply them (ovsdbapp's Open_vSwitch backend
does, and would hang against an ovsdb-server without vswitchd, as in the ovs-ipsec tests):
callers that need an ofport poll for it.

Every command NWC runs prints only key names in its repr: ovsdbapp logs commands at debug
level, and some values here are pre-shared keys.

Targets are `unix:`, `tcp:` or `ssl:` (comma-separated for several remotes). `ssl:` needs this
process's key, certificate and CA certificate (`configure_ssl`; python-ovs keeps them
process-wide): without them a target is refused with a clear error. The server's certificate
must also be the expected server's (`server_identity`, checked by `nwc.ovsdbtls` before any
OVSDB message crosses, on every connection and reconnection): python-ovs alone checks only
that it chains to the CA. `tcp:` works but carries every record, pre-shared keys included, in
clear: it is logged once per target.

Nothing here waits without limit on the other end: opening (connect, TLS handshake, schema,
first contents) has a deadline, transactions time out, and reading the cache gives up when
the connection's thread is stuck in a transaction. ovsdbapp's own schema fetch has no limit
at all (a powered-off host costs the kernel's SYN retries, about two minutes; a server that
accepts and never answers, for ever).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ovs.poller
from ovs import jsonrpc, stream
from ovsdbapp.backend.ovs_idl import command as ovs_command
from ovsdbapp.backend.ovs_idl import connection, idlutils, transaction
from ovsdbapp.schema.open_vswitch import impl_idl

from nwc import ovsdbtls
from nwc.bridgeguard import BridgeRows, Fix, RemoteRow
from nwc.ovsdbtls import ServerIdentity

log = logging.getLogger(__name__)

# Table -> the columns monitored (empty: all). The controller reads the integration bridge's
# safety settings (nwc.bridgeguard) but not its ports: only those columns of Bridge.
CONTROLLER_TABLES: Mapping[str, tuple[str, ...]] = {
    "Open_vSwitch": (),
    "Bridge": ("name", "fail_mode", "controller"),
    "Controller": ("target", "connection_mode"),
    "Manager": ("target", "connection_mode"),
}
AGENT_TABLES = ("Open_vSwitch", "Bridge", "Port", "Interface")


class _PlainTransactions(impl_idl.OvsdbIdl):
    """ovsdbapp's Open_vSwitch API with plain transactions (no wait for ovs-vswitchd), and
    one connection per instance: ovsdbapp's backends share a single class-wide connection,
    and NWC talks to every host's OVSDB at once."""

    _own_connection: connection.Connection | None = None

    @property  # type: ignore[override]
    def ovsdb_connection(self) -> connection.Connection:
        return self._own_connection

    @ovsdb_connection.setter
    def ovsdb_connection(self, conn: connection.Connection) -> None:
        self._own_connection = conn

    def create_transaction(self, check_error: bool = False, log_errors: bool = True,
                           **kwargs: Any) -> transaction.Transaction:
        return transaction.Transaction(self, self.ovsdb_connection, check_error=check_error,
                                       log_errors=log_errors)


class _UpdateMap(ovs_command.BaseCommand):
    """Set and delete single keys of a map column (OVSDB mutate: no read, no conflict)."""

    def __init__(self, api: Any, table: str, record: str, column: str,
                 set_keys: Mapping[str, str], delete_keys: Iterable[str]) -> None:
        super().__init__(api)
        self.table, self.record, self.column = table, record, column
        self.set_keys = dict(set_keys)
        self.delete_keys = list(delete_keys)

    def run_idl(self, txn: Any) -> None:
        row = self.api.lookup(self.table, self.record)
        for key in self.delete_keys:
            row.delkey(self.column, key)
        for key, value in self.set_keys.items():
            row.setkey(self.column, key, value)

    def __str__(self) -> str:
        return (f"UpdateMap({self.table} {self.record} {self.column}: set "
                f"{sorted(self.set_keys)}, delete {sorted(self.delete_keys)})")

    __repr__ = __str__


class _AddTunnelPort(ovs_command.BaseCommand):
    """A Port with one Interface on a bridge (replacing any row of that name NWC owns)."""

    def __init__(self, api: Any, bridge: str, columns: Mapping[str, Any]) -> None:
        super().__init__(api)
        self.bridge = bridge
        self.columns = dict(columns)

    def run_idl(self, txn: Any) -> None:
        name = self.columns["name"]
        br = self.api.lookup("Bridge", self.bridge)
        iface = idlutils.row_by_value(self.api.idl, "Interface", "name", name, None)
        port = idlutils.row_by_value(self.api.idl, "Port", "name", name, None)
        if port is None:
            iface = txn.insert(self.api.idl.tables["Interface"])
            port = txn.insert(self.api.idl.tables["Port"])
            port.name = name
            port.interfaces = [iface]
            port.external_ids = self.columns.get("external_ids", {})
            br.addvalue("ports", port)
        elif iface is None:
            raise RuntimeError(f"port {name} exists without its interface")
        for column, value in self.columns.items():
            setattr(iface, column, value)

    def __str__(self) -> str:
        return f"AddTunnelPort({self.bridge} {self.columns.get('name')})"

    __repr__ = __str__


class _DeletePort(ovs_command.BaseCommand):
    def __init__(self, api: Any, name: str) -> None:
        super().__init__(api)
        self.name = name

    def run_idl(self, txn: Any) -> None:
        port = idlutils.row_by_value(self.api.idl, "Port", "name", self.name, None)
        if port is None:
            return
        for br in self.api.idl.tables["Bridge"].rows.values():
            if port in br.ports:
                br.delvalue("ports", port)
        for iface in port.interfaces:
            iface.delete()
        port.delete()

    def __str__(self) -> str:
        return f"DeletePort({self.name})"

    __repr__ = __str__


class OvsdbConfigError(ValueError):
    """An OVSDB target this process cannot use as configured (e.g. ssl: without keys)."""


class ServerIdentityError(ConnectionError):
    """An ssl: server whose certificate chains to the CA but is not the expected server's."""


@dataclass(frozen=True)
class SslFiles:
    """PEM files for `ssl:` OVSDB targets: this side's private key and certificate, and the
    CA certificate the server's certificate must chain to. Whose certificate it is, python-ovs
    does not check: `HostDb`'s `server_identity` does (`nwc.ovsdbtls`)."""

    private_key: Path
    certificate: Path
    ca_cert: Path


_ssl: SslFiles | None = None
_tcp_warned: set[str] = set()
_tcp_lock = threading.Lock()


def ssl_files(private_key: str | Path | None, certificate: str | Path | None,
              ca_cert: str | Path | None) -> SslFiles | None:
    """The three options given together (or none), each a readable file."""
    given = {"--ovsdb-ssl-key": private_key, "--ovsdb-ssl-cert": certificate,
             "--ovsdb-ssl-ca": ca_cert}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise OvsdbConfigError(f"{', '.join(missing)} missing: --ovsdb-ssl-key, "
                               "--ovsdb-ssl-cert and --ovsdb-ssl-ca go together")
    for name, value in given.items():
        try:
            Path(str(value)).open("rb").close()
        except OSError as exc:
            raise OvsdbConfigError(f"{name} {value}: {exc.strerror}") from None
    return SslFiles(Path(str(private_key)), Path(str(certificate)), Path(str(ca_cert)))


def configure_ssl(files: SslFiles | None) -> None:
    """Use these files for every `ssl:` target this process opens from now on (None: no
    ssl: targets)."""
    global _ssl
    ovsdbtls.install()
    stream.Stream.ssl_set_private_key_file(str(files.private_key) if files else None)
    stream.Stream.ssl_set_certificate_file(str(files.certificate) if files else None)
    stream.Stream.ssl_set_ca_cert_file(str(files.ca_cert) if files else None)
    _ssl = files


def configure_targets(private_key: str | Path | None, certificate: str | Path | None,
                      ca_cert: str | Path | None, targets: Iterable[str]) -> None:
    """A command's `--ovsdb-ssl-*` options and the OVSDB targets it will open, checked
    together before it starts: bad files or an ssl: target without them raise
    OvsdbConfigError now, rather than a retry loop later."""
    files = ssl_files(private_key, certificate, ca_cert)
    if files is not None:
        configure_ssl(files)
    for target in targets:
        check_target(target)


def check_target(target: str) -> None:
    """Refuse an `ssl:` target this process has no keys for (python-ovs would fail deep in
    its TLS setup, with "cafile, capath and cadata cannot be all omitted"), and say once per
    `tcp:` target that what crosses it is readable by anyone on the way."""
    remotes = idlutils.parse_connection(target)
    if _ssl is None and any(r.startswith("ssl:") for r in remotes):
        raise OvsdbConfigError(f"OVSDB target {target} is ssl: but no key, certificate and CA "
                               "certificate are configured (--ovsdb-ssl-key, --ovsdb-ssl-cert, "
                               "--ovsdb-ssl-ca)")
    for remote in remotes:
        if remote.startswith("tcp:"):
            with _tcp_lock:
                if remote in _tcp_warned:
                    continue
                _tcp_warned.add(remote)
            log.warning("OVSDB target %s is not encrypted: tunnel records, pre-shared keys "
                        "included, cross the network in clear (use ssl:)", remote)


def _open_stream(remote: str, deadline: float, timeout_s: float) -> stream.Stream:
    """A connected stream (TLS handshake done for ssl:), or an error by `deadline`.
    python-ovs's Stream.open_block waits for the socket to be writable while a TLS handshake
    waits for the server, which is at once and every time: it would spin a core until the
    deadline against a server that never answers."""
    error, strm = stream.Stream.open(remote)
    if error or strm is None:
        raise ConnectionError(f"{remote}: {os.strerror(error)}")
    try:
        while (error := strm.connect()) == errno.EAGAIN:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{remote}: no connection within {timeout_s:g} s")
            try:
                strm.socket.getpeername()
                event = ovs.poller.POLLIN  # connected: the TLS handshake waits for the server
            except OSError:
                event = ovs.poller.POLLOUT  # still connecting
            poller = ovs.poller.Poller()
            poller.fd_wait(strm.socket, event)
            poller.timer_wait(min(int(left * 1000) + 1, 100))  # and look again now and then
            poller.block()
        if error:
            refusal = getattr(strm, "refusal", None)
            if refusal:
                raise ServerIdentityError(f"{remote}: {refusal}")
            raise ConnectionError(f"{remote}: {os.strerror(error)}")
    except BaseException:
        strm.close()
        raise
    return strm


def fetch_schema(remote: str, schema: str, timeout_s: float) -> Any:
    """The schema from one OVSDB remote, or an error within `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    rpc = jsonrpc.Connection(_open_stream(remote, deadline, timeout_s))
    try:
        request = jsonrpc.Message.create_request("get_schema", [schema])
        error = rpc.send(request)
        while not error:
            error, reply = rpc.recv()
            if error == errno.EAGAIN:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{remote}: no answer within {timeout_s:g} s")
                rpc.run()
                poller = ovs.poller.Poller()
                rpc.wait(poller)
                rpc.recv_wait(poller)
                poller.timer_wait(int(left * 1000) + 1)
                poller.block()
                error = 0
            elif not error and reply.id == request.id:
                if reply.type != jsonrpc.Message.T_REPLY or reply.error:
                    raise ConnectionError(f"{remote}: get_schema refused: {reply.error}")
                return reply.result
        raise ConnectionError(f"{remote}: " + ("connection closed" if error == jsonrpc.EOF
                                               else os.strerror(error)))
    finally:
        rpc.close()


class HostDb:
    """One connection to one host's OVSDB (an ovsdbapp IDL with its own thread). `timeout`
    bounds opening, each transaction and each wait for the cache. An `ssl:` server must
    present a certificate naming `server_identity` (without one, every ssl: server is
    refused: NWC could not tell whose it is)."""

    def __init__(self, target: str,
                 tables: Iterable[str] | Mapping[str, Iterable[str]] = CONTROLLER_TABLES,
                 timeout: float = 10.0, server_identity: ServerIdentity | None = None) -> None:
        self.target = target
        # Table -> columns monitored; a plain list of tables monitors all their columns.
        self.tables: dict[str, tuple[str, ...]] = (
            {t: tuple(c) for t, c in tables.items()} if isinstance(tables, Mapping)
            else {t: () for t in tables})
        self.timeout = timeout
        self.server_identity = server_identity
        self._ssl_remotes = [r for r in idlutils.parse_connection(target)
                             if r.startswith("ssl:")]
        # The remotes this HostDb enters in nwc.ovsdbtls while open (none without an identity).
        self._expected_remotes = self._ssl_remotes if server_identity is not None else []
        self._api: _PlainTransactions | None = None
        self._lock = threading.Lock()

    def open(self) -> HostDb:
        with self._lock:
            if self._api is None:
                check_target(self.target)
                if self._expected_remotes:
                    ovsdbtls.install()
                    try:
                        ovsdbtls.expect(self._expected_remotes, self.server_identity)
                    except ovsdbtls.IdentityConflict as exc:
                        raise OvsdbConfigError(str(exc)) from None
                try:
                    self._api = self._open()
                except BaseException:
                    ovsdbtls.forget(self._expected_remotes)
                    raise
        return self

    def _open(self) -> _PlainTransactions:
        deadline = time.monotonic() + self.timeout
        schema, problems, refused = None, [], False
        for remote in idlutils.parse_connection(self.target):
            left = deadline - time.monotonic()
            if left <= 0:
                problems.append(f"{remote}: not tried, no time left")
                continue
            try:
                schema = fetch_schema(remote, "Open_vSwitch", left)
                break
            except (OSError, ValueError) as exc:
                problems.append(str(exc))
                refused = refused or isinstance(exc, ServerIdentityError)
        if schema is None:
            error = ServerIdentityError if refused else ConnectionError
            raise error(f"OVSDB {self.target} unreachable: " + "; ".join(problems))
        helper = idlutils.create_schema_helper(schema)
        for table, columns in self.tables.items():
            if columns:
                helper.register_columns(table, list(columns))
            else:
                helper.register_table(table)
        idl = connection.OvsdbIdl(self.target, helper)
        # Connecting again and the first contents get what is left of the deadline.
        conn = connection.Connection(idl=idl, timeout=max(0.5, deadline - time.monotonic()))
        try:
            api = _PlainTransactions(conn)
        except Exception:
            idl.close()
            raise
        conn.timeout = self.timeout
        return api

    @property
    def api(self) -> _PlainTransactions:
        if self._api is None:
            raise RuntimeError(f"OVSDB {self.target} is not open")
        return self._api

    def close(self) -> None:
        """Never blocks for long: ovsdbapp's Connection.stop() waits without limit for room
        in its transaction queue, which a transaction that never came back keeps full."""
        with self._lock:
            api, self._api = self._api, None
            if api is not None:
                ovsdbtls.forget(self._expected_remotes)
        if api is None:
            return
        conn = api.ovsdb_connection
        conn.is_running = False
        with contextlib.suppress(queue.Full):
            conn.txns.put_nowait(None)  # wakes its thread, which then closes the IDL
        thread = conn.thread
        if thread is not None:
            thread.join(2)
            if thread.is_alive():
                log.warning("OVSDB %s: connection thread stuck in a transaction; left behind",
                            self.target)

    @contextlib.contextmanager
    def _cache(self) -> Iterator[_PlainTransactions]:
        """The IDL's in-memory copy, under its lock. The connection's thread holds that lock
        for a whole transaction, so waiting for it is bounded too."""
        api = self.api
        lock = api.ovsdb_connection.lock
        if not lock.acquire(timeout=self.timeout):
            raise TimeoutError(f"OVSDB {self.target}: a transaction has not come back")
        try:
            yield api
        finally:
            lock.release()

    # -- NWC's keys in the Open_vSwitch row -----------------------------------------------

    def external_ids(self, prefix: str = "nwc-") -> dict[str, str]:
        """NWC's keys. An OVSDB without its Open_vSwitch row is not a host with no legs (that
        answer would tear every tunnel down): it is an error. So is a lost connection: the
        cache then holds the past, and the IDL is busy reconnecting."""
        with self._cache() as api:
            session = getattr(api.idl, "_session", None)
            if session is not None and not session.is_connected():
                refusals = [why for r in self._ssl_remotes if (why := ovsdbtls.last_refusal(r))]
                if refusals:
                    raise ServerIdentityError(f"OVSDB {self.target} is not connected: "
                                              + "; ".join(refusals))
                raise ConnectionError(f"OVSDB {self.target} is not connected")
            rows = list(api.tables["Open_vSwitch"].rows.values())
            if not rows:
                raise RuntimeError(f"OVSDB {self.target} has no Open_vSwitch row (yet)")
            return {k: v for k, v in rows[0].external_ids.items() if k.startswith(prefix)}

    def update_external_ids(self, set_keys: Mapping[str, str] | None = None,
                            delete_keys: Iterable[str] = ()) -> None:
        set_keys = dict(set_keys or {})
        delete_keys = list(delete_keys)
        if not set_keys and not delete_keys:
            return
        _UpdateMap(self.api, "Open_vSwitch", ".", "external_ids", set_keys,
                   delete_keys).execute(check_error=True)

    def other_config(self) -> dict[str, str]:
        with self._cache() as api:
            rows = list(api.tables["Open_vSwitch"].rows.values())
            return dict(rows[0].other_config) if rows else {}

    def update_other_config(self, set_keys: Mapping[str, str] | None = None,
                            delete_keys: Iterable[str] = ()) -> None:
        _UpdateMap(self.api, "Open_vSwitch", ".", "other_config", dict(set_keys or {}),
                   list(delete_keys)).execute(check_error=True)

    # -- the integration bridge's safety (nwc.bridgeguard) ---------------------------------

    def bridge_rows(self, bridge: str) -> BridgeRows:
        """The bridge's fail_mode and controllers, and the host's managers, from the cache."""
        with self._cache() as api:
            managers = tuple(_remote(row) for row in api.tables["Manager"].rows.values())
            br = idlutils.row_by_value(api.idl, "Bridge", "name", bridge, None)
            if br is None:
                return BridgeRows(bridge, None, (), managers, exists=False)
            return BridgeRows(bridge, br.fail_mode[0] if br.fail_mode else None,
                              tuple(_remote(row) for row in br.controller), managers)

    def apply_fixes(self, fixes: Iterable[Fix]) -> None:
        """Set every column of `fixes` in one transaction."""
        with self.api.transaction(check_error=True) as txn:
            for fix in fixes:
                txn.add(self.api.db_set(fix.table, fix.record, (fix.column, fix.new)))

    # -- ports (the agent) ------------------------------------------------------------------

    def add_port(self, bridge: str, columns: Mapping[str, Any]) -> None:
        """Add (or update) a Port+Interface named columns['name'] with these Interface
        columns (ofport_request, type, options, external_ids...)."""
        _AddTunnelPort(self.api, bridge, columns).execute(check_error=True)

    def delete_port(self, name: str) -> None:
        _DeletePort(self.api, name).execute(check_error=True)

    def interface(self, name: str) -> dict[str, Any] | None:
        """An Interface's columns NWC looks at (None if there is no such interface)."""
        with self._cache() as api:
            row = idlutils.row_by_value(api.idl, "Interface", "name", name, None)
            if row is None:
                return None
            ofport = row.ofport[0] if row.ofport else None
            return {"name": row.name, "type": row.type, "ofport": ofport,
                    "ofport_request": row.ofport_request[0] if row.ofport_request else None,
                    "options": dict(row.options), "external_ids": dict(row.external_ids),
                    "error": row.error[0] if row.error else None}

    def bridge_datapath_type(self, bridge: str) -> str | None:
        """The bridge's datapath_type ("" means the default, the kernel datapath); None if
        there is no such bridge."""
        with self._cache() as api:
            br = idlutils.row_by_value(api.idl, "Bridge", "name", bridge, None)
            return None if br is None else br.datapath_type


def _remote(row: Any) -> RemoteRow:
    """A Controller or Manager row as the bridge guard sees it."""
    return RemoteRow(str(row.uuid), row.target,
                     row.connection_mode[0] if row.connection_mode else None)
