"""A job's two big start-up parts, model load and knobs, before and after reading half-precision files straight to
the device, measured in the same run:

    python benchmarks/startup.py --model coder15 --repeats 3

model: `from_pretrained` of the float32 safetensors in bfloat16 on the host, then `.to(device)` (before), against
`models.load` (a bfloat16 copy of the cache entry, made once, read with `device_map` onto the device).
knobs: `adapter.attach` reading SVD entries whose U and Vh are float32 (before: a copy of the cache written that way
here) against entries in the model's dtype (now). Every variant runs once untimed first (page cache, CUDA context),
then `--repeats` times in turn; the table gives the median seconds and the ratio to the first row of its part.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from projected_grpo import adapter, models  # noqa: E402
from projected_grpo.config import AdapterConfig, ModelConfig  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_before(src: str, cfg: ModelConfig) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(src, dtype=cfg.torch_dtype).to(cfg.torch_device)


def load_now(_src: str, cfg: ModelConfig) -> torch.nn.Module:
    return models.load(cfg).model


def float32_svd_copy(svd_dir: Path, out: Path) -> None:
    """The cache's entries with U and Vh widened to float32 (the earlier format), same metadata, under `out`."""
    for f in svd_dir.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata()
        t = {k: v.float() for k, v in load_file(f).items()}
        dst = out / f.relative_to(svd_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file(t, str(dst), metadata=meta)


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    dt = time.perf_counter() - t0
    del out
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="coder15", help="model.name, as for every command")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = ModelConfig(name=args.model)
    src, model_id = models.resolve(cfg)
    models.load(cfg)  # makes the half-precision copy once, outside the timing
    rows: list[tuple[str, str, list[float]]] = []
    for name, fn in (("float32 file, cast on the host, then moved (before)", load_before),
                     ("models.load: half-precision copy read onto the device (now)", load_now)):
        timed(lambda fn=fn: fn(src, cfg))
        rows.append(("model", name, [timed(lambda fn=fn: fn(src, cfg)) for _ in range(args.repeats)]))

    model = models.load(cfg).model
    acfg = AdapterConfig()
    adapter.attach(model, acfg, model_id)  # computes any missing SVD entry, outside the timing
    old = Path(tempfile.mkdtemp(prefix="svd32_"))
    float32_svd_copy(acfg.svd_dir, old / "svd")

    def attach_from(cache_dir: str):
        fresh = models.load(cfg).model
        sync()
        t0 = time.perf_counter()
        adapter.attach(fresh, AdapterConfig(cache_dir=cache_dir), model_id)
        sync()
        return time.perf_counter() - t0

    for name, cache_dir in (("SVD entries with float32 U, Vh (before)", str(old)),
                            ("SVD entries in the model's dtype (now)", acfg.cache_dir)):
        attach_from(cache_dir)
        rows.append(("knobs", name, [attach_from(cache_dir) for _ in range(args.repeats)]))
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    print(f"\n{args.model} ({model_id}), {cfg.torch_dtype}, {cfg.torch_device}, median of {args.repeats}")
    print("| part | variant | median s | all s | vs before |\n|---|---|---|---|---|")
    base: dict[str, float] = {}
    for part, name, ts in rows:
        med = statistics.median(ts)
        base.setdefault(part, med)
        print(f"| {part} | {name} | {med:.2f} | {', '.join(f'{t:.2f}' for t in ts)} | {base[part] / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
