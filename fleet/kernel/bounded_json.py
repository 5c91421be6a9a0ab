"""JSON from untrusted peers, parsed with limits checked before any work.

``json.loads`` alone will recurse until Python's stack gives out on deeply nested input, build
integers of any length (and raise a bare ``ValueError`` past 4,300 digits), and accept ``NaN``.
:func:`loads_bounded` first checks the size and the nesting depth with a linear scan, then
parses with hooks that refuse long numbers and non-finite constants, so every malformed input
ends in one :class:`JsonRejected` naming what was wrong.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 16
MAX_NUMBER_CHARS = 32

_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


class JsonRejected(ValueError):
    """The input is not JSON within the limits; the message says which."""


def loads_bounded(
    data: bytes,
    *,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
    max_number_chars: int = MAX_NUMBER_CHARS,
) -> Any:
    """Parse ``data`` (UTF-8 JSON) or raise :class:`JsonRejected`."""
    if len(data) > max_bytes:
        raise JsonRejected(f"larger than {max_bytes} bytes")
    depth = _nesting_depth(data)
    if depth > max_depth:
        raise JsonRejected(f"nested {depth} deep (at most {max_depth})")

    def number(text: str) -> int | float:
        if len(text) > max_number_chars:
            raise JsonRejected(f"a number of {len(text)} characters (at most {max_number_chars})")
        value = float(text) if any(c in text for c in ".eE") else int(text)
        if value in (float("inf"), float("-inf")):
            raise JsonRejected(f"number {text} is out of range")
        return value

    def constant(name: str) -> Any:
        raise JsonRejected(f"{name} is not JSON")

    try:
        text = data.decode("utf-8")
        return json.loads(text, parse_int=number, parse_float=number, parse_constant=constant)
    except UnicodeDecodeError as exc:
        raise JsonRejected(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise JsonRejected(
            f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def _nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects, brackets inside strings left out."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif byte in _CLOSE:
            depth -= 1
    return deepest
