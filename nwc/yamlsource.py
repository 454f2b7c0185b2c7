"""Strict YAML reading with positions, for configuration that people write by hand.

PyYAML silently keeps the last of two equal keys in a mapping; in a policy that can turn
"deny" into "allow" without anyone noticing, so duplicates are errors here. Every value keeps
the line it came from, so a validator can say `policies/acme.yaml:12: ivns.web.cidrs[1]: ...`.

The validators in `policy.py` and `topology.py` walk a `Cursor`: a value plus where it is.
They collect every `Problem` instead of stopping at the first one, so one run of
`nwc check-policy` lists everything that is wrong.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a configuration file, located precisely."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field or '(document)'}: {self.message}"


class ConfigError(Exception):
    """A configuration could not be loaded; `problems` says every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


PathKey = tuple[str | int, ...]


def format_path(path: PathKey) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


@dataclass
class Document:
    """One parsed YAML file: plain Python values plus the line of every key and item."""

    file: str
    root: Any
    lines: dict[PathKey, int]
    # Values that could not be read at all (already a Problem each): a validator that finds
    # nothing there must not add "expected an integer, got nothing" about the same value.
    unreadable: set[PathKey] = field(default_factory=set)

    def line_of(self, path: PathKey) -> int:
        # Fall back to the nearest enclosing node that has a position.
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)


# Deeper than any policy or topology (they nest five or six levels); the composer and the
# walk below recurse once per level, so without a limit 3000 brackets end in RecursionError.
MAX_NESTING = 64


class _Refused(yaml.MarkedYAMLError):
    """YAML this reader will not take, though it is well-formed."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases, and with a nesting limit.

    An alias is expanded wherever it is used, so a few hundred bytes of nested aliases
    ("billion laughs") grow into billions of values, and an alias inside its own anchor is a
    cycle. Hand-written configuration has no need for them: refused at their line."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.nesting = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(problem=f"YAML aliases (*{event.anchor}) are not accepted; "
                                   "write the value out", problem_mark=event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused(problem=f"YAML anchors (&{event.anchor}) are not accepted; "
                                   "write each value out", problem_mark=event.start_mark)
        if self.nesting >= MAX_NESTING:
            raise _Refused(problem=f"nested more than {MAX_NESTING} levels deep",
                           problem_mark=event.start_mark)
        self.nesting += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.nesting -= 1


def _plain(loader: yaml.SafeLoader, node: yaml.Node, path: PathKey, doc: Document,
           problems: list[Problem]) -> Any:
    doc.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(Problem(doc.file, key_node.start_mark.line + 1, format_path(path),
                                        "mapping keys must be plain scalars"))
                continue
            key = _plain(loader, key_node, path, doc, problems)
            if isinstance(key, int) and abs(key) >= _LONGEST_SHOWN_INTEGER:
                # No key is a number this large, and its path could not even be printed.
                problems.append(Problem(doc.file, key_node.start_mark.line + 1,
                                        format_path(path), f"{_num(key)} is not a key"))
                continue
            if not isinstance(key, str | int) or isinstance(key, bool):
                key = str(key)
            child = (*path, key)
            line = key_node.start_mark.line + 1
            if key in out:
                problems.append(Problem(
                    doc.file, line, format_path(child),
                    f"duplicate key (first defined on line {doc.lines[child]}); "
                    "YAML would silently keep only the last one"))
                continue
            doc.lines[child] = line
            out[key] = _plain(loader, value_node, child, doc, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(loader, item, (*path, i), doc, problems)
                for i, item in enumerate(node.value)]
    try:
        return loader.construct_object(node)
    except ValueError as exc:
        # PyYAML lets Python's own conversions raise: `2024-13-45` looks like a date but is
        # none, and int() refuses a decimal of more than 4300 digits.
        message = (f"an integer of {len(node.value)} characters is too large"
                   if node.tag == "tag:yaml.org,2002:int" else f"cannot read this value: {exc}")
        problems.append(Problem(doc.file, node.start_mark.line + 1, format_path(path), message))
        doc.unreadable.add(path)
        return None


def parse_yaml(text: str, file: str) -> tuple[Document, list[Problem]]:
    """Parse one YAML document strictly; syntax errors and duplicate keys become Problems."""
    doc = Document(file=file, root=None, lines={(): 1})
    problems: list[Problem] = []
    loader = None
    try:
        # The reader checks every character as it is constructed: inside the try.
        loader = _StrictLoader(text)
        node = loader.get_single_node()
        if node is not None:
            doc.root = _plain(loader, node, (), doc, problems)
    except _Refused as exc:
        problems.append(Problem(file, exc.problem_mark.line + 1, "", str(exc.problem)))
    except RecursionError:
        # MAX_NESTING should stop this first; a traceback must never be the answer.
        problems.append(Problem(file, 0, "", f"nested too deeply (the limit is {MAX_NESTING})"))
    except yaml.reader.ReaderError as exc:
        # A control character (NUL, ESC...) YAML does not allow; not a MarkedYAMLError, so
        # its line is counted here. Named by code point: printing it would be the problem.
        problems.append(Problem(file, text.count("\n", 0, exc.position) + 1, "",
                                f"character U+{exc.character:04X} may not appear in YAML "
                                "(of the control characters, only tab and line breaks may)"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        problems.append(Problem(file, line, "", f"YAML syntax error: {exc.problem or exc}"))
    except yaml.YAMLError as exc:
        problems.append(Problem(file, 0, "", f"YAML error: {exc}"))
    finally:
        if loader is not None:
            loader.dispose()
    return doc, problems


# The largest file read as policy or topology. Hand-written configuration is kilobytes (the
# shipped policy set is under 10 KiB; ten thousand IVNs would be about 3 MiB); parsing 8 MiB
# takes seconds and a few hundred MB, so a runaway file is refused instead of taking the
# controller's memory, or its reload thread, with it.
MAX_FILE_BYTES = 8 * 1024 * 1024


def read_yaml(path: Path) -> tuple[Document, list[Problem]]:
    """Read and parse one file. Only a regular file (or a symlink to one) of at most
    MAX_FILE_BYTES is read: a FIFO would block the reader (and a reload) forever, and
    /dev/zero or /dev/urandom never end."""
    def unread(line: int, message: str) -> tuple[Document, list[Problem]]:
        return Document(str(path), None, {(): 0}), [Problem(str(path), line, "", message)]

    try:
        data = _read_regular_file(path)
    except OSError as exc:
        return unread(0, f"cannot read: {exc}")
    except _NotReadable as exc:
        return unread(0, str(exc))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return unread(data.count(b"\n", 0, exc.start) + 1,
                      f"not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})")
    return parse_yaml(text, str(path))


class _NotReadable(Exception):
    """A file that is not read as configuration, for the reason given."""


def _read_regular_file(path: Path) -> bytes:
    # O_NONBLOCK: opening a FIFO for reading would wait for a writer; it is refused below
    # once fstat() says what the open file is (no window between a check and the open).
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotReadable(f"not a regular file ({_file_kind(mode)}); only regular files "
                               "(or symlinks to them) are read")
        # Read one byte past the limit: the size fstat() gave may change while reading.
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise _NotReadable(f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB, the limit "
                           "for a configuration file")
    return data


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"


class Cursor:
    """A value inside a Document, with typed accessors that record Problems instead of raising."""

    def __init__(self, doc: Document, path: PathKey, value: Any, problems: list[Problem]) -> None:
        self.doc = doc
        self.path = path
        self.value = value
        self.problems = problems

    @classmethod
    def root(cls, doc: Document, problems: list[Problem]) -> Cursor:
        return cls(doc, (), doc.root, problems)

    @property
    def line(self) -> int:
        return self.doc.line_of(self.path)

    @property
    def field(self) -> str:
        return format_path(self.path)

    @property
    def name(self) -> str:
        """The last key of the path: for `ivns.web`, `web`."""
        return str(self.path[-1]) if self.path else ""

    def problem(self, message: str) -> None:
        if self.path in self.doc.unreadable:
            return  # said once already, where it was read
        self.problems.append(Problem(self.doc.file, self.line, self.field, message))

    def child(self, key: str | int, value: Any) -> Cursor:
        return Cursor(self.doc, (*self.path, key), value, self.problems)

    # -- shapes -------------------------------------------------------------------------------

    def mapping(self, allowed: set[str] | None = None, required: set[str] = frozenset(),
                *, what: str = "") -> dict[str, Cursor] | None:
        """The value as a mapping of str to Cursor; None (after a Problem) if it is not one."""
        if self.value is None and not required:
            return {}
        if not isinstance(self.value, dict):
            self.problem(f"expected a mapping{' of ' + what if what else ''}, "
                         f"got {_kind(self.value)}")
            return None
        out: dict[str, Cursor] = {}
        for key, value in self.value.items():
            child = self.child(key, value)
            if not isinstance(key, str):
                child.problem("keys here must be strings")
                continue
            if allowed is not None and key not in allowed:
                hint = ", ".join(sorted(allowed))
                child.problem(f"unknown key {key!r} (allowed: {hint})")
                continue
            out[key] = child
        for key in sorted(required - set(out)):
            if key not in (self.value or {}):
                self.problem(f"missing required key {key!r}")
        return out

    def items(self) -> Iterator[Cursor]:
        """The value as a list; a lone scalar is not silently promoted."""
        if self.value is None:
            return
        if not isinstance(self.value, list):
            self.problem(f"expected a list, got {_kind(self.value)}")
            return
        for i, item in enumerate(self.value):
            yield self.child(i, item)

    def string(self, *, pattern: Any = None, what: str = "a string") -> str | None:
        if not isinstance(self.value, str) or not self.value:
            self.problem(f"expected {what}, got {_kind(self.value)}")
            return None
        if pattern is not None and not pattern.fullmatch(self.value):
            self.problem(f"{self.value!r} is not {what}")
            return None
        return self.value

    def integer(self, *, minimum: int | None = None, maximum: int | None = None,
                unit: str = "") -> int | None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            self.problem(f"expected an integer{' (' + unit + ')' if unit else ''}, "
                         f"got {_kind(self.value)}")
            return None
        return self._bounded(self.value, minimum, maximum, unit)

    def number(self, *, minimum: float | None = None, maximum: float | None = None,
               unit: str = "", exclusive_minimum: bool = False) -> float | None:
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            self.problem(f"expected a number{' (' + unit + ')' if unit else ''}, "
                         f"got {_kind(self.value)}")
            return None
        value = self.value
        if isinstance(value, float) and not math.isfinite(value):
            self.problem("expected a finite number")
            return None
        # Bounds first, on the value as written: Python compares an int with a float exactly,
        # so a 400-digit integer is "more than the maximum" instead of overflowing float().
        if exclusive_minimum and minimum is not None and value <= minimum:
            self.problem(f"must be greater than {minimum:g}{' ' + unit if unit else ''}, "
                         f"got {_num(value)}")
            return None
        if self._bounded(value, None if exclusive_minimum else minimum, maximum, unit) is None:
            return None
        try:
            return float(value)
        except OverflowError:  # an integer beyond every float, where no maximum caught it
            self.problem(f"{_num(value)} is too large a number")
            return None

    def boolean(self) -> bool | None:
        if not isinstance(self.value, bool):
            self.problem(f"expected true or false, got {_kind(self.value)}")
            return None
        return self.value

    def _bounded(self, value: Any, minimum: Any, maximum: Any, unit: str) -> Any:
        suffix = f" {unit}" if unit else ""
        if minimum is not None and value < minimum:
            self.problem(f"must be at least {_num(minimum)}{suffix}, got {_num(value)}")
            return None
        if maximum is not None and value > maximum:
            self.problem(f"must be at most {_num(maximum)}{suffix}, got {_num(value)}")
            return None
        return value


# Integers this large are shown by size only: a message must stay one readable line, and
# Python refuses to print an integer of more than 4300 digits at all (ValueError).
_LONGEST_SHOWN_INTEGER = 10**20


def _num(value: float) -> str:
    if isinstance(value, int):
        if abs(value) >= _LONGEST_SHOWN_INTEGER:
            # log10(2) digits per bit: the count is right to within one digit.
            return f"an integer of about {value.bit_length() * 30103 // 100000 + 1} digits"
        return str(value)
    return f"{value:g}"


def shown(value: Any) -> str:
    """repr() for a message: abbreviated when long, and never raising (Python refuses to
    print an integer of more than 4300 digits, also inside a list)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _num(value)
    try:
        text = repr(value)
    except ValueError:
        return "a value too large to show"
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"string {shown(value)}"
    if isinstance(value, int) and abs(value) >= _LONGEST_SHOWN_INTEGER:
        return _num(value)
    return f"{type(value).__name__} {shown(value)}"
