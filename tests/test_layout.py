"""The package's import graph has no cycles (counting imports inside functions), and the light modules stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).parents[1] / "src" / "projected_grpo"


def imports_of(path: Path) -> set[str]:
    """projected_grpo modules a file imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("projected_grpo"):
            if node.module == "projected_grpo":
                out |= {a.name for a in node.names}
            else:
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("projected_grpo.")}
    return out - {"__version__"}


def test_no_import_cycles():
    graph = {p.stem: imports_of(p) - {p.stem} for p in PKG.glob("*.py") if p.stem != "__init__"}
    graph.pop("cli")  # the dispatcher imports commands by name only
    seen: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if seen.get(n) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, n]))
        if seen.get(n) == 2:
            return
        seen[n] = 1
        for m in sorted(graph.get(n, ())):
            visit(m, [*path, n])
        seen[n] = 2

    for n in sorted(graph):
        visit(n, [])


def test_grader_and_config_never_import_torch():
    code = ("import sys; import projected_grpo.grader, projected_grpo.config, projected_grpo.problems; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
