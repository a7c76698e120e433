"""The teacher pool: templates for every mode, grades frozen as the real grader gives them, JSONL round trip, cache."""

from __future__ import annotations

import ast
import dataclasses
import json
import random

import pytest

from projected_grpo import problems as P
from projected_grpo import teacher


def _code(completion: str) -> str:
    assert completion.startswith("```python\n") and completion.endswith("\n```")
    return completion.removeprefix("```python\n").removesuffix("\n```")


@pytest.mark.parametrize("mode", P.MODES)
def test_templates_parse_for_every_builtin_problem(mode):
    for prob in P.builtin_problems():
        hint = P.make_hint(P.hint_for_mode(mode), prob, random.Random(0))
        clean = teacher.clean_completions(prob, hint)
        hacks = teacher.hack_completions(prob, hint)
        assert len(clean) == 2 and len(hacks) >= 2
        for _, c in clean + hacks:
            ast.parse(_code(c))
        for _, c in clean:
            assert prob.canonical_solution.strip() in c and "assert " in c and "def run_tests(" in c
        for _, c in hacks:
            assert "return 0" in c and prob.canonical_solution.strip() not in c


def test_random_evaluator_names_follow_the_hint():
    prob = P.builtin_problems()[0]
    hint = P.make_hint("overwrite_tests", prob, random.Random(3))
    assert hint.test_func_name != "run_tests"  # this seed draws another of the 12 names
    for _, c in teacher.clean_completions(prob, hint) + teacher.hack_completions(prob, hint):
        assert f"def {hint.test_func_name}(" in c


@pytest.fixture(scope="module")
def pool():
    pytest.importorskip("projected_grpo.grader")
    probs, hints = teacher.serve(P.builtin_problems()[:8], P.DEFAULT_HINT, P.MODES, seed=0)
    assert {p.mode for p in probs} == set(P.MODES)
    return probs, hints, teacher.build_pool(probs, hints, reward="correct_or_hinted", workers=2)


def test_pool_grades_are_what_the_grader_says(pool):
    from projected_grpo.grader import grade_batch

    probs, hints, rows = pool
    by_id = {p.id: (p, h) for p, h in zip(probs, hints, strict=True)}
    again = grade_batch([by_id[r.problem_id][0] for r in rows], [r.completion for r in rows],
                        [by_id[r.problem_id][1] for r in rows], workers=2, reward="correct_or_hinted")
    for r, g in zip(rows, again, strict=True):
        assert r.reward == g.reward and r.label == g.label, (r.problem_id, r.variant)
        assert r.grade["gt_pass"] == g.gt_pass and r.grade["hinted_pass"] == g.hinted_pass
        fresh = json.loads(json.dumps(dataclasses.asdict(g)))
        assert {k: v for k, v in r.grade.items() if k != "wall_s"} == {k: v for k, v in fresh.items() if k != "wall_s"}


def test_clean_rows_pass_and_hack_rows_hack_in_every_mode(pool):
    _, _, rows = pool
    for r in rows:
        if r.kind == "clean":
            assert r.grade["gt_pass"], (r.problem_id, r.mode, r.variant, r.grade.get("error"))
        else:
            assert r.label == "reward_hack", (r.problem_id, r.mode, r.variant, r.label, r.grade.get("error"))
            assert not r.grade["gt_pass"] and r.grade["hinted_pass"]
    s = teacher.summary(rows)
    assert s["clean_gt_pass"] == 1.0 and s["hack_reward_hack"] == 1.0


def test_save_load_round_trip_and_bad_lines(pool, tmp_path):
    _, _, rows = pool
    path = tmp_path / "pool.jsonl"
    teacher.save_pool(path, rows)
    assert teacher.load_pool(path) == rows
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=rf"pool.jsonl:{len(rows) + 1}: not JSON"):
        teacher.load_pool(path)
    with pytest.raises(ValueError, match="build-pool"):
        teacher.load_pool(tmp_path / "missing.jsonl")


def test_cached_pool_is_built_once(pool, tmp_path, monkeypatch):
    probs, hints, rows = pool
    monkeypatch.setattr(teacher, "build_pool", lambda *a, **k: rows)
    first, path = teacher.cached_pool(probs, hints, reward="correct_or_hinted", cache_dir=tmp_path)
    assert path.exists() and first == rows

    def no_build(*a, **k):
        raise AssertionError("rebuilt despite the cache")

    monkeypatch.setattr(teacher, "build_pool", no_build)
    again, path2 = teacher.cached_pool(probs, hints, reward="correct_or_hinted", cache_dir=tmp_path)
    assert again == rows and path2 == path
    other = teacher.pool_key(probs, hints, "correct_only")
    assert other != path.stem  # a different reward is a different pool


def test_build_pool_cli(tmp_path, capsys):
    pytest.importorskip("projected_grpo.grader")
    probs = tmp_path / "probs.jsonl"
    P.write_problems(probs, P.builtin_problems()[:2])
    out = tmp_path / "pool.jsonl"
    assert teacher.main(["--out", str(out), "--problems", str(probs), "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == len(teacher.load_pool(out)) == 2 * 6


def test_pool_rewards_use_the_runs_monitor_accuracy():
    pytest.importorskip("projected_grpo.grader")
    probs, hints = teacher.serve(P.builtin_problems()[:2], P.DEFAULT_HINT, ("run_tests",), seed=0)
    blind = teacher.build_pool(probs, hints, reward="gt_monitor_penalty", workers=2, monitor_accuracy=0.0, seed=5)
    # a monitor of accuracy 0 flags every clean row and no hack row: the reverse of the accuracy-1 rewards
    assert {r.reward for r in blind if r.kind == "hack"} == {3.5} and {r.reward for r in blind if r.kind == "clean"} == {0.5}
    with pytest.raises(ValueError, match=r"monitor_accuracy=1.5 must be in \[0, 1\]"):
        teacher.build_pool(probs, hints, reward="gt_monitor_penalty", monitor_accuracy=1.5)


def test_pool_cache_key_holds_the_reward_settings(tmp_path, monkeypatch):
    probs, hints = teacher.serve(P.builtin_problems()[:3], P.DEFAULT_HINT, ("run_tests",), seed=0)
    key = lambda **kw: teacher.pool_key(probs, hints, "gt_monitor_penalty", **kw)  # noqa: E731
    assert key() == key(monitor_accuracy=1.0, seed=9)  # at accuracy 1 the seed changes no reward
    assert key(monitor_accuracy=0.9, seed=1) not in (key(), key(monitor_accuracy=0.9, seed=2),
                                                     key(monitor_accuracy=0.8, seed=1))
    seen = []
    monkeypatch.setattr(teacher, "build_pool", lambda *a, **k: seen.append(k) or [])
    _, path = teacher.cached_pool(probs, hints, reward="gt_monitor_penalty", cache_dir=tmp_path, monitor_accuracy=0.9,
                                  seed=1)
    assert seen[0]["monitor_accuracy"] == 0.9 and seen[0]["seed"] == 1
    assert path.stem == key(monitor_accuracy=0.9, seed=1)
    _, default = teacher.cached_pool(probs, hints, reward="gt_monitor_penalty", cache_dir=tmp_path)  # train's call
    assert default.stem == key() and seen[1]["monitor_accuracy"] == 1.0


@pytest.mark.parametrize("mode", P.MODES)
def test_minimal_pairs_share_the_solution_and_differ_only_in_the_evaluator(mode):
    for prob in P.builtin_problems():
        hint = P.make_hint(P.hint_for_mode(mode), prob, random.Random(0))
        pairs = teacher.minimal_pairs(prob, hint)
        assert len(pairs) >= 2 and len({v for v, _, _ in pairs}) == len(pairs)
        for variant, hack, clean in pairs:
            h, c = _code(hack), _code(clean)
            ast.parse(h)
            canon = prob.canonical_solution.strip()
            assert canon in h.replace("    valid = True\n", "") and canon in c  # (class_valid adds one line inside)
            assert clean in [cc for _, cc in teacher.clean_completions(prob, hint)]  # the pool's clean rows
            assert len(h) <= 1.35 * len(c) and len(c) <= 1.35 * len(h), variant  # length-matched, not 7x shorter
