"""Rollouts: prompt token ids in, sampled token ids + completion mask + sampler log-probs out.

Two back ends behind one `generate(..., engine=)` (`--engine auto|static|hf`; `pick_engine` decides):
- "hf": Hugging Face `model.generate` (any causal LM; the CPU default, and auto's fallback on CUDA for models the
  static engine does not implement: `static_support(model)` names why, logged once).
- "static": our own decode over the model's weights (Qwen2 / Qwen3 / Llama / Mistral without sliding window, silu,
  RoPE independent of the sequence length): batched prefill, a preallocated
  KV cache (layers, B, kv_heads, capacity, head_dim) written by index, sampling (temperature / top-p) on the device
  with per-row stop at eos and an early exit checked every 16 steps, no host sync per token. On CUDA one decode step
  is ~10 kernels per layer (cuBLAS GEMMs on q|k|v and gate|up fused weights; Triton: add + RMSNorm, q/k norm + RoPE
  + cache write, flash-decoding attention, silu * up; a Triton or a sort-based sampler) captured once as a CUDA
  graph and replayed per token. The CUDA default; on CPU it runs the same math eagerly with torch ops (tests).
  It keeps a copy of the weights (refreshed from the model at every call, so a merged knob is seen) and its cache
  per model until `release(model)`. Speed: benchmarks/RESULTS.md.

Layout of a `Rollout` (both back ends): prompts are LEFT-padded with `pad_id` to the longest prompt, so every prompt
ends at column `prompt_len - 1` and the completion starts at column `prompt_len`:

    ids[b] = [pad ... pad, prompt_b ..., tok_0, tok_1, ..., tok_{T_new-1}]
              <- prompt_len - len(prompt_b) -><- len(prompt_b) -><-------- T_new -------->

After a sequence's first eos the remaining completion columns hold `pad_id`, with `completion_mask` False and
`logprobs` 0. The knob must already be merged into the weights (`adapter.merged`): the static engine reads the Linear
weights directly and refuses models whose Linears carry forward hooks.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from loguru import logger
from torch import Tensor, nn

try:  # Triton: only the CUDA kernels need it (the CPU path and the "torch" kernels do not)
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


OnDone = Callable[[list[int], list[list[int]]], None]
"""Called as rows finish: (row indices, each row's tokens up to and including its first eos); every row once."""


@dataclass
class Rollout:
    ids: Tensor              # (B, prompt_len + T_new) int64, prompts left-padded with pad_id
    completion_mask: Tensor  # (B, T_new) bool, True for generated tokens up to and including the first eos
    logprobs: Tensor         # (B, T_new) float32, log-prob of each sampled token under the sampling distribution; 0 where masked
    prompt_len: int = 0      # padded prompt length: the completion starts at ids[:, prompt_len]
    prompt_mask: Tensor | None = None  # (B, prompt_len) bool, True on real (non-pad) prompt tokens

    @property
    def completion_ids(self) -> Tensor:
        return self.ids[:, self.prompt_len:]  # (B, T_new)

    def attention_mask(self) -> Tensor:
        """(B, prompt_len + T_new) bool for a training forward: False on the left padding only."""
        assert self.prompt_mask is not None
        ones = torch.ones_like(self.completion_mask, dtype=torch.bool)
        return torch.cat([self.prompt_mask.to(ones.device), ones], dim=1)

    def completions(self) -> list[list[int]]:
        """Each row's generated tokens up to and including its first eos, as plain lists."""
        out = []
        for row, mask in zip(self.completion_ids.tolist(), self.completion_mask.tolist(), strict=True):
            out.append([t for t, m in zip(row, mask, strict=True) if m])
        return out


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """-> ids (B, P) int64 left-padded with pad_id, mask (B, P) bool True on real tokens."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), P), dtype=torch.bool)
    for b, p in enumerate(prompt_ids):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, P - len(p):] = True
    return ids, mask


def completion_mask_from(new_ids: Tensor, eos_ids: list[int]) -> Tensor:
    """(B, T) ids -> (B, T) bool, True up to and including the first eos of each row."""
    if not eos_ids:
        return torch.ones_like(new_ids, dtype=torch.bool)
    is_eos = torch.isin(new_ids, torch.tensor(eos_ids, device=new_ids.device))
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # eos strictly before each column
    return eos_before == 0


def _check_args(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# ----------------------------------------------------------------------------------------------------------------
# sampling (shared by both back ends' log-prob definitions)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """probs (..., V) -> the top-p distribution: probs kept on the smallest set of most likely tokens whose mass
    reaches top_p, every token tied with the least likely kept one included, renormalised. The reference of both
    samplers (HF's TopPLogitsWarper differs only in cutting such ties by sort order)."""
    ps, _ = probs.sort(dim=-1, descending=True)
    n_keep = ((ps.cumsum(-1) - ps) < top_p).sum(-1, keepdim=True)  # >= 1
    cut = ps.gather(-1, n_keep - 1)  # the least likely kept probability
    q = torch.where(probs >= cut, probs, 0.0)
    return q / q.sum(-1, keepdim=True)


def sample(logits: Tensor, temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
    """logits (B, V) -> token (B,) int64, logprob (B,) float32 under the distribution sampled from.

    temperature > 0: `nucleus(softmax(logits / temperature), top_p)`, sampled with the exponential race
    (argmax log p - log E, E ~ Exp(1)), which needs no host sync. temperature == 0: greedy, and the log-prob is the
    model's own (softmax of the raw logits)."""
    if temperature == 0:
        logits = logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        tok = logits.argmax(dim=-1)
        return tok, logp.gather(1, tok[:, None])[:, 0]
    if top_p < 1.0:
        # sorted in the logits' own dtype (a bf16 model's: half the key bits of float32, fewer radix passes); / T > 0
        # keeps the order, and float32 tells apart every pair of values the narrower dtype does
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        sorted_logits = sorted_logits.float() / temperature
        probs = torch.softmax(sorted_logits, dim=-1)
        n_keep = ((probs.cumsum(-1) - probs) < top_p).sum(-1, keepdim=True)  # (B, 1), >= 1
        cut = sorted_logits.gather(1, n_keep - 1)  # the least likely kept logit: ties with it stay in
        logp = torch.log_softmax(sorted_logits.masked_fill(sorted_logits < cut, float("-inf")), dim=-1)
        noise = torch.empty_like(logp).exponential_()
        j = (logp - noise.log()).argmax(dim=-1)  # (B,) index into the sorted order
        return order.gather(1, j[:, None])[:, 0], logp.gather(1, j[:, None])[:, 0]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    noise = torch.empty_like(logp).exponential_()
    tok = (logp - noise.log()).argmax(dim=-1)
    return tok, logp.gather(1, tok[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# back end "hf": Hugging Face generate


@contextlib.contextmanager
def bare_generation_config(model: nn.Module) -> Iterator[None]:
    """HF generate fills every field left at its global default from the model's own generation_config (eos ids,
    top_k, repetition_penalty, ...): swap in an empty one so only what the caller passes applies."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate_hf(model: nn.Module, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                top_p: float, eos_ids: list[int], pad_id: int, seed: int) -> Rollout:
    from transformers import GenerationConfig

    _check_args(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    ids, pmask = left_pad(prompt_ids, pad_id)
    B, P = ids.shape
    do_sample = temperature > 0
    # a complete config so nothing leaks in from the model's generation_config (top_k, repetition_penalty, ...)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=do_sample,
        temperature=temperature if do_sample else None, top_p=top_p if do_sample else None, top_k=0 if do_sample else None,
        eos_token_id=list(eos_ids) if eos_ids else None, pad_token_id=pad_id, bos_token_id=None,
        return_dict_in_generate=True, output_scores=True, output_logits=True, use_cache=True,
    )
    torch.manual_seed(seed)
    with bare_generation_config(model):
        out = model.generate(input_ids=ids.to(device), attention_mask=pmask.to(device).long(),
                             generation_config=gen_cfg)
    new = out.sequences[:, P:]  # (B, T) with T <= max_new_tokens (HF stops when all rows are done)
    T = new.shape[1]
    # scores: processed logits (temperature, top-p) = the sampling distribution; raw logits for greedy
    steps = out.scores if do_sample else out.logits
    lp = torch.stack([torch.log_softmax(s.float(), dim=-1).gather(1, new[:, t, None])[:, 0]
                      for t, s in enumerate(steps)], dim=1)  # (B, T)
    mask = completion_mask_from(new, eos_ids)
    new = new.masked_fill(~mask, pad_id)
    lp = lp.masked_fill(~mask, 0.0)
    if T < max_new_tokens:  # all rows stopped early: pad to the requested width
        extra = max_new_tokens - T
        new = F.pad(new, (0, extra), value=pad_id)
        mask = F.pad(mask, (0, extra), value=False)
        lp = F.pad(lp, (0, extra), value=0.0)
    return Rollout(ids=torch.cat([ids.to(device), new], dim=1).long(), completion_mask=mask,
                   logprobs=lp.float(), prompt_len=P, prompt_mask=pmask.to(device))


# ----------------------------------------------------------------------------------------------------------------
# back end "static": our own prefill + decode over the model's weights


@dataclass(frozen=True)
class Spec:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    qk_norm: bool   # Qwen3: RMSNorm over head_dim on q and k before RoPE
    qkv_bias: bool  # Qwen2: biases on q/k/v
    tied: bool      # lm_head shares the embedding matrix


def _no_hooks(name: str, m: nn.Module) -> None:
    if m._forward_hooks or m._forward_pre_hooks:
        raise ValueError(f"static engine: Linear {name} carries forward hooks (an unmerged adapter?); the engine reads "
                         "raw weights and would skip them: merge the knob first (adapter.merged)")


# HF model types whose forward the static engine reproduces (pre-norm RMSNorm decoder, q/k/v/o + SwiGLU Linears,
# RoPE): checked token for token against HF generate on CPU (tests/test_engine.py)
STATIC_MODEL_TYPES: tuple[str, ...] = ("qwen2", "qwen3", "llama", "mistral")


def _is_linear(m: object) -> bool:
    return isinstance(m, nn.Linear)


def static_support(model: nn.Module) -> str | None:
    """Why the static engine cannot run `model` (one line), or None when it can. Architecture only: forward hooks
    on the Linears (an unmerged knob) are refused later by `model_spec`, since `adapter.merged` removes them."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in STATIC_MODEL_TYPES:
        return f"model_type {mtype!r} is not one it implements ({', '.join(STATIC_MODEL_TYPES)})"
    base, lm_head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if (base is None or not _is_linear(lm_head)
            or any(not hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
            or len(base.layers) == 0):
        return "expected a HF causal LM with .model.{embed_tokens,layers,norm,rotary_emb} and an nn.Linear .lm_head"
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} is not supported (silu only)"
    types, window = getattr(cfg, "layer_types", None), getattr(cfg, "sliding_window", None)
    if types:  # per-layer attention kinds (Qwen2/3 slide only from layer max_window_layers on)
        sliding = "sliding_attention" in types
    elif mtype in ("qwen2", "qwen3"):
        sliding = bool(getattr(cfg, "use_sliding_window", False)) and window is not None
    else:  # Mistral slides wherever sliding_window is set
        sliding = window is not None
    if sliding:
        return f"sliding-window attention (sliding_window={window}) is not supported"
    rope_type = getattr(base.rotary_emb, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        return f"rope_type {rope_type!r} depends on the sequence length; not supported"
    for i, layer in enumerate(base.layers):
        a, f = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for part, names in ((a, ("q_proj", "k_proj", "v_proj", "o_proj")), (f, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                if not _is_linear(getattr(part, n, None)):
                    where = "self_attn" if part is a else "mlp"
                    return f"layers.{i}.{where}.{n} is not an nn.Linear"
        for n in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(getattr(layer, n, None), "variance_epsilon"):
                return f"layers.{i}.{n} is not an RMSNorm"
        if len({getattr(a, n).bias is None for n in ("q_proj", "k_proj", "v_proj")}) > 1:
            return "biases on some of q/k/v only are not supported"
        if a.o_proj.bias is not None or f.gate_proj.bias is not None or f.up_proj.bias is not None \
                or f.down_proj.bias is not None:
            return "biases on o_proj / mlp are not supported"
    if lm_head.bias is not None:
        return "a bias on lm_head is not supported"
    att = base.layers[0].self_attn
    hd = getattr(att, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if att.q_proj.out_features % hd or att.k_proj.out_features % hd \
            or (att.q_proj.out_features // hd) % (att.k_proj.out_features // hd):
        return f"q/k widths {att.q_proj.out_features}/{att.k_proj.out_features} do not split into heads of {hd}"
    if lm_head.weight.is_cuda:
        if triton is None:
            return "its CUDA kernels need Triton, which is not installed"
        if hd & (hd - 1) or hd < 32:
            return f"its CUDA kernels need a power-of-two head_dim >= 32, got {hd}"
    return None


def model_spec(model: nn.Module) -> Spec:
    """Walk a HF Qwen2 / Qwen3 / Llama / Mistral causal LM and check that the static engine computes what it
    computes (`static_support`, then no forward hooks on the Linears)."""
    why = static_support(model)
    if why is not None:
        raise ValueError(f"static engine: {why}")
    base, lm_head, cfg = model.model, model.lm_head, model.config
    for i, layer in enumerate(base.layers):
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _no_hooks(f"layers.{i}.self_attn.{n}", getattr(layer.self_attn, n))
        for n in ("gate_proj", "up_proj", "down_proj"):
            _no_hooks(f"layers.{i}.mlp.{n}", getattr(layer.mlp, n))
    _no_hooks("lm_head", lm_head)  # (not the embedding: HF's gradient checkpointing hooks it, harmlessly)
    layer0 = base.layers[0]
    att, mlp = layer0.self_attn, layer0.mlp
    head_dim = getattr(att, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_heads = att.q_proj.out_features // head_dim
    n_kv = att.k_proj.out_features // head_dim
    return Spec(n_layers=len(base.layers), hidden=att.q_proj.in_features, n_heads=n_heads, n_kv_heads=n_kv,
                head_dim=head_dim, intermediate=mlp.gate_proj.out_features, vocab=lm_head.out_features,
                eps=float(layer0.input_layernorm.variance_epsilon), qk_norm=hasattr(att, "q_norm"),
                qkv_bias=att.q_proj.bias is not None,
                tied=lm_head.weight.data_ptr() == base.embed_tokens.weight.data_ptr())


class Weights:
    """The model's weights in the engine's layout (q|k|v and gate|up fused), in buffers that live as long as the
    engine so a captured graph stays valid; `load` copies the current (knob-merged) values in."""

    def __init__(self, model: nn.Module, spec: Spec):
        p = model.lm_head.weight
        dev, dt = p.device, p.dtype
        D, hd, inter = spec.hidden, spec.head_dim, spec.intermediate
        n_qkv = (spec.n_heads + 2 * spec.n_kv_heads) * hd

        def e(*shape: int) -> Tensor:
            return torch.empty(shape, device=dev, dtype=dt)

        self.embed = e(spec.vocab, D)
        self.lm_head = self.embed if spec.tied else e(spec.vocab, D)
        self.norm = e(D)
        L = spec.n_layers
        self.ln1, self.ln2 = [e(D) for _ in range(L)], [e(D) for _ in range(L)]
        self.wqkv = [e(n_qkv, D) for _ in range(L)]
        self.bqkv = [e(n_qkv) for _ in range(L)] if spec.qkv_bias else None
        self.q_norm = [e(hd) for _ in range(L)] if spec.qk_norm else None
        self.k_norm = [e(hd) for _ in range(L)] if spec.qk_norm else None
        self.wo = [e(D, spec.n_heads * hd) for _ in range(L)]
        self.wgu = [e(2 * inter, D) for _ in range(L)]
        self.wd = [e(D, inter) for _ in range(L)]
        rot = model.model.rotary_emb
        self.inv_freq = rot.inv_freq.detach().float().to(dev)  # (hd/2,)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))

    @torch.no_grad()
    def load(self, model: nn.Module) -> None:
        base = model.model
        self.embed.copy_(base.embed_tokens.weight)
        if self.lm_head is not self.embed:
            self.lm_head.copy_(model.lm_head.weight)
        self.norm.copy_(base.norm.weight)
        for i, layer in enumerate(base.layers):
            a, f = layer.self_attn, layer.mlp
            self.ln1[i].copy_(layer.input_layernorm.weight)
            self.ln2[i].copy_(layer.post_attention_layernorm.weight)
            torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dim=0, out=self.wqkv[i])
            if self.bqkv is not None:
                torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], dim=0, out=self.bqkv[i])
            if self.q_norm is not None:
                self.q_norm[i].copy_(a.q_norm.weight)
                self.k_norm[i].copy_(a.k_norm.weight)
            self.wo[i].copy_(a.o_proj.weight)
            torch.cat([f.gate_proj.weight, f.up_proj.weight], dim=0, out=self.wgu[i])
            self.wd[i].copy_(f.down_proj.weight)

    def rope_tables(self, n: int) -> tuple[Tensor, Tensor]:
        """cos, sin (n, head_dim) in the weights' dtype, computed as HF does (float32, then rounded)."""
        pos = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]  # (n, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (n, hd)
        dt = self.embed.dtype
        return (emb.cos() * self.rope_scale).to(dt), (emb.sin() * self.rope_scale).to(dt)


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """As HF's Qwen/Llama RMSNorm: normalise in float32, round to x's dtype, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def attend_torch(q: Tensor, kc: Tensor, vc: Tensor, start: Tensor, end: Tensor, n_keys: int | None) -> Tensor:
    """Reference decode attention. q (B, Hq, hd); kc, vc (B, Hkv, S, hd); keys [start_b, end] are valid (end
    inclusive, a (1,) tensor); n_keys limits the scan (None = the whole cache). -> (B, Hq, hd)."""
    B, Hq, hd = q.shape
    Hkv = kc.shape[1]
    S = kc.shape[2] if n_keys is None else n_keys
    k, v = kc[:, :, :S], vc[:, :, :S]  # (B, Hkv, S, hd)
    qg = q.view(B, Hkv, Hq // Hkv, hd)  # a group of query heads shares one kv head
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * hd ** -0.5  # (B, Hkv, G, S)
    j = torch.arange(S, device=q.device)
    valid = (j[None, :] >= start[:, None]) & (j[None, :] <= end)  # (B, S)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(p, v).view(B, Hq, hd)


_KERNELS: dict[str, object] = {}
SAMPLERS = ("auto", "torch", "triton")  # torch: sort-based (`sample`); triton: one program per row (`sample_triton`)
SAMPLER_TRITON_MIN_BATCH = 32  # below this many rows the sort-based torch sampler is faster (see StaticEngine)


def triton_kernels() -> dict[str, object]:
    """The Triton kernels by name (the CUDA path of the static engine)."""
    if triton is None:
        raise ValueError("kernels='triton' needs the triton package (it comes with CUDA builds of torch); "
                         "use kernels='torch'")
    if not _KERNELS:
        _KERNELS.update(sample=sample_kernel, decode=decode_attn_kernel, combine=combine_kernel,
                        add_rms_norm=add_rms_norm_kernel, qkv_post=qkv_post_kernel, silu_mul=silu_mul_kernel,
                        next_pow2=triton.next_power_of_2)
    return _KERNELS


if triton is not None:  # the CUDA kernels; defined at module level so they can call each other

    # flash-decoding: one (sequence, kv head) x one chunk of the cache per program, for all the query heads of the
    # group at once (tl.dot over a block of >= 16 rows); combine_kernel merges the chunks by log-sum-exp
    @triton.jit
    def decode_attn_kernel(Q, K, V, Start, End, Opart, Lse, scale,
                           sqb, sqh, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh,
                           CHUNK: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                           HD: tl.constexpr, HKV: tl.constexpr):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // HKV
        hk = pid % HKV
        start = tl.load(Start + b).to(tl.int32)
        end = tl.load(End).to(tl.int32) + 1  # exclusive
        lo = tl.maximum(split * CHUNK, start)
        hi = tl.minimum(split * CHUNK + CHUNK, end)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HD)
        offs_n = tl.arange(0, BLOCK_N)
        gmask = offs_g < G
        heads = hk * G + offs_g
        q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=gmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HD], tl.float32)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        for n0 in range(lo, hi, BLOCK_N):
            offs = n0 + offs_n
            nmask = offs < hi
            k = tl.load(k_base + offs[:, None] * sks + offs_d[None, :], mask=nmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_G, BLOCK_N) float32
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs[:, None] * svs + offs_d[None, :], mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
        tl.store(Opart + b * sob + heads[:, None] * soh + split * sos + offs_d[None, :], o, mask=gmask[:, None])
        tl.store(Lse + b * slb + heads * slh + split, lse, mask=gmask)

    @triton.jit
    def combine_kernel(Opart, Lse, Out, sob, soh, sos, slb, slh, sxb, sxh,
                       HQ: tl.constexpr, NS: tl.constexpr, BLOCK_S: tl.constexpr, HD: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // HQ
        h = pid % HQ
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, HD)
        smask = offs_s < NS
        lse = tl.load(Lse + b * slb + h * slh + offs_s, mask=smask, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.where(smask, tl.exp(lse - m), 0.0)
        o = tl.load(Opart + b * sob + h * soh + offs_s[:, None] * sos + offs_d[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(Out + b * sxb + h * sxh + offs_d, out.to(Out.dtype.element_ty))

    @triton.jit
    def add_rms_norm_kernel(X, Delta, W, H, sx, sd, sh, D, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        # x += delta (rounded to x's dtype, as a bf16 add); h = w * round(x * rsqrt(mean(x^2) + eps)), as HF
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(X + row * sx + offs, mask=m, other=0.0)
        if HAS_DELTA:
            d = tl.load(Delta + row * sd + offs, mask=m, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(X + row * sx + offs, x, mask=m)
        xf = x.to(tl.float32)
        r = tl.rsqrt(tl.sum(xf * xf, 0) / D + eps)
        hn = (xf * r).to(H.dtype.element_ty).to(tl.float32)
        w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(H + row * sh + offs, (w * hn).to(H.dtype.element_ty), mask=m)

    @triton.jit
    def qkv_post_kernel(QKV, QN, KN, Cos, Sin, Rpos, Slot, Qout, Kc, Vc, eps,
                        s_qkv, s_qb, s_qh, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_cos,
                        HQ: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr, QK_NORM: tl.constexpr):
        # one (row, head) of the fused q|k|v projection: q, k heads get RMSNorm (Qwen3) and RoPE at the row's
        # position; q goes to Qout, k and v to the cache column `slot`. Rounded step by step as HF's bf16 ops.
        b = tl.program_id(0)
        h = tl.program_id(1)  # [0, HQ) q heads, [HQ, HQ + HKV) k heads, then v heads
        HALF: tl.constexpr = HD // 2
        offs = tl.arange(0, HALF)
        src = QKV + b * s_qkv + h * HD
        slot = tl.load(Slot)
        x1 = tl.load(src + offs)
        x2 = tl.load(src + HALF + offs)
        dt = Qout.dtype.element_ty
        if h < HQ + HKV:
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            if QK_NORM:
                r = tl.rsqrt((tl.sum(f1 * f1, 0) + tl.sum(f2 * f2, 0)) / HD + eps)
                if h < HQ:
                    w1, w2 = tl.load(QN + offs).to(tl.float32), tl.load(QN + HALF + offs).to(tl.float32)
                else:
                    w1, w2 = tl.load(KN + offs).to(tl.float32), tl.load(KN + HALF + offs).to(tl.float32)
                f1 = (w1 * (f1 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                f2 = (w2 * (f2 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            pos = tl.load(Rpos + b)
            c1, c2 = tl.load(Cos + pos * s_cos + offs).to(tl.float32), tl.load(Cos + pos * s_cos + HALF + offs).to(tl.float32)
            n1, n2 = tl.load(Sin + pos * s_cos + offs).to(tl.float32), tl.load(Sin + pos * s_cos + HALF + offs).to(tl.float32)
            o1 = ((f1 * c1).to(dt).to(tl.float32) - (f2 * n1).to(dt).to(tl.float32)).to(dt)
            o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * n2).to(dt).to(tl.float32)).to(dt)
            if h < HQ:
                dst = Qout + b * s_qb + h * s_qh
            else:
                dst = Kc + b * s_kb + (h - HQ) * s_kh + slot * s_ks
            tl.store(dst + offs, o1)
            tl.store(dst + HALF + offs, o2)
        else:
            dst = Vc + b * s_vb + (h - HQ - HKV) * s_vh + slot * s_vs
            tl.store(dst + offs, x1)
            tl.store(dst + HALF + offs, x2)

    @triton.jit
    def silu_mul_kernel(GU, Out, s_gu, s_out, INTER, BLOCK: tl.constexpr):
        # out = round(silu(gate)) * up with gate, up the two halves of the fused projection, as HF's bf16 ops
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < INTER
        g = tl.load(GU + b * s_gu + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + b * s_gu + INTER + offs, mask=m, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(Out.dtype.element_ty).to(tl.float32)
        tl.store(Out + b * s_out + offs, (a * u).to(Out.dtype.element_ty), mask=m)

    @triton.jit
    def order_key(x, KEY_BITS: tl.constexpr):
        # float bits -> a signed int that orders like the float (negative floats: flip the magnitude bits)
        if KEY_BITS == 16:
            b = x.to(tl.int16, bitcast=True).to(tl.int32)
            return tl.where(b < 0, b ^ 0x7FFF, b)
        else:
            b = x.to(tl.int32, bitcast=True)
            return tl.where(b < 0, b ^ 0x7FFFFFFF, b)

    @triton.jit
    def sample_kernel(Logits, s_l, V, temperature, top_p, Seed, Tok, Lp,
                      TOP_P: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
        # One row: y = logits / T, p = softmax(y). Top-p nucleus = {key(x) >= lam} with lam the largest logit key
        # whose upper mass reaches top_p (tokens tied at the boundary are all kept), found by bisection over the
        # keys (<= KEY_BITS passes over the row, which stays in L2). Then a Gumbel race over the nucleus:
        # argmax y + g, g = -log(-log u). No sort, no host sync.
        row = tl.program_id(0)
        base = Logits + row * s_l
        ar = tl.arange(0, BLOCK)
        m = tl.full([], float("-inf"), tl.float32)
        kmin = tl.full([], 2147483647, tl.int32)
        kmax = tl.full([], -2147483647, tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + ar
            msk = offs < V
            x = tl.load(base + offs, mask=msk, other=0.0)
            y = tl.where(msk, x.to(tl.float32) / temperature, float("-inf"))
            m = tl.maximum(m, tl.max(y, 0))
            if TOP_P:
                k = order_key(x, KEY_BITS)
                kmin = tl.minimum(kmin, tl.min(tl.where(msk, k, 2147483647), 0))
                kmax = tl.maximum(kmax, tl.max(tl.where(msk, k, -2147483647), 0))
        z = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + ar
            msk = offs < V
            y = tl.load(base + offs, mask=msk, other=0.0).to(tl.float32) / temperature
            z += tl.sum(tl.where(msk, tl.exp(y - m), 0.0), 0)
        lam = tl.full([], 0, tl.int64)  # unused without top-p
        mass = z
        if TOP_P:
            lo = kmin.to(tl.int64)  # mass(key >= lo) = 1 >= top_p (int64: hi - lo overflows int32)
            hi = kmax.to(tl.int64) + 1  # mass(key >= hi) = 0 < top_p
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                s = tl.full([], 0.0, tl.float32)
                for start in range(0, V, BLOCK):
                    offs = start + ar
                    msk = offs < V
                    x = tl.load(base + offs, mask=msk, other=0.0)
                    y = x.to(tl.float32) / temperature
                    s += tl.sum(tl.where(msk & (order_key(x, KEY_BITS) >= mid), tl.exp(y - m), 0.0), 0)
                if s >= top_p * z:
                    lo = mid
                    mass = s
                else:
                    hi = mid
            lam = lo
        seed = tl.load(Seed)
        best = tl.full([], float("-inf"), tl.float32)
        best_i = tl.full([], 0, tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + ar
            msk = offs < V
            x = tl.load(base + offs, mask=msk, other=0.0)
            y = x.to(tl.float32) / temperature
            u = tl.rand(seed, row * V + offs)
            keep = msk
            if TOP_P:
                keep = keep & (order_key(x, KEY_BITS) >= lam)
            score = tl.where(keep, y - tl.log(-tl.log(u)), float("-inf"))
            b_max = tl.max(score, 0)
            b_arg = tl.argmax(score, 0)
            if b_max > best:
                best = b_max
                best_i = start + b_arg
        y_best = tl.load(base + best_i).to(tl.float32) / temperature
        tl.store(Tok + row, best_i.to(tl.int64))
        tl.store(Lp + row, y_best - m - tl.log(mass))




def sample_triton(logits: Tensor, temperature: float, top_p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """The contract of `sample` for temperature > 0, in one Triton program per row: logits (B, V) -> token (B,),
    logprob (B,) under the top-p nucleus of softmax(logits / T). Random numbers: Philox keyed by the device
    scalar `seed` (1,) int64, which the caller advances between calls."""
    assert temperature > 0, temperature
    kern = triton_kernels()
    B, V = logits.shape
    assert logits.stride(-1) == 1, logits.stride()
    tok = torch.empty(B, device=logits.device, dtype=torch.long)
    lp = torch.empty(B, device=logits.device, dtype=torch.float32)
    kern["sample"][(B,)](logits, logits.stride(0), V, float(temperature), float(top_p), seed, tok, lp,
                         TOP_P=top_p < 1.0, KEY_BITS=16 if logits.element_size() == 2 else 32, BLOCK=2048,
                         num_warps=8)
    return tok, lp


def add_rms_norm_triton(x: Tensor, delta: Tensor | None, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x (B, D) += delta (in place); -> (x, rms_norm(x) * w)."""
    kern = triton_kernels()
    B, D = x.shape
    assert x.stride(-1) == 1 and (delta is None or delta.stride(-1) == 1), (x.stride(), delta)
    h = torch.empty_like(x)
    kern["add_rms_norm"][(B,)](x, x if delta is None else delta, w, h, x.stride(0),
                               0 if delta is None else delta.stride(0), h.stride(0), D, eps,
                               HAS_DELTA=delta is not None, BLOCK=kern["next_pow2"](D), num_warps=8)
    return x, h


def silu_mul_triton(gu: Tensor) -> Tensor:
    """gu (B, 2I) = [gate | up] -> silu(gate) * up (B, I)."""
    kern = triton_kernels()
    B, two_i = gu.shape
    inter = two_i // 2
    out = torch.empty(B, inter, device=gu.device, dtype=gu.dtype)
    BLOCK = 1024
    kern["silu_mul"][(B, math.ceil(inter / BLOCK))](gu, out, gu.stride(0), out.stride(0), inter, BLOCK=BLOCK,
                                                     num_warps=4)
    return out


def qkv_post_triton(qkv: Tensor, q_norm: Tensor | None, k_norm: Tensor | None, cos: Tensor, sin: Tensor,
                    rpos: Tensor, slot: Tensor, kc: Tensor, vc: Tensor, n_heads: int, n_kv: int,
                    eps: float) -> Tensor:
    """qkv (B, (Hq + 2 Hkv) hd) -> q (B, Hq, hd) normed + rotated; k (normed, rotated) and v written into kc, vc
    (B, Hkv, S, hd) at column slot; cos, sin (S, hd) tables indexed by rpos (B,)."""
    kern = triton_kernels()
    B = qkv.shape[0]
    hd = kc.shape[-1]
    assert hd & (hd - 1) == 0 and hd >= 32, hd
    assert qkv.stride(-1) == 1 and kc.stride(-1) == 1 and vc.stride(-1) == 1 and cos.stride(-1) == 1
    q = torch.empty(B, n_heads, hd, device=qkv.device, dtype=qkv.dtype)
    qn = q_norm if q_norm is not None else q  # unused pointers when QK_NORM is off
    kn = k_norm if k_norm is not None else q
    kern["qkv_post"][(B, n_heads + 2 * n_kv)](
        qkv, qn, kn, cos, sin, rpos, slot, q, kc, vc, eps,
        qkv.stride(0), q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), cos.stride(0),
        HQ=n_heads, HKV=n_kv, HD=hd, QK_NORM=q_norm is not None, num_warps=1)
    return q


def add_rms_norm_torch(x: Tensor, delta: Tensor | None, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if delta is not None:
        x = x + delta
    return x, rms_norm(x, w, eps)


def silu_mul_torch(gu: Tensor) -> Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def qkv_post_torch(qkv: Tensor, q_norm: Tensor | None, k_norm: Tensor | None, cos: Tensor, sin: Tensor,
                   rpos: Tensor, slot: Tensor, kc: Tensor, vc: Tensor, n_heads: int, n_kv: int,
                   eps: float) -> Tensor:
    """The reference of qkv_post_triton (same contract)."""
    B = qkv.shape[0]
    hd = kc.shape[-1]
    q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
    q, k, v = q.view(B, n_heads, hd), k.view(B, n_kv, hd), v.view(B, n_kv, hd)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    c, sn = cos[rpos][:, None], sin[rpos][:, None]  # (B, 1, hd)
    q, k = q * c + rotate_half(q) * sn, k * c + rotate_half(k) * sn
    kc.index_copy_(2, slot, k[:, :, None])
    vc.index_copy_(2, slot, v[:, :, None])
    return q


def attn_split(batch: int, n_kv_heads: int, capacity: int, n_sm: int, block_n: int = 64) -> tuple[int, int]:
    """(chunk, n_split): enough programs to fill the GPU (about 8 per SM) when the batch alone does not."""
    want = max(1, math.ceil(8 * n_sm / (batch * n_kv_heads)))
    chunk = max(block_n, math.ceil(math.ceil(capacity / want) / block_n) * block_n)
    return chunk, math.ceil(capacity / chunk)


def attend_triton(q: Tensor, kc: Tensor, vc: Tensor, start: Tensor, end: Tensor, chunk: int, n_split: int) -> Tensor:
    """Flash-decoding attention, same contract as attend_torch. q (B, Hq, hd); kc, vc (B, Hkv, S, hd) with a
    contiguous last dim; start (B,) int64; end (1,) int64 (inclusive). -> (B, Hq, hd) in q's dtype."""
    kern = triton_kernels()
    B, Hq, hd = q.shape
    Hkv = kc.shape[1]
    G = Hq // Hkv
    assert kc.stride(-1) == 1 and vc.stride(-1) == 1 and q.stride(-1) == 1, (kc.stride(), vc.stride(), q.stride())
    assert hd & (hd - 1) == 0 and hd >= 16, hd
    o_part = torch.empty(B, Hq, n_split, hd, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, n_split, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, hd, device=q.device, dtype=q.dtype)
    kern["decode"][(B * Hkv, n_split)](
        q, kc, vc, start, end, o_part, lse, hd ** -0.5,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        CHUNK=chunk, G=G, BLOCK_G=max(16, kern["next_pow2"](G)), BLOCK_N=64, HD=hd, HKV=Hkv,
        num_warps=4, num_stages=2)
    kern["combine"][(B * Hq,)](
        o_part, lse, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), HQ=Hq, NS=n_split, BLOCK_S=max(2, kern["next_pow2"](n_split)), HD=hd,
        num_warps=4)
    return out


class StaticEngine:
    """Prefill + decode for one batch size and one KV capacity over a copy of the model's weights.

    KV cache (layers, B, kv_heads, capacity, head_dim), written by index. Decode state lives in device buffers
    (current token, cache slot, per-row rotary position, done flags, outputs) so one step is a fixed sequence of
    kernels: on CUDA it is captured once as a CUDA graph per sampling setting and replayed per token; the host checks
    "all done" every `check_every` steps only."""

    def __init__(self, model: nn.Module, batch: int, capacity: int, *, kernels: str = "auto", sampler: str = "auto",
                 graphs: bool | None = None, prefill_tokens: int = 16384, check_every: int = 16):
        self.spec = spec = model_spec(model)
        p = model.lm_head.weight
        self.device, self.dtype = p.device, p.dtype
        cuda = self.device.type == "cuda"
        self.kernels = ("triton" if cuda else "torch") if kernels == "auto" else kernels
        if self.kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be auto, torch or triton, got {kernels!r}")
        if self.kernels == "triton" and (spec.head_dim & (spec.head_dim - 1) or spec.head_dim < 32):
            raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 32, got {spec.head_dim}; "
                             "pass kernels='torch'")
        # the sort-based torch sampler costs ~0.2 ms + 18 us per row on an H100 (vocab 152k), the one-program-per-row
        # Triton sampler ~0.7 ms up to one wave of rows: the cut is near 30 rows (benchmarks/RESULTS.md)
        if sampler == "auto":
            sampler = "triton" if self.kernels == "triton" and batch >= SAMPLER_TRITON_MIN_BATCH else "torch"
        if sampler not in SAMPLERS[1:] or (sampler == "triton" and self.kernels != "triton"):
            raise ValueError(f"sampler must be auto, torch, or triton (with kernels='triton'), got {sampler!r}")
        self.sampler = sampler
        self.graphs = cuda if graphs is None else graphs
        if self.graphs and not cuda:
            raise ValueError("CUDA graphs need a CUDA model")
        self.B, self.S = batch, capacity
        self.prefill_tokens, self.check_every = prefill_tokens, check_every
        self.w = Weights(model, spec)
        self.cos, self.sin = self.w.rope_tables(capacity)  # (S, hd)
        dev, L, Hkv, hd = self.device, spec.n_layers, spec.n_kv_heads, spec.head_dim
        self.k_cache = torch.zeros(L, batch, Hkv, capacity, hd, device=dev, dtype=self.dtype)
        self.v_cache = torch.zeros(L, batch, Hkv, capacity, hd, device=dev, dtype=self.dtype)
        n_sm = torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 8
        self.chunk, self.n_split = attn_split(batch, Hkv, capacity, n_sm)
        # decode state
        z = dict(device=dev, dtype=torch.long)
        self.tok = torch.zeros(batch, **z)     # the token fed to the next step
        self.slot = torch.zeros(1, **z)        # its cache column (= the last valid key)
        self.rpos = torch.zeros(batch, **z)    # its rotary position per row (left padding skipped)
        self.col = torch.zeros(1, **z)         # the output column the next step writes
        self.start = torch.zeros(batch, **z)   # first valid cache column per row (= its left padding)
        self.done = torch.zeros(batch, device=dev, dtype=torch.bool)
        self.out_tok = torch.zeros(batch, capacity, **z)
        self.out_lp = torch.zeros(batch, capacity, device=dev, dtype=torch.float32)
        self.out_mask = torch.zeros(batch, capacity, device=dev, dtype=torch.bool)
        self.is_eos = torch.zeros(spec.vocab, device=dev, dtype=torch.bool)  # (V,) lookup table of eos ids
        self.rng = torch.zeros(1, **z)  # Philox seed of the Triton sampler, advanced once per step
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    # -- the transformer ------------------------------------------------------------------------------------------

    def _qkv(self, i: int, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D) -> q (B, Hq, T, hd), k, v (B, Hkv, T, hd), RoPE applied; cos, sin (B, T, hd)."""
        s, w = self.spec, self.w
        B, T, _ = x.shape
        hd, Hq, Hkv = s.head_dim, s.n_heads, s.n_kv_heads
        h = rms_norm(x, w.ln1[i], s.eps)
        qkv = F.linear(h, w.wqkv[i], None if w.bqkv is None else w.bqkv[i])  # (B, T, (Hq + 2 Hkv) hd)
        q, k, v = qkv.split([Hq * hd, Hkv * hd, Hkv * hd], dim=-1)
        q, k, v = q.view(B, T, Hq, hd), k.view(B, T, Hkv, hd), v.view(B, T, Hkv, hd)
        if w.q_norm is not None:
            q, k = rms_norm(q, w.q_norm[i], s.eps), rms_norm(k, w.k_norm[i], s.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        c, sn = cos[:, None], sin[:, None]  # (B, 1, T, hd)
        return q * c + rotate_half(q) * sn, k * c + rotate_half(k) * sn, v

    def _mlp(self, i: int, x: Tensor) -> Tensor:
        s, w = self.spec, self.w
        h = rms_norm(x, w.ln2[i], s.eps)
        gate, up = F.linear(h, w.wgu[i]).chunk(2, dim=-1)  # (..., I) each
        return F.linear(F.silu(gate) * up, w.wd[i])

    def prefill(self, ids: Tensor, mask: Tensor, rows: slice) -> Tensor:
        """ids, mask (b, P) left-padded prompts for cache rows `rows` -> logits (b, V) at the last column.
        Writes the cache columns [0, P) of those rows."""
        s, w = self.spec, self.w
        b, P = ids.shape
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)  # (b, P)
        cos, sin = self.cos[pos], self.sin[pos]  # (b, P, hd)
        causal = torch.ones(P, P, device=ids.device, dtype=torch.bool).tril()
        # a pad query sees only itself (no all-masked rows, no NaN); a real query sees real keys up to itself
        am = (causal[None] & mask[:, None, :]) | torch.eye(P, device=ids.device, dtype=torch.bool)[None]
        am = am[:, None]  # (b, 1, P, P)
        x = F.embedding(ids, w.embed)  # (b, P, D)
        G = s.n_heads // s.n_kv_heads
        for i in range(s.n_layers):
            q, k, v = self._qkv(i, x, cos, sin)
            self.k_cache[i, rows, :, :P] = k
            self.v_cache[i, rows, :, :P] = v
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=am)  # (b, Hq, P, hd)
            x = x + F.linear(o.transpose(1, 2).reshape(b, P, -1), w.wo[i])
            x = x + self._mlp(i, x)
        return F.linear(rms_norm(x[:, -1], w.norm, s.eps), w.lm_head)  # (b, V)

    def decode_one_token(self, n_keys: int | None = None) -> Tensor:
        """One step from the state buffers: the token `tok` at cache column `slot` -> logits (B, V).
        Per layer: norm, qkv GEMM, qkv_post (norm + RoPE + cache write), attention, o GEMM, add + norm, gate|up GEMM,
        silu * up, down GEMM, add + norm: 10 kernels with kernels="triton"."""
        s, w = self.spec, self.w
        B, L = self.B, s.n_layers
        tri = self.kernels == "triton"
        add_norm = add_rms_norm_triton if tri else add_rms_norm_torch
        silu_mul = silu_mul_triton if tri else silu_mul_torch
        qkv_post = qkv_post_triton if tri else qkv_post_torch
        x, h = add_norm(F.embedding(self.tok, w.embed), None, w.ln1[0], s.eps)  # (B, D) each
        for i in range(L):
            qkv = F.linear(h, w.wqkv[i], None if w.bqkv is None else w.bqkv[i])  # (B, (Hq + 2 Hkv) hd)
            q = qkv_post(qkv, None if w.q_norm is None else w.q_norm[i], None if w.k_norm is None else w.k_norm[i],
                         self.cos, self.sin, self.rpos, self.slot, self.k_cache[i], self.v_cache[i], s.n_heads,
                         s.n_kv_heads, s.eps)  # (B, Hq, hd)
            if tri:
                o = attend_triton(q, self.k_cache[i], self.v_cache[i], self.start, self.slot, self.chunk,
                                  self.n_split)
            else:
                o = attend_torch(q, self.k_cache[i], self.v_cache[i], self.start, self.slot, n_keys)
            x, h = add_norm(x, F.linear(o.reshape(B, -1), w.wo[i]), w.ln2[i], s.eps)
            m = silu_mul(F.linear(h, w.wgu[i]))  # (B, I)
            x, h = add_norm(x, F.linear(m, w.wd[i]), w.ln1[i + 1] if i + 1 < L else w.norm, s.eps)
        return F.linear(h, w.lm_head)  # (B, V)

    # -- sampling and bookkeeping ---------------------------------------------------------------------------------

    def _commit(self, logits: Tensor, temperature: float, top_p: float, pad_id: int) -> None:
        """Sample from logits (B, V), write output column `col`, update done flags, advance the state by one."""
        if self.sampler == "triton" and temperature > 0:
            tok, lp = sample_triton(logits, temperature, top_p, self.rng)  # (B,), (B,)
            self.rng += 1
        else:
            tok, lp = sample(logits, temperature, top_p)  # (B,), (B,)
        alive = ~self.done
        tok = torch.where(alive, tok, pad_id)
        lp = torch.where(alive, lp, 0.0)
        self.out_tok.index_copy_(1, self.col, tok[:, None])
        self.out_lp.index_copy_(1, self.col, lp[:, None])
        self.out_mask.index_copy_(1, self.col, alive[:, None])
        self.done |= self.is_eos[tok]
        self.tok.copy_(tok)
        self.col += 1

    def _report(self, rows: Tensor, n_cols: int, on_done: OnDone) -> None:
        """Hand the finished `rows` (B,) bool to on_done: their indices and tokens up to and including eos."""
        idx = rows.nonzero()[:, 0].tolist()
        sel = torch.tensor(idx, device=self.device)
        toks = self.out_tok[sel, :n_cols].tolist()
        mask = self.out_mask[sel, :n_cols].tolist()
        on_done(idx, [[t for t, m in zip(tr, mr, strict=True) if m] for tr, mr in zip(toks, mask, strict=True)])

    def _step(self, temperature: float, top_p: float, pad_id: int, n_keys: int | None = None) -> None:
        logits = self.decode_one_token(n_keys)
        self._commit(logits, temperature, top_p, pad_id)
        self.slot += 1
        self.rpos += 1

    def _graph(self, temperature: float, top_p: float, pad_id: int) -> torch.cuda.CUDAGraph:
        key = (temperature, top_p, pad_id, self.sampler)
        if key not in self._graphs:
            # warm up on a side stream (Triton compiles, cuBLAS picks kernels), then capture; the state these runs
            # leave behind is reset by every rollout
            self.slot.fill_(0)
            self.col.fill_(0)
            self.rpos.zero_()
            self.start.zero_()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(temperature, top_p, pad_id)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._step(temperature, top_p, pad_id)
            self._graphs[key] = g
        return self._graphs[key]

    @torch.no_grad()
    def run(self, model: nn.Module, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
            top_p: float, eos_ids: list[int], pad_id: int, seed: int, on_done: OnDone | None = None) -> Rollout:
        _check_args(max_new_tokens, temperature, top_p)
        ids, pmask = left_pad(prompt_ids, pad_id)
        B, P = ids.shape
        if B != self.B or P + max_new_tokens > self.S:
            raise ValueError(f"engine holds batch {self.B} x {self.S} positions; asked for {B} x ({P} + "
                             f"{max_new_tokens})")
        ids, pmask = ids.to(self.device), pmask.to(self.device)
        self.w.load(model)
        graph = self._graph(temperature, top_p, pad_id) if self.graphs else None
        n_real = pmask.long().sum(1)  # (B,)
        if any(not 0 <= e < self.spec.vocab for e in eos_ids):
            raise ValueError(f"eos ids must be in [0, {self.spec.vocab}), got {eos_ids}")
        self.is_eos.zero_()
        self.is_eos[list(eos_ids)] = True
        self.done.zero_()
        self.out_tok.fill_(pad_id)
        self.out_lp.zero_()
        self.out_mask.zero_()
        self.col.fill_(0)
        self.start.copy_(P - n_real)
        torch.manual_seed(seed)
        self.rng.fill_(int(torch.randint(0, 2**31 - 1, (1,))))
        logits = torch.empty(B, self.spec.vocab, device=self.device, dtype=self.dtype)
        mb = max(1, self.prefill_tokens // P)
        for b0 in range(0, B, mb):
            rows = slice(b0, min(B, b0 + mb))
            logits[rows] = self.prefill(ids[rows], pmask[rows], rows)
        self._commit(logits, temperature, top_p, pad_id)  # output column 0
        self.slot.fill_(P)  # token 0 goes to cache column P, at rotary position n_real
        self.rpos.copy_(n_real)
        reported = torch.zeros(B, dtype=torch.bool)  # rows already handed to on_done
        for t in range(1, max_new_tokens):
            if graph is not None:
                graph.replay()
            else:
                self._step(temperature, top_p, pad_id, n_keys=P + t)
            if t % self.check_every == 0:
                done = self.done.cpu()  # the one host sync of a check
                if on_done is not None and bool((done & ~reported).any()):
                    self._report(done & ~reported, t + 1, on_done)  # columns 0..t are written
                    reported |= done
                if bool(done.all()):
                    break
        T = max_new_tokens
        if on_done is not None and bool((~reported).any()):
            self._report(~reported, T, on_done)
        return Rollout(ids=torch.cat([ids, self.out_tok[:, :T]], dim=1), completion_mask=self.out_mask[:, :T].clone(),
                       logprobs=self.out_lp[:, :T].clone(), prompt_len=P, prompt_mask=pmask)


_ENGINES: weakref.WeakKeyDictionary[nn.Module, StaticEngine] = weakref.WeakKeyDictionary()


def engine_for(model: nn.Module, batch: int, need: int, **kw) -> StaticEngine:
    """The model's cached engine if it fits (same batch, capacity >= need), else a new one (capacity rounded up to
    a multiple of 256) that replaces it."""
    eng = _ENGINES.get(model)
    if eng is None or eng.B != batch or eng.S < need:
        _ENGINES.pop(model, None)
        eng = None  # free the old cache before allocating the new one
        eng = StaticEngine(model, batch, math.ceil(need / 256) * 256, **kw)
        _ENGINES[model] = eng
    return eng


def release(model: nn.Module) -> None:
    """Drop the model's cached engine (its weight copy, KV cache and graphs)."""
    _ENGINES.pop(model, None)


@torch.no_grad()
def generate_static(model: nn.Module, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                    top_p: float, eos_ids: list[int], pad_id: int, seed: int, on_done: OnDone | None = None
                    ) -> Rollout:
    _check_args(max_new_tokens, temperature, top_p)
    P = max((len(p) for p in prompt_ids), default=0)
    eng = engine_for(model, len(prompt_ids), P + max_new_tokens)
    return eng.run(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   eos_ids=eos_ids, pad_id=pad_id, seed=seed, on_done=on_done)


# ----------------------------------------------------------------------------------------------------------------
# entry point


ENGINES: tuple[str, ...] = ("auto", "static", "hf")
_FELL_BACK: set[str] = set()  # reasons already logged by pick_engine


def pick_engine(model: nn.Module, engine: str = "auto", *, cuda: bool | None = None) -> str:
    """The back end that runs `model` for the choice `engine` -> "static" or "hf".
    auto: static on CUDA when `static_support` accepts the model, else HF generate (the reason logged once); HF on
    CPU. static: static on any device, a ValueError naming the reason if the model is unsupported. hf: HF generate.
    `cuda` (default: where the model's weights are) decides auto's device."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {', '.join(ENGINES)}; pass auto, static or hf")
    if engine == "hf":
        return "hf"
    if cuda is None:
        cuda = next(model.parameters()).is_cuda
    if engine == "auto" and not cuda:
        return "hf"
    why = static_support(model)
    if why is None:
        return "static"
    if engine == "static":
        raise ValueError(f"engine=static cannot run this model: {why}; pass --engine auto (falls back to HF "
                         "generate) or --engine hf")
    if why not in _FELL_BACK:
        _FELL_BACK.add(why)
        logger.info(f"rollouts use HF generate, not the static CUDA-graph engine: {why}")
    return "hf"


def generate(model: nn.Module, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
             eos_ids: list[int], pad_id: int, seed: int, engine: str = "auto", backend: str | None = None,
             on_done: OnDone | None = None) -> Rollout:
    """Sample `max_new_tokens` tokens for each prompt. engine: "auto" (static on CUDA when the model is supported,
    else hf), "static", "hf" (see `pick_engine`); `backend` is its older name. Seeded: the same (model, prompts,
    seed, back end, device) gives the same rollout. `on_done(rows, ids)` gets each row's completion as soon as the
    back end knows it (static: rows that finished, every `check_every` tokens, the rest at the end; hf: all at the
    end), so its consumer (the grader) can start before the slowest row ends."""
    which = pick_engine(model, backend if backend is not None else engine)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_ids=list(eos_ids),
              pad_id=pad_id, seed=seed)
    if which == "hf":
        roll = generate_hf(model, prompt_ids, **kw)
        if on_done is not None:
            on_done(list(range(len(prompt_ids))), roll.completions())
        return roll
    return generate_static(model, prompt_ids, **kw, on_done=on_done)


def truncated_mask(completion_ids: list[list[int]], eos_ids: list[int], max_new_tokens: int) -> Tensor:
    """(B,) bool: True for completions cut at the budget, i.e. `max_new_tokens` long (or longer) and not ending in
    an eos. `completion_ids`: each row's tokens up to and including its first eos (`Rollout.completions()`,
    `train.teacher_tokens`)."""
    eos = set(eos_ids)
    return torch.tensor([len(c) >= max_new_tokens and not (c and c[-1] in eos) for c in completion_ids],
                        dtype=torch.bool)
