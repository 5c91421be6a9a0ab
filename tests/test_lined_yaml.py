"""YAML with lines (scenarios, the access policy): limits before work, errors with a line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.kernel.lined_yaml import MAX_BYTES, FileFormatError, LinedMap, parse_lined_yaml

FILE = Path("policy.yaml")


def test_values_keep_their_lines() -> None:
    document = parse_lined_yaml(FILE, "a: 1\nrules:\n  - name: x\n    tier: gold\n")
    assert (document.line, document.lines) == (1, {"a": 1, "rules": 2})
    rule = document["rules"][0]
    assert isinstance(rule, LinedMap) and rule.lines == {"name": 3, "tier": 4}
    assert document["rules"].lines == [3]


@pytest.mark.parametrize(
    ("text", "where", "line"),
    [
        ("a: [1, 2\n", "YAML", 2),
        ("a: 1\na: 2\n", "a", 2),
        ("- 1\n", "file", 1),
        ("", "file", 1),
        ("x: " + "[" * 40 + "]" * 40 + "\n", "YAML", 1),
        ("a: 1\nb: 2001-02-30\n", "YAML", 2),
        ("a: 1\nb: \x1f\n", "YAML", 2),
    ],
)
def test_bad_files_name_the_line(text: str, where: str, line: int) -> None:
    with pytest.raises(FileFormatError) as raised:
        parse_lined_yaml(FILE, text)
    assert (raised.value.where, raised.value.line) == (where, line), str(raised.value)


def test_an_alias_bomb_and_a_huge_file_are_refused_at_once() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefgh":
        previous = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 10) + "]\n"
    started = time.monotonic()
    with pytest.raises(FileFormatError, match="more than 100,000 values"):
        parse_lined_yaml(FILE, bomb)
    with pytest.raises(FileFormatError, match="larger than"):
        parse_lined_yaml(FILE, "a: " + "x" * MAX_BYTES)
    assert time.monotonic() - started < 5


@given(st.text(max_size=300))
def test_any_text_is_a_mapping_or_a_file_error(text: str) -> None:
    try:
        document = parse_lined_yaml(FILE, text)
    except FileFormatError as error:
        assert str(error).startswith(f"{FILE}:")
    else:
        assert isinstance(document, LinedMap)
