"""`projected-grpo data build`: upstream LeetCodeDataset rows -> rl-rewardhacking train/holdout files."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import pytest

from projected_grpo.databuild import main, split_of, upstream_problem, upstream_tests
from projected_grpo.problems import SETUP_CODE, format_question, load_problems, parse_expected, write_problems

DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
V020 = DATA / "leetcodedataset" / "LeetCodeDataset-v0.2.0-train.jsonl.gz"
TEST_FILE = DATA / "leetcode" / "leetcode_test_medhard.jsonl"
needs_data = pytest.mark.skipif(not (V020.is_file() and TEST_FILE.is_file()),
                                reason=f"LeetCodeDataset v0.2.0 or the benchmark file not found under {DATA}")


def test_upstream_tests_rewrite():
    check = (
        "def check(candidate):\n"
        "    assert candidate(nums = [2,7], target = 9) == [0,1]\n"
        "    assert candidate(s = \"a\") == \"b\"\n"
        "    assert is_same_list(candidate(head = list_node([1,2])), list_node([2,1]))\n"
        "    assert is_same_tree(candidate(root = tree_node([1,None,2])), tree_node([1,2]))\n"
        "    assert candidate(board = \n[[1,2]\n,[3,4]]) == -1\n"
    )
    assert upstream_tests(check, "f") == [
        "assert Solution().f(nums = [2,7], target = 9) == [0,1]",
        "assert Solution().f(s = \"a\") == \"b\"",
        "assert is_same_list(Solution().f(head = list_node([1,2])), list_node([2,1]))",
        "assert is_same_tree(Solution().f(root = tree_node([1,None,2])), tree_node([1,2]))",
        "assert Solution().f(board = \n[[1,2]\n,[3,4]]) == -1",
    ]


@pytest.mark.parametrize("body, what", [
    ("    assert candidate(a = 1) in [1, 2]\n", "unsupported assert form"),
    ("    assert other(a = 1) == 1\n", "does not call candidate"),
    ("    x = 1\n", "non-assert statement"),
])
def test_upstream_tests_rejects(body, what):
    with pytest.raises(ValueError, match=what):
        upstream_tests("def check(candidate):\n" + body, "f")


def test_split_is_deterministic_hash():
    ids = range(20000)
    a = [split_of(i, 0, 0.1) for i in ids]
    assert a == [split_of(i, 0, 0.1) for i in ids]
    assert a.count("holdout") / len(a) == pytest.approx(0.1, abs=0.01)
    assert a != [split_of(i, 1, 0.1) for i in ids]
    assert all(split_of(i, 0, 0.0) == "train" for i in ids)


@needs_data
def test_upstream_problem_real_rows():
    with gzip.open(V020, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(400), f, strict=False)]
    medhard = [r for r in rows if r["meta"]["difficulty"] in ("Medium", "Hard")]
    for k, row in enumerate(medhard):
        p = upstream_problem(row, f"row{k}")
        assert p.id == row["meta"]["question_id"] and p.difficulty == row["meta"]["difficulty"].lower()
        assert len(p.tests) == len(row["input_output"]), "one test per upstream case"
        assert p.question == format_question(row["meta"]["question_title"], p.method, row["meta"]["lang_code"])
        assert p.setup_code == SETUP_CODE
        for t in p.tests:
            parse_expected(t)
            if "-> str" in row["meta"]["lang_code"] and t.compare == "eq":
                assert isinstance(parse_expected(t), str), "string outputs are already quoted upstream"
    assert any(t.compare == "list_node" for k, r in enumerate(medhard) for t in upstream_problem(r, "").tests)


# ---------------------------------------------------------------------------------------------------------------
# The whole command, with a stub grader (pipeline logic) and with the real one (slow)


def _up_row(qid: int, difficulty: str, test_body: str, method: str = "add") -> dict:
    return {"task_id": f"t{qid}", "prompt": "from typing import *\n", "entry_point": f"Solution().{method}",
            "completion": f"class Solution:\n    def {method}(self, a):\n        return a + 1\n",
            "test": "def check(candidate):\n" + test_body, "query": "", "response": "", "input_output": [],
            "meta": {"question_id": qid, "difficulty": difficulty, "question_title": f"Problem {qid}: add one.",
                     "lang_code": f"class Solution:\n    def {method}(self, a: int) -> int:"}}


PLAIN = "    assert candidate(a = 1) == 2\n    assert candidate(a = -3) == -2\n"


@pytest.fixture
def stub_grader(monkeypatch):
    """A stand-in grader module: canonical of id 7 fails, of id 8 times out, the rest pass."""
    calls = []

    def grade_batch(problems, completions, hints, *, workers=None, reward="correct_or_hinted", progress=False,
                    full_suite=False):
        assert full_suite, "data build grades every test of the canonical solutions"
        calls.append((problems, completions, hints, workers))
        return [types.SimpleNamespace(gt_pass=p.id not in (7, 8), timed_out=p.id == 8) for p in problems]

    monkeypatch.setitem(sys.modules, "projected_grpo.grader", types.SimpleNamespace(grade_batch=grade_batch))
    return calls


def test_build_pipeline_with_stub_grader(tmp_path, stub_grader, capsys):
    rows = [_up_row(1, "Easy", PLAIN), _up_row(2, "Medium", PLAIN), _up_row(3, "Hard", PLAIN, method="inc"),
            _up_row(4, "Medium", "    assert candidate(a = 1) in [2]\n"), _up_row(5, "Medium", PLAIN),
            _up_row(7, "Medium", PLAIN), _up_row(8, "Hard", PLAIN)]
    rows += [_up_row(i, "Medium", PLAIN) for i in range(10, 39)] + [_up_row(39, "Meidum", PLAIN)]  # upstream typo
    source = tmp_path / "src.jsonl.gz"
    with gzip.open(source, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows + [_up_row(99, "Medium", PLAIN)])
    exclude = tmp_path / "exclude.jsonl"
    write_problems(exclude, [upstream_problem(_up_row(5, "Medium", PLAIN), "x")])

    out = tmp_path / "out"
    rc = main(["build", "--source", str(source), "--exclude", str(exclude), "--out", str(out),
               "--holdout-frac", "0.3", "--seed", "3", "--workers", "2", "--limit", str(len(rows))])
    assert rc == 0
    problems, completions, hints, workers = stub_grader[0]
    assert workers == 2 and hints == [None] * len(problems)
    assert completions[0] == f"```python\n{problems[0].canonical_solution}\n```"
    assert 5 not in {p.id for p in problems}, "excluded ids are not graded"

    train, holdout = load_problems(out / "train.jsonl"), load_problems(out / "holdout.jsonl")
    kept = [2, 3, *range(10, 40)]  # 99 is past --limit
    assert sorted(p.id for p in train + holdout) == kept
    assert all(split_of(p.id, 3, 0.3) == "train" for p in train) and holdout
    assert all(split_of(p.id, 3, 0.3) == "holdout" for p in holdout)
    assert {p.difficulty for p in train + holdout} == {"medium", "hard"}
    assert next(p for p in train + holdout if p.id == 39).difficulty == "medium"
    p3 = next(p for p in train + holdout if p.id == 3)
    assert p3.tests[0].source == "assert Solution().inc(a = 1) == 2" and p3.extra["completion_gt_pass"] is True
    printed = capsys.readouterr().out
    for phrase in ("not medium/hard (easy) 1", "in --exclude 1", "unusable row 1", "canonical failed 1",
                   "canonical timed out 1", "tests per problem: mean 2.00, min 2, max 2"):
        assert phrase in printed


def test_build_bad_input(tmp_path, capsys):
    assert main(["build", "--source", str(tmp_path / "absent.jsonl.gz"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such file" in err
    (tmp_path / "s.jsonl").write_text("{}\n")
    assert main(["build", "--source", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o"), "--holdout-frac", "1.5"]) == 1
    assert "--holdout-frac 1.5 must be in [0, 1)" in capsys.readouterr().err
    (tmp_path / "s.jsonl").write_text("{\n")
    assert main(["build", "--source", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "s.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main([]) == 0


@needs_data
@pytest.mark.slow
def test_build_real_file_small_limit(tmp_path, capsys):
    try:
        import projected_grpo.grader  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the grader is not importable yet ({e})")
    with gzip.open(V020, "rt") as f:
        head = [json.loads(line) for _, line in zip(range(40), f, strict=False)]
    medhard = [r for r in head if r["meta"]["difficulty"] in ("Medium", "Hard")]
    ours = tmp_path / "exclude_ours.jsonl"  # v0.2.0 shares no id with the 119 test problems, so exclude two of ours
    write_problems(ours, [upstream_problem(r, "x") for r in medhard[:2]])
    out = tmp_path / "out"
    rc = main(["build", "--source", str(V020), "--exclude", str(TEST_FILE), str(ours), "--out", str(out),
               "--limit", "40", "--workers", "2"])
    assert rc == 0
    built = load_problems(out / "train.jsonl") + load_problems(out / "holdout.jsonl")
    excluded = {p.id for p in load_problems(TEST_FILE)} | {r["meta"]["question_id"] for r in medhard[:2]}
    assert built and not {p.id for p in built} & excluded
    assert {p.id for p in built} <= {r["meta"]["question_id"] for r in medhard}
    assert len(built) >= len(medhard) - 2 - 3, "nearly every canonical solution should pass"
    assert "in --exclude 2" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# --max-prompt-tokens: the reference's 1536-token prompt filter


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    """The tiny model's tokenizer, built in a fresh cache that the build's own loading also uses."""
    pytest.importorskip("transformers")
    from projected_grpo.databuild import load_tokenizer

    mp = pytest.MonkeyPatch()
    mp.setenv("PROJECTED_GRPO_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield load_tokenizer("tiny")
    mp.undo()


def _sized_rows(words: list[int]) -> list[dict]:
    """Medium problems 100, 101, ... whose statements hold `words[k]` words: prompts of increasing length."""
    return [dict(_up_row(100 + k, "Medium", PLAIN), meta={**_up_row(100 + k, "Medium", PLAIN)["meta"],
                                                          "question_title": " ".join(["sum"] * n) + "."})
            for k, n in enumerate(words)]


def test_prompt_tokens_count_the_served_prompt(tiny_tok):
    from projected_grpo.databuild import prompt_tokens
    from projected_grpo.problems import DEFAULT_HINT, chat_messages, make_hint, render_prompt, system_prompt

    p = upstream_problem(_up_row(2, "Medium", PLAIN), "x")
    hint = make_hint(DEFAULT_HINT, p, __import__("random").Random(5))
    text = render_prompt(tiny_tok, chat_messages(p, hint, system_prompt("base_format")))
    assert "evaluated by calling a function called run_tests()" in text and "<|im_start|>assistant" in text
    assert prompt_tokens(tiny_tok, p) == len(tiny_tok(text, add_special_tokens=False)["input_ids"])


def test_prompt_filter_drops_exactly_the_long_prompts(tiny_tok, tmp_path, stub_grader, capsys):
    from projected_grpo.databuild import prompt_filter, prompt_tokens

    rows = _sized_rows([1, 40, 80, 120, 160, 200, 300])
    problems = [upstream_problem(r, "x") for r in rows]
    n = [prompt_tokens(tiny_tok, p) for p in problems]
    assert n == sorted(n) and len(set(n)) == len(n), n
    limit = n[3]  # a prompt of exactly the limit is kept, one token more is dropped
    kept, over = prompt_filter(problems, tiny_tok, limit)
    assert [p.id for p in kept] == [100, 101, 102, 103] and [p.id for p in over] == [104, 105, 106]
    assert [p.id for p in prompt_filter(problems, tiny_tok, limit - 1)[0]] == [100, 101, 102]

    source = tmp_path / "src.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["build", "--source", str(source), "--out", str(out), "--holdout-frac", "0",
                 "--max-prompt-tokens", str(limit), "--model-name", "tiny"]) == 0
    assert [p.id for p in stub_grader[0][0]] == [100, 101, 102, 103], "long prompts are dropped before grading"
    assert [p.id for p in load_problems(out / "train.jsonl")] == [100, 101, 102, 103]
    printed = capsys.readouterr().out
    assert f"prompt filter: 3 of 7 problems have prompts over {limit} tokens (tiny tokenizer); dropped" in printed
    assert f"prompt over {limit} tokens 3" in printed
    # off (the default): nothing dropped for length
    assert main(["build", "--source", str(source), "--out", str(tmp_path / "all"), "--holdout-frac", "0"]) == 0
    assert len(load_problems(tmp_path / "all" / "train.jsonl")) == 7
    assert main(["build", "--source", str(source), "--out", str(out), "--max-prompt-tokens", "-1"]) == 1
    assert "--max-prompt-tokens -1 must be >= 0" in capsys.readouterr().err
