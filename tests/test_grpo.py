"""GRPO math against hand-computed numbers; per-token log-probs against a naive full-logits computation and the
sampler; KL 0 at step 0; a tiny model overfits a fixed batch."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from projected_grpo import adapter, grpo  # noqa: E402
from projected_grpo.adapter import AdapterConfig  # noqa: E402


def tiny_qwen3(seed: int = 0):
    cfg = transformers.Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
                                   initializer_range=0.1)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


# --- advantages ----------------------------------------------------------------------------------------------------


def test_dr_grpo_advantages_by_hand():
    R = torch.tensor([[0.0, 3.5, 0.5, 3.5], [3.0, 3.0, 3.0, 3.0]])
    A = grpo.advantages_dr_grpo(R)
    # group 0: mean 7.5/4 = 1.875
    assert A.tolist() == [[-1.875, 1.625, -1.375, 1.625], [0.0, 0.0, 0.0, 0.0]]
    assert grpo.zero_variance_groups(R).tolist() == [False, True]


def test_classic_grpo_advantages_by_hand():
    R = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    # mean 1.5, unbiased std sqrt(5/3)
    std = math.sqrt(5 / 3)
    want = [(r - 1.5) / (std + 1e-6) for r in (0.0, 1.0, 2.0, 3.0)]
    torch.testing.assert_close(grpo.advantages_grpo(R), torch.tensor([want]))
    assert torch.equal(grpo.advantages_grpo(torch.full((1, 3), 2.0)), torch.zeros(1, 3))


def test_screened_nan_rewards_are_left_out_of_the_group():
    R = torch.tensor([[0.0, float("nan"), 3.0, 3.0], [float("nan"), 3.5, float("nan"), float("nan")]])
    A = grpo.advantages_dr_grpo(R)
    assert A.tolist() == [[-2.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    # group 0 unscreened: 0, 3, 3 -> mean 2, unbiased std sqrt(3)
    s = math.sqrt(3.0)
    torch.testing.assert_close(grpo.advantages_grpo(R)[0], torch.tensor([-2 / (s + 1e-6), 0.0, 1 / (s + 1e-6),
                                                                         1 / (s + 1e-6)]))
    assert grpo.zero_variance_groups(R).tolist() == [False, True]  # one unscreened reward: no signal


# --- loss ----------------------------------------------------------------------------------------------------------


def test_dr_grpo_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([2.0, -1.0])
    ref = logp.detach() + math.log(2.0)  # ref − logp = ln 2 on every token
    G, max_new, P = 2, 3, 1
    denom = G * max_new * P
    loss, st = grpo.grpo_loss(logp, logp.detach(), ref, adv, mask, clip=0.2, beta=0.1, denom=denom)
    # ratio ≡ 1: pg = −A per token; K3 = 2 − ln2 − 1 per token; 5 masked tokens
    k3 = 1 - math.log(2.0)
    want = (-(2.0 * 3) - (-1.0 * 2) + 0.1 * 5 * k3) / denom
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert st["tokens"].item() == 5 and st["kl_sum"].item() == pytest.approx(5 * k3, rel=1e-6)
    loss.backward()
    # d loss / d logp = (−A + β(1 − exp(ref − logp))) · mask / denom = (−A − β) · mask / denom
    want_grad = (-adv[:, None] - 0.1) * mask / denom
    torch.testing.assert_close(logp.grad, want_grad)


def test_clipping_by_hand():
    logp = torch.tensor([[math.log(1.5)], [math.log(0.5)]], requires_grad=True)
    old = torch.zeros(2, 1)
    adv = torch.tensor([1.0, 1.0])
    mask = torch.ones(2, 1, dtype=torch.bool)
    loss, st = grpo.grpo_loss(logp, old, None, adv, mask, clip=0.2, beta=0.0, denom=1.0)
    # row 0: ratio 1.5 > 1.2 with A > 0 -> min(1.5, 1.2) = 1.2, no gradient; row 1: ratio 0.5 -> 0.5, gradient 0.5
    assert loss.item() == pytest.approx(-(1.2 + 0.5))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [-0.5]]))
    assert st["clipped"].item() == 2  # both ratios lie outside [0.8, 1.2]


def _padded_case():
    """Row 1's last two columns are padding; there the picked log-prob is −inf (logit −inf), and the reference holds
    +inf / the old log-prob NaN. Returns (logits leaf, targets, mask, ref, old_fix) with the real positions finite."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, generator=g)
    targets = torch.randint(0, 5, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    logits[1, 2, targets[1, 2]] = -torch.inf  # log p = −inf at a padded position
    logits[1, 3, targets[1, 3]] = -torch.inf
    ref = torch.log_softmax(torch.randn(2, 4, 5, generator=g), -1).gather(-1, targets[..., None])[..., 0]
    ref[1, 2] = torch.inf
    ref[1, 3] = -torch.inf
    return logits.requires_grad_(True), targets, mask, ref


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_padded_inf_logprobs_give_a_finite_loss_and_finite_gradients(beta):
    logits, targets, mask, ref = _padded_case()
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]  # (2, 4)
    assert torch.isinf(logp[1, 2:]).all()
    old = logp.detach().clone()
    old[1, 3] = torch.nan
    adv = torch.tensor([1.0, -2.0])
    loss, st = grpo.grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=beta, denom=8.0)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in st.values())
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[1, 2:] == 0).all()
    # the real positions see exactly the loss of the real tokens alone
    clean = logits.detach().clone()
    clean[1, 2:] = 0.0
    clean.requires_grad_(True)
    lp2 = torch.log_softmax(clean, -1).gather(-1, targets[..., None])[..., 0]
    ref2 = torch.where(mask, ref, 0.0)
    loss2, st2 = grpo.grpo_loss(lp2, lp2.detach(), ref2, adv, mask, clip=0.2, beta=beta, denom=8.0)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(logits.grad[mask], clean.grad[mask])
    assert st["tokens"].item() == 6 and st["clipped"].item() == 0  # ratio ≡ 1 on the real tokens
    for key in ("kl_sum", "pg_sum"):
        assert st[key].item() == pytest.approx(st2[key].item())


# --- per-token log-probs -------------------------------------------------------------------------------------------


def naive_logprobs_with_grad(model, ids, attn, n_prompt, temperature=1.0):
    """The whole-logits computation with the left-padded rows as they are and a padding mask."""
    pos = (attn.long().cumsum(dim=1) - 1).clamp(min=0)  # 0 at each row's first real token, as the sampler
    logits = model(input_ids=ids, attention_mask=attn.long(), position_ids=pos).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return logp[:, n_prompt - 1:]


def naive_logprobs(model, ids, attn, n_prompt, temperature=1.0):
    with torch.no_grad():
        return naive_logprobs_with_grad(model, ids, attn, n_prompt, temperature)


def test_token_logprobs_matches_naive_and_is_microbatch_independent():
    model = tiny_qwen3()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (5, 12), generator=g)
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[1, :3] = False  # left padding
    attn[3, :5] = False
    ids[~attn] = 0
    n_prompt = 7
    want = naive_logprobs(model, ids, attn, n_prompt)
    with torch.no_grad():
        got1 = grpo.token_logprobs(model, ids, n_prompt, micro_batch=1, attention_mask=attn)
        got5 = grpo.token_logprobs(model, ids, n_prompt, micro_batch=5, attention_mask=attn)
    assert got1.shape == (5, 5) and got1.dtype == torch.float32
    torch.testing.assert_close(got1, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got5, got1, atol=1e-5, rtol=0)
    attn[4, 2] = False  # a gap inside a prompt is not left padding: refused, not silently mis-aligned
    with pytest.raises(ValueError, match="left padding only"):
        grpo.token_logprobs(model, ids, n_prompt, micro_batch=5, attention_mask=attn)


def test_chunked_output_layer_matches_whole_logits_in_value_and_gradient(tmp_path, monkeypatch):
    """The output layer on LOGPROB_CHUNK positions at a time (recomputed in backward) gives the same log-probs and
    knob gradients as the whole-logits path, and never sees more than a chunk of positions at once."""
    model = tiny_qwen3()
    knobs = adapter.attach(model, AdapterConfig(cache_dir=str(tmp_path)), "tiny-grpo")
    for k in knobs.values():
        k.dS.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 50, (3, 14), generator=g)
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[1, :4] = False
    ids[~attn] = 0
    n_prompt, weights = 6, torch.randn(3, 8, generator=g)

    def run():
        for k in knobs.values():
            k.dS.grad = None
        lp = grpo.token_logprobs(model, ids, n_prompt, 2, attn, temperature=0.7)  # (3, 8)
        (lp * weights).sum().backward()
        return lp.detach(), [k.dS.grad.clone() for k in knobs.values()]

    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    monkeypatch.setattr(grpo, "LOGPROB_CHUNK", 3)
    lp_c, g_c = run()
    assert seen and max(seen) <= 3, seen  # 8 positions in chunks of 3 (and their recomputation in backward)
    monkeypatch.setattr(grpo, "CHUNKED_HEADS", ())
    seen.clear()
    lp_w, g_w = run()
    assert max(seen) == 8 + 4  # whole logits from the earliest predicting column (the row with 4 left pads) to the
    # last one (the last token predicts nothing and is not run)
    torch.testing.assert_close(lp_c, lp_w, atol=1e-5, rtol=0)
    for a, b in zip(g_c, g_w, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _ragged_batch(seed: int = 5):
    """Left-padded prompts of several lengths and completions ending at several positions (0 = nothing kept)."""
    g = torch.Generator().manual_seed(seed)
    n_prompt, t_new = 6, 9
    n_real, extent = [6, 2, 4, 6, 3, 5, 1], [9, 2, 5, 0, 9, 3, 7]
    ids = torch.randint(1, 50, (len(n_real), n_prompt + t_new), generator=g)
    attn = torch.ones_like(ids, dtype=torch.bool)
    for r, n in enumerate(n_real):
        attn[r, :n_prompt - n] = False
    ids[~attn] = 0
    cmask = torch.arange(t_new)[None] < torch.tensor(extent)[:, None]  # (B, t_new)
    return ids, attn, cmask, n_prompt, torch.randn(len(n_real), t_new, generator=g)


@pytest.mark.parametrize("chunked", [True, False])
def test_completion_mask_runs_only_the_columns_each_micro_batch_needs(tmp_path, monkeypatch, chunked):
    """With the completion mask, each micro-batch runs through its longest row's last kept position only: the same
    log-probs and knob gradients where the mask is True, exactly 0 after each row's end, fewer tokens through the
    model."""
    if not chunked:
        monkeypatch.setattr(grpo, "CHUNKED_HEADS", ())
    model = tiny_qwen3()
    knobs = adapter.attach(model, AdapterConfig(cache_dir=str(tmp_path)), "tiny-grpo")
    for k in knobs.values():
        k.dS.data.normal_(0, 0.1)
    ids, attn, cmask, n_prompt, weights = _ragged_batch()
    o = grpo.length_order(attn, cmask, n_prompt)  # as train cuts its micro-batches
    ids, attn, cmask, weights = ids[o], attn[o], cmask[o], weights[o]
    tokens = []
    model.base_model.register_forward_hook(lambda m, i, kw, o: tokens.append(kw["input_ids"].numel()),
                                           with_kwargs=True)

    def run(mask):
        for k in knobs.values():
            k.dS.grad = None
        lp = grpo.token_logprobs(model, ids, n_prompt, 3, attn, temperature=0.7, completion_mask=mask)
        (lp * weights * cmask).sum().backward()
        return lp.detach(), [k.dS.grad.clone() for k in knobs.values()]

    lp_m, g_m = run(cmask)
    n_masked, tokens[:] = sum(tokens), []
    lp_w, g_w = run(None)
    assert n_masked < 0.8 * sum(tokens)
    torch.testing.assert_close(lp_m[cmask], lp_w[cmask], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp_w[cmask], naive_logprobs(model, ids, attn, n_prompt, 0.7)[cmask], atol=1e-5, rtol=0)
    assert (lp_m[~cmask] == 0).all() and (lp_w[~cmask] != 0).all()
    for a, b in zip(g_m, g_w, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(a.abs().sum() > 0 for a in g_m)
    with pytest.raises(ValueError, match="completion_mask is"):
        grpo.token_logprobs(model, ids, n_prompt, 3, attn, completion_mask=cmask[:, 1:])


def test_length_order_puts_rows_of_similar_length_together_longest_first():
    ids, attn, cmask, n_prompt, _ = _ragged_batch()  # tokens needed: 15, 4, 9, 6, 12, 8, 8
    assert grpo.completion_extent(cmask).tolist() == [9, 2, 5, 0, 9, 3, 7]
    assert grpo.length_order(attn, cmask, n_prompt).tolist() == [0, 4, 2, 5, 6, 3, 1]


class _NaNGradOnEmptyRows(torch.autograd.Function):
    """Identity in the forward; in the backward NaN for the query rows that attend to no key, as fused attention
    kernels can return for fully masked rows."""

    @staticmethod
    def forward(ctx, out, empty):  # out (b, q, heads, d), empty (b, q)
        ctx.save_for_backward(empty)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (empty,) = ctx.saved_tensors
        return grad.masked_fill(empty[:, :, None, None], float("nan")), None


def _nan_on_empty_rows_attention(module, query, key, value, attention_mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    if attention_mask is None:
        return out, weights
    empty = ~attention_mask.any(dim=-1)[:, 0] if attention_mask.dtype == torch.bool else \
        (attention_mask <= torch.finfo(attention_mask.dtype).min / 2).all(dim=-1)[:, 0]  # (b, q)
    return _NaNGradOnEmptyRows.apply(out, empty.expand(out.shape[0], -1)), weights


def test_a_kernel_nan_on_fully_masked_rows_never_reaches_the_knob_gradient(tmp_path):
    """Left padding gives query rows that attend to nothing; a fused kernel's NaN gradient there poisons every knob
    (shared parameters) although the loss never reads those rows. token_logprobs runs rows right-aligned under a
    plain causal mask, so no such row exists and the gradient equals the padded computation's where that is finite."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("nan_on_empty_rows", _nan_on_empty_rows_attention)
    AttentionMaskInterface.register("nan_on_empty_rows", sdpa_mask)
    model = tiny_qwen3()
    knobs = adapter.attach(model, AdapterConfig(cache_dir=str(tmp_path)), "tiny-grpo")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 50, (3, 12), generator=g)
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[0, :3] = False  # left padding: rows 0 and 2 have query positions with no key to attend to
    attn[2, :1] = False
    ids[~attn] = 0
    n_prompt, weights = 6, torch.randn(3, 6, generator=g)

    def grads(logprobs):
        for k in knobs.values():
            k.dS.grad = None
        (logprobs() * weights).sum().backward()
        return [k.dS.grad.clone() for k in knobs.values()]

    model.set_attn_implementation("sdpa")
    want = grads(lambda: naive_logprobs_with_grad(model, ids, attn, n_prompt))
    model.set_attn_implementation("nan_on_empty_rows")
    poisoned = grads(lambda: naive_logprobs_with_grad(model, ids, attn, n_prompt))
    assert not all(torch.isfinite(p).all() for p in poisoned)  # the emulated kernel bites on the padded layout
    got = grads(lambda: grpo.token_logprobs(model, ids, n_prompt, 2, attn))
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class _FixedLogits(torch.nn.Module):
    """Every position's logits are ln(4, 2, 1): p = (4, 2, 1)/7 at T = 1, (16, 4, 1)/21 at T = 0.5."""

    def forward(self, input_ids, position_ids, logits_to_keep, use_cache):
        b = input_ids.shape[0]
        row = torch.log(torch.tensor([4.0, 2.0, 1.0]))
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=row.expand(b, logits_to_keep, 3))


def test_token_logprobs_at_a_sampling_temperature_by_hand():
    ids = torch.tensor([[0, 1, 0, 1, 2], [2, 2, 2, 0, 1]])  # 2 prompt tokens, 3 completion tokens
    want = {t: torch.log(torch.tensor(p) / sum(p)) for t, p in ((0.5, [16.0, 4.0, 1.0]), (1.0, [4.0, 2.0, 1.0]))}
    for t, p_t in ((0.5, want[0.5]), (1.0, want[1.0]), (0.0, want[1.0])):  # T = 0 (greedy): T = 1
        got = grpo.token_logprobs(_FixedLogits(), ids, 2, micro_batch=1, temperature=t)
        torch.testing.assert_close(got, p_t[ids[:, 2:]])
    with pytest.raises(ValueError, match="temperature"):
        grpo.token_logprobs(_FixedLogits(), ids, 2, micro_batch=1, temperature=-1.0)


def test_token_logprobs_at_a_sampling_temperature_match_naive():
    model = tiny_qwen3()
    ids = torch.randint(1, 50, (3, 10), generator=torch.Generator().manual_seed(4))
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[2, :2] = False
    ids[~attn] = 0
    with torch.no_grad():
        got = grpo.token_logprobs(model, ids, 6, 2, attn, temperature=0.7)
        at1 = grpo.token_logprobs(model, ids, 6, 2, attn)
    torch.testing.assert_close(got, naive_logprobs(model, ids, attn, 6, temperature=0.7), atol=1e-5, rtol=0)
    assert (got - at1).abs().max() > 1e-2


def test_token_logprobs_match_the_sampler_on_left_padded_prompts():
    engine = pytest.importorskip("projected_grpo.engine")
    model = tiny_qwen3()
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]
    roll = engine.generate(model, prompts, max_new_tokens=6, temperature=0.0, top_p=1.0, eos_ids=[1], pad_id=0,
                           seed=0)
    with torch.no_grad():
        lp = grpo.token_logprobs(model, roll.ids, roll.prompt_len, 2, roll.attention_mask())
    m = roll.completion_mask
    torch.testing.assert_close(lp[m], roll.logprobs[m], atol=1e-4, rtol=0)


# --- KL at step 0, and learning ------------------------------------------------------------------------------------


def test_kl_is_zero_at_step_zero(tmp_path):
    model = tiny_qwen3()
    knobs = adapter.attach(model, AdapterConfig(cache_dir=str(tmp_path)), "tiny-grpo")
    ids = torch.randint(1, 50, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 4, dtype=torch.bool)
    with torch.no_grad(), adapter.zeroed(knobs):
        ref = grpo.token_logprobs(model, ids, 6, 2)
    lp = grpo.token_logprobs(model, ids, 6, 2)
    assert torch.equal(lp.detach(), ref)
    _, st = grpo.grpo_loss(lp, lp.detach(), ref, torch.tensor([1.0, -1.0, 0.5, -0.5]), mask, clip=0.2, beta=1e-3,
                           denom=16.0)
    assert st["kl_sum"].item() == 0.0


def test_tiny_model_overfits_a_fixed_batch(tmp_path):
    model = tiny_qwen3()
    knobs = adapter.attach(model, AdapterConfig(cache_dir=str(tmp_path)), "tiny-grpo")
    opt = torch.optim.AdamW(adapter.knob_params(knobs), lr=0.3)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (4, 12), generator=g)
    n_prompt = 6
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5])
    mask = torch.ones(4, 6, dtype=torch.bool)
    losses, good = [], []
    for _ in range(40):
        opt.zero_grad()
        with torch.no_grad(), adapter.zeroed(knobs):
            ref = grpo.token_logprobs(model, ids, n_prompt, 2)
        lp = grpo.token_logprobs(model, ids, n_prompt, 2)
        loss, _ = grpo.grpo_loss(lp, lp.detach(), ref, adv, mask, clip=0.2, beta=1e-3, denom=24.0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        good.append(lp[0].detach().mean().item())
    # with ratio ≡ 1 the loss value is −Σ A·|tokens| / denom + β·KL (constant part); the policy moves toward row 0
    assert good[-1] > good[0] + 1.0, (good[0], good[-1])
    lp_final = grpo.token_logprobs(model, ids, n_prompt, 4).detach()
    assert lp_final[0].mean() > lp_final[1:].mean(dim=1).max()
    # the surrogate with the *initial* log-probs as logp_old falls: the PPO objective improved
    with torch.no_grad(), adapter.zeroed(knobs):
        lp0 = grpo.token_logprobs(model, ids, n_prompt, 4)
    start, _ = grpo.grpo_loss(lp0, lp0, None, adv, mask, clip=10.0, beta=0.0, denom=24.0)
    end, _ = grpo.grpo_loss(lp_final, lp0, None, adv, mask, clip=10.0, beta=0.0, denom=24.0)
    assert end.item() < start.item() - 0.5, (start.item(), end.item())
