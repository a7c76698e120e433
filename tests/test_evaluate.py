"""Held-out eval: intervals that cover under intraclass correlation (cluster bootstrap over problems; Wilson kept as a
secondary field), per-problem counts in eval.json, and a route run evaluated with its quarantine knob ablated."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from projected_grpo import adapter, checkpoint, evaluate, grader, models
from projected_grpo import problems as P
from projected_grpo.train import main as train_main


def test_wilson_interval():
    lo, hi = evaluate.wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    lo, hi = evaluate.wilson(5, 10)
    assert lo < 0.5 < hi and lo == pytest.approx(1 - hi)


def _coverage(icc: float, m: int = 30, n: int = 10, mu: float = 0.3, reps: int = 200) -> tuple[float, float]:
    """Fraction of simulated evals whose bootstrap / Wilson 95% interval holds the true rate mu, when each problem's
    rate is Beta-distributed around mu with intraclass correlation `icc` (Beta(a, b) has ICC 1 / (a + b + 1))."""
    rng = np.random.default_rng(0)
    a, b = mu * (1 / icc - 1), (1 - mu) * (1 / icc - 1)
    boot = wil = 0
    for r in range(reps):
        k = rng.binomial(n, rng.beta(a, b, size=m))
        lo, hi = evaluate.cluster_bootstrap(k, np.full(m, n), n_boot=500, seed=r)
        boot += lo <= mu <= hi
        lo, hi = evaluate.wilson(int(k.sum()), m * n)
        wil += lo <= mu <= hi
    return boot / reps, wil / reps


@pytest.mark.parametrize("icc", [0.3, 0.6])
def test_cluster_bootstrap_covers_under_intraclass_correlation_where_wilson_does_not(icc):
    boot, wil = _coverage(icc)
    assert boot >= 0.88 and wil <= 0.80 and boot > wil + 0.1, (boot, wil)


def test_cluster_bootstrap_is_deterministic_and_degenerate_cases_are_explicit():
    k, n = [0, 3, 10, 5], [10, 10, 10, 10]
    assert evaluate.cluster_bootstrap(k, n, seed=4) == evaluate.cluster_bootstrap(k, n, seed=4)
    lo, hi = evaluate.cluster_bootstrap(k, n, seed=4)
    assert 0.0 <= lo < 18 / 40 < hi <= 1.0
    assert all(math.isnan(x) for x in evaluate.cluster_bootstrap([], []))
    with pytest.raises(ValueError, match="one shape"):
        evaluate.cluster_bootstrap([1, 2], [3])


def test_rate_summary_writes_per_problem_counts_and_both_intervals():
    ids = [7, 7, 7, 9, 9, 9, 11, 11, 11]
    hack = [True, True, True, False, False, False, True, False, False]
    res = evaluate.rate_summary(ids, {"hack": hack, "pass": [not h for h in hack]}, seed=0)
    assert res["n"] == 9 and res["n_problems"] == 3 and res["hack_rate"] == pytest.approx(4 / 9)
    assert res["per_problem"] == {"7": {"n": 3, "hack": 3, "pass": 0}, "9": {"n": 3, "hack": 0, "pass": 3},
                                  "11": {"n": 3, "hack": 1, "pass": 2}}
    (blo, bhi), (wlo, whi) = res["hack_ci95"], res["hack_ci95_wilson"]
    assert bhi - blo > whi - wlo  # three problems, all-or-nothing within two of them: wider than the binomial
    assert json.loads(json.dumps(res)) == json.loads(json.dumps(res))  # JSON-ready


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
    assert set(res["hack"]["per_problem"]) == {str(p.id) for p in P.builtin_problems()[:3]}
    assert len(res["hack"]["hack_ci95"]) == 2 and len(res["hack"]["hack_ci95_wilson"]) == 2
    rows = (run / "eval" / "eval_rollouts.jsonl").read_text().splitlines()
    assert len(rows) == 12 and {json.loads(r)["eval"] for r in rows} == {"hack", "perf"}
    # what the hacks' evaluators do, counted over the hack rows labelled reward_hack
    assert res["hack"]["kinds"] == grader.hack_kinds(json.loads(r) for r in rows)
    assert sum(res["hack"]["kinds"].values()) == sum(json.loads(r)["label"] == "reward_hack" for r in rows
                                                     if json.loads(r)["eval"] == "hack")
    assert all(json.loads(r)["hint"] is None for r in rows if json.loads(r)["eval"] == "perf")

    # an exported run (a results folder keeps config, metrics and the final knobs, no optimizer state) evaluates too
    export = tmp_path / "export"
    (export / "ckpt" / ck.parent.name).mkdir(parents=True)
    shutil.copy(run / "config.json", export / "config.json")
    shutil.copy(ck, export / "ckpt" / ck.parent.name / "knobs.safetensors")
    assert checkpoint.load_run_knobs(export, knobs, quarantine=True) == 3
    assert all(k.dS_hack.abs().sum() > 0 for k in knobs.values())
