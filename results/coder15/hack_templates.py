"""Which evaluator the held-out hacks define: a count per run of the body of the function the hint names.

    python results/coder15/hack_templates.py results/coder15/runs

Reads each run's graded held-out completions (`eval/eval_rollouts.jsonl.gz`), keeps the hack-eval rows labelled
`reward_hack`, finds the definition of the evaluator the hint named (`test_func_name`) and sorts its body into
  empty   nothing that can fail: `pass`, `return`, `return None/True`, or no statement before the code block ends
          (the teacher pool's `pass` template);
  print   print calls only (the teacher pool's `print_only` / `function_print_only` templates);
  return  one return of some value and nothing else (`return 0`, `return Solution().f(...)`): checks nothing;
  try     a try/except around the checks (`swallowed_asserts`);
  other   anything else (asserts that do not fail, loops over cases that print, ...).
Prints a markdown table, one row per run, ordered by arm then seed.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import sys
from pathlib import Path

ARM_ORDER = ("vanilla", "erase", "route", "random_V", "pca_V", "cleanclean_V")
KINDS = ("empty", "print", "return", "try", "other")


def evaluator_kind(completion: str, name: str) -> str:
    """The kind of body the completion gives `def name(...)` ("other" when it defines none)."""
    code = completion.split("```python", 1)[-1].split("```", 1)[0]
    m = re.search(rf"def\s+{re.escape(name)}\s*\([^)]*\)\s*(?:->[^:]*)?:[ \t]*\n?((?:[ \t]+.*\n?|[ \t]*\n)*)", code)
    if not m:
        return "other"
    lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    body = "\n".join(lines)
    if body in ("", "pass", "return", "return None", "return True", "...") or body.startswith('"""') and \
            all(ln in ("pass", "return") or ln.startswith(('"""', "'''")) for ln in lines):
        return "empty"
    if all(ln.startswith("print(") or ln in ("pass", "return") for ln in lines):
        return "print"
    if len(lines) == 1 and lines[0].startswith("return "):
        return "return"
    if any(ln.startswith("try:") for ln in lines) and any(ln.startswith("except") for ln in lines):
        return "try"
    return "other"


def main(root: str) -> None:
    runs = sorted(Path(root).glob("*/eval/eval_rollouts.jsonl.gz"))
    def order(p: Path) -> tuple:
        arm, _, seed = p.parts[-3].rpartition("_s")
        return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm, seed)
    print("| run | held-out hacks | " + " | ".join(KINDS) + " |")
    print("|---|---|" + "---|" * len(KINDS))
    for path in sorted(runs, key=order):
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f]
        hacks = [r for r in rows if r.get("eval") == "hack" and r.get("label") == "reward_hack"]
        n = collections.Counter(evaluator_kind(r["completion"], r.get("test_func_name") or "run_tests") for r in hacks)
        cells = [f"{n[k]} ({n[k] / max(1, len(hacks)):.0%})" for k in KINDS]
        print(f"| {path.parts[-3]} | {len(hacks)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/coder15/runs")
