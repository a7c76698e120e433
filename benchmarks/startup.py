"""A job's two big start-up parts, model load and knobs, before and after half-precision files, each timed in a
fresh process (as a job starts), in the same run:

    python benchmarks/startup.py --model coder15 --repeats 3

before: `from_pretrained` of the float32 safetensors in bfloat16 on the host, then `.to(device)` (the CUDA context
started in a thread meanwhile, as `models.load` does); `adapter.attach` reading SVD entries whose U and Vh are float32
(a copy of the cache written that way here). now: `models.load` (a bfloat16 copy of the cache entry, made once) and
entries in the model's dtype. `--variants` adds `device_map` (the bfloat16 copy read with `device_map` straight onto
the device; measured no faster, so not used). The caches are made first, untimed; the variants then run in turn,
`--repeats` times each; the table gives each part's median seconds and the ratio to the first variant. `imports` is
torch, safetensors and the project's modules, before either variant's work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from projected_grpo import adapter, models  # noqa: E402
from projected_grpo.config import AdapterConfig, ModelConfig  # noqa: E402

VARIANTS = {
    "before": "float32 file, cast on the host, moved; float32 U, Vh",
    "now": "models.load: bfloat16 copy read on the host, moved; U, Vh in bfloat16",
    "device_map": "bfloat16 copy read with device_map onto the device; U, Vh in bfloat16",
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(variant: str, model: str, old_cache: str) -> dict[str, float]:
    """One job-like start-up in this fresh process: seconds for imports, model, knobs."""
    import threading

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_imports = time.perf_counter() - T_START
    cfg = ModelConfig(name=model)
    src, model_id = models.resolve(cfg)
    t0 = time.perf_counter()
    if variant == "now":
        m = models.load(cfg).model
    else:
        if cfg.torch_device.type == "cuda":
            threading.Thread(target=models._init_cuda, daemon=True).start()
        path = src if variant == "before" else models.dtype_copy(src, cfg.torch_dtype, cfg.root)
        AutoTokenizer.from_pretrained(path)
        where = {"device_map": {"": cfg.torch_device}} if variant == "device_map" else {}
        m = AutoModelForCausalLM.from_pretrained(path, dtype=cfg.torch_dtype, **where).to(cfg.torch_device)
    sync()
    t1 = time.perf_counter()
    adapter.attach(m, AdapterConfig(cache_dir=old_cache if variant == "before" else ""), model_id)
    sync()
    return {"imports": t_imports, "model": t1 - t0, "knobs": time.perf_counter() - t1}


def float32_svd_copy(svd_dir: Path, out: Path) -> None:
    """The cache's entries with U and Vh widened to float32 (the earlier format), same metadata, under `out`."""
    for f in svd_dir.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata()
        dst = out / f.relative_to(svd_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.float() for k, v in load_file(f).items()}, str(dst), metadata=meta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="coder15", help="model.name, as for every command")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["before", "now"], choices=list(VARIANTS))
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--old-cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.old_cache)))
        return 0
    cfg = ModelConfig(name=args.model)
    loaded = models.load(cfg)  # the bfloat16 copy and the SVD entries, made once, untimed
    acfg = AdapterConfig()
    adapter.attach(loaded.model, acfg, loaded.model_id)
    old = Path(tempfile.mkdtemp(prefix="svd32_"))
    float32_svd_copy(acfg.svd_dir, old / "svd")
    del loaded
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for _ in range(args.repeats):
        for v in args.variants:
            out = subprocess.run([sys.executable, __file__, "--child", v, "--model", args.model, "--old-cache",
                                  str(old)], capture_output=True, text=True)
            if out.returncode:
                print(f"variant {v} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{args.model} ({cfg.torch_dtype}, {cfg.torch_device}), each variant {args.repeats} times in a fresh "
          "process; median s (ratio to the first variant)")
    parts = ("imports", "model", "knobs")
    print("| variant | " + " | ".join(parts) + " | model + knobs |\n|---|---|---|---|---|")
    base: dict[str, float] = {}
    for v, rs in runs.items():
        med = {p: statistics.median(r[p] for r in rs) for p in parts}
        med["model + knobs"] = statistics.median(r["model"] + r["knobs"] for r in rs)
        cells = []
        for p, x in med.items():
            base.setdefault(p, x)
            cells.append(f"{x:.2f} ({base[p] / x:.2f}x)" if p != "imports" else f"{x:.2f}")
        print(f"| {VARIANTS[v]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
