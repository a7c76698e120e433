"""Rollout speed: our static engine against HF `generate`, measured in the same run, as ms per decode step, tokens/s
and the fraction of the memory-bandwidth roofline (weights + KV bytes per step over the bandwidth of a large
device-to-device copy measured in the same run). Prints one table last.

    # Qwen3-4B shape, random init, forced 1024 new tokens, batch 12 and 192
    python benchmarks/rollout.py --shape qwen3-4b --batch 12 192 --new 1024
    # Qwen2.5-Coder-0.5B real weights, 768 new tokens, batch 128 over the 119-problem split's prompts
    python benchmarks/rollout.py --model DIR --prompts prompts_coder05.json --batch 128 --new 768 --greedy-check 300

Decode ms/step = (time of a rollout of N new tokens - time of a rollout of 1 token) / (N - 1): the prefill and the
first sample cancel. HF is timed the same way over --hf-new tokens (it is slow; its per-step time grows little with
the length, so a short run flatters it if anything). Tokens are forced (no eos) in both.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from projected_grpo import engine  # noqa: E402

SHAPES = {  # Qwen3-4B: hidden 2560, 36 layers, 32 q / 8 kv heads of 128, MLP 9728, vocab 151936, tied embeddings
    "qwen3-4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True,
                     max_position_embeddings=40960, rope_theta=1_000_000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=300, tie_word_embeddings=True),  # a CPU smoke run of this script
}


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def copy_bandwidth(gib: float = 2.0, reps: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written (median of reps)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, device=DEVICE, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [sync_time(lambda: dst.copy_(src)) for _ in range(reps)]
    return 2 * n * 2 / statistics.median(times)


def random_model(shape: str) -> torch.nn.Module:
    import transformers

    cfg = transformers.Qwen3Config(**SHAPES[shape])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = transformers.Qwen3ForCausalLM(cfg)
    torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def load_dir(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE).eval().requires_grad_(False)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step must read: every weight but the embedding table (B rows of it are gathered), unless
    the lm_head shares it."""
    spec = engine.model_spec(model)
    emb = model.model.embed_tokens.weight
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n if spec.tied else n - emb.numel() * emb.element_size()


def kv_bytes_per_step(model: torch.nn.Module, lens: list[int], first: int, last: int) -> float:
    """Mean KV-cache bytes read per decode step over steps first..last (step t attends len_b + t keys)."""
    s = engine.model_spec(model)
    per_tok = s.n_layers * s.n_kv_heads * s.head_dim * 2 * 2  # K and V, bf16
    mean_keys = sum(lens) + len(lens) * (first + last) / 2
    return per_tok * mean_keys


def make_prompts(args, vocab: int, B: int) -> tuple[list[list[int]], list[int], int]:
    if args.prompts:
        d = json.loads(Path(args.prompts).read_text())
        src = d["prompt_ids"]
        return [src[i % len(src)] for i in range(B)], d["eos_ids"], d["pad_id"]
    rng = random.Random(B)
    lens = [args.prompt_len] + [rng.randint(args.prompt_len // 2, args.prompt_len) for _ in range(B - 1)]
    return [[rng.randrange(1, vocab) for _ in range(n)] for n in lens], [], 0


def time_hf(model, prompts: list[list[int]], pad: int, n: int, temperature: float, top_p: float) -> tuple[float, float]:
    """HF generate, plain (no scores kept, its best case), n forced tokens -> (ms per decode step, 1-token time s)."""
    from transformers import GenerationConfig

    ids, mask = engine.left_pad(prompts, pad)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE).long()

    def run(k: int) -> None:
        cfg = GenerationConfig(max_new_tokens=k, min_new_tokens=k, do_sample=True, temperature=temperature,
                               top_p=top_p, top_k=0, pad_token_id=pad, eos_token_id=None)
        with torch.no_grad(), engine.bare_generation_config(model):
            model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)

    run(2)
    t1, tn = sync_time(lambda: run(1)), sync_time(lambda: run(n))
    return (tn - t1) / (n - 1) * 1e3, t1


def time_ours(eng: engine.StaticEngine, model, prompts: list[list[int]], pad: int, n: int, temperature: float,
              top_p: float) -> tuple[float, float, float, float]:
    """-> (ms per decode step, 1-token rollout s, n-token rollout s, first call s (graph capture))."""
    def run(k: int) -> None:
        eng.run(model, prompts, max_new_tokens=k, temperature=temperature, top_p=top_p, eos_ids=[], pad_id=pad,
                seed=0)

    t_cap = sync_time(lambda: run(2))
    t1, tn = sync_time(lambda: run(1)), sync_time(lambda: run(n))
    return (tn - t1) / (n - 1) * 1e3, t1, tn, t_cap


def profile_decode(eng: engine.StaticEngine, model, prompts: list[list[int]], pad: int, steps: int = 8) -> str:
    """Kernel times of a few eager decode steps (same kernels as the graph): the top rows of the profiler table."""
    from torch.profiler import ProfilerActivity, profile

    eng.run(model, prompts, max_new_tokens=2, temperature=0.7, top_p=0.95, eos_ids=[], pad_id=pad, seed=0)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng._step(0.7, 0.95, pad)
        sync()
    return prof.key_averages().table(sort_by="device_time_total", row_limit=14, max_name_column_width=60)


def greedy_check(model, prompts: list[list[int]], n_new: int, pad: int) -> list[str]:
    """Our greedy decode against HF's, row by row: tokens equal, or the first divergence and HF's logit gap there."""
    from transformers import GenerationConfig

    ours = engine.generate(model, prompts, max_new_tokens=n_new, temperature=0.0, top_p=1.0, eos_ids=[], pad_id=pad,
                           seed=0, backend="static")
    ids, mask = engine.left_pad(prompts, pad)
    cfg = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=pad,
                           eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), engine.bare_generation_config(model):
        out = model.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE).long(), generation_config=cfg)
    ref = out.sequences[:, ids.shape[1]:]
    lines = []
    for r in range(len(prompts)):
        diff = (ours.completion_ids[r] != ref[r]).nonzero()
        if len(diff) == 0:
            lines.append(f"row {r}: {n_new}/{n_new} tokens equal")
            continue
        t = int(diff[0])
        lg = out.logits[t][r].float()
        gap = float(lg[ref[r, t]] - lg[ours.completion_ids[r, t]])
        ulp = 2.0 ** (math.floor(math.log2(float(lg.abs().max()))) - 7)
        lines.append(f"row {r}: first divergence at token {t}; HF logit gap {gap:.4f} = {gap / ulp:.2f} bf16 ulp "
                     f"of the top logit {float(lg.max()):.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random-init model of this shape")
    ap.add_argument("--model", help="a local model directory (safetensors) instead of --shape")
    ap.add_argument("--prompts", help="JSON from coder05_prompts.py (prompt_ids, eos_ids, pad_id); else random")
    ap.add_argument("--prompt-len", type=int, default=512, help="random prompts: longest length (others len/2..len)")
    ap.add_argument("--batch", type=int, nargs="+", default=[12])
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--hf-new", type=int, default=64, help="new tokens for the HF generate timing")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.95], help="one engine row per value")
    ap.add_argument("--sampler", nargs="+", default=["auto"], choices=engine.SAMPLERS,
                    help="the engine's sampler; one engine row per sampler and top-p value")
    ap.add_argument("--greedy-check", type=int, default=0, help="compare greedy with HF for this many tokens")
    ap.add_argument("--profile", action="store_true", help="print the kernel times of eager decode steps per batch")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (--shape tiny)")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    if (a.shape is None) == (a.model is None):
        raise ValueError("pass exactly one of --shape and --model")

    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    bw = copy_bandwidth(2.0 if DEVICE == "cuda" else 0.1)
    print(f"{dev}; torch {torch.__version__}; device-to-device copy {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    t0 = time.perf_counter()
    model = random_model(a.shape) if a.shape else load_dir(a.model)
    name = a.shape or Path(a.model).name
    print(f"model {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, loaded in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    wb = weight_bytes(model)
    rows = []
    for B in a.batch:
        prompts, eos, pad = make_prompts(a, model.config.vocab_size, B)
        lens = [len(p) for p in prompts]
        P = max(lens)

        hf_ms, hf_t1 = time_hf(model, prompts, pad, a.hf_new, a.temperature, a.top_p[0])
        floor = (wb + kv_bytes_per_step(model, lens, 1, a.hf_new - 1)) / bw * 1e3
        rows.append(dict(model=name, B=B, new=a.hf_new, engine=f"HF generate (top_p {a.top_p[0]})", ms=hf_ms,
                         tok_s=B / hf_ms * 1e3, floor_ms=floor, prefill_s=hf_t1))
        print(rows[-1], flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

        eng = engine.StaticEngine(model, B, math.ceil((P + a.new) / 256) * 256)
        auto = eng.sampler  # the engine's own choice for this batch
        for sampler, top_p in [(s, t) for s in a.sampler for t in a.top_p]:
            eng.sampler = auto if sampler == "auto" else sampler  # a graph per sampler: the engine keys graphs by it
            ms, t1, tn, t_cap = time_ours(eng, model, prompts, pad, a.new, a.temperature, top_p)
            floor = (wb + kv_bytes_per_step(model, lens, 1, a.new - 1)) / bw * 1e3
            rows.append(dict(model=name, B=B, new=a.new, engine=f"static+graph, {eng.sampler} sampler (top_p {top_p})",
                             ms=ms, tok_s=B / ms * 1e3, floor_ms=floor, prefill_s=t1, capture_s=t_cap,
                             rollout_s=tn, rollout_tok_s=B * a.new / tn))
            print(rows[-1], flush=True)
        if a.profile:
            print(profile_decode(eng, model, prompts, pad), flush=True)
        del eng
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    if a.greedy_check:
        prompts, eos, pad = make_prompts(a, model.config.vocab_size, 8)
        print(f"greedy check, {a.greedy_check} tokens, 8 prompts:")
        for line in greedy_check(model, prompts, a.greedy_check, pad):
            print("  " + line)

    if a.out:
        Path(a.out).write_text(json.dumps(dict(device=dev, bandwidth=bw, rows=rows), indent=1))
    hf_ms = {r["B"]: r["ms"] for r in rows if r["engine"].startswith("HF")}
    print(f"\n{dev}, copy bandwidth {bw / 1e12:.2f} TB/s; roofline = (weights {wb / 1e9:.2f} GB + mean KV bytes) / "
          "bandwidth")
    print("| model | batch | new tokens | engine | ms/step | tokens/s | roofline ms | % of roofline | vs HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['B']} | {r['new']} | {r['engine']} | {r['ms']:.2f} | {r['tok_s']:,.0f} | "
              f"{r['floor_ms']:.2f} | {100 * r['floor_ms'] / r['ms']:.0f}% | {hf_ms[r['B']] / r['ms']:.1f}x |")


if __name__ == "__main__":
    main()
