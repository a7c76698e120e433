"""`projected-grpo data build`: rebuild a medium+hard train/holdout split from LeetCodeDataset v0.2.0 (upstream schema)
into the rl-rewardhacking schema, keeping only problems whose canonical solution passes all its tests in our grader.

    projected-grpo data build --source LeetCodeDataset-v0.2.0-train.jsonl.gz \
        --exclude leetcode_test_medhard.jsonl --out runs/data [--max-prompt-tokens 1536 --model-name coder15]

`--max-prompt-tokens N` is the reference's prompt filter (spec §1.5 step 4: prompts over 1536 tokens dropped): each
problem's prompt as a run serves it (the default loophole hint, the default system prompt, the chat template of
`--model-name`'s tokenizer) is counted, and problems over N tokens are dropped before grading.
"""

from __future__ import annotations

import ast
import hashlib
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from projected_grpo.problems import (
    _HELPER_COMPARE,
    DEFAULT_HINT,
    DEFAULT_SYSTEM_PROMPT,
    SETUP_CODE,
    Problem,
    chat_messages,
    format_question,
    load_problems,
    make_hint,
    problem_from_record,
    read_jsonl,
    render_prompt,
    system_prompt,
    write_problems,
)

# ----------------------------------------------------------------------------------------------------------------
# data build: LeetCodeDataset v0.2.0 (upstream schema) -> train.jsonl / holdout.jsonl (rl-rewardhacking schema)


@dataclass(frozen=True)
class BuildConfig:
    """projected-grpo data build: rebuild a medium+hard train/holdout split from LeetCodeDataset (upstream schema),
    keeping only problems whose canonical solution passes all tests in our grader."""

    source: Path
    """LeetCodeDataset JSONL (.jsonl or .jsonl.gz), upstream v0.2.0 schema."""
    out: Path
    """Output directory; receives train.jsonl and holdout.jsonl."""
    exclude: tuple[Path, ...] = ()
    """rl-rewardhacking JSONL files whose ids are dropped (e.g. the 119-problem test split)."""
    holdout_frac: float = 0.1
    """Fraction of kept problems put in holdout.jsonl (by a hash of id and seed)."""
    seed: int = 0
    """Seed of the train/holdout split."""
    workers: int = 0
    """Grader processes (0 = one per available core)."""
    limit: int | None = None
    """Read only the first N source rows (for quick checks)."""
    max_prompt_tokens: int = 0
    """Drop problems whose served prompt (default hint and system prompt, chat template applied) is over N tokens of
    --model-name's tokenizer (0 = off; the reference: 1536 with Qwen3-4B's tokenizer)."""
    model_name: str = "tiny"
    """The model whose tokenizer counts prompt tokens (tiny, coder05, a .gguf file, a Hugging Face id or a directory)."""


def upstream_tests(check_src: str, method: str) -> list[str]:
    """The asserts of an upstream `def check(candidate): ...`, rewritten to call `Solution().<method>(...)`.
    Raises ValueError if a statement is not `assert candidate(...) == x` or `assert is_same_*(candidate(...), x)`."""
    # v0.2.0's `input_output` holds LeetCode's display form (true/false/null, trailing spaces, and raw lists where
    # the method takes a ListNode/TreeNode), so it does not run as Python; the check() asserts are the executable
    # form of the same cases (one assert per input_output entry). We therefore build the tests from check().
    try:
        module = ast.parse(check_src)
    except SyntaxError as e:
        raise ValueError(f"test code is not valid Python ({e.msg})") from None
    if len(module.body) != 1 or not isinstance(module.body[0], ast.FunctionDef) or module.body[0].name != "check":
        raise ValueError("test code is not a single `def check(candidate):`")
    out = []
    for stmt in module.body[0].body:
        if not isinstance(stmt, ast.Assert):
            raise ValueError(f"check() holds a non-assert statement: {ast.unparse(stmt)[:80]!r}")
        node = stmt.test
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
            call, expected, helper = node.left, node.comparators[0], None
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _HELPER_COMPARE
              and len(node.args) == 2):
            call, expected, helper = node.args[0], node.args[1], node.func.id
        else:
            raise ValueError(f"unsupported assert form: {ast.unparse(node)[:80]!r}")
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "candidate"):
            raise ValueError(f"assert does not call candidate(...): {ast.unparse(node)[:80]!r}")
        call_src, exp_src = ast.get_source_segment(check_src, call), ast.get_source_segment(check_src, expected)
        assert call_src is not None and exp_src is not None
        new_call = f"Solution().{method}" + call_src.removeprefix("candidate")
        out.append(f"assert {new_call} == {exp_src}" if helper is None else f"assert {helper}({new_call}, {exp_src})")
    if not out:
        raise ValueError("check() has no asserts")
    return out


# Upstream misspellings of a difficulty (v0.2.0's test file labels 21 medium problems "Meidum").
_DIFFICULTY_SPELLING = {"meidum": "medium"}


def upstream_difficulty(row: dict[str, Any]) -> str:
    """The row's difficulty, lowercased, with known upstream misspellings corrected ("" if absent)."""
    d = str(row.get("meta", {}).get("difficulty", "")).lower()
    return _DIFFICULTY_SPELLING.get(d, d)


def upstream_problem(row: dict[str, Any], where: str) -> Problem:
    """One LeetCodeDataset v0.2.0 row -> Problem (question per the reference's layout, setup_code = SETUP_CODE).
    Raises ValueError for rows the reference's processor would reject or whose tests we cannot parse."""
    meta = row.get("meta")
    if not isinstance(meta, dict) or any(k not in row for k in ("entry_point", "completion", "test")):
        raise ValueError(f"{where}: not a LeetCodeDataset v0.2.0 row (needs entry_point, completion, test, meta)")
    if any(k not in meta for k in ("question_id", "difficulty", "question_title", "lang_code")):
        raise ValueError(f"{where}: meta lacks question_id/difficulty/question_title/lang_code (v0.2.0 schema)")
    entry = row["entry_point"]
    if not entry.startswith("Solution()."):
        raise ValueError(f"{where}: entry_point {entry!r} is not Solution().<method>")
    starter = meta["lang_code"]
    if not starter.strip():
        raise ValueError(f"{where}: empty starter code")
    method = entry.removeprefix("Solution().")
    try:
        gt = upstream_tests(row["test"], method)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    # v0.2.0 names the problem statement `question_title`; string outputs are already quoted in its asserts, so the
    # reference's "-> str: wrap the output in quotes" step does not apply. SETUP_CODE covers every v0.2.0 preamble
    # (it adds the random/functools/... imports and the ListNode and TreeNode helpers; `pairwise` is in itertools).
    rec = {"id": meta["question_id"], "difficulty": upstream_difficulty(row),
           "question": format_question(meta["question_title"], method, starter), "gt_answer": gt, "func_name": entry,
           "setup_code": SETUP_CODE, "canonical_solution": row["completion"],
           "prompt_metadata": {"starter_code": starter}}
    return problem_from_record(rec, where)


def load_tokenizer(model_name: str):
    """The tokenizer of `model_name` as `models.load` would pair it with the model (the model itself is not loaded)."""
    from transformers import AutoTokenizer

    from projected_grpo import config, models

    src, _ = models.resolve(config.ModelConfig(name=model_name, device="cpu"))
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--model-name {model_name}: cannot load its tokenizer ({first}); pass tiny, coder05, a .gguf "
                         "file, a local directory, or a Hugging Face id that is cached") from None
    if tok.chat_template is None:
        raise ValueError(f"--model-name {model_name}: its tokenizer has no chat template; use an instruct/chat model")
    return tok


def prompt_tokens(tokenizer, problem: Problem) -> int:
    """Tokens of `problem`'s prompt as a run serves it: the default loophole hint (run_tests mode), the default system
    prompt, the chat template with a generation prompt (thinking off), no added special tokens."""
    hint = make_hint(DEFAULT_HINT, problem, random.Random(0))  # "simple_*": the rng is not drawn from
    text = render_prompt(tokenizer, chat_messages(problem, hint, system_prompt(DEFAULT_SYSTEM_PROMPT)))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_filter(problems: list[Problem], tokenizer, max_tokens: int) -> tuple[list[Problem], list[Problem]]:
    """-> (problems whose prompt has at most `max_tokens` tokens, those over it), each in input order."""
    kept, over = [], []
    for p in problems:
        (kept if prompt_tokens(tokenizer, p) <= max_tokens else over).append(p)
    return kept, over


def split_of(problem_id: int, seed: int, holdout_frac: float) -> str:
    """"holdout" or "train", from a hash of (seed, id): deterministic and independent of row order."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()[:8], "big") / 2**64
    return "holdout" if h < holdout_frac else "train"


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Run the data build; returns the counts it prints."""
    from tqdm import tqdm

    if not cfg.source.is_file():
        raise ValueError(f"--source {cfg.source}: no such file; pass LeetCodeDataset-v0.2.0-train.jsonl.gz")
    if not 0.0 <= cfg.holdout_frac < 1.0:
        raise ValueError(f"--holdout-frac {cfg.holdout_frac} must be in [0, 1)")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit {cfg.limit} must be >= 1 (or omitted)")
    if cfg.workers < 0:
        raise ValueError(f"--workers {cfg.workers} must be >= 0 (0 = one per available core)")
    if cfg.max_prompt_tokens < 0:
        raise ValueError(f"--max-prompt-tokens {cfg.max_prompt_tokens} must be >= 0 (0 = off; the reference: 1536)")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ValueError(f"--out {cfg.out} is a file; pass a directory (train.jsonl and holdout.jsonl go there)")
    excluded = {p.id for path in cfg.exclude for p in load_problems(path)}

    rows = read_jsonl(cfg.source)[: cfg.limit]
    dropped: Counter[str] = Counter()
    candidates: list[Problem] = []
    seen: set[int] = set()
    for lineno, row in tqdm(rows, desc="parse", unit="row"):
        where = f"{cfg.source}:{lineno}"
        difficulty = upstream_difficulty(row)
        if difficulty not in ("medium", "hard"):
            dropped[f"not medium/hard ({difficulty or 'none'})"] += 1
            continue
        try:
            problem = upstream_problem(row, where)
        except ValueError as e:
            dropped["unusable row"] += 1
            tqdm.write(f"drop {e}", file=sys.stderr)
            continue
        if problem.id in seen:
            raise ValueError(f"{where}: duplicate id {problem.id}; the source must have one row per problem")
        seen.add(problem.id)
        if problem.id in excluded:
            dropped["in --exclude"] += 1
            continue
        candidates.append(problem)

    n_long = 0
    if cfg.max_prompt_tokens:  # before grading: a dropped prompt needs no grading
        candidates, over = prompt_filter(candidates, load_tokenizer(cfg.model_name), cfg.max_prompt_tokens)
        n_long = len(over)
        if n_long:
            dropped[f"prompt over {cfg.max_prompt_tokens} tokens"] += n_long
        print(f"prompt filter: {n_long} of {n_long + len(candidates)} problems have prompts over "
              f"{cfg.max_prompt_tokens} tokens ({cfg.model_name} tokenizer); dropped")

    from projected_grpo.grader import grade_batch  # the grader's 3 s limit decides, as in the reference prefilter

    completions = [f"```python\n{p.canonical_solution}\n```" for p in candidates]
    grades = grade_batch(candidates, completions, [None] * len(candidates), workers=cfg.workers or None,
                         progress=True, full_suite=True)
    assert len(grades) == len(candidates), (len(grades), len(candidates))
    kept = []
    for p, g in zip(candidates, grades, strict=True):
        if g.gt_pass:
            kept.append(p)
        else:
            dropped["canonical timed out" if g.timed_out else "canonical failed"] += 1

    splits: dict[str, list[Problem]] = {"train": [], "holdout": []}
    for p in kept:
        splits[split_of(p.id, cfg.seed, cfg.holdout_frac)].append(p)
    cfg.out.mkdir(parents=True, exist_ok=True)
    for name, problems in splits.items():
        write_problems(cfg.out / f"{name}.jsonl", problems)

    n_tests = [len(p.tests) for p in kept]
    counts = {
        "rows": len(rows), "dropped": dict(dropped), "kept": len(kept), "prompt_too_long": n_long,
        **{f"{name}_{d}": sum(p.difficulty == d for p in ps) for name, ps in splits.items() for d in ("medium", "hard")},
        "tests_mean": sum(n_tests) / len(n_tests) if n_tests else math.nan,
        "tests_min": min(n_tests, default=0), "tests_max": max(n_tests, default=0),
    }
    print(f"data build: {len(rows)} rows from {cfg.source}")
    print("  dropped: " + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"))
    for name in ("train", "holdout"):
        print(f"  {name}: {len(splits[name])} (medium {counts[name + '_medium']}, hard {counts[name + '_hard']}) "
              f"-> {cfg.out / (name + '.jsonl')}")
    print(f"  tests per problem: mean {counts['tests_mean']:.2f}, min {counts['tests_min']}, max {counts['tests_max']}")
    return counts


def main(argv: list[str]) -> int:
    """`projected-grpo data build ...` (argv[0] is the subcommand)."""
    usage = "usage: projected-grpo data build --source FILE --out DIR [--exclude FILE ...] [options] (build --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] != "build":
        print(f"projected-grpo data: unknown subcommand {argv[0]!r}; {usage}", file=sys.stderr)
        return 2
    import tyro

    cfg = tyro.cli(BuildConfig, args=argv[1:], prog="projected-grpo data build")
    try:
        build(cfg)
    except ValueError as e:
        print(f"projected-grpo data build: {e}", file=sys.stderr)
        return 1
    return 0
