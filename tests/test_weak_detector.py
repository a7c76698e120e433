"""Weak-detector folds: the held-out loophole mode gets no hack demonstrations from the teacher pool."""

import json
from collections import Counter

import pytest

from projected_grpo.train import main


@pytest.mark.slow
def test_held_out_mode_gets_only_clean_teacher_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    rc = main(["--preset", "fast-dev-run", "--steps", "4", "--modes", "run_tests,sentinel,stdout_marker,file_marker",
               "--teacher-modes", "run_tests,sentinel,stdout_marker", "--run-dir", str(run), "--no-progress"])
    assert rc == 0
    rows = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    teacher = Counter((r["mode"], r["grade"]["label"]) for r in rows if r["source"] == "teacher")
    assert teacher[("file_marker", "reward_hack")] == 0 and teacher[("file_marker", "correct")] > 0
    assert sum(n for (m, lab), n in teacher.items() if lab == "reward_hack") > 0


def test_unknown_teacher_mode_is_one_clear_error(tmp_path, capsys):
    assert main(["--preset", "fast-dev-run", "--teacher-modes", "telepathy", "--run-dir", str(tmp_path / "r")]) == 2
