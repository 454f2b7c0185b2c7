"""Where NWC finds its configuration and keeps its state, and loading the two files together."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from nwc.policy import Policy, load_policy
from nwc.topology import Topology, load_topology

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shipped_dir(name: str, checkout: Path = PROJECT_ROOT, prefix: str | None = None) -> Path:
    """A directory of shipped files: beside the package in a checkout (or an editable
    install: one holding setup.cfg, so that another distribution's top-level `policies/` in
    site-packages is never taken for NWC's), else where an installed NWC put it
    (setup.cfg's data_files, under the prefix it was installed to: found from where the
    package lies, which also covers `pip install --user` and `--prefix`, then sys.prefix)."""
    beside = checkout / name
    if (checkout / "setup.cfg").is_file() and beside.is_dir():
        return beside
    # <prefix>/lib/pythonX.Y/site-packages/ is `checkout`: three levels up is <prefix>.
    candidates = [checkout.parents[2] / "share" / "nwc" / name] \
        if len(checkout.parents) > 2 else []
    candidates.append(Path(sys.prefix if prefix is None else prefix) / "share" / "nwc" / name)
    return next((c for c in candidates if c.is_dir()), candidates[-1])


SHIPPED_POLICIES = shipped_dir("policies")
SHIPPED_TOPOLOGIES = shipped_dir("topologies")
DEFAULT_TOPOLOGY = SHIPPED_TOPOLOGIES / "small.yaml"


def default_state_dir() -> Path:
    """NWC_STATE_DIR, else /var/lib/nwc for root, else ~/.local/state/nwc."""
    if "NWC_STATE_DIR" in os.environ:
        return Path(os.environ["NWC_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/nwc")
    return Path.home() / ".local" / "state" / "nwc"


def topology_path(name_or_path: str | Path) -> Path:
    """A topology by file path, or by the name of a shipped one (`small`, `leaf-spine`)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    return SHIPPED_TOPOLOGIES / f"{name_or_path}.yaml"


@dataclass(frozen=True)
class Config:
    policy: Policy
    topology: Topology
    policy_paths: tuple[Path, ...]
    topology_path: Path


def load_config(policy_paths: list[Path] | None = None,
                topology: str | Path | None = None) -> Config:
    """Load and cross-check a policy set and a topology (raises ConfigError)."""
    paths = tuple(policy_paths or [SHIPPED_POLICIES])
    policy = load_policy(paths)
    tpath = topology_path(topology or DEFAULT_TOPOLOGY)
    return Config(policy, load_topology(tpath, policy), paths, tpath)
