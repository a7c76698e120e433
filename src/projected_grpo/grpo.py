"""GRPO math as pure functions: group advantages, per-token log-probs, the clipped policy loss with K3 KL.

Dr.GRPO (the seed's default): A = R − mean_group(R), no std; the loss is summed over completion tokens and divided by
a fixed denominator G·max_new·prompts, so there is no length normalisation. Classic GRPO (the benchmark's verl
default): A = (R − mean) / (std + ε) and a token mean over the batch. Both are one `grpo_loss` with a different
`denom`, which also makes the loss additive over micro-batches and over the student / teacher halves of a group.

No model loading, no I/O.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

STD_EPS = 1e-6  # classic GRPO: A = (R - mean) / (std + STD_EPS), as verl
ZERO_VAR_TOL = 1e-6  # a group whose reward range is below this carries no signal and is skipped


def _group_mean(rewards: Float[Tensor, "P G"]) -> tuple[Bool[Tensor, "P G"], Float[Tensor, "P 1"]]:
    valid = ~torch.isnan(rewards)  # NaN = screened out: in no mean, no std, no advantage
    n = valid.sum(dim=1, keepdim=True).clamp(min=1)
    return valid, torch.where(valid, rewards, 0.0).sum(dim=1, keepdim=True) / n


def advantages_dr_grpo(rewards: Float[Tensor, "P G"]) -> Float[Tensor, "P G"]:
    """Dr.GRPO: A = R − mean over the group. NaN rewards (screened) get A = 0 and stay out of the mean."""
    valid, mean = _group_mean(rewards)
    return torch.where(valid, rewards - mean, 0.0)


def advantages_grpo(rewards: Float[Tensor, "P G"]) -> Float[Tensor, "P G"]:
    """Classic GRPO: A = (R − mean) / (std + 1e-6), std unbiased over the group (as verl). NaN as in Dr.GRPO."""
    valid, mean = _group_mean(rewards)
    n = valid.sum(dim=1, keepdim=True)
    dev = torch.where(valid, rewards - mean, 0.0)
    std = torch.sqrt((dev ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1))
    return dev / (std + STD_EPS)


ADVANTAGES = {"dr_grpo": advantages_dr_grpo, "grpo": advantages_grpo}


def zero_variance_groups(rewards: Float[Tensor, "P G"]) -> Bool[Tensor, " P"]:
    """True for groups with no learning signal: fewer than two unscreened rewards, or all equal (range < 1e-6)."""
    valid = ~torch.isnan(rewards)
    hi = torch.where(valid, rewards, -torch.inf).max(dim=1).values
    lo = torch.where(valid, rewards, torch.inf).min(dim=1).values
    return (valid.sum(dim=1) < 2) | ((hi - lo) < ZERO_VAR_TOL)


LOGPROB_CHUNK = 128
"""Completion positions per chunk of the output layer in `token_logprobs` (see there)."""

CHUNKED_HEADS = ("qwen2", "qwen3", "llama", "mistral")
"""Model types whose logits are exactly lm_head(final hidden state): no soft-capping or logit scaling, so the output
layer can run on chunks of the hidden states."""


def _picked_logprobs(head: nn.Module, h: Float[Tensor, "b c H"], targets: Int[Tensor, "b c"],
                     scale: float) -> Float[Tensor, "b c"]:
    """log softmax(head(h) / scale) at `targets`, in float32."""
    logits = head(h).float()  # (b, c, V)
    if scale != 1.0:
        logits = logits / scale
    return logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)


def right_aligned(ids: Int[Tensor, "b T"], attention_mask: Bool[Tensor, "b T"], n_prompt: int
                  ) -> tuple[Int[Tensor, "b T"], Int[Tensor, "b T_new"]]:
    """Each row's tokens moved to start at column 0 (its left padding wrapped round to the end), and for every
    completion column t >= n_prompt the column of the shifted row whose state predicts ids[:, t]. A causal model
    run on the shifted rows needs no attention mask: every real position sees exactly its own row's real tokens,
    at the positions the sampler gave them (0 at the first real token). `attention_mask`'s prompt columns must be
    left padding only (token_logprobs checks it)."""
    T = ids.shape[1]
    pad = n_prompt - attention_mask[:, :n_prompt].sum(dim=1)  # (b,)
    cols = torch.arange(T, device=ids.device)
    shifted = ids.gather(1, (cols[None] + pad[:, None]) % T)  # (b, T)
    pred = (n_prompt - 1 - pad)[:, None] + cols[None, :T - n_prompt]  # (b, T_new)
    return shifted, pred


def completion_extent(completion_mask: Bool[Tensor, "B T_new"]) -> Int[Tensor, " B"]:
    """Completion positions each row needs a log-prob at: through its last True (0 for a row with none)."""
    cols = torch.arange(1, completion_mask.shape[1] + 1, device=completion_mask.device)
    return (completion_mask.to(torch.long) * cols).amax(dim=1)


def length_order(attention_mask: Bool[Tensor, "B T"], completion_mask: Bool[Tensor, "B T_new"], n_prompt: int
                 ) -> Int[Tensor, " B"]:
    """The rows by the tokens a forward pass needs for them (real prompt + completion through its last masked
    position), longest first: micro-batches cut from this order hold rows of similar length, so each runs at about
    its own rows' length (`token_logprobs(completion_mask=...)`), and the first holds the peak memory."""
    need = attention_mask[:, :n_prompt].sum(dim=1) + completion_extent(completion_mask)  # (B,)
    return torch.sort(need, descending=True, stable=True).indices


def token_logprobs(model: nn.Module, ids: Int[Tensor, "B T"], n_prompt: int, micro_batch: int,
                   attention_mask: Bool[Tensor, "B T"] | None = None, *, temperature: float = 1.0,
                   completion_mask: Bool[Tensor, "B T_new"] | None = None) -> Float[Tensor, "B T_new"]:
    """log p_T(ids[:, t] | ids[:, :t]) for the completion columns t >= n_prompt, in float32, where p_T =
    softmax(logits / T) is the distribution the rollouts were sampled at (as TRL and verl compute it; top-p is not
    applied). `temperature` 0 means greedy sampling and uses T = 1. `attention_mask` is False on each row's left
    padding (what follows a row's end is masked by the caller's completion mask, not here).

    The model never gets a padding mask: each micro-batch is run right-aligned (`right_aligned`: real tokens from
    column 0, padding at the end) under a plain causal mask. A left-padded row has query positions that may attend
    to nothing; fused attention kernels can return NaN gradients for such fully masked rows, and through the knobs'
    shared parameters one such row poisons the whole step's gradient although the loss never reads it. Plain
    causal attention also takes the faster kernels.

    Runs `micro_batch` rows at a time over the completion positions only, so the full (B, T, V) logits are never
    held. For the model types in CHUNKED_HEADS the output layer and the float32 log-softmax run on LOGPROB_CHUNK
    positions at a time, each chunk recomputed in the backward pass instead of kept (torch.utils.checkpoint): with a
    150k vocabulary that is the difference between ~0.6 GB and ~8 GB of logits and their copies per micro-batch of
    8 × 512 positions. Keeps the autograd graph (call under `torch.no_grad()` for reference / old log-probs).

    `completion_mask` (the caller's, True where a log-prob is used): each micro-batch runs only the columns its rows
    need (through their last True: the padding after the micro-batch's longest row is never computed), and the
    positions after a row's last True are 0. Completions are often far shorter than the longest one of a step;
    cutting micro-batches from rows of similar length (`length_order`) makes that most of the saving."""
    B, T = ids.shape
    t_new = T - n_prompt
    assert 0 < n_prompt < T and micro_batch >= 1, (n_prompt, T, micro_batch)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    scale = temperature if temperature > 0 else 1.0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    chunked = (getattr(getattr(model, "config", None), "model_type", None) in CHUNKED_HEADS and head is not None
               and body is not None and body is not model)
    attention_mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool)
    if not bool((attention_mask[:, 1:n_prompt].int() >= attention_mask[:, :n_prompt - 1].int()).all()):
        raise ValueError("token_logprobs: the attention mask of the prompt columns must be left padding only "
                         "(False then True); got a gap inside a prompt")
    if completion_mask is not None and completion_mask.shape != (B, t_new):
        raise ValueError(f"token_logprobs: completion_mask is {tuple(completion_mask.shape)}, expected {(B, t_new)}")
    extent = (completion_extent(completion_mask) if completion_mask is not None else  # (B,): positions kept per row
              torch.full((B,), t_new, device=ids.device))
    out = []
    for i in range(0, B, micro_batch):
        x, am = ids[i:i + micro_batch], attention_mask[i:i + micro_batch]  # (b, T)
        e = extent[i:i + micro_batch].to(x.device)  # (b,)
        t_keep = max(1, int(e.max()))  # completion positions
        targets = x[:, n_prompt:n_prompt + t_keep]  # (b, t_keep)
        shifted, pred = right_aligned(x, am, n_prompt)  # (b, T), (b, t_new)
        last = pred.gather(1, (e - 1).clamp(min=0)[:, None])[:, 0]  # (b,): the column predicting a row's last kept one
        L = max(1, int(torch.where(e > 0, last + 1, 1).max()))  # the columns run; the rest never is
        pred = pred[:, :t_keep].clamp(max=L - 1)  # (b, t_keep); positions past a row's end (zeroed below) read any
        kw = dict(input_ids=shifted[:, :L], position_ids=torch.arange(L, device=x.device).expand(x.shape[0], L),
                  use_cache=False)
        if not chunked:
            first = int(pred.min())  # the earliest predicting column of any row: keep the logits from there on
            logits = model(**kw, logits_to_keep=L - first).logits  # (b, L - first, V)
            logits = logits.gather(1, (pred - first)[..., None].expand(-1, -1, logits.shape[-1]))  # (b, t_keep, V)
            lp = _picked_logprobs(nn.Identity(), logits, targets, scale)  # (b, t_keep)
        else:
            h = body(**kw).last_hidden_state  # (b, L, H)
            h = h.gather(1, pred[..., None].expand(-1, -1, h.shape[-1]))  # (b, t_keep, H): the states predicting
            parts = []
            for c in range(0, t_keep, LOGPROB_CHUNK):
                hc, tc = h[:, c:c + LOGPROB_CHUNK], targets[:, c:c + LOGPROB_CHUNK]
                if torch.is_grad_enabled() and hc.requires_grad:
                    parts.append(torch.utils.checkpoint.checkpoint(_picked_logprobs, head, hc, tc, scale,
                                                                   use_reentrant=False))
                else:
                    parts.append(_picked_logprobs(head, hc, tc, scale))
            lp = torch.cat(parts, dim=1)  # (b, t_keep)
        lp = torch.where(torch.arange(t_keep, device=lp.device)[None] < e[:, None], lp, 0.0)  # 0 past a row's end
        out.append(torch.nn.functional.pad(lp, (0, t_new - t_keep)))  # (b, t_new)
    return torch.cat(out, dim=0)


def grpo_loss(logp: Float[Tensor, "B T"], logp_old: Float[Tensor, "B T"], logp_ref: Float[Tensor, "B T"] | None,
              adv: Float[Tensor, " B"], mask: Bool[Tensor, "B T"], *, clip: float, beta: float,
              denom: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss + β·K3 KL to the reference, summed over masked tokens and divided by `denom`.

    per token: −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·(exp(ref − logp) − (ref − logp) − 1), ρ = exp(logp − logp_old).
    With logp_old = logp.detach() (one update per batch) ρ ≡ 1 in value and the gradient is A·∇logp.
    Positions outside `mask` are selected away (torch.where), never multiplied by 0: a padded position may hold
    ±inf or NaN log-probs, and inf·0 = NaN would poison the loss and, through the backward, the whole gradient. logp
    is also replaced by 0 there before any arithmetic, so the padded positions get an exact 0 gradient.
    Returns (loss, stats) with stats summed over tokens (not divided), so micro-batches add up:
    kl_sum, pg_sum, clipped (count), tokens (count)."""
    assert logp.shape == logp_old.shape == mask.shape and adv.shape == logp.shape[:1], (
        logp.shape, logp_old.shape, mask.shape, adv.shape)
    assert denom > 0, denom
    mask = mask.to(torch.bool)
    zero = logp.new_zeros(())
    logp = torch.where(mask, logp, zero)  # (B, T): no inf/NaN gradient reaches the padded inputs
    ratio = torch.exp(logp - logp_old)  # (B, T)
    a = adv[:, None].to(logp.dtype)  # (B, 1)
    pg = torch.where(mask, -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a), zero)  # (B, T)
    if logp_ref is None:
        kl = torch.zeros_like(logp)
    else:
        d = logp_ref - logp  # (B, T)
        kl = torch.where(mask, torch.exp(d) - d - 1, zero)  # K3, >= 0, unbiased for KL(pi || ref)
    loss = (pg + beta * kl).sum() / denom
    clipped = mask & ((ratio - ratio.clamp(1 - clip, 1 + clip)).abs() > 0)
    stats = {"kl_sum": kl.sum().detach(), "pg_sum": pg.sum().detach(),
             "clipped": clipped.sum().to(logp.dtype).detach(), "tokens": mask.sum().to(logp.dtype).detach()}
    return loss, stats


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int
                  ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Left-pad prompts and right-pad completions -> ids (B, Tp+Tc), attention (B, Tp+Tc) bool,
    completion mask (B, Tc) bool, Tp."""
    tp, tc = max(map(len, prompts)), max(1, max(map(len, completions)))
    ids = torch.full((len(prompts), tp + tc), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids, dtype=torch.bool)
    cmask = torch.zeros((len(prompts), tc), dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[b, tp - len(p):tp] = torch.tensor(p)
        ids[b, tp:tp + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[b, tp - len(p):] = True
        cmask[b, :len(c)] = True
    return ids, attn, cmask, tp
