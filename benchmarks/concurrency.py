"""Runs per GPU-hour at 1, 2, 4 concurrent train jobs on one GPU: the gain the experiment runner's --jobs-per-gpu buys.

    python benchmarks/concurrency.py --preset coder15 --steps 4 --levels 1 2 4 -- --problems runs/data/train.jsonl

Each level starts K `projected-grpo train` processes at once (seeds 1..K, the same settings otherwise, grader
workers shared out as the runner does) and times until the last one ends; model load, SVD and teacher-pool caches
are warmed first by a 1-step run that is not timed. Prints one table: wall seconds, runs per GPU-hour, and the ratio
to K = 1 measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
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
    ap.add_argument("extra", nargs="*", help="flags passed to every train job (after --)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="concurrency_"))
    warm = launch(args.preset, 1, 999, root / "warm", cores, args.extra)
    if warm.wait() != 0:
        print(f"warm-up run failed: see {root / 'warm.log'}", file=sys.stderr)
        return 1
    rows = []
    for k in args.levels:
        t0 = time.perf_counter()
        procs = [launch(args.preset, args.steps, s, root / f"k{k}_s{s}", max(1, cores // k), args.extra)
                 for s in range(1, k + 1)]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - t0
        if any(c == GPU_OOM_EXIT for c in codes):
            print(f"level {k}: {codes.count(GPU_OOM_EXIT)} of {k} jobs ran out of GPU memory; logs under {root}",
                  file=sys.stderr)
            rows.append((k, float("nan"), float("nan")))
            continue
        if any(codes):
            print(f"level {k}: a job failed ({codes}); logs under {root}", file=sys.stderr)
            return 1
        rows.append((k, wall, k / wall * 3600))
    base = rows[0][2]
    print(f"\n{args.preset}, {args.steps} steps per run, {cores} CPU cores")
    print("| concurrent jobs | wall s | runs per GPU-hour | vs 1 job |")
    print("|---|---|---|---|")
    for k, wall, rate in rows:
        if wall != wall:  # nan: out of GPU memory
            print(f"| {k} | out of GPU memory | – | – |")
        else:
            print(f"| {k} | {wall:.1f} | {rate:.1f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
