"""Named network namespaces, veth pairs and processes, owned and cleaned up by name or pid.

A `Lab` is a bag of resources created under one unique prefix; `Lab.close()` removes exactly
those, newest first. Use it as a context manager in tests so a failing test still cleans up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def unique_prefix(tag: str = "") -> str:
    """A short prefix for names of things this process creates: 'nw' + pid digits + tag.
    Short because Linux interface names stop at 15 characters."""
    return f"nw{os.getpid() % 100000:05d}{tag}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at `host` right now (for a listener started next)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                                input=input)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout} s") from exc
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


@dataclass
class Netns:
    name: str

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 30,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
        return run(self.cmd(*prefix, *args), check=check, timeout=timeout)

    def popen(self, args: Sequence[str], *, env: dict[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - child owns it
        try:
            return subprocess.Popen(self.cmd(*args), stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})},
                                    start_new_session=True)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("ip", *args, check=check)

    def exists(self) -> bool:
        return Path("/run/netns", self.name).exists()

    def no_ipv6(self) -> None:
        """IPv6 off, so captures hold only what NWC and the tenants put on the wire."""
        for scope in ("all", "default"):
            self.run("sysctl", "-q", "-w", f"net.ipv6.conf.{scope}.disable_ipv6=1")

    def no_offload(self, device: str) -> None:
        """TCP over veth into the userspace datapath stalls unless checksum offload is off
        (LAB-NOTES)."""
        self.run("ethtool", "-K", device, "tx", "off", "rx", "off", check=False)


def kill_pid(pid: int, timeout: float = 5.0) -> None:
    """TERM a process (and its session), wait, then KILL: by pid, never by name. A child of
    ours is reaped too, so it does not linger as a zombie."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reaped = _reap(pid)
            if reaped:
                return
            # Not reaped: still running, or a multi-threaded leader (ovs-vswitchd) that shows
            # as a zombie while its other threads exit and cannot be reaped yet. Only a process
            # that is not our child may be left once it is no longer alive.
            if reaped is None and not _alive(pid):
                return
            time.sleep(0.05)


def _reap(pid: int) -> bool | None:
    """True if `pid` was our child and has now been reaped, False if it is our child but not
    reapable yet, None if it is not our child."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return done == pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie that is not our child still answers kill(0): check its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _start_time(pid: int) -> int | None:
    """When `pid` started, which tells a process from a later one given the same pid; None
    if it cannot be read (gone)."""
    try:
        return stat_start_time(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError):
        return None


def stat_start_time(stat: str) -> int:
    """Field 22 of a /proc/PID/stat line (starttime, clock ticks after boot); ValueError if
    the line has none."""
    # The fields after the command name, which may hold spaces and ") ": field 3 on.
    _, sep, rest = stat.rpartition(") ")
    fields = rest.split()
    if not sep or len(fields) < 22 - 2:
        raise ValueError("not a /proc/PID/stat line")
    return int(fields[22 - 3])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Lab:
    """Resources created under `prefix`, removed by `close()` in reverse order."""

    prefix: str = field(default_factory=unique_prefix)
    _undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    # What `remains` checks besides the prefix: processes (ours and those others start for
    # the lab, such as Mininet's node shells), each with its start time so that another
    # process given the same pid later is not blamed, and links in the root namespace.
    _pids: dict[int, tuple[str, int | None]] = field(default_factory=dict)
    _links: set[str] = field(default_factory=set)
    _dirs: set[Path] = field(default_factory=set)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_close(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def close(self) -> list[str]:
        """Remove everything, newest first; what was removed, as `on_close` named it."""
        errors, removed = [], []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
                removed.append(what)
            except Exception as exc:  # keep going: remove everything we can
                errors.append(f"{what}: {exc}")
        self._dirs.clear()  # gone: asked for again, they are made again
        if errors:
            raise RuntimeError("cleanup incomplete: " + "; ".join(errors))
        return removed

    def watch_pid(self, pid: int, what: str) -> None:
        """A process someone else starts and stops for the lab: `remains` checks it is gone."""
        self._pids[pid] = (what, _start_time(pid))

    def own_link(self, name: str) -> None:
        """A link made in the root namespace (removed by an `on_close` of the caller's)."""
        self._links.add(name)

    def remains(self) -> list[str]:
        """What of this lab is still there, looked up in the system rather than taken from
        the lab's own bookkeeping: namespaces and /tmp directories named with its prefix,
        any process whose command line or environment names one of those directories (its
        OVS, charon, agent and controller instances do), the processes it started, and the
        links it made in the root namespace. Empty after a clean `close()`."""
        left = [f"namespace {name}" for name in _netns_names()
                if name.startswith(f"{self.prefix}-")]
        left += [f"link {name}" for name in sorted(self._links | {f"{self.prefix}a",
                                                                  f"{self.prefix}b"})
                 if Path("/sys/class/net", name).exists()]
        left += [f"directory {path}" for path in sorted(Path("/tmp").glob(f"{self.prefix}-*"))]
        named = _processes_naming(f"/tmp/{self.prefix}-")
        left += [f"process {pid} ({what})" for pid, what in sorted(named.items())]
        left += [f"process {pid} ({what})" for pid, (what, started) in sorted(self._pids.items())
                 if pid not in named and _alive(pid) and _start_time(pid) == started]
        return left

    def netns(self, suffix: str) -> Netns:
        ns = Netns(f"{self.prefix}-{suffix}")
        run(["ip", "netns", "add", ns.name])
        self.on_close(f"netns {ns.name}", lambda: self._delete_netns(ns))
        ns.ip("link", "set", "lo", "up")
        return ns

    @staticmethod
    def _delete_netns(ns: Netns) -> None:
        # Processes still inside would keep the namespace alive: kill those (by pid).
        pids = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
        for pid in pids:
            kill_pid(int(pid), timeout=2)
        run(["ip", "netns", "delete", ns.name], check=False)

    def veth(self, a: Netns | None, a_name: str, b: Netns | None, b_name: str,
             mtu: int | None = None) -> None:
        """A veth pair with one end in each namespace (None: the root namespace)."""
        tmp_a, tmp_b = f"{self.prefix}a", f"{self.prefix}b"
        run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
        try:
            for tmp, ns, name in ((tmp_a, a, a_name), (tmp_b, b, b_name)):
                if ns is not None:
                    run(["ip", "link", "set", tmp, "netns", ns.name])
                    ns.ip("link", "set", tmp, "name", name)
                    if mtu:
                        ns.ip("link", "set", name, "mtu", str(mtu))
                    ns.ip("link", "set", name, "up")
                else:
                    self.own_link(name)
                    run(["ip", "link", "set", tmp, "name", name])
                    if mtu:
                        run(["ip", "link", "set", name, "mtu", str(mtu)])
                    run(["ip", "link", "set", name, "up"])
                    self.on_close(f"link {name}",
                                  lambda n=name: run(["ip", "link", "del", n], check=False))
        except Exception:
            run(["ip", "link", "del", tmp_a], check=False)
            raise

    def process(self, proc: subprocess.Popen[Any], what: str, *,
                timeout: float = 5.0) -> subprocess.Popen[Any]:
        self.watch_pid(proc.pid, what)
        self.on_close(what, lambda: kill_pid(proc.pid, timeout=timeout))
        return proc

    def directory(self, suffix: str) -> Path:
        """/tmp/PREFIX-SUFFIX, private to this user (0700): it holds private OVS databases
        (PSKs in conf.db), keys and logs. The name is guessable (the prefix is the pid's
        digits), so one already there is used only if it is a directory of ours, 0700, and
        not a symlink; else LabError."""
        path = Path("/tmp") / f"{self.prefix}-{suffix}"
        if path in self._dirs:  # asked for again (logs, captures): removed once
            return path
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            # Left by an earlier lab of a process with the same pid digits, or planted.
            problem = not_private(os.lstat(path), os.geteuid())
            if problem is not None:
                raise LabError(f"{path} exists and {problem}: remove it, or use another "
                               "prefix") from None
        self._dirs.add(path)
        self.on_close(f"dir {path}", lambda: _rmtree(path))
        return path


class LabError(RuntimeError):
    """The lab cannot be set up safely as asked."""


def not_private(st: os.stat_result, uid: int) -> str | None:
    """Why a path with this lstat() result is no private directory of user `uid` (None
    when it is one: a real directory, owned by `uid`, mode 0700)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"belongs to uid {st.st_uid}, not {uid}"
    if stat.S_IMODE(st.st_mode) != 0o700:
        return f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    return None


def _netns_names() -> list[str]:
    try:
        return sorted(p.name for p in Path("/run/netns").iterdir())
    except FileNotFoundError:
        return []


def _processes_naming(text: str) -> dict[int, str]:
    """Processes (not this one) whose command line or environment contains `text`, with
    their command line. Read from /proc; a process that ends meanwhile is skipped."""
    needle, found = text.encode(), {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if needle in cmdline or needle in (proc / "environ").read_bytes():
                found[int(proc.name)] = cmdline.replace(b"\0", b" ").decode(
                    errors="replace").strip()[:100]
        except OSError:  # gone, or not ours to read
            continue
    return found


def _rmtree(path: Path) -> None:
    import shutil

    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
