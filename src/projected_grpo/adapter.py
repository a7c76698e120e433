"""The SVD knob: the only trainable parameters of a run.

For every target Linear, W = U Σ Vh is computed once in float32 (and cached on disk, keyed by a hash of W and the
model id). U and Vh become frozen buffers; two zero-initialised vectors δS and δS_hack ∈ ℝ^r are the knobs, and a
forward hook adds

    y = W x + U · diag(δS + δS_hack) · Vh · x

W itself is never rebuilt. With both knobs at zero the added term is exactly zero, so the model is bit-identical to
the base model: the KL reference is the same model under `zeroed(knobs)`, with no second copy. δS_hack is the routing
quarantine: it moves only when a projection hook writes its gradient, and `ablate_quarantine` zeroes it at deploy.

`merged(knobs)` folds the knob into W (and back, bit-exactly) so a fast generation engine sees plain Linears.
`folded(knobs)` does the same for a forward and backward pass of training: each Linear runs one GEMM with the folded
W, and the hook adds only the knob's gradient, ∂L/∂δS = Σ_t (g_t U) ⊙ (Vh x_t), in the backward pass (at full rank
the unfolded hook costs about 1.3 base GEMMs more in the forward and again in the backward).
Knows nothing of GRPO or of the hack direction V.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from jaxtyping import Float
from loguru import logger
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from projected_grpo.config import DEFAULT_TARGETS, AdapterConfig, cache_lock, default_cache_dir  # noqa: E402,F401


class SVDKnob(nn.Module):
    """δS, δS_hack on the SVD basis of one Linear. Registered as the Linear's child `svd_knob` (so `.to()` moves it)."""

    def __init__(self, U: Float[Tensor, "d_out r"], S: Float[Tensor, " r"], Vh: Float[Tensor, "r d_in"],
                 w_sha256: str, dtype: torch.dtype):
        super().__init__()
        assert U.shape[1] == S.shape[0] == Vh.shape[0], (U.shape, S.shape, Vh.shape)
        self.register_buffer("U", U.to(dtype).contiguous())  # (d_out, r), frozen
        self.register_buffer("Vh", Vh.to(dtype).contiguous())  # (r, d_in), frozen
        self.register_buffer("S", S.float().contiguous())  # (r,) singular values of W, for diagnostics
        self.dS = nn.Parameter(torch.zeros(S.shape[0], dtype=torch.float32, device=U.device))
        self.dS_hack = nn.Parameter(torch.zeros(S.shape[0], dtype=torch.float32, device=U.device))
        self.w_sha256 = w_sha256
        self.active = True  # False while merged into W: the hook then adds nothing
        self.quiet = False  # True while zeroed: δS = δS_hack = 0, so the hook skips its two GEMMs (exactly)
        self.folded = False  # True inside folded(): W holds W + delta, the hook adds only the backward's ∂L/∂δS
        self._w_saved: Tensor | None = None
        self._owner: weakref.ref[nn.Linear] | None = None  # set by attach(); a weakref, so not a child module
        self._handle: RemovableHandle | None = None  # the Linear's forward hook; removed while merged

    @property
    def linear(self) -> nn.Linear:
        lin = self._owner() if self._owner is not None else None
        assert isinstance(lin, nn.Linear), "knob is not attached to a Linear (use attach())"
        return lin

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def delta(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        s = (self.dS + self.dS_hack).to(x.dtype)  # (r,)
        return ((x @ self.Vh.T) * s) @ self.U.T  # (..., r) -> (..., d_out)

    def delta_weight(self) -> Float[Tensor, "d_out d_in"]:
        """U diag(δS+δS_hack) Vh in float32. For a half-precision model on a GPU the product runs on TF32 tensor
        cores: Vh (bf16/fp16) is exact in TF32 and U·s is rounded to 2^-11 relative, far below the half-precision
        rounding of W + delta; a full-rank fold of a 4B model is ~18 TFLOP, ~0.3 s per step in plain float32."""
        s = (self.dS + self.dS_hack).detach().float()  # (r,)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.U.dtype in (torch.bfloat16, torch.float16) or prev
        try:
            return (self.U.float() * s) @ self.Vh.float()  # (d_out, r) * (r,) @ (r, d_in)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + U diag(δS+δS_hack) Vh (in float32, rounded once to W's dtype); the hook goes quiet."""
        assert self.active and self._w_saved is None, "knob is already merged"
        self._fold_into_w()
        self.active = False
        if self._handle is not None:  # a plain Linear while merged: an engine may refuse hooked Linears
            self._handle.remove()
            self._handle = None

    @torch.no_grad()
    def fold(self) -> None:
        """W <- W + U diag(δS+δS_hack) Vh as `merge`, but the hook stays: it passes the output through and adds
        the knob's gradient in the backward pass."""
        assert self.active and not self.quiet and self._w_saved is None, "knob is already merged, folded or zeroed"
        self._fold_into_w()
        self.folded = True

    @torch.no_grad()
    def unfold(self) -> None:
        assert self.folded and self._w_saved is not None, "knob is not folded"
        self._restore_w()
        self.folded = False

    def _fold_into_w(self) -> None:
        """Save W, then W <- W + delta in place (float32 sum, rounded once to W's dtype)."""
        w = self.linear.weight.data
        self._w_saved = w.clone()
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))  # in place: tensor pointers stay valid

    def _restore_w(self) -> None:
        """W back to the saved copy, bit-exactly and in place (a captured engine keeps valid pointers)."""
        self.linear.weight.data.copy_(self._w_saved)
        self._w_saved = None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W bit-exactly and reactivate the hook."""
        assert not self.active and self._w_saved is not None, "knob is not merged"
        self._restore_w()
        self.active = True
        self._handle = self.linear.register_forward_hook(_hook)


class _FoldedGrad(torch.autograd.Function):
    """Identity on a folded Linear's output; its backward gives s = δS + δS_hack the gradient
    Σ_t (g_t U) ⊙ (x_t Vhᵀ) (float32), which the unfolded hook's autograd would. x's gradient flows through the
    Linear itself (its W holds the fold)."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, s: Tensor, U: Tensor, Vh: Tensor) -> Tensor:
        ctx.save_for_backward(x, U, Vh)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, U, Vh = ctx.saved_tensors
        gU = (g @ U).float().reshape(-1, U.shape[1])  # (tokens, r)
        xV = (x @ Vh.T).float().reshape(-1, U.shape[1])  # (tokens, r)
        return g, None, (gU * xV).sum(dim=0), None, None


def _hook(linear: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    knob: SVDKnob = linear.svd_knob
    if not knob.active or knob.quiet:
        return output
    if knob.folded:
        return _FoldedGrad.apply(output, inputs[0], knob.dS + knob.dS_hack, knob.U, knob.Vh)
    return output + knob.delta(inputs[0])


def _w_sha256(w: Tensor) -> str:
    b = w.detach().contiguous().cpu().view(torch.uint8).numpy()  # raw bytes, any dtype
    h = hashlib.sha256(str(w.dtype).encode() + str(tuple(w.shape)).encode())
    h.update(memoryview(b.reshape(-1)))
    return h.hexdigest()


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model_id).strip("-") or "model"


def svd_cached(w: Float[Tensor, "d_out d_in"], model_id: str, rank_cap: int | None,
               svd_dir: Path, sha: str | None = None) -> tuple[Tensor, Tensor, Tensor, str]:
    """(U (d_out, r), S (r,), Vh (r, d_in), sha256 of W) on W's device, U and Vh in W's dtype (the knob's; W's hash
    names its dtype, so an entry serves one dtype) and S in float32; computed once in float32, then read from disk.

    The file is keyed by W's hash (`sha`, when the caller has it already) and the model id; its metadata must name
    the same model, hash and shape, else it is a stale or foreign entry and loading fails (delete the file to
    recompute)."""
    sha = _w_sha256(w) if sha is None else sha
    r = min(w.shape) if rank_cap is None else min(rank_cap, *w.shape)
    path = svd_dir / _slug(model_id) / f"{sha[:32]}-r{r}.safetensors"
    want = {"model_id": model_id, "w_sha256": sha, "shape": f"{w.shape[0]}x{w.shape[1]}", "rank": str(r)}
    if not path.exists():  # jobs starting side by side on a fresh cache: one computes each entry, the others read it
        with cache_lock(path.parent / ".svd.lock"):
            if not path.exists():
                return (*_svd_to(path, w, r, want), sha)
    with safe_open(str(path), framework="pt") as sf:  # metadata first
        meta = sf.metadata() or {}
    bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if bad:
        raise ValueError(f"stale or foreign SVD cache entry {path}: (found, expected) {bad}; delete it to recompute")
    t = load_file(path, device=str(w.device))
    return t["U"], t["S"], t["Vh"], sha


def _svd_to(path: Path, w: Tensor, r: int, meta: dict[str, str]) -> tuple[Tensor, Tensor, Tensor]:
    """The truncated SVD of w (computed in float32; U and Vh then in w's dtype; on w's device), written atomically
    to `path` with `meta`."""
    U, S, Vh = torch.linalg.svd(w.detach().float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    # a half-precision model's factors are kept (and read back) in its dtype: half the bytes of a job's start-up
    U, S, Vh = U[:, :r].to(w.dtype).contiguous(), S[:r].contiguous(), Vh[:r].to(w.dtype).contiguous()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"U": U.cpu(), "S": S.cpu(), "Vh": Vh.cpu()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return U, S, Vh


def attach(model: nn.Module, cfg: AdapterConfig, model_id: str) -> dict[str, SVDKnob]:
    """Put a knob on every target Linear and freeze everything else. Returns module name -> knob (model order)."""
    for p in model.parameters():
        p.requires_grad_(False)
    knobs: dict[str, SVDKnob] = {}
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.targets]
    # every W's sha256 (its SVD cache key) first, in threads: hashlib lets go of the GIL, and hashing a 1.5B model's
    # Linears one after another is ~1.5 s of a job's start-up
    with ThreadPoolExecutor(max(1, min(8, torch.get_num_threads()))) as pool:
        shas = list(pool.map(lambda m: _w_sha256(m.weight), [m for _, m in targets]))
    for (name, mod), sha in zip(targets, shas, strict=True):
        assert not hasattr(mod, "svd_knob"), f"{name} already has a knob"
        U, S, Vh, sha = svd_cached(mod.weight, model_id, cfg.rank_cap, cfg.svd_dir, sha=sha)
        knob = SVDKnob(U, S, Vh, sha, dtype=mod.weight.dtype)
        knob._owner = weakref.ref(mod)
        mod.add_module("svd_knob", knob)
        knob._handle = mod.register_forward_hook(_hook)
        knobs[name] = knob
    if not knobs:
        raise ValueError(f"no nn.Linear named like {cfg.targets} in the model; pass --adapter.targets with the model's "
                         "projection names")
    n = sum(k.rank for k in knobs.values())
    logger.debug(f"adapter: {len(knobs)} knobs, {n} trainable δS entries (+{n} δS_hack), rank_cap={cfg.rank_cap}")
    return knobs


def knob_params(knobs: dict[str, SVDKnob]) -> list[Tensor]:
    """All trainable tensors, in a fixed order: dS then dS_hack of each module."""
    return [p for k in knobs.values() for p in (k.dS, k.dS_hack)]


@contextlib.contextmanager
def zeroed(knobs: dict[str, SVDKnob]) -> Iterator[None]:
    """Both knobs at zero inside: the exact base model (the free KL reference). The hooks go quiet meanwhile, so a
    reference forward costs a plain forward (the knob's delta would be exactly zero)."""
    assert not any(k.folded for k in knobs.values()), "zeroed() inside folded(): W still holds the fold"
    saved = [(k.dS.data.clone(), k.dS_hack.data.clone(), k.quiet) for k in knobs.values()]
    try:
        for k in knobs.values():
            k.dS.data.zero_()
            k.dS_hack.data.zero_()
            k.quiet = True
        yield
    finally:
        for k, (a, b, q) in zip(knobs.values(), saved, strict=True):
            k.dS.data.copy_(a)
            k.dS_hack.data.copy_(b)
            k.quiet = q


@contextlib.contextmanager
def ablate_quarantine(knobs: dict[str, SVDKnob]) -> Iterator[None]:
    """δS_hack at zero inside: the deployed model of the route arm."""
    assert not any(k.folded for k in knobs.values()), "ablate_quarantine() inside folded(): W still holds the fold"
    saved = [k.dS_hack.data.clone() for k in knobs.values()]
    try:
        for k in knobs.values():
            k.dS_hack.data.zero_()
        yield
    finally:
        for k, b in zip(knobs.values(), saved, strict=True):
            k.dS_hack.data.copy_(b)


@contextlib.contextmanager
def merged(knobs: dict[str, SVDKnob]) -> Iterator[None]:
    """Knobs folded into W inside (plain Linears, hooks quiet), W restored bit-exactly on exit."""
    with _each(knobs, SVDKnob.merge, SVDKnob.unmerge):
        yield


@contextlib.contextmanager
def folded(knobs: dict[str, SVDKnob]) -> Iterator[None]:
    """Knobs folded into W for a training forward and backward (run the backward inside): the same outputs and
    knob gradients as the hooks, up to W's rounding, for one GEMM per Linear in the forward. W restored bit-exactly
    on exit. The knobs must not change inside."""
    with _each(knobs, SVDKnob.fold, SVDKnob.unfold):
        yield


@contextlib.contextmanager
def _each(knobs: dict[str, SVDKnob], enter, leave) -> Iterator[None]:
    """enter(k) for every knob, leave(k) on exit for each one entered (also when a later enter fails)."""
    done: list[SVDKnob] = []
    try:
        for k in knobs.values():
            enter(k)
            done.append(k)
        yield
    finally:
        for k in done:
            leave(k)


def fingerprint(model_id: str, knobs: dict[str, SVDKnob]) -> str:
    """Identifies (model, adapter basis): model id, module names, ranks and W hashes. For V metadata and caches."""
    h = hashlib.sha256(model_id.encode())
    for name, k in knobs.items():
        h.update(f"|{name}:{k.rank}:{k.w_sha256}".encode())
    return h.hexdigest()[:16]
