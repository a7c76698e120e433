"""One config for every command: presets, flags, validation as one line naming the value, the rule and the fix."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from projected_grpo import config
from projected_grpo.config import PRESETS, Config


def _cli(*args: str, cwd: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "projected_grpo.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("argv, fragment", [
    (["--lr", "1e6"], "lr=1000000.0 must be in (0, 1]"),
    (["--lr", "inf"], "optim.lr=inf is not a finite number"),
    (["--weight-decay", "-1"], "weight_decay=-1.0 must be in [0, 1]"),
    (["--cpu-threads", "100000"], "cpu_threads=100000 must be in [0,"),
    (["--eval.temperature", "nan"], "eval.temperature=nan is not a finite number"),
    (["--eval.n", "0"], "eval.n=0 must be >= 1"),
    (["--k", "0"], "k=0 must be >= 1"),
    (["--k", "-2"], "k=-2 must be >= 1"),
    (["--modes", "run_tests,nope"], "modes='run_tests,nope' must be a comma-separated subset"),
    (["--workers", "-1"], "workers=-1 must be >= 0"),
])
def test_bad_values_are_refused_before_any_work(argv, fragment):
    cfg, _ = config.parse(["--preset", "fast-dev-run", *argv], "train", "")
    with pytest.raises(ValueError) as e:
        config.validate(cfg, "train")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_the_same_flag_means_the_same_thing_in_every_command():
    for cmd in ("train", "extract-vhack", "verify-vhack", "eval", "pipeline", "sweep"):
        cfg, _ = config.parse(["--model.name", "m", "--lr", "0.001", "--workers", "3", "--vhack-path", "v.st",
                               "--adapter.targets", "q_proj,v_proj"], cmd, "")
        assert (cfg.model.name, cfg.optim.lr, cfg.workers, cfg.proj.vhack_path) == ("m", 0.001, 3, "v.st")
        assert cfg.adapter.targets == ("q_proj", "v_proj")  # comma-separated, like every list flag


def test_config_file_is_a_base_like_a_preset(tmp_path):
    cfg = dataclasses.replace(PRESETS["smoke"], seed=7)
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**config.to_dict(cfg), "provenance": {"torch": "x"}}))
    again, _ = config.parse(["--config", str(f), "--lr", "0.002"], "train", "")
    assert again.seed == 7 and again.optim.lr == 0.002 and again.preset == "smoke"
    assert config.diff(cfg, again) == ["optim.lr: 0.05 -> 0.002"]
    with pytest.raises(config.UsageError, match="not both"):
        config.parse(["--config", str(f), "--preset", "smoke"], "train", "")
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        config.parse(["--config", str(f)], "train", "")


def test_presets_round_trip_through_their_flags():
    for name, cfg in PRESETS.items():
        changed = dataclasses.replace(cfg, steps=3, data=dataclasses.replace(cfg.data, modes="sentinel"),
                                      proj=dataclasses.replace(cfg.proj, vhack_random=True), progress=False)
        again, _ = config.parse(config.to_argv(changed), "train", "")
        assert again == changed, name


def test_device_that_does_not_exist_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = dataclasses.replace(Config(), model=dataclasses.replace(Config().model, device="cuda"))
    with pytest.raises(ValueError, match="no CUDA device .* pass --model.device cpu"):
        config.validate(cfg, "train")


def test_training_on_the_heldout_split_is_refused(tmp_path):
    heldout = config.EvalConfig().problems_path()
    if not Path(heldout).is_file():
        pytest.skip("benchmark data not beside the repository")
    cfg = dataclasses.replace(PRESETS["fast-dev-run"], data=dataclasses.replace(PRESETS["fast-dev-run"].data,
                                                                                problems=heldout))
    with pytest.raises(ValueError, match="held-out evaluation split"):
        config.validate(cfg, "train")


def test_missing_train_split_does_not_suggest_the_test_split():
    cfg = PRESETS["coder05"]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device="cpu"),
                              data=dataclasses.replace(cfg.data, problems="runs/no-such-split/train.jsonl"))
    with pytest.raises(ValueError) as e:
        config.validate(cfg, "train")
    assert "data build" in str(e.value) and "leetcode_test_medhard" not in str(e.value)


def test_heldout_data_resolves_from_any_working_directory(tmp_path):
    here = config.EvalConfig().problems_path()
    os.chdir(tmp_path)
    try:
        assert config.EvalConfig().problems_path() == here
    finally:
        os.chdir(Path(__file__).parents[1])


@pytest.mark.parametrize("argv, fragment", [
    (["sweep", "--seeds", "abc"], "--seeds 'abc' must be comma-separated integers"),
    (["sweep", "--arms", "nuke"], "unknown arm(s) ['nuke']"),
    (["eval", "--eval.n", "0"], "eval.n=0 must be >= 1"),
    (["extract-vhack", "--k", "0", "--vhack-path", "v.safetensors"], "k=0 must be >= 1"),
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--no-such-field", "3"], "unknown option --no-such-field"),
])
def test_cli_errors_are_one_line_without_a_traceback(tmp_path, argv, fragment):
    out = _cli(*argv, cwd=str(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_eval_out_pointing_at_a_file_is_refused_before_loading(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    out = _cli("eval", "--out", str(f), "--eval.problems", "builtin", cwd=str(tmp_path))
    assert out.returncode == 2 and "is a file" in out.stderr, out.stderr


def test_no_forkserver_reaches_the_grader_and_the_provenance():
    from projected_grpo import grader, world

    cfg, _ = config.parse(["--preset", "fast-dev-run", "--no-forkserver"], "projected-grpo train", "")
    assert cfg.forkserver is False and config.PRESETS["fast-dev-run"].forkserver is True
    try:
        level = world.isolation(True, cfg.forkserver)
        assert not grader.use_forkserver(level, None)
        assert world.provenance(None, level)["grader_forkserver"] is False
        level = world.isolation(True, True)
        assert grader.use_forkserver(level, None) == (level == "userns")
        assert world.provenance(None, level)["grader_forkserver"] == (level == "userns")
    finally:
        grader.set_forkserver(True)


def test_provenance_names_the_exact_source(tmp_path):
    """source_sha256 changes with any byte or name of the package's code and with nothing else."""
    from projected_grpo import world

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not code")
    first = world.source_sha256(tmp_path)
    (tmp_path / "notes.txt").write_text("changed, still not code")
    assert world.source_sha256(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert world.source_sha256(tmp_path) != first
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    assert world.source_sha256(tmp_path) == first
    (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "c.py")
    assert world.source_sha256(tmp_path) != first
    assert len(world.provenance(None, None)["source_sha256"]) == 16
