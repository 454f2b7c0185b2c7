"""The shipped policy files, edited for a test: as one text (for parse_policy_text) or as a
directory of copies (for a controller that reloads them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from nwc.config import SHIPPED_POLICIES


def shipped_text(edits: Mapping[str, str] | None = None) -> str:
    """All shipped policy files as one document, each `old` replaced by `new` (each `old`
    must be there: an edit that matches nothing would test nothing)."""
    text = "\n".join(p.read_text().replace("version: 1\n", "")
                     for p in sorted(SHIPPED_POLICIES.glob("*.yaml")))
    for old, new in (edits or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def copy_shipped_policies(directory: Path) -> Path:
    """The shipped policy files, copied into `directory` (created) for a test to edit."""
    directory.mkdir(parents=True)
    for source in SHIPPED_POLICIES.glob("*.yaml"):
        (directory / source.name).write_text(source.read_text())
    return directory
