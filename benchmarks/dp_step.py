"""Data-parallel GRPO step rate: the same step on 1 GPU and on N GPUs (torch.distributed), in one run.

    python benchmarks/dp_step.py --gpus 2 --prompts 4 --group 12 --new 1024 --steps 3

The seed's workload per prompt (Qwen3-4B shape, random init, G = 12 completions × 1024 new tokens, KL on, the knob
on every attention and MLP Linear at full rank, gradient checkpointing), `--prompts` prompts per step in all. The
driver launches `torchrun --nproc-per-node W` for W = 1 and W = --gpus, each on the same total batch: each rank
generates, grades and backpropagates its share of the prompts (as the trainer's distributed.share), the knob
gradients are summed over ranks (distributed.sum_grads, NCCL) before the clip and AdamW step, as in train.py. A step
is timed on rank 0 from its start to the end of the optimizer step after a barrier (the slowest rank's time).
Prints one table last: seconds per step (median, first step left out: capture and compile) and the rate against
W = 1 measured in the same run.

`--device cpu --shape tiny` smoke-tests the script with gloo processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step  # noqa: E402
import rollout  # noqa: E402

from projected_grpo import adapter, distributed, engine, grpo, models  # noqa: E402


def worker(a: argparse.Namespace) -> None:
    d = distributed.setup(a.device)
    rollout.DEVICE = a.device
    model = rollout.random_model(a.shape)  # seeded: the same weights on every rank
    models.enable_checkpointing(model)
    torch.manual_seed(1)
    knobs = grpo_step.attach_random_knobs(model, None)
    params = adapter.knob_params(knobs)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    mine = d.share(a.prompts)  # this rank's prompts
    rng = random.Random(0)
    prompts = [[rng.randrange(1, model.config.vocab_size) for _ in range(a.prompt_len)] for _ in range(a.prompts)]
    G = a.group
    gr, why = grpo_step.grader_or_reason(a.problems)
    if gr is not None:
        grader, problems = gr
        probs = problems.load_problems(a.problems)[:len(mine) * G]
        probs = (probs * (len(mine) * G // len(probs) + 1))[:len(mine) * G]
        hint = [problems.make_hint(problems.DEFAULT_HINT, p, rng) for p in probs]
        texts = [f"```python\n{p.canonical_solution}\n```" for p in probs]
    workers = max(1, (os.cpu_count() or 1) // d.world)
    rows = []
    for step in range(a.steps):
        distributed.barrier(d)
        t0 = time.perf_counter()
        with torch.no_grad(), adapter.merged(knobs):
            roll = engine.generate(model, [prompts[i] for i in mine for _ in range(G)], max_new_tokens=a.new,
                                   temperature=0.7, top_p=0.95, eos_ids=[], pad_id=0, seed=step * 1000 + d.rank)
        rollout.sync()
        t_gen = time.perf_counter() - t0
        with ThreadPoolExecutor(1) as ex:  # grade beside the reference log-probs, as the trainer does
            grading = ex.submit(grader.grade_batch, probs, texts, hint, workers=workers) if gr else None
            ref_all = grpo_step.reference(model, knobs, roll, a.micro_batch)
            rollout.sync()
            if grading is not None:
                grading.result()
        rewards = torch.tensor([[float(rng.random() < 0.5) for _ in range(G)] for _ in mine])  # (P_rank, G)
        rewards[:, 0], rewards[:, 1] = 0.0, 1.0
        adv = grpo.advantages_dr_grpo(rewards).reshape(-1)  # (P_rank * G,)
        grpo_step.train_step(model, knobs, opt, roll, adv, a.micro_batch, 1e-3, float(a.prompts * G * a.new), ref_all,
                             reduce=lambda grads: distributed.sum_grads(d, dict(enumerate(grads))))
        rollout.sync()
        distributed.barrier(d)
        rows.append(dict(step=step, total=time.perf_counter() - t0, gen=t_gen,
                         peak=torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else float("nan")))
        if d.main:
            print(rows[-1], flush=True)
    check = torch.cat([p.detach().reshape(-1) for p in params]).double().sum().item()  # same on every rank
    checks = distributed.gather(d, check)
    if d.main:
        Path(a.out).write_text(json.dumps(dict(world=d.world, rows=rows, knob_sums=checks, grade=why or "graded")))
    distributed.teardown(d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="the data-parallel world size to compare with 1")
    ap.add_argument("--shape", default="qwen3-4b")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step in all (shared out over the ranks)")
    ap.add_argument("--group", type=int, default=12, help="G completions of each prompt")
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=400)
    ap.add_argument("--steps", type=int, default=3, help="the first is warm-up (graph capture, kernel compile)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--problems", default=str(Path(__file__).resolve().parents[2] / "shared/data/leetcode/"
                                              "leetcode_test_medhard.jsonl"))
    ap.add_argument("--device", default="cuda", help="cuda; cpu (gloo) only to smoke-test this script")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    if a.prompts % a.gpus:
        sys.exit(f"--prompts {a.prompts} must be a multiple of --gpus {a.gpus} (every rank gets the same share)")
    if a.device == "cuda" and torch.cuda.device_count() < a.gpus:
        sys.exit(f"--gpus {a.gpus}: this machine has {torch.cuda.device_count()} GPUs")
    tmp = Path(tempfile.mkdtemp(prefix="dp_step_"))
    results = {}
    for w in sorted({1, a.gpus}):
        out = tmp / f"w{w}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={w}", __file__,
               "--worker", "--out", str(out)] + [x for x in sys.argv[1:]]
        print(f"== world {w}: {' '.join(cmd[3:6])} ...", flush=True)
        if subprocess.run(cmd).returncode != 0 or not out.exists():
            sys.exit(f"world {w} failed (its output is above)")
        results[w] = json.loads(out.read_text())
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"\n{dev}; {a.shape}, {a.prompts} prompts × G={a.group} × {a.new} new tokens per step in all, prompt "
          f"{a.prompt_len}, micro-batch {a.micro_batch}, KL on, full-rank knobs, gradient checkpointing; medians leave "
          f"out the first step; grading: {results[1]['grade']}")
    print("| GPUs | rows per GPU | generate s | step s | steps/s | vs 1 GPU | peak GiB | knobs equal across ranks |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for w, r in results.items():
        steady = r["rows"][1:] if len(r["rows"]) > 1 else r["rows"]
        step = statistics.median(x["total"] for x in steady)
        gen = statistics.median(x["gen"] for x in steady)
        base = base or step
        same = len(set(r["knob_sums"])) == 1
        print(f"| {w} | {a.prompts // w * a.group} | {gen:.2f} | {step:.2f} | {1 / step:.3f} | {base / step:.2f}x | "
              f"{max(x['peak'] for x in r['rows']):.1f} | {'yes' if same else 'NO: ' + str(r['knob_sums'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
