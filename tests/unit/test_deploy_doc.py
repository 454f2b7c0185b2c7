"""docs/deploy.md cannot rot: every `nwc` command line in its code blocks (the systemd units'
`ExecStart=` lines included) parses with NWC's real argument parser, every `[nwc]` config-file
example sets only options `nwc run` knows, with values it accepts, and the charon
configuration names the plugins the lab's charon loads. Nothing is executed: argparse only
parses."""

from __future__ import annotations

import argparse
import configparser
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from nwc.cli import build_parser
from nwc.lab.strongswan import PLUGINS
from nwc.run import apply_config_file, check_run_options

pytestmark = pytest.mark.unit

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
FENCE = re.compile(r"^\s*```")
SHELL_PUNCTUATION = set("();<>|&")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
UNIT_SECTION = re.compile(r"^\[(Unit|Service|Install)\]\s*$", re.M)


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    info: str  # the fence's info string: sh, ini, ...
    text: str


@dataclass(frozen=True)
class Command:
    line: int
    argv: list[str]  # after `nwc`
    source: str


def code_blocks(markdown: str) -> list[Block]:
    blocks, open_at, info, body = [], None, "", []
    for number, line in enumerate(markdown.splitlines(), 1):
        if FENCE.match(line):
            if open_at is None:
                open_at, info, body = number, line.strip()[3:].strip(), []
            else:
                blocks.append(Block(open_at, info, "\n".join(body)))
                open_at = None
        elif open_at is not None:
            body.append(line)
    assert open_at is None, f"deploy.md:{open_at}: code block never closed"
    return blocks


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined (shell and systemd alike)."""
    out, pending, start = [], "", 0
    for offset, line in enumerate(block.text.splitlines(), 1):
        if not pending:
            start = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def segments(line: str) -> list[list[str]]:
    """Simple commands of a shell line: split at `;`, `|`, `&&`, `$(`, `)`, redirections."""
    lexer = shlex.shlex(line.replace("$(", " ( "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # not shell (an unbalanced quote in prose-like text)
        return []
    out, current = [], []
    for token in tokens:
        if set(token) <= SHELL_PUNCTUATION:
            out.append(current)
            current = []
        else:
            current.append(token)
    out.append(current)
    return [s for s in out if s]


def _is_nwc(token: str) -> bool:
    return token == "nwc" or token.endswith("/nwc")


def nwc_commands(markdown: str, subcommands: set[str]) -> list[Command]:
    """Every `nwc ...` in the code blocks. A token is the command when it is a path ending in
    `/bin/nwc` (also as the value of `ExecStart=`), opens the command (after VAR=
    assignments), or is a bare `nwc` followed by a subcommand (so `runuser -u nwc --` is not
    taken for one). In systemd units only the `Exec*=` lines are commands."""
    found = []
    for block in code_blocks(markdown):
        unit = bool(UNIT_SECTION.search(block.text))
        for number, line in logical_lines(block):
            if unit and not line.startswith("Exec"):
                continue
            for seg in segments(line):
                words = [w.split("=", 1)[1] if ASSIGNMENT.match(w) else w for w in seg]
                first = next((i for i, w in enumerate(seg) if not ASSIGNMENT.match(w)), None)
                for i, word in enumerate(words):
                    if not _is_nwc(word):
                        continue
                    nxt = words[i + 1] if i + 1 < len(words) else None
                    if word.endswith("/bin/nwc") or i == first or nxt in subcommands:
                        found.append(Command(number, words[i + 1:], line.strip()))
                        break
    return found


def subcommand_names(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("nwc has no subcommands")


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse as `nwc` would, turning argparse's exit into an assertion with its message."""
    parser = build_parser()
    errors: list[str] = []

    def error(message: str) -> None:
        errors.append(message)
        raise SystemExit(2)

    for p in _all_parsers(parser):
        p.error = error  # type: ignore[method-assign]
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help
            return argparse.Namespace()
        raise AssertionError("; ".join(errors) or f"exit {exc.code}") from None


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _all_parsers(sub)
    return out


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def commands(guide: str) -> list[Command]:
    return nwc_commands(guide, subcommand_names(build_parser()))


def test_the_extractor_finds_commands_and_catches_a_bad_one() -> None:
    names = subcommand_names(build_parser())
    text = ("```sh\nexport T=$(runuser -u nwc -- /opt/nwc/bin/nwc token issue admin)\n"
            "nwc run --no-such-option \\\n    --state-dir /x   # a comment\n"
            "systemctl reload nwc\n```\n"
            "```ini\nExecStart=/opt/nwc/bin/nwc agent --underlay-dev br-ul\n```\n")
    found = nwc_commands(text, names)
    assert [c.argv for c in found] == [
        ["token", "issue", "admin"], ["run", "--no-such-option", "--state-dir", "/x"],
        ["agent", "--underlay-dev", "br-ul"]]
    with pytest.raises(AssertionError, match="no-such-option"):
        parse(found[1].argv)


def test_the_guide_shows_the_commands_an_operator_needs(commands: list[Command]) -> None:
    grouped = ("token", "weave", "audit")  # these name an action after the command
    shown = {tuple(c.argv[:2]) if c.argv[0] in grouped else tuple(c.argv[:1])
             for c in commands if c.argv}
    for needed in [("run",), ("agent",), ("check-policy",), ("token", "issue"),
                   ("token", "revoke"), ("fabric",), ("ivns",), ("events",),
                   ("weave", "create"), ("audit", "verify")]:
        assert needed in shown, f"deploy.md shows no `nwc {' '.join(needed)}`"


def test_every_nwc_command_line_parses(commands: list[Command]) -> None:
    problems = []
    for command in commands:
        try:
            args = parse(command.argv)
            if command.argv[:1] == ["run"] and args.config_file is None:
                check_run_options(args, _erroring_parser())
        except AssertionError as exc:
            problems.append(f"deploy.md:{command.line}: {command.source}\n    {exc}")
    assert not problems, "\n".join(problems)


def _erroring_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()

    def error(message: str) -> None:
        raise AssertionError(message)

    parser.error = error  # type: ignore[method-assign]
    return parser


def test_the_systemd_units_start_nwc_run_and_nwc_agent(guide: str) -> None:
    names = subcommand_names(build_parser())
    execs = [c for block in code_blocks(guide) if "[Service]" in block.text
             for c in nwc_commands(f"```\n{block.text}\n```", names)
             if c.source.startswith("ExecStart=")]
    assert sorted(c.argv[0] for c in execs) == ["agent", "run"]
    for command in execs:
        parse(command.argv)
    run = next(c for c in execs if c.argv[0] == "run")
    agent = next(c for c in execs if c.argv[0] == "agent")
    # The agent's unit runs the very command section 7 shows.
    shown = [c for c in nwc_commands(guide, names)
             if c.argv[:1] == ["agent"] and not c.source.startswith("ExecStart=")]
    assert [c.argv for c in shown] == [agent.argv]
    assert "--config-file" in run.argv


def config_examples(guide: str) -> list[Block]:
    return [b for b in code_blocks(guide) if re.search(r"^\[nwc\]\s*$", b.text, re.M)]


def test_config_file_examples_set_only_options_nwc_run_knows(guide: str,
                                                             tmp_path: Path) -> None:
    examples = config_examples(guide)
    assert examples, "deploy.md has no [nwc] config-file example"
    run_parser = parse(["run"])._parser
    known = {a.dest for a in run_parser._actions
             if a.option_strings and a.dest not in ("help", "config_file")}
    for block in examples:
        ini = configparser.ConfigParser(interpolation=None)
        ini.read_string(block.text)
        assert ini.sections() == ["nwc"], f"deploy.md:{block.line}: only [nwc] belongs here"
        unknown = [k for k in ini["nwc"] if k.replace("-", "_") not in known]
        assert not unknown, f"deploy.md:{block.line}: nwc run has no option {unknown}"
        # And the file is accepted as nwc run reads it: values convert, TLS options that go
        # together are all there.
        path = tmp_path / f"nwc-{block.line}.ini"
        path.write_text(block.text)
        args = parse(["run", "--config-file", str(path)])
        parser = args._parser
        parser.error = _erroring_parser().error  # type: ignore[method-assign]
        apply_config_file(args, parser)
        check_run_options(args, parser)


def test_the_charon_configuration_loads_the_labs_plugins(guide: str) -> None:
    loads = [line.split("=", 1)[1].split() for block in code_blocks(guide)
             for line in block.text.splitlines()
             if re.match(r"^\s*load\s*=\s*\S+\s+\S+", line)]
    assert loads == [PLUGINS.split()]
