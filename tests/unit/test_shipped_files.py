"""An installed NWC (not a checkout) finds the shipped policies and topologies where setup.cfg
installs them, and setup.cfg installs every one of them."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from nwc.config import load_config, shipped_dir

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_file_is_installed_with_the_package() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    installed = {target: {p.strip() for p in files.split(",")}
                 for target, files in cfg["options.data_files"].items()}
    for name in ("policies", "topologies"):
        shipped = {f"{name}/{p.name}" for p in (ROOT / name).iterdir() if p.is_file()}
        assert installed[f"share/nwc/{name}"] == shipped


def test_a_checkout_uses_its_own_files() -> None:
    assert shipped_dir("policies") == ROOT / "policies"


def test_without_a_checkout_the_installed_copies_are_found_and_load(tmp_path: Path) -> None:
    prefix, site = tmp_path / "venv", tmp_path / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    for name in ("policies", "topologies"):
        (prefix / "share" / "nwc" / name).mkdir(parents=True)
        for f in (ROOT / name).glob("*.yaml"):
            (prefix / "share" / "nwc" / name / f.name).write_bytes(f.read_bytes())
    policies = shipped_dir("policies", checkout=site, prefix=str(prefix))
    topologies = shipped_dir("topologies", checkout=site, prefix=str(prefix))
    assert policies == prefix / "share" / "nwc" / "policies"
    loaded = load_config([policies], topologies / "small.yaml")
    assert loaded.policy.ivns and loaded.topology.hosts
