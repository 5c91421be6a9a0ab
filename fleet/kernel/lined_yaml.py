"""YAML that remembers where each value was written, read with limits, for files people edit
(scenarios, the access policy): every error names the file, the line and the field.

Limits before any work: the file's size, the nesting depth and the number of values (an alias
bomb expands into millions of them), so a hostile or broken file costs milliseconds.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from fleet.kernel.errors import UsageError

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_VALUES = 100_000


class FileFormatError(UsageError):
    """A file that cannot be used as written; the message says where and why."""

    def __init__(self, path: Path, line: int, where: str, problem: str) -> None:
        self.path = path
        self.line = line
        self.where = where
        super().__init__(f"{path}:{line}: {where}: {problem}")


class LinedMap(dict[str, Any]):
    """A YAML mapping that remembers its line and the line of every key."""

    line: int
    lines: dict[str, int]

    @classmethod
    def of(cls, line: int, values: dict[str, Any] | None = None) -> LinedMap:
        """A mapping written at ``line`` (its keys too), e.g. for a shorthand value."""
        mapping = cls(values or {})
        mapping.line, mapping.lines = line, dict.fromkeys(mapping, line)
        return mapping


class LinedSeq(list[Any]):
    line: int
    lines: list[int]


def parse_lined_yaml(
    path: Path,
    text: str,
    *,
    error: type[FileFormatError] = FileFormatError,
    empty: str = "empty",
    not_a_mapping: str = "expected a mapping of fields",
) -> LinedMap:
    """The document in ``text`` (one mapping) with lines kept; ``error`` is raised, naming
    ``path`` and the line, for bad YAML, a file over the limits, ``empty`` or ``not_a_mapping``."""
    if len(text.encode()) > MAX_BYTES:
        raise error(path, 1, "file", f"larger than {MAX_BYTES // 1024} KiB")
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        raise error(path, line, "YAML", str(exc.problem or exc)) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        raise error(path, line, "YAML", f"character U+{exc.character:04X} is not allowed") from None
    if node is None:
        raise error(path, 1, "file", empty)
    document = _Converter(path, error).convert(node, 0)
    if not isinstance(document, LinedMap):
        raise error(path, 1, "file", not_a_mapping)
    return document


class _Converter:
    def __init__(self, path: Path, error: type[FileFormatError]) -> None:
        self.path, self.error = path, error
        self.loader = yaml.SafeLoader("")
        self.values = 0

    def convert(self, node: yaml.Node, depth: int) -> Any:
        self.values += 1
        if self.values > MAX_VALUES or depth > MAX_DEPTH:
            limit = f"{MAX_VALUES:,} values" if depth <= MAX_DEPTH else f"{MAX_DEPTH} levels"
            raise self.error(self.path, _line(node), "YAML", f"more than {limit}")
        if isinstance(node, yaml.MappingNode):
            mapping = LinedMap()
            mapping.line, mapping.lines = _line(node), {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node)
                if not isinstance(key, str):
                    raise self.error(
                        self.path, _line(key_node), str(key), "field names must be text"
                    )
                if key in mapping:
                    raise self.error(self.path, _line(key_node), key, "given twice")
                mapping[key] = self.convert(value_node, depth + 1)
                mapping.lines[key] = _line(key_node)
            return mapping
        if isinstance(node, yaml.SequenceNode):
            sequence = LinedSeq(self.convert(item, depth + 1) for item in node.value)
            sequence.line, sequence.lines = _line(node), [_line(item) for item in node.value]
            return sequence
        try:
            return self.loader.construct_object(node)
        except (ValueError, OverflowError, yaml.YAMLError) as exc:  # 2001-02-30, !!binary junk …
            raise self.error(self.path, _line(node), "YAML", f"unreadable value: {exc}") from None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def suggest(word: str, choices: Iterable[str]) -> str:
    """The nearest valid name: one that holds the word whole (``revoked`` in
    ``certificate_revoked``), else the closest spelling."""
    options = [str(c) for c in choices]
    word = word.strip().replace(" ", "_")  # 'not authorized' was meant as not_authorized
    holding = sorted((c for c in options if word and word in c), key=len)
    close = holding[:1] or difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


class FieldReader:
    """Reads the fields of a :func:`parse_lined_yaml` document; every problem is ``error``
    naming the file, the line and the field (subclasses add the file's own kinds of field)."""

    error: type[FileFormatError] = FileFormatError

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, line: int, where: str, problem: str) -> FileFormatError:
        return self.error(self.path, line, where, problem)

    def only(self, mapping: LinedMap, where: str, allowed: tuple[str, ...]) -> None:
        for key in mapping:
            if key not in allowed:
                raise self.fail(
                    mapping.lines[key],
                    where,
                    f"unknown field {key!r}{suggest(key, allowed)}; valid fields: "
                    + ", ".join(allowed),
                )

    def named(
        self, item: Any, line: int, where: str, allowed: tuple[str, ...], what: str
    ) -> tuple[LinedMap, str, str]:
        """A named item's mapping, its name, and where it is (``rules[2] (name)``)."""
        if not isinstance(item, LinedMap):
            raise self.fail(line, where, f"a {what} is a mapping of {', '.join(allowed)}")
        self.only(item, where, allowed)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise self.fail(
                item.lines.get("name", item.line), f"{where}.name", f"give the {what} a name"
            )
        return item, name.strip(), f"{where} ({name})"
