"""The REST API from a shell: `nwc weave create|list|show|extend|delete`, `nwc fabric`,
`nwc ivns`, `nwc events`.

The controller is `--api-url` (or $NWC_API_URL, default http://127.0.0.1:8181); the token is
$NWC_TOKEN, `--token-file`, or `--token` (which shows it to anyone who can list processes:
prefer the other two). Tables for people, `--json` for scripts. Progress goes to stderr, so
stdout stays parseable.

Exit codes: 0 done; 1 bad input or other error; 2 usage; 3 denied (policy, bandwidth,
overlap, unknown IVN, forbidden, quota); 4 the weave failed (or did not become active while
we waited); 5 controller unreachable; 6 not authenticated (no token, or a token it refused).
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nwc.cli import EXIT_ERROR, EXIT_OK, counted, stdout_reader_left
from nwc.weave import TRANSIENT_STATES

EXIT_DENIED = 3
EXIT_FAILED = 4
EXIT_UNREACHABLE = 5
EXIT_UNAUTHENTICATED = 6

DEFAULT_API_URL = "http://127.0.0.1:8181"
DENIAL_ERRORS = {"policy_violation", "insufficient_bandwidth", "cidr_overlap", "unknown_ivn",
                 "forbidden", "quota_exceeded", "rate_limited", "insufficient_capacity",
                 "weave_not_live", "too_many_streams"}


class ClientError(Exception):
    """The controller answered with an error."""

    def __init__(self, status: int, body: dict[str, Any],
                 retry_after_s: float | None = None) -> None:
        self.status = status
        self.body = body
        self.retry_after_s = retry_after_s  # from a 429's Retry-After, when it had one
        self.error = str(body.get("error", f"http_{status}"))
        self.detail = str(body.get("detail", ""))
        super().__init__(f"{self.error}: {self.detail}")

    @property
    def exit_code(self) -> int:
        if self.status == 401:
            return EXIT_UNAUTHENTICATED
        if self.error in DENIAL_ERRORS:
            return EXIT_DENIED
        return EXIT_ERROR


class Unreachable(Exception):
    """No answer from the controller (refused, timed out, not HTTP)."""


class Untrusted(Unreachable):
    """The controller's https certificate does not verify: no request was sent."""


class ApiClient:
    def __init__(self, base_url: str, token: str | None, timeout_s: float = 30.0,
                 ca_file: Path | None = None) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"--api-url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.host = parsed.hostname
        self.plaintext_remote = parsed.scheme == "http" and not _is_loopback(parsed.hostname)
        # https verifies the controller's certificate: against --ca-file when given (an
        # operator's own CA), else against the system's trust store.
        self.tls: ssl.SSLContext | None = None
        if parsed.scheme == "https":
            self.tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    def _open(self, method: str, path: str, body: Any = None,
              query: dict[str, Any] | None = None, timeout_s: float | None = None,
              accept: str = "application/json") -> Any:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items()
                                                 if v is not None})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", accept)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s,
                                          context=self.tls)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = {"error": f"http_{exc.code}", "detail": raw[:200].decode(errors="replace")}
            raise ClientError(exc.code, answer if isinstance(answer, dict) else {},
                              _retry_after(exc.headers.get("Retry-After"))) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # HTTPException: something answered, but not in HTTP (BadStatusLine...).
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                # It did answer: calling that "no answer" sent a deploy-guide tester looking
                # at the network instead of at --ca-file.
                raise Untrusted(
                    f"{self.base_url} answered with a certificate that does not verify "
                    f"({reason.verify_message}): give the CA that signed it with --ca-file "
                    "or $NWC_API_CA") from None
            raise Unreachable(f"no answer from {self.base_url}: {reason!r}") from None

    def call(self, method: str, path: str, body: Any = None,
             query: dict[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        with self._open(method, path, body, query, timeout_s) as response:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:  # cut off mid-answer
                raise Unreachable(f"{self.base_url} stopped answering: {exc!r}") from None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise Unreachable(f"{self.base_url} did not answer JSON: is it NWC?") from exc

    # -- the API ------------------------------------------------------------------------------

    def create_weave(self, requester: str, target: str, duration_s: int, bandwidth_mbps: float,
                     security_profile: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"requester": requester, "target": target,
                                "duration_s": duration_s, "bandwidth_mbps": bandwidth_mbps}
        if security_profile:
            body["security_profile"] = security_profile
        return self.call("POST", "/v1/weaves", body)

    def weaves(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/weaves", query={"state": state, "limit": limit})["weaves"]

    def weave(self, weave_id: str, wait_s: float | None = None) -> dict[str, Any]:
        """One weave; with wait_s, the controller holds the answer up to that long while the
        weave is still provisioning or terminating."""
        if wait_s is None:
            return self.call("GET", f"/v1/weaves/{_quote(weave_id)}")
        wait_s = min(max(wait_s, 0.1), 3600.0)
        return self.call("GET", f"/v1/weaves/{_quote(weave_id)}",
                         query={"wait": "true", "wait_timeout_s": f"{wait_s:.3f}"},
                         timeout_s=wait_s + self.timeout_s)

    def extend_weave(self, weave_id: str, duration_s: int) -> dict[str, Any]:
        return self.call("POST", f"/v1/weaves/{_quote(weave_id)}/extend",
                         {"duration_s": duration_s})

    def delete_weave(self, weave_id: str) -> dict[str, Any]:
        return self.call("DELETE", f"/v1/weaves/{_quote(weave_id)}")

    def weave_stats(self, weave_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/weaves/{_quote(weave_id)}/stats")

    def fabric(self) -> dict[str, Any]:
        return self.call("GET", "/v1/fabric")

    def ivns(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/ivns")["ivns"]

    def events(self, max_events: int | None = None, idle_timeout_s: float = 60.0
               ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event type, data) from the server-sent event stream, `ready` first."""
        response = self._open("GET", "/v1/events", query={"max_events": max_events},
                              timeout_s=idle_timeout_s, accept="text/event-stream")
        with response:
            kind, data = "message", []
            while True:
                try:
                    raw = response.readline()
                except (OSError, http.client.HTTPException) as exc:  # incl. the idle timeout
                    raise Unreachable(f"the event stream stopped: {exc!r}") from None
                if not raw:  # the connection ended; the caller decides whether it should have
                    return
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if not line:
                    if data:
                        try:
                            payload = json.loads("\n".join(data))
                        except ValueError:
                            payload = {"raw": "\n".join(data)}
                        yield kind, payload if isinstance(payload, dict) else {"data": payload}
                    kind, data = "message", []
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())


def _retry_after(header: str | None) -> float | None:
    """Retry-After in seconds (NWC sends whole seconds; an HTTP date is not worth parsing)."""
    try:
        seconds = float(header) if header else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < 3600 else None


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- presentation -------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def describe_weave(w: dict[str, Any]) -> str:
    paths = "; ".join(" > ".join(leg["path"]) for leg in w.get("legs", [])) or \
        " > ".join(w.get("path", []))
    rows = [
        ("id", w["id"]),
        ("state", w["state"] + (f" ({w['reason']})" if w.get("reason") else "")
                  + (f": {w['end_detail']}" if w.get("end_detail") else "")),
        ("requester", f"{w['requester']} (tenant {w['requester_tenant']})"),
        ("target", f"{w['target']} (tenant {w['target_tenant']})"),
        ("bandwidth", f"{w['bandwidth_mbps']:g} Mbit/s reserved each way, per host pair"),
        ("profile", w["security_profile"]),
        ("path", paths),
        ("reachable", f"{', '.join(w['requester_prefixes'])} <-> "
                      f"{', '.join(w['target_prefixes'])}"),
        ("created", w["created_at"]),
        ("expires", w["expires_at"]),
    ]
    if w.get("ended_at"):
        rows.append(("ended", w["ended_at"] + (f" by {w['ended_by']}" if w.get("ended_by")
                                                else "")))
    return "\n".join(f"{k:<10} {v}" for k, v in rows)


def weave_rows(weaves: list[dict[str, Any]]) -> str:
    # ENDS is the lease's end for a live weave and when it ended for one that has: a weave
    # ended by request long before its lease would otherwise show a time still to come.
    return table(["ID", "STATE", "REQUESTER", "TARGET", "MBIT/S", "PROFILE", "ENDS", "REASON"],
                 [[w["id"], w["state"], w["requester"], w["target"],
                   f"{w['bandwidth_mbps']:g}", w["security_profile"],
                   w.get("ended_at") or w["expires_at"], w.get("reason") or "-"]
                  for w in weaves])


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


def stats_lines(measured: dict[str, Any]) -> list[str]:
    """What the data plane measured, one line per counter and per tunnel leg end."""
    scalars = {k: v for k, v in measured.items() if not isinstance(v, dict | list)}
    width = max((len(k) for k in scalars), default=0)
    lines = [f"{k:<{width}}  {_shown(v)}" for k, v in sorted(scalars.items())]
    for key, value in sorted(measured.items()):
        if key == "tunnel_legs" and isinstance(value, list):
            for leg in value:
                lines.append(f"leg {_shown(leg.get('slot'))}: {_shown(leg.get('requester_host'))}"
                             f" <-> {_shown(leg.get('target_host'))} ({_shown(leg.get('device'))}"
                             f", {_shown(leg.get('auth'))}, installed "
                             f"{_shown(leg.get('installed'))}, rekeying "
                             f"{_shown(leg.get('rekeying'))})")
                for host, end in sorted((leg.get("ends") or {}).items()):
                    lines.append(f"  {host}: " + ", ".join(f"{k} {_shown(v)}"
                                                           for k, v in end.items()))
        elif key not in scalars:  # a shape this client does not know yet: JSON, not a repr
            lines.append(f"{key}  {json.dumps(value, sort_keys=True)}")
    return lines


def fabric_rows(fabric: dict[str, Any]) -> str:
    rows = [[f"{ln['a']}-{ln['b']}", f"{ln['capacity_mbps']:g}", f"{ln['reservable_mbps']:g}",
             f"{ln['reserved_mbps']:g}", f"{ln['free_mbps']:g}", "up" if ln["up"] else "DOWN",
             ",".join(ln.get("weaves") or []) or "-"] for ln in fabric["links"]]
    headers = ["LINK", "CAPACITY", "RESERVABLE", "RESERVED", "FREE", "STATE", "WEAVES"]
    if not any("weaves" in ln for ln in fabric["links"]):
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    text = f"topology {fabric['topology']} (Mbit/s)\n" + table(headers, rows)
    connections = fabric.get("connections")
    if connections is None:  # no OpenFlow part runs (or an older controller): not known
        return text
    # A link's STATE is its last known port state: a switch that is not connected reports
    # none, so its links may show up while nothing passes; this table says so.
    headers = ["SWITCH", "KIND", "CONNECTED", "DETAIL"]
    rows = [[c["name"], c["kind"], "yes" if c["connected"] else "NO", c.get("detail") or ""]
            for c in connections]
    if not any("detail" in c for c in connections):  # a tenant's view
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    return text + "\n\n" + table(headers, rows)


def event_line(kind: str, data: dict[str, Any]) -> str:
    ts = data.get("ts", "")
    weave = data.get("weave") if isinstance(data.get("weave"), dict) else None
    if weave:
        what = f"{weave.get('id')} {weave.get('state')}"
        if weave.get("reason"):
            what += f" ({weave['reason']})"
        what += f" {weave.get('requester')} <-> {weave.get('target')}"
        if weave.get("ended_by"):
            what += f", ended by {weave['ended_by']}"
        if data.get("detail"):
            what += f": {data['detail']}"
    elif kind == "weave.denied":
        what = f"{data.get('action')} {data.get('requester') or data.get('weave_id') or ''}: " \
               f"{data.get('error')}: {data.get('detail')}"
    else:
        what = " ".join(f"{k}={v}" for k, v in sorted(data.items())
                        if k not in ("ts", "type") and v is not None)
    return f"{ts}  {kind:<16} {what}".rstrip()


# -- commands -----------------------------------------------------------------------------------

def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    if args.token_file:
        return Path(args.token_file).read_text(encoding="utf-8").strip()
    return os.environ.get("NWC_TOKEN") or None


def _client(args: argparse.Namespace) -> ApiClient:
    client = ApiClient(args.api_url, _token(args), args.timeout, args.ca_file)
    if client.token is None:
        raise ClientError(401, {"error": "unauthenticated", "detail": "no token: set NWC_TOKEN "
                                "(from `nwc token issue`) or use --token-file"})
    if client.plaintext_remote:
        print(f"warning: {client.host} is not this host and the URL is http: the token "
              "crosses the network in clear", file=sys.stderr)
    return client


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else human)


# States a weave passes through; the CLI waits them out unless told not to.
TRANSIENT = tuple(state.value for state in TRANSIENT_STATES)
# Between asks that come back still transient at once (the server's wait slots were full):
# a pause growing to a few seconds, so waiting never spends the tenant's request budget.
POLL_FIRST_S = 0.5
POLL_MAX_S = 5.0


def _wait_for(client: ApiClient, weave: dict[str, Any], timeout_s: float,
              quiet: bool) -> dict[str, Any]:
    """Ask the controller to hold the answer until the weave settles (bounded on its side
    too), showing progress on stderr meanwhile."""
    deadline = time.monotonic() + timeout_s
    start = last_line = time.monotonic()
    current = weave
    tty = sys.stderr.isatty()
    pause = POLL_FIRST_S
    while current["state"] in TRANSIENT and time.monotonic() < deadline:
        result: dict[str, Any] = {}
        asked_at = time.monotonic()

        def ask(into: dict[str, Any] = result, weave_id: str = current["id"]) -> None:
            try:
                into["weave"] = client.weave(weave_id, wait_s=deadline - time.monotonic())
            except (ClientError, Unreachable) as exc:
                into["error"] = exc

        worker = threading.Thread(target=ask, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(1.0)
            elapsed = time.monotonic() - start
            if not quiet and worker.is_alive():
                if tty:
                    print(f"\r{current['id']}: {current['state']}, waiting for the data "
                          f"plane ({elapsed:.0f} s)", end="", file=sys.stderr, flush=True)
                elif time.monotonic() - last_line >= 5.0:  # a log, not a terminal
                    last_line = time.monotonic()
                    print(f"{current['id']}: still {current['state']} ({elapsed:.0f} s)",
                          file=sys.stderr)
        error = result.get("error")
        if isinstance(error, ClientError) and error.error == "rate_limited":
            # The weave is admitted: over the rate is a reason to wait, not to give up.
            _sleep_until(min(deadline, time.monotonic() + (error.retry_after_s or pause)))
            pause = min(pause * 2, POLL_MAX_S)
            continue
        if error is not None:
            raise error
        current = result["weave"]
        if current["state"] in TRANSIENT and time.monotonic() - asked_at < pause:
            _sleep_until(min(deadline, asked_at + pause))  # answered at once: not held
            pause = min(pause * 2, POLL_MAX_S)
    if tty and not quiet:
        print(file=sys.stderr)
    return current


def _sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))


def cmd_weave_create(args: argparse.Namespace) -> int:
    client = _client(args)
    weave = client.create_weave(args.requester, args.target, args.duration, args.bandwidth,
                                args.profile)
    if not args.json:
        print(f"{weave['id']}: admitted, {weave['state']}", file=sys.stderr)
    if not args.no_wait:
        weave = _wait_for(client, weave, args.wait_timeout, quiet=args.json)
    _print(args, weave, describe_weave(weave))
    if weave["state"] == "failed":
        print(f"{weave['id']} failed: {weave.get('reason')}"
              + (f": {weave['end_detail']}" if weave.get("end_detail") else ""),
              file=sys.stderr)
        return EXIT_FAILED
    if weave["state"] == "provisioning" and not args.no_wait:
        print(f"{weave['id']} is still provisioning after {args.wait_timeout:g} s",
              file=sys.stderr)
        return EXIT_FAILED
    if weave["state"] != "active" and not args.no_wait:
        # Ended before it was ever active (the other party or an operator ended it).
        print(f"{weave['id']} ended before it became active: {weave['state']}"
              + (f" ({weave['reason']})" if weave.get("reason") else ""), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_weave_list(args: argparse.Namespace) -> int:
    weaves = _client(args).weaves(args.state, args.limit)
    _print(args, weaves, weave_rows(weaves) if weaves else "no weaves")
    return EXIT_OK


def cmd_weave_show(args: argparse.Namespace) -> int:
    client = _client(args)
    weave = client.weave(args.weave_id)
    if args.stats:
        stats = client.weave_stats(args.weave_id)
        human = "\n".join([describe_weave(weave), *stats_lines(stats["measured"])])
        _print(args, {"weave": weave, "stats": stats}, human)
    else:
        _print(args, weave, describe_weave(weave))
    return EXIT_FAILED if weave["state"] == "failed" else EXIT_OK


def cmd_weave_extend(args: argparse.Namespace) -> int:
    weave = _client(args).extend_weave(args.weave_id, args.duration)
    _print(args, weave, describe_weave(weave))
    return EXIT_OK


def cmd_weave_delete(args: argparse.Namespace) -> int:
    client = _client(args)
    weave = client.delete_weave(args.weave_id)
    if not args.no_wait:  # until its flows and tunnels are confirmed gone
        weave = _wait_for(client, weave, args.wait_timeout, quiet=args.json)
    _print(args, weave, f"{weave['id']}: {weave['state']}"
                        + (f" ({weave['reason']})" if weave.get("reason") else ""))
    return EXIT_OK


def cmd_fabric(args: argparse.Namespace) -> int:
    fabric = _client(args).fabric()
    _print(args, fabric, fabric_rows(fabric))
    return EXIT_OK


def cmd_ivns(args: argparse.Namespace) -> int:
    ivns = _client(args).ivns()
    rows = [[i["name"], i["tenant"], "yes" if i["own"] else "no",
             ",".join(i.get("cidrs") or []) or "-", ",".join(i["can_weave_with"]) or "-"]
            for i in ivns]
    _print(args, ivns, table(["IVN", "TENANT", "OWN", "CIDRS", "CAN WEAVE WITH"], rows))
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    client = _client(args)
    received = 0
    try:
        for kind, data in client.events(args.count, idle_timeout_s=args.idle_timeout):
            if kind == "ready":
                if not args.json:
                    print(f"streaming events as {data.get('principal')} (Ctrl-C to stop)",
                          file=sys.stderr)
                continue
            if args.json:
                print(json.dumps({"event": kind, **data}, sort_keys=True), flush=True)
            else:
                print(event_line(kind, data), flush=True)
            if kind in ("overflow", "closing"):
                return EXIT_UNREACHABLE
            received += 1
    except KeyboardInterrupt:
        return EXIT_OK
    if args.count is None or received < args.count:
        # The server ends a stream only after --count events or with `closing`: anything
        # else is a dropped connection, and a script must not take it for a finished stream.
        print(f"nwc: unreachable: the event stream ended after {counted(received, 'event')}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK


def _run(func: Any) -> Any:
    """Turn the client's exceptions into a message on stderr and the documented exit code."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except ClientError as exc:
            fields = [f"{p.get('field')}: {p.get('problem')}"
                      for p in exc.body.get("fields") or []]
            # invalid_request's detail is its fields joined: print them once, one a line.
            detail = "" if fields and exc.detail == "; ".join(fields) else f" {exc.detail}"
            print(f"nwc: {'denied' if exc.exit_code == EXIT_DENIED else 'error'}: "
                  f"{exc.error}:{detail}", file=sys.stderr)
            for line in fields:
                print(f"  {line}", file=sys.stderr)
            return exc.exit_code
        except Untrusted as exc:
            print(f"nwc: not trusted: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except Unreachable as exc:
            print(f"nwc: unreachable: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except (ValueError, OSError) as exc:
            if stdout_reader_left(exc):
                raise  # the reader of stdout has gone (`| head`): nwc.cli.main ends quietly
            print(f"nwc: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return wrapped


# argparse names the type function in its message for a ValueError ("invalid _positive_int
# value"): these raise ArgumentTypeError, whose text it prints as it is.
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api-url", default=os.environ.get("NWC_API_URL", DEFAULT_API_URL),
                        help=f"the controller's REST API (default: $NWC_API_URL or "
                             f"{DEFAULT_API_URL})")
    common.add_argument("--ca-file", type=Path, default=os.environ.get("NWC_API_CA") or None,
                        help="CA certificate (PEM) an https controller's certificate must "
                             "chain to (default: $NWC_API_CA, else the system's CAs)")
    common.add_argument("--token-file", type=Path, default=None,
                        help="read the bearer token from this file (default: $NWC_TOKEN)")
    common.add_argument("--token", default=None,
                        help="the bearer token (visible to other users in the process list: "
                             "prefer $NWC_TOKEN or --token-file)")
    common.add_argument("--timeout", type=_positive_float, default=30.0,
                        help="seconds to wait for an answer (default 30)")
    common.add_argument("--json", action="store_true", help="print JSON, for scripts")
    epilog = ("exit codes: 0 ok, 1 error, 2 usage, 3 denied, 4 weave failed, "
              "5 controller unreachable, 6 not authenticated")

    weave = sub.add_parser("weave", help="create, list, show, extend and end weaves",
                           epilog=epilog)
    actions = weave.add_subparsers(dest="weave_command", required=True, metavar="ACTION")

    p = actions.add_parser("create", parents=[common], epilog=epilog,
                           help="ask for a weave from one of your IVNs to a partner IVN")
    p.add_argument("requester", help="your IVN")
    p.add_argument("target", help="the partner IVN")
    p.add_argument("--duration", type=_positive_int, required=True, metavar="SECONDS",
                   help="lease length")
    p.add_argument("--bandwidth", type=_positive_float, required=True, metavar="MBPS",
                   help="Mbit/s reserved each way, per host pair")
    p.add_argument("--profile", default=None, help="security profile (default: the best one "
                                                   "both IVNs allow)")
    p.add_argument("--no-wait", action="store_true",
                   help="answer once admitted, without waiting for the data plane")
    p.add_argument("--wait-timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                   help="longest wait for active (default 120)")
    p.set_defaults(func=_run(cmd_weave_create))

    p = actions.add_parser("list", parents=[common], epilog=epilog,
                           help="weaves you are party to, newest first")
    p.add_argument("--state", choices=["provisioning", "active", "terminating", "terminated",
                                       "failed"], default=None)
    p.add_argument("--limit", type=_positive_int, default=100)
    p.set_defaults(func=_run(cmd_weave_list))

    p = actions.add_parser("show", parents=[common], epilog=epilog, help="one weave")
    p.add_argument("weave_id", metavar="ID")
    p.add_argument("--stats", action="store_true", help="with what the data plane measures")
    p.set_defaults(func=_run(cmd_weave_show))

    p = actions.add_parser("extend", parents=[common], epilog=epilog,
                           help="move a weave's end later (checked against both policies)")
    p.add_argument("weave_id", metavar="ID")
    p.add_argument("--duration", type=_positive_int, required=True, metavar="SECONDS",
                   help="seconds to add")
    p.set_defaults(func=_run(cmd_weave_extend))

    p = actions.add_parser("delete", parents=[common], epilog=epilog,
                           help="end a weave now and release everything it holds")
    p.add_argument("weave_id", metavar="ID")
    p.add_argument("--no-wait", action="store_true",
                   help="answer at once (terminating), without waiting for the teardown")
    p.add_argument("--wait-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                   help="longest wait for terminated (default 60)")
    p.set_defaults(func=_run(cmd_weave_delete))

    p = sub.add_parser("fabric", parents=[common], epilog=epilog,
                       help="fabric links: capacity, reservable share, reserved; "
                            "switches connected")
    p.set_defaults(func=_run(cmd_fabric))

    p = sub.add_parser("ivns", parents=[common], epilog=epilog,
                       help="your IVNs and the IVNs you may weave with")
    p.set_defaults(func=_run(cmd_ivns))

    p = sub.add_parser("events", parents=[common], epilog=epilog,
                       help="follow weave state changes and security events live")
    p.add_argument("--count", type=_positive_int, default=None,
                   help="stop after this many events")
    p.add_argument("--idle-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                   help="give up when the stream is silent this long (the server sends a "
                        "keepalive every 15 s)")
    p.set_defaults(func=_run(cmd_events))
