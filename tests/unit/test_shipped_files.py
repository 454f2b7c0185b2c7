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


def installed(prefix: Path) -> Path:
    """A prefix as pip leaves it: NWC's shipped files in share/nwc; its site-packages."""
    for name in ("policies", "topologies"):
        (prefix / "share" / "nwc" / name).mkdir(parents=True)
        for f in (ROOT / name).glob("*.yaml"):
            (prefix / "share" / "nwc" / name / f.name).write_bytes(f.read_bytes())
    site = prefix / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    return site


def test_without_a_checkout_the_installed_copies_are_found_and_load(tmp_path: Path) -> None:
    prefix = tmp_path / "venv"
    site = installed(prefix)
    policies = shipped_dir("policies", checkout=site, prefix=str(prefix))
    topologies = shipped_dir("topologies", checkout=site, prefix=str(prefix))
    assert policies == prefix / "share" / "nwc" / "policies"
    loaded = load_config([policies], topologies / "small.yaml")
    assert loaded.policy.ivns and loaded.topology.hosts


def test_a_user_or_prefix_install_is_found_from_where_the_package_lies(tmp_path: Path) -> None:
    """Found in review: `pip install --user` puts the files under the user base, not under
    sys.prefix."""
    user = tmp_path / "home" / ".local"
    site = installed(user)
    assert shipped_dir("policies", checkout=site, prefix=str(tmp_path / "usr")) == \
        user / "share" / "nwc" / "policies"


def test_another_distributions_policies_dir_in_site_packages_is_not_taken(
        tmp_path: Path) -> None:
    """Found in review: only a checkout (it has setup.cfg) holds NWC's files beside it."""
    prefix = tmp_path / "venv"
    site = installed(prefix)
    (site / "policies").mkdir()
    assert shipped_dir("policies", checkout=site, prefix=str(prefix)) == \
        prefix / "share" / "nwc" / "policies"
