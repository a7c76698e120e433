"""Runs per GPU-hour at 1, 2, 4 concurrent train jobs on one GPU: the gain the experiment runner's --jobs-per-gpu buys.

    python benchmarks/concurrency.py --preset coder15 --steps 4 --levels 1 2 4 -- --problems runs/data/train.jsonl

Each level starts K `projected-grpo train` processes at once (seeds 1..K, the same settings otherwise, grader
workers shared out as the runner does) and times until the last one ends; model load, SVD and teacher-pool caches
are warmed first by a 1-step run that is not timed (`--no-warm-up` skips it when they are warm already). Prints a line
as each level ends, then one table: wall seconds, runs per GPU-hour, the slowest job's start-up (the train call to its
first step, `time_startup`) and the median step of all jobs, peak GPU memory per job, and the ratio to the first
variant at K = 1 measured in the same run.

`--variants` compares settings that trade speed for memory in the same run, each at every level, e.g.

    python benchmarks/concurrency.py --levels 1 2 3 4 --variants "" "--model.gradient-checkpointing" \
        "--micro-batch 4" -- --problems runs/data/train.jsonl --n-problems 256
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from math import nan
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from projected_grpo.config import GPU_OOM_EXIT  # noqa: E402  (a train job's exit status when out of GPU memory)


def launch(preset: str, steps: int, seed: int, run_dir: Path, workers: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "projected_grpo.cli", "train", "--preset", preset, "--steps", str(steps), "--seed",
           str(seed), "--run-dir", str(run_dir), "--workers", str(workers), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(run_dir.with_suffix(".log"), "w"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="coder15")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--variants", nargs="+", default=[""],
                    help="flag sets to compare (each a quoted string; \"\" = the preset as is)")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="skip the untimed 1-step run (the caches are warm already, e.g. after a sweep of the preset)")
    ap.add_argument("extra", nargs="*", help="flags passed to every train job (after --)")
    argv, variants = split_variants(sys.argv[1:], {o for a in ap._actions for o in a.option_strings})
    args = ap.parse_args(argv)
    args.variants = variants or args.variants
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="concurrency_"))
    warm = None if args.no_warm_up else launch(args.preset, 1, 999, root / "warm", cores, args.extra)
    if warm is not None and warm.wait() != 0:
        print(f"warm-up run failed: see {root / 'warm.log'}", file=sys.stderr)
        return 1
    rows = []
    for vi, variant in enumerate(args.variants):
        flags = [*args.extra, *shlex.split(variant)]
        for k in args.levels:
            t0 = time.perf_counter()
            dirs = [root / f"v{vi}_k{k}_s{s}" for s in range(1, k + 1)]
            procs = [launch(args.preset, args.steps, s, d, max(1, cores // k), flags) for s, d in enumerate(dirs, 1)]
            codes = [p.wait() for p in procs]
            wall = time.perf_counter() - t0
            if any(c == GPU_OOM_EXIT for c in codes):
                print(f"{variant or 'preset'} at {k}: {codes.count(GPU_OOM_EXIT)} of {k} jobs ran out of GPU memory; "
                      f"logs under {root}", file=sys.stderr)
                rows.append((variant, k, *[float("nan")] * 5))
                continue
            if any(codes):
                print(f"{variant or 'preset'} at {k}: a job failed ({codes}); logs under {root}", file=sys.stderr)
                return 1
            steps = [s for d in dirs for s in logged(d, "time_step")]
            rows.append((variant, k, wall, k / wall * 3600, max(max(logged(d, "time_startup"), default=nan) for d in dirs),
                         statistics.median(steps) if steps else nan, max(max(logged(d, "gpu_peak_gb"), default=nan)
                                                                           for d in dirs)))
            parts = {p: [x for d in dirs for x in logged(d, f"time_{p}")] for p in STEP_PARTS}
            print(f"{variant or 'preset'} at {k}: wall {wall:.1f} s, slowest start-up {rows[-1][4]:.1f} s, median step "
                  f"{rows[-1][5]:.2f} s, median step parts " + ", ".join(
                f"{p} {statistics.median(xs):.2f} s" for p, xs in parts.items() if xs) + f"; runs under {root}",
                flush=True)
    base = rows[0][3]
    print(f"\n{args.preset}, {args.steps} steps per run, {cores} CPU cores")
    print("| variant | concurrent jobs | wall s | runs per GPU-hour | vs first row | start-up s (slowest) | median step s "
          "| peak GB per job |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, k, wall, rate, startup, step, peak in rows:
        name = f"`{variant}`" if variant else "preset"
        if wall != wall:  # nan: out of GPU memory
            print(f"| {name} | {k} | out of GPU memory | – | – | – | – | – |")
        else:
            print(f"| {name} | {k} | {wall:.1f} | {rate:.1f} | {rate / base:.2f}x | {startup:.1f} | {step:.2f} | "
                  f"{peak:.1f} |")
    return 0


def split_variants(argv: list[str], options: set[str]) -> tuple[list[str], list[str]]:
    """(argv without --variants and its values, the values): every argument after --variants up to the next of this
    script's options or `--`, so a variant may be a lone flag (`--adapter.fold-train`) that argparse would take for an
    option of its own."""
    if "--variants" not in argv:
        return argv, []
    i = j = argv.index("--variants")
    j += 1
    while j < len(argv) and argv[j] != "--" and argv[j] not in options:
        j += 1
    return argv[:i] + argv[j:], argv[i + 1:j]


STEP_PARTS = ("generate", "grade", "ref", "train")  # a step's timed parts in metrics.jsonl (time_<part>)


def logged(run_dir: Path, key: str) -> list[float]:
    """Every value of `key` a run logged in metrics.jsonl (none, e.g. gpu_peak_gb on CPU: an empty list)."""
    path = run_dir / "metrics.jsonl"
    vals = [json.loads(line).get(key) for line in path.read_text().splitlines()] if path.exists() else []
    return [float(v) for v in vals if v is not None]


if __name__ == "__main__":
    sys.exit(main())
