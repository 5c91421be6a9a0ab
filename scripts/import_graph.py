"""Count cross-package imports (statements and names) and find package-level cycles.

    python scripts/import_graph.py [ROOT]

Every import statement in broker/, device/ and fleet/ counts, including those inside functions
and under TYPE_CHECKING. A package is the longest of ``broker``, ``device``, ``fleet`` and
``fleet.<subpackage>`` that holds the module; ``fleet`` alone is its top-level modules.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

TOP = ("broker", "device", "fleet")


def _packages(root: Path) -> list[str]:
    found = list(TOP)
    for init in (root / "fleet").glob("*/__init__.py"):
        found.append(f"fleet.{init.parent.name}")
    return sorted(found, key=len, reverse=True)


def _package_of(module: str, packages: list[str]) -> str | None:
    for package in packages:
        if module == package or module.startswith(package + "."):
            return package
    return None


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def main(root: Path) -> None:
    packages = _packages(root)
    statements: Counter[tuple[str, str]] = Counter()
    names: Counter[tuple[str, str]] = Counter()
    for top in TOP:
        for path in sorted((root / top).rglob("*.py")):
            source = _package_of(_module_name(root, path), packages)
            assert source is not None
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [(node.module, len(node.names))]
                elif isinstance(node, ast.Import):
                    targets = [(alias.name, 1) for alias in node.names]
                else:
                    continue
                for module, count in targets:
                    target = _package_of(module, packages)
                    if target is None or target == source:
                        continue
                    statements[source, target] += 1
                    names[source, target] += count
    print(f"{'from':<20} {'to':<20} statements  names")
    for (source, target), n in sorted(statements.items()):
        print(f"{source:<20} {target:<20} {n:>10}  {names[source, target]:>5}")
    edges: dict[str, set[str]] = {}
    for source, target in statements:
        edges.setdefault(source, set()).add(target)
    cycles = [" -> ".join(sorted(group)) for group in _cycles(edges)]
    print(f"package cycles: {len(cycles)}", *cycles, sep="\n  ")


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The groups of packages that import one another, directly or through others."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {node: reach(node) for node in edges}
    groups: list[set[str]] = []
    for node in sorted(edges):
        group = {node} | {o for o in reachable[node] if node in reachable.get(o, set())}
        if len(group) > 1 and group not in groups:
            groups.append(group)
    return groups


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
