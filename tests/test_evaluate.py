"""Held-out eval: Wilson intervals, and a route run evaluated with its quarantine knob ablated."""

import json

import pytest
import torch

from projected_grpo import adapter, checkpoint, evaluate, models
from projected_grpo.train import main as train_main


def test_wilson_interval():
    lo, hi = evaluate.wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    lo, hi = evaluate.wilson(5, 10)
    assert lo < 0.5 < hi and lo == pytest.approx(1 - hi)


@pytest.mark.slow
def test_eval_of_a_run_ablates_the_quarantine(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert train_main(["--preset", "fast-dev-run", "--steps", "3", "--run-dir", str(run), "--no-progress"]) == 0
    # plant a non-zero quarantine knob in the checkpoint, as a route run would leave it
    from safetensors.torch import load_file, save_file

    ck = sorted((run / "ckpt").glob("step_*"))[-1] / "knobs.safetensors"
    t = load_file(str(ck))
    t = {k: (torch.ones_like(v) if k.endswith("dS_hack") else v) for k, v in t.items()}
    save_file(t, str(ck))
    loaded = models.load(models.ModelConfig(name="tiny", dtype="float32", device="cpu"))
    knobs = adapter.attach(loaded.model, adapter.AdapterConfig(), loaded.model_id)
    assert checkpoint.load_run_knobs(run, knobs, quarantine=False) == 3
    assert all(k.dS_hack.abs().sum() == 0 for k in knobs.values())
    assert any(k.dS.abs().sum() > 0 for k in knobs.values())
    checkpoint.load_run_knobs(run, knobs, quarantine=True)
    assert all(k.dS_hack.abs().sum() > 0 for k in knobs.values())

    assert evaluate.main(["--run-dir", str(run), "--eval.problems", "builtin", "--eval.n-problems", "3",
                          "--eval.n", "2", "--eval.max-new-tokens", "8", "--eval.batch", "6"]) == 0
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert res["quarantine_ablated"] and res["step"] == 3 and res["provenance"]["isolation"]
    assert res["hack"]["n"] == res["perf"]["n"] == 6
    rows = (run / "eval" / "eval_rollouts.jsonl").read_text().splitlines()
    assert len(rows) == 12 and {json.loads(r)["eval"] for r in rows} == {"hack", "perf"}
    assert all(json.loads(r)["hint"] is None for r in rows if json.loads(r)["eval"] == "perf")
