"""Fail when a function under the given folders is longer than 80 lines (the complexity limit is ruff's C901).

Usage: python scripts/check_function_sizes.py lowdose [--max-lines 80]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def long_functions(root: Path, max_lines: int) -> list[str]:
    """``path:line name (N lines)`` for every function or method of more than ``max_lines`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - start + 1
                if lines > max_lines:
                    found.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("--max-lines", type=int, default=80)
    args = parser.parse_args(argv)
    found = [f for root in args.roots for f in long_functions(root, args.max_lines)]
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
