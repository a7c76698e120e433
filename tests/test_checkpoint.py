"""A run directory has one writer, survives torn lines and damaged files with one clear line, and resumes with safe
overrides only."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from projected_grpo import checkpoint, config, train, vhack
from projected_grpo.config import PRESETS


def test_second_writer_is_refused(tmp_path):
    with checkpoint.RunLock(tmp_path):
        assert checkpoint.is_locked(tmp_path)
        with pytest.raises(checkpoint.RunLocked, match="being written by another process"):
            with checkpoint.RunLock(tmp_path):
                pass
    assert not checkpoint.is_locked(tmp_path)
    with checkpoint.RunLock(tmp_path):  # released: a new writer may take it
        pass


def test_resume_of_a_locked_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict(dataclasses.replace(PRESETS["fast-dev-run"],
                                                                                   run_dir=str(run)))))
    with checkpoint.RunLock(run):
        assert train.main(["--resume", str(run)]) == 2
    assert "being written by another process" in capsys.readouterr().err


def test_torn_last_line_is_trimmed_and_nan_is_written_as_null(tmp_path):
    f = tmp_path / "metrics.jsonl"
    checkpoint.append_jsonl(f, [{"step": 0, "x": 1.0}, {"step": 1, "x": math.nan}, {"step": 2, "x": math.inf}])
    assert [json.loads(x)["x"] for x in f.read_text().splitlines()] == [1.0, None, None]  # strict JSON
    with open(f, "a") as fh:
        fh.write('{"step": 3, "x": 0.')  # a kill or a full disk mid-write
    assert [r["step"] for r in checkpoint.read_jsonl_rows(f)] == [0, 1, 2]
    assert checkpoint.truncate_jsonl(f, before_step=2) == 2  # the step past the checkpoint and the torn line
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [0, 1]
    f.write_text('{"step": 0}\n{broken\n{"step": 1}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not valid JSON in the middle"):
        checkpoint.read_jsonl_rows(f)


def _run_with_checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    from projected_grpo.adapter import SVDKnob

    run = tmp_path / "run"
    run.mkdir()
    cfg = dataclasses.replace(PRESETS["fast-dev-run"], run_dir=str(run), steps=4)
    (run / "config.json").write_text(json.dumps(config.to_dict(cfg)))
    w = torch.randn(6, 5)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    knobs = {"m": SVDKnob(U, S, Vh, "sha", dtype=torch.float32)}
    opt = torch.optim.AdamW([knobs["m"].dS, knobs["m"].dS_hack])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.save_checkpoint(run, 2, knobs, opt, sched, "model|fp")
    return run, knobs


def test_damaged_checkpoint_files_are_one_line(tmp_path):
    run, knobs = _run_with_checkpoint(tmp_path)
    ck = checkpoint.latest_checkpoint(run)
    with pytest.raises(ValueError, match="made for model 'model'"):
        checkpoint.load_knobs(ck, knobs, "other|fp")
    state = (ck / "state.json").read_text()
    (ck / "state.json").write_text(state[: len(state) // 2])
    opt = torch.optim.AdamW([knobs["m"].dS, knobs["m"].dS_hack])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ValueError, match=r"state.json: damaged .* delete"):
        checkpoint.load_checkpoint(ck, knobs, opt, sched)
    data = (ck / "knobs.safetensors").read_bytes()
    (ck / "knobs.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable .* damaged"):
        checkpoint.load_knobs(ck, knobs)


def test_resume_accepts_more_steps_and_refuses_what_would_change_the_past(tmp_path):
    run, _ = _run_with_checkpoint(tmp_path)
    cfg = train.resume_config(run, ["--steps", "10", "--no-progress"], "train")
    assert cfg.steps == 10 and not cfg.progress
    assert json.loads((run / "config.json").read_text())["steps"] == 10
    with pytest.raises(config.UsageError, match=r"cannot change optim.lr: 0.05 -> 0.1"):
        train.resume_config(run, ["--lr", "0.1"], "train")
    # memory settings change no step's result: a run that ran out of memory continues with smaller micro-batches
    cfg = train.resume_config(run, ["--micro-batch", "1", "--model.gradient-checkpointing"], "train")
    assert cfg.grpo.micro_batch == 1 and cfg.model.gradient_checkpointing
    with pytest.raises(config.UsageError, match="below the 2 steps"):
        train.resume_config(run, ["--steps", "1"], "train")


def test_V_files_that_cannot_be_trusted_are_one_line(tmp_path):
    from projected_grpo.vhack import VMeta, load_vhack, save_vhack

    meta = VMeta("model|fp", "problems", ("a",), "mean", 2, 0.0, "none", 41)
    Vs = {"a": torch.eye(2, 4), "b": torch.eye(2, 4)}
    Ss = {"a": torch.ones(2), "b": torch.ones(2)}
    p = save_vhack(tmp_path / "v.safetensors", Vs, Ss, meta)
    with pytest.raises(ValueError, match="covers 2 modules but the model has 3 knobs"):
        load_vhack(p, "model|fp", modules={"a", "b", "c"})
    load_vhack(p, "model|fp", modules={"a", "b"})
    bad = save_vhack(tmp_path / "nan.safetensors", {"a": torch.full((2, 4), math.nan)}, {"a": torch.ones(2)}, meta)
    with pytest.raises(ValueError, match="holds NaN/inf .* re-extract"):
        load_vhack(bad, "model|fp")
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable V file"):
        load_vhack(tmp_path / "cut.safetensors", "model|fp")
    assert vhack.verify_path(p).name == "v.verify.json"
