"""The controller process's parts, wired together: store, weaver, its loop, and the shells
(OpenFlow, tunnels, REST) that attach to it. `nwc run` builds one of these."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from nwc.config import Config, load_config
from nwc.lease import Clock, SystemClock
from nwc.policy import Policy, load_policy
from nwc.store import Store, private_dir
from nwc.topology import underlay_mtu_problem, vm_problems
from nwc.weave import Weave
from nwc.weaver import (
    DEFAULT_PROVISION_TIMEOUT_S,
    DEFAULT_TEARDOWN_TIMEOUT_S,
    SYSTEM,
    Actor,
    Part,
    Weaver,
    WeaverLoop,
)
from nwc.yamlsource import ConfigError

if TYPE_CHECKING:
    from nwc.certexpiry import CertWatch
    from nwc.pipeline import DroppedTraffic

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Controller:
    config: Config
    state_dir: Path
    clock: Clock = field(default_factory=SystemClock)
    provision_timeout_s: float = DEFAULT_PROVISION_TIMEOUT_S
    teardown_timeout_s: float = DEFAULT_TEARDOWN_TIMEOUT_S
    # How long a reload waits for the weaver's loop before leaving the reload to it (it is
    # then applied, or refused, and audited and announced, when the loop gets to it).
    reload_wait_s: float = 30.0
    store: Store = field(init=False)
    weaver: Weaver = field(init=False)
    loop: WeaverLoop = field(init=False)
    _stoppers: list[Callable[[], None]] = field(default_factory=list, init=False)
    # Live per-weave measurements, merged by the REST API and metrics: each source returns a
    # dict for a weave (the OpenFlow app: bytes/packets each way and meter drops by cookie;
    # the tunnel part: IKE/CHILD SA state and rekeys). Sources must not block for long.
    stats_sources: list[Callable[[Weave], dict[str, Any]]] = field(default_factory=list,
                                                                   init=False)
    # Each host's OVSDB and agent as the tunnel part judged them last (host -> an object with
    # `ovsdb_up` and `agent_up`, None while not known: nwc.hostwatch.HostHealth), for metrics.
    host_sources: list[Callable[[], dict[str, Any]]] = field(default_factory=list, init=False)
    # Each switch's and host bridge's OpenFlow connection as the flows part knows it now
    # (name -> an object with `kind`, `connected`, `detail`: nwc.ofapp.SwitchConnection), for
    # metrics and the fabric view. None attached (no OpenFlow): not known, not shown.
    switch_sources: list[Callable[[], dict[str, Any]]] = field(default_factory=list,
                                                               init=False)
    # What the data plane's counting drops refused, per switch (the OpenFlow app:
    # nwc.pipeline.DroppedTraffic, carried across re-installs), for metrics.
    drop_sources: list[Callable[[], list[DroppedTraffic]]] = field(default_factory=list,
                                                                   init=False)
    # The TLS certificates `nwc run` was given (nwc.certexpiry), read again at each scrape.
    cert_watch: CertWatch | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        private_dir(self.state_dir)
        self.store = Store(self.state_dir)
        self.weaver = Weaver(policy=self.config.policy, topology=self.config.topology,
                             store=self.store, clock=self.clock,
                             provision_timeout_s=self.provision_timeout_s,
                             teardown_timeout_s=self.teardown_timeout_s)
        self.loop = WeaverLoop(self.weaver)

    @classmethod
    def from_paths(cls, state_dir: Path, policy_paths: list[Path] | None = None,
                   topology: str | Path | None = None, **kw: Any) -> Controller:
        return cls(load_config(policy_paths, topology), state_dir, **kw)

    def weave_stats(self, weave: Weave) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        for source in self.stats_sources:
            try:
                stats.update(source(weave))
            except Exception:
                log.exception("stats source %s failed for %s", source, weave.id)
        return stats

    def add_part(self, part: Part) -> None:
        """Attach a data-plane part before `start` (or via the loop after it)."""
        self.weaver.add_part(part)

    def on_stop(self, stopper: Callable[[], None]) -> None:
        self._stoppers.append(stopper)

    def start(self, parts_to_attach: bool = False) -> None:
        """Recover the state and start the loop. `parts_to_attach`: the shells attach their
        parts after this (as `nwc run`'s do; call `parts_attached` once they have), and the
        teardowns of weaves the previous run may have built wait for them."""
        self.weaver.recover(parts_to_attach=parts_to_attach)
        self.loop.start()
        self.loop.call(self.weaver.start_parts)

    def parts_attached(self) -> None:
        self.loop.call(self.weaver.parts_attached)

    def stop(self) -> None:
        for stopper in reversed(self._stoppers):
            try:
                stopper()
            except Exception:
                log.exception("stopping %s failed", stopper)
        self.loop.stop()
        self.store.close()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the weaver's loop and wait for its result."""
        return self.loop.call(fn, *args, **kwargs)

    def admit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call` for an admission: those waiting together share one durable commit."""
        return self.loop.admit(fn, *args, **kwargs)

    def reload_policy(self, actor: Actor = SYSTEM) -> list[str]:
        """Re-read the policy files. On any problem the running policy stays; returns the
        problems (empty on success, and when the weaver's loop is too busy to apply it within
        `reload_wait_s`: it applies it later, and records the outcome then). Never raises:
        SIGHUP runs this on a thread of its own, and an exception would end it with the
        refusal unrecorded. Run one at a time (`PolicyReloads`): the loop applies reloads
        in the order they were read."""
        try:
            policy = load_policy(self.config.policy_paths)
            misfits = self._misfits(policy)
        except ConfigError as exc:
            log.error("policy reload refused, keeping the last good policy:\n%s", exc)
            return self._refused([str(p) for p in exc.problems], actor)
        except Exception as exc:
            # A bug (or MemoryError) is refused like any problem, with the traceback in the
            # log; the record names only the exception's type, as its text could quote the
            # files at length.
            log.exception("policy reload refused, keeping the last good policy: loading it "
                          "failed")
            return self._refused([f"loading the policy failed: {type(exc).__name__} "
                                  "(the controller's log has the traceback)"], actor)
        if misfits:
            log.error("policy reload refused, keeping the last good policy: the running "
                      "topology does not fit it:\n%s", "\n".join(misfits))
            return self._refused(misfits, actor)
        try:
            return self.call(self._apply_policy, policy, actor, timeout=self.reload_wait_s)
        except TimeoutError:
            # Not a refusal: the call stays queued, and _apply_policy records its outcome.
            log.warning("policy reload: the weaver's loop did not take it within %g s; it is "
                        "applied (or refused) when the loop gets to it, and audited then",
                        self.reload_wait_s)
            return []
        except Exception:  # the loop is stopping: nothing was applied, nor can be recorded
            log.exception("policy reload refused, keeping the last good policy: the weaver's "
                          "loop did not take it")
            return ["the weaver's loop did not take the policy (the controller's log has "
                    "the traceback)"]

    def _apply_policy(self, policy: Policy, actor: Actor) -> list[str]:
        """On the weaver's loop: switch to `policy`, or record the refusal if that fails (the
        weaver leaves the running policy in force when the switch cannot be audited). Here,
        not in the waiting thread, so the outcome is recorded even when nobody waits."""
        try:
            self.weaver.reload_policy(policy, actor)
        except Exception as exc:
            if self.weaver.policy is not policy:
                log.exception("policy reload refused, keeping the last good policy: applying "
                              "it failed")
                return self._refused_on_loop(
                    [f"applying the policy failed: {type(exc).__name__} (the controller's log "
                     "has the traceback)"], actor)
            # Audited and in force; what failed after (told in the log) does not undo it.
            log.exception("policy reload applied, but a step after the switch failed")
        self.config = Config(policy, self.config.topology, self.config.policy_paths,
                             self.config.topology_path)
        return []

    def _misfits(self, policy: Policy) -> list[str]:
        """Why the running topology (not its file, which may have been edited for the next
        start) does not fit a new policy: a VM of an IVN the new policy drops, or an address
        outside its new prefixes, would leave a host impossible to program."""
        misfits = vm_problems(self.config.topology, policy)
        # A profile whose legs would not fit the running underlay is refused as a whole (not
        # per weave): check-policy and the next start would refuse this policy too.
        short = underlay_mtu_problem(self.config.topology.underlay.mtu, policy)
        if short:
            misfits.append(f"underlay.mtu of {self.config.topology.source}: {short}")
        return misfits

    def _refused(self, problems: list[str], actor: Actor) -> list[str]:
        """Audit and announce a refused reload (logged by the caller); returns `problems`."""
        try:
            self.call(self._refused_on_loop, problems, actor)
        except Exception:  # the refusal stands, and the log has it
            log.exception("the refused policy reload could not be recorded")
        return problems

    def _refused_on_loop(self, problems: list[str], actor: Actor) -> list[str]:
        try:
            self.weaver.policy_refused(problems, actor)
        except Exception:  # the refusal stands, and the log has it
            log.exception("the refused policy reload could not be recorded")
        return problems


class PolicyReloads:
    """SIGHUP's policy reloads, one at a time on a thread of their own. A signal while one
    runs asks for one more after it, however many came: each reload reads the files when it
    starts, so the one read last is the one applied last (two reloads at once could apply
    the older file last), and a burst of signals costs at most two reloads."""

    def __init__(self, reload: Callable[[], object]) -> None:
        self._reload = reload
        # SimpleQueue.put is reentrant: safe in a signal handler, which may interrupt the
        # main thread anywhere, even inside an earlier call of `request`.
        self._asked: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="nwc-reload", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for a reload (from a signal handler): never blocks."""
        self._asked.put(True)

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread once the reload running, if any, and those asked before are done."""
        self._asked.put(False)
        self._thread.join(timeout)

    def _run(self) -> None:
        going = True
        while going:
            wanted = self._asked.get()
            going = wanted
            while True:  # every request that came meanwhile is served by this one reload
                try:
                    more = self._asked.get_nowait()
                except queue.Empty:
                    break
                wanted = wanted or more
                going = going and more
            if wanted:
                try:
                    self._reload()
                except Exception:  # never the end of this thread: the next SIGHUP retries
                    log.exception("policy reload failed")
