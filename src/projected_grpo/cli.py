"""`projected-grpo <command> ...`: a thin dispatcher. Each command's parsing and logic live in its stage's module,
as `main(argv: list[str]) -> int`; modules are imported lazily so the grader never imports torch."""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "grade": ("projected_grpo.grader", "main", "grade model completions against problems (sandboxed)"),
    "demo": ("projected_grpo.grader", "demo_main", "grade built-in canonical, wrong and hacking solutions"),
    "data": ("projected_grpo.databuild", "main", "data build: rebuild a train/holdout split from LeetCodeDataset"),
    "train": ("projected_grpo.train", "main", "one GRPO run (--preset NAME; --help lists every flag)"),
    "build-pool": ("projected_grpo.teacher", "main", "build and grade the teacher pool"),
    "extract-vhack": ("projected_grpo.vhack", "extract_main", "extract the hack direction V from contrastive pairs"),
    "verify-vhack": ("projected_grpo.vhack", "verify_main", "check V on held-out pairs against a random V"),
    "pipeline": ("projected_grpo.experiment", "pipeline_main", "extract -> verify -> arms as dependent jobs"),
    "sweep": ("projected_grpo.experiment", "sweep_main", "arms x seeds, resumable"),
    "report": ("projected_grpo.report", "main", "tables and plots over run directories"),
    "eval": ("projected_grpo.evaluate", "main", "held-out hack rate and pass rate for a model or a run"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: projected-grpo <command> [options]   (projected-grpo <command> --help for its options)", ""]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"projected-grpo: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        print(f"projected-grpo {name}: not available ({e}). Install the extras: pip install -e '.[train]'",
              file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
