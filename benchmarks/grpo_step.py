"""One whole GRPO step at the seed's workload, timed as generate / grade / train. Prints one table last.

    python benchmarks/grpo_step.py --shape qwen3-4b --group 12 --new 1024 --steps 3

Qwen3-4B shape with random init (speed does not depend on the values), the SVD knob on every attention and MLP
Linear (full rank; random factors instead of an SVD, which would only cost setup time), bf16, gradient checkpointing.
A step: rollout with the knob merged (static engine, G forced completions of one prompt, temperature 0.7, top-p 0.95)
-> grade -> advantages -> the trainer's own backward pass (`train.backward_pass`: reference log-probs with the knobs
zeroed, no grad; per micro-batch the policy log-probs + Dr.GRPO loss with K3 KL -> backward) -> clip -> AdamW step.

Grading: the model's text is random, so each row is graded as one of the 119-problem split's canonical solutions
(every test runs: the slow case), with random rewards for the advantages (so no group is skipped).

Two schedules, measured in the same run (`--schedules`, steps alternating between them):
- sequential: generate -> grade -> train (the reference log-probs of every row, then the policy pass), one after
  another;
- overlap (the trainer's): generate -> [grade in worker processes | the reference log-probs of every row, no grad]
  -> train with those reference log-probs. The last line prints overlap's step time over sequential's;
- overlap_nockpt: overlap without gradient checkpointing (one forward fewer per micro-batch, more activation memory);
- overlap_fold, overlap_nockpt_fold: the same with the knobs folded into W for the backward pass
  (`--adapter.fold-train`: one GEMM per Linear in the forward, the knobs' gradient added in the backward);
- ahead, ahead_nockpt: overlap, and after the reference log-probs the policy's forward of the first
  `--forward-ahead` micro-batches (default: all of them) while the grader still works (`train.forward_ahead`, the
  trainer's `--forward-ahead`); the train column is then what is left of the policy pass.
`--samplers auto,triton` crosses the schedules with the engine's samplers (`engine.SAMPLERS`; the row's schedule
reads e.g. overlap_nockpt+triton), steps alternating over all pairs. `sort32` is the torch sampler as it was before it
sorted in the logits' own dtype (float32 keys), the baseline of that change.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollout  # noqa: E402

from projected_grpo import adapter, engine, grpo, models, train  # noqa: E402
from projected_grpo.config import GRPOConfig, data_root  # noqa: E402

ORIGINAL_SAMPLE = engine.sample
BENCH_SAMPLERS = (*engine.SAMPLERS, "sort32")


def sample_sort32(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch sampler sorting float32 keys (the logits cast first), as before it sorted in their own dtype."""
    return ORIGINAL_SAMPLE(logits.float(), temperature, top_p)


SCHEDULES = ("sequential", "overlap", "overlap_nockpt", "overlap_fold", "overlap_nockpt_fold", "ahead", "ahead_nockpt")


def attach_random_knobs(model: torch.nn.Module, rank_cap: int | None) -> dict[str, adapter.SVDKnob]:
    """adapter.attach with random U, Vh in place of the SVD (same shapes, so the same cost)."""
    def fake_svd(w, model_id, cap, svd_dir, sha=None):
        d_out, d_in = w.shape
        r = min(w.shape) if cap is None else min(cap, *w.shape)
        U = torch.randn(d_out, r, device=w.device) / math.sqrt(d_out)
        Vh = torch.randn(r, d_in, device=w.device) / math.sqrt(d_in)
        return U, torch.ones(r, device=w.device), Vh, "random"

    real = adapter.svd_cached
    adapter.svd_cached = fake_svd
    try:
        return adapter.attach(model, adapter.AdapterConfig(rank_cap=rank_cap), "bench")
    finally:
        adapter.svd_cached = real


def grader_or_reason(path: str):
    """(grader, problems) modules if grading works here (one canonical solution graded as a check), else a reason."""
    try:
        from projected_grpo import grader, problems
    except ImportError as e:
        return None, f"not measured: grader not importable ({e})"
    if not Path(path).is_file():
        return None, f"not measured: no problems file at {path}"
    p = problems.load_problems(path)[0]
    try:
        g = grader.grade(p, f"```python\n{p.canonical_solution}\n```", None)
    except Exception as e:  # noqa: BLE001 -- report why grading cannot run on this machine, time the rest
        return None, f"not measured: grading failed here ({type(e).__name__}: {e})"
    if not g.gt_pass:
        return None, f"not measured: the canonical solution of {p.id} does not pass here ({g.error})"
    return (grader, problems), ""


def grpo_config(micro_batch: int, beta: float, forward_ahead: int = 0) -> GRPOConfig:
    """The trainer's GRPO settings for this benchmark: the seed's sampling temperature and clip range."""
    return GRPOConfig(micro_batch=micro_batch, beta=beta, clip=0.2, temperature=0.7, forward_ahead=forward_ahead)


def reference(model: torch.nn.Module, knobs: dict[str, adapter.SVDKnob], roll: engine.Rollout,
              micro_batch: int, beta: float = 1e-3) -> torch.Tensor | None:
    """Every row's reference log-probs (knobs zeroed, no grad) -> (B, T), as the trainer computes them while the
    grader works (`train.reference_logprobs`); None when beta = 0."""
    return train.reference_logprobs(model, knobs, roll.ids, roll.attention_mask(), roll.completion_mask,
                                    roll.prompt_len, grpo_config(micro_batch, beta))


def train_step(model: torch.nn.Module, knobs: dict[str, adapter.SVDKnob], opt: torch.optim.Optimizer,
               roll: engine.Rollout, adv: torch.Tensor, micro_batch: int, beta: float, denom: float,
               ref_all: torch.Tensor | None = None, reduce=None, fold: bool = False,
               ahead: list | None = None) -> float:
    """The trainer's backward pass (`train.backward_pass`: the reference log-probs of every row first unless
    `ref_all` holds them, then per micro-batch the policy's, the Dr.GRPO loss with K3 KL, backward), then clip and
    AdamW. `reduce(grads)`, when given, sums the knob gradients over data-parallel ranks before the clip. `fold`:
    the knobs folded into W for the pass (adapter.folded); `ahead`: micro-batches whose forward already ran
    (`train.forward_ahead`). -> the summed loss."""
    params = adapter.knob_params(knobs)
    opt.zero_grad(set_to_none=True)
    totals = dict.fromkeys(("kl_sum", "tokens", "loss", "clipped", "logp_bench", "tokens_bench"), 0.0)
    train.backward_pass(model, knobs, roll.ids, roll.attention_mask(), roll.completion_mask, roll.prompt_len, adv,
                        grpo_config(micro_batch, beta), denom, totals, "bench", 0, ref_all, fold, ahead=ahead)
    if reduce is not None:
        reduce([p.grad for p in params])
    torch.nn.utils.clip_grad_norm_(params, 10.0)
    opt.step()
    return totals["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-4b")
    ap.add_argument("--group", type=int, default=12, help="G completions of one prompt")
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=400)
    ap.add_argument("--steps", type=int, default=3, help="the first is warm-up (graph capture, kernel compile)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--beta", type=float, default=1e-3, help="K3 KL coefficient (0 = no reference forward)")
    ap.add_argument("--forward-ahead", type=int, default=None,
                    help="micro-batches the ahead schedules run before the grades (default: all of the step's)")
    ap.add_argument("--rank-cap", type=int, default=None)
    ap.add_argument("--problems", default=str(data_root() / "leetcode" / "leetcode_test_medhard.jsonl"),
                    help="the problems whose canonical solutions are graded each step (default: the benchmark data)")
    ap.add_argument("--no-grade", action="store_true",
                    help="time the step without grading (otherwise a missing problems file or grader is an error)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (--shape tiny)")
    ap.add_argument("--schedules", default="sequential,overlap",
                    help=f"comma-separated, from: {', '.join(SCHEDULES)}")
    ap.add_argument("--samplers", default="auto", help=f"comma-separated, from: {', '.join(BENCH_SAMPLERS)}")
    a = ap.parse_args()
    schedules = [s for s in a.schedules.split(",") if s]
    if not schedules or any(s not in SCHEDULES for s in schedules):
        sys.exit(f"--schedules {a.schedules!r}: expected a comma-separated subset of {','.join(SCHEDULES)}")
    samplers = [s for s in a.samplers.split(",") if s]
    if not samplers or any(s not in BENCH_SAMPLERS for s in samplers):
        sys.exit(f"--samplers {a.samplers!r}: expected a comma-separated subset of {','.join(BENCH_SAMPLERS)}")
    if samplers != ["auto"]:
        schedules = [f"{s}+{m}" for s in schedules for m in samplers]
    rollout.DEVICE = a.device
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    model = rollout.random_model(a.shape)
    models.enable_checkpointing(model)
    model.eval()
    t0 = time.perf_counter()
    knobs = attach_random_knobs(model, a.rank_cap)
    params = adapter.knob_params(knobs)
    print(f"{dev}: {a.shape}, {len(knobs)} knobs, {sum(p.numel() for p in params):,} knob entries, "
          f"attached in {time.perf_counter() - t0:.1f} s", flush=True)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    rng = random.Random(0)
    prompt = [rng.randrange(1, model.config.vocab_size) for _ in range(a.prompt_len)]
    G, pad = a.group, 0
    gr, why = (None, "not measured (--no-grade)") if a.no_grade else grader_or_reason(a.problems)
    if gr is None and not a.no_grade:
        sys.exit(f"grading {why}: the step's grading is part of what this measures; pass --problems FILE (e.g. "
                 "runs/data/leetcode_test_medhard.jsonl) or --no-grade")
    if gr is not None:
        grader, problems = gr
        probs = problems.load_problems(a.problems)[:G]
        hint = [problems.make_hint(problems.DEFAULT_HINT, p, rng) for p in probs]
        texts = [f"```python\n{p.canonical_solution}\n```" for p in probs]

    rows, auto = [], ""
    n_ahead = a.forward_ahead if a.forward_ahead is not None else -(-G // a.micro_batch)
    for step in range(a.steps * len(schedules)):
        sched = schedules[step % len(schedules)]
        if "nockpt" in sched:
            model.gradient_checkpointing_disable()
        else:
            models.enable_checkpointing(model)
        # rollout, knob merged into W
        t_gen = time.perf_counter()
        with torch.no_grad(), adapter.merged(knobs):
            if a.device == "cuda":  # the static engine generate() takes below, with this schedule's sampler
                eng = engine.engine_for(model, G, a.prompt_len + a.new)
                auto = auto or eng.sampler  # the engine's own choice for this batch
                eng.sampler = auto if sched.partition("+")[2] in ("", "auto") else sched.partition("+")[2]
                # sort32 runs the torch path with the old sampler (its own CUDA graph: the sampler names the graph)
                engine.sample = sample_sort32 if eng.sampler == "sort32" else ORIGINAL_SAMPLE
            roll = engine.generate(model, [prompt] * G, max_new_tokens=a.new, temperature=0.7, top_p=0.95,
                                   eos_ids=[], pad_id=pad, seed=step)
        rollout.sync()
        t_gen = time.perf_counter() - t_gen

        # grade (sequential), or grade while the reference log-probs are computed (overlap)
        t_grade, ref_all, ahead = float("nan"), None, None
        if sched.startswith(("overlap", "ahead")):
            t_grade = time.perf_counter()
            with ThreadPoolExecutor(1) as ex:
                grading = ex.submit(grader.grade_batch, probs, texts, hint, workers=a.workers) if gr else None
                ref_all = reference(model, knobs, roll, a.micro_batch, a.beta)
                if sched.startswith("ahead"):
                    ahead = train.forward_ahead(model, roll.ids, roll.attention_mask(), roll.completion_mask,
                                                roll.prompt_len, grpo_config(a.micro_batch, a.beta, n_ahead))
                rollout.sync()
                if grading is not None:
                    grading.result()
            t_grade = time.perf_counter() - t_grade
        elif gr is not None:
            t_grade = time.perf_counter()
            grader.grade_batch(probs, texts, hint, workers=a.workers)
            t_grade = time.perf_counter() - t_grade
        rewards = torch.tensor([[float(rng.random() < 0.5) for _ in range(G)]])  # (1, G)
        rewards[0, 0], rewards[0, 1] = 0.0, 1.0
        adv = grpo.advantages_dr_grpo(rewards)[0]  # (G,)

        # train: reference + policy log-probs per micro-batch, loss, backward, clip, step
        t_train = rollout.sync_time(functools.partial(train_step, model, knobs, opt, roll, adv, a.micro_batch, a.beta,
                                              float(G * a.new), ref_all, None, "fold" in sched, ahead))
        del ahead
        peak = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else float("nan")
        if a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows.append(dict(step=step, schedule=sched, gen=t_gen, grade=t_grade, train=t_train, peak=peak,
                         tok=int(roll.completion_mask.sum())))
        print(rows[-1], flush=True)

    print(f"\n{dev}; {a.shape}, G={G} x {a.new} new tokens, prompt {a.prompt_len}, micro-batch {a.micro_batch}, "
          f"beta {a.beta}, knob rank {'full' if a.rank_cap is None else a.rank_cap}; medians leave out each "
          f"schedule's first step (warm-up); overlap's grade column is grading alongside the reference log-probs (ahead's: and the forward run ahead)"
          + (f"; grade: {why}" if why else ""))
    print("| step | schedule | generate s | grade s | train s | total s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    totals: dict[str, float] = {}
    for r in rows:
        r["total"] = r["gen"] + r["train"] + (0 if math.isnan(r["grade"]) else r["grade"])
        print(f"| {r['step']} | {r['schedule']} | {r['gen']:.2f} | {r['grade']:.2f} | {r['train']:.2f} | "
              f"{r['total']:.2f} | {r['peak']:.1f} |")
    for s in schedules:
        mine = [r for r in rows if r["schedule"] == s]
        steady = mine[1:] if len(mine) > 1 else mine
        med = {k: statistics.median(r[k] for r in steady) for k in ("gen", "grade", "train", "total")}
        totals[s] = med["total"]
        print(f"| median | {s} | {med['gen']:.2f} | {med['grade']:.2f} | {med['train']:.2f} | {med['total']:.2f} | |")
    if "sequential" in totals:
        print()
        for s in totals:
            if s != "sequential":
                print(f"{s} / sequential step time: {totals[s] / totals['sequential']:.2f}x")


if __name__ == "__main__":
    main()
