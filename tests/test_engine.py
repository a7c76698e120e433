"""CPU tests of the rollout engine on a tiny random Qwen3."""

import pytest
import torch

from projected_grpo import engine
from projected_grpo.engine import Rollout, completion_mask_from, generate, left_pad, nucleus

transformers = pytest.importorskip("transformers")

EOS, PAD = 7, 0


def tiny_qwen3(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=300, **kw)
    return transformers.Qwen3ForCausalLM(cfg).eval()


PROMPTS = [[5, 17, 42, 99, 3], [11, 12], [250, 251, 252]]


def test_left_pad_and_mask():
    ids, mask = left_pad(PROMPTS, PAD)
    assert ids.shape == (3, 5) and ids.dtype == torch.long
    assert ids[1].tolist() == [PAD, PAD, PAD, 11, 12]
    assert mask[1].tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError):
        left_pad([[1], []], PAD)
    new = torch.tensor([[1, EOS, 2, EOS], [1, 2, 3, 4], [EOS, 1, 1, 1]])
    m = completion_mask_from(new, [EOS])
    assert m.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]


@pytest.mark.parametrize("engine_", ["hf", "static"])
def test_rollout_shapes_and_invariants(engine_):
    model = tiny_qwen3()
    r = generate(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9, eos_ids=[EOS], pad_id=PAD, seed=0,
                 engine=engine_)
    assert isinstance(r, Rollout)
    assert r.prompt_len == 5
    assert r.ids.shape == (3, 5 + 12) and r.ids.dtype == torch.int64
    assert r.completion_mask.shape == (3, 12) and r.completion_mask.dtype == torch.bool
    assert r.logprobs.shape == (3, 12) and r.logprobs.dtype == torch.float32
    assert r.ids[1, :5].tolist() == [PAD, PAD, PAD, 11, 12]  # left padding, prompt ends at prompt_len - 1
    assert (r.logprobs[r.completion_mask] <= 0).all() and (r.logprobs[~r.completion_mask] == 0).all()
    assert (r.completion_ids[~r.completion_mask] == PAD).all()
    # the mask ends exactly at the first eos
    assert torch.equal(r.completion_mask, completion_mask_from(r.completion_ids.masked_fill(~r.completion_mask, EOS),
                                                               [EOS]))
    assert r.attention_mask().shape == r.ids.shape
    # seeded: the same seed gives the same rollout, another seed another one
    r2 = generate(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9, eos_ids=[EOS], pad_id=PAD, seed=0,
                  engine=engine_)
    r3 = generate(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9, eos_ids=[EOS], pad_id=PAD, seed=1,
                  engine=engine_)
    assert torch.equal(r.ids, r2.ids)
    assert not torch.equal(r.ids, r3.ids)


@pytest.mark.parametrize("engine_", ["hf", "static"])
def test_logprobs_are_the_sampling_distribution(engine_):
    """Recompute each sampled token's log-prob with a plain forward (temperature 0.7, no top-p) and compare."""
    model = tiny_qwen3(1)
    T = 0.7
    r = generate(model, PROMPTS, max_new_tokens=8, temperature=T, top_p=1.0, eos_ids=[], pad_id=PAD, seed=3,
                 engine=engine_)
    am = r.attention_mask().long()
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=r.ids, attention_mask=am, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, r.prompt_len - 1:-1] / T, dim=-1)
    ref = logp.gather(2, r.completion_ids[:, :, None])[:, :, 0]
    assert r.completion_mask.all()
    torch.testing.assert_close(r.logprobs, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine_", ["hf", "static"])
def test_eos_stops_each_row(engine_):
    """Uniform logits (zero lm_head) and half the vocabulary as eos ids: rows stop at different steps."""
    model = tiny_qwen3(2)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    eos = list(range(150))
    r = generate(model, PROMPTS * 4, max_new_tokens=6, temperature=1.0, top_p=1.0, eos_ids=eos, pad_id=PAD, seed=0,
                 engine=engine_)
    new, mask = r.completion_ids, r.completion_mask
    for row, m in zip(new.tolist(), mask.tolist(), strict=True):
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # up to and including the first eos
        assert m == [True] * n + [False] * (len(row) - n)
        assert all(t == PAD for t in row[n:])
    assert 0 < mask.sum(1).float().mean() < 6  # some rows stopped early, not all at once
    torch.testing.assert_close(r.logprobs[mask], torch.full_like(r.logprobs[mask], -torch.log(torch.tensor(300.0))))
    assert r.completions()[0] == new[0, : int(mask[0].sum())].tolist()


def test_nucleus_keeps_ties_and_the_sampler_follows_it():
    """top-p over [3, 2, 2, 2, 0]: the mass reaches top_p inside the run of 2s, so all three 2s stay in; the torch
    sampler draws from exactly that distribution and reports its log-probs."""
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 0.0])
    p = torch.softmax(logits, -1)
    top_p = float(p[0] + p[1] / 2)
    q = nucleus(p, top_p)
    assert (q[:4] > 0).all() and q[4] == 0
    torch.testing.assert_close(q.sum(), torch.tensor(1.0))
    n = 40000
    torch.manual_seed(0)
    tok, lp = engine.sample(logits.expand(n, 5), 1.0, top_p)
    freq = torch.bincount(tok, minlength=5).float() / n
    assert freq[4] == 0 and ((freq - q).abs() <= 5 * (q * (1 - q) / n).sqrt() + 1e-3).all(), (freq, q)
    torch.testing.assert_close(lp, q[tok].log())


def test_the_sampler_on_bf16_logits_draws_from_their_float32_nucleus():
    """bf16 logits (a bf16 model's) are sorted in bf16 and then divided by T in float32: the distribution is
    nucleus(softmax(float32(logits) / T)), each draw's log-prob that distribution's, with ties kept together."""
    torch.manual_seed(1)
    logits = (torch.randn(300) * 3).to(torch.bfloat16)  # bf16: many ties among 300 values
    assert len(set(logits.tolist())) < 300
    T, top_p, n = 0.7, 0.9, 40000
    q = nucleus(torch.softmax(logits.float() / T, -1), top_p)
    tok, lp = engine.sample(logits.expand(n, 300), T, top_p)
    freq = torch.bincount(tok, minlength=300).float() / n
    assert (freq[q == 0] == 0).all() and ((freq - q).abs() <= 5 * (q * (1 - q) / n).sqrt() + 1e-3).all()
    torch.testing.assert_close(lp, q[tok].log())


def test_bad_arguments():
    model = tiny_qwen3()
    with pytest.raises(ValueError):
        generate(model, PROMPTS, max_new_tokens=0, temperature=1.0, top_p=1.0, eos_ids=[], pad_id=PAD, seed=0)
    with pytest.raises(ValueError):
        generate(model, PROMPTS, max_new_tokens=4, temperature=1.0, top_p=0.0, eos_ids=[], pad_id=PAD, seed=0)
    with pytest.raises(ValueError):
        generate(model, PROMPTS, max_new_tokens=4, temperature=1.0, top_p=1.0, eos_ids=[], pad_id=PAD, seed=0,
                 engine="vllm")


def tiny_qwen2(seed: int = 0, hidden_size: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=300, tie_word_embeddings=True)
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for layer in m.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    return m


def peaky(model: torch.nn.Module) -> torch.nn.Module:
    """Scale the output matrix so greedy decoding has clear winners (random-init logits are nearly flat)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def tiny_llama(seed: int = 0, cls: str = "Llama", **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{cls}Config")(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=128, vocab_size=300, **kw)
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()


def tiny_mistral(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(seed, "Mistral", sliding_window=None)


@pytest.mark.parametrize("make", [tiny_qwen3, tiny_qwen2, tiny_llama, tiny_mistral],
                         ids=["qwen3", "qwen2", "llama", "mistral"])
def test_static_greedy_equals_hf_greedy(make):
    """float32 on CPU: our prefill + decode (KV cache by index, left padding, RoPE positions) gives HF's tokens."""
    model = peaky(make())
    prompts = PROMPTS + [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    kw = dict(max_new_tokens=40, temperature=0.0, top_p=1.0, eos_ids=[], pad_id=PAD, seed=0)
    ref = generate(model, prompts, engine="hf", **kw)
    ours = generate(model, prompts, engine="static", **kw)
    assert torch.equal(ours.ids, ref.ids), (ours.ids[:, ours.prompt_len:], ref.ids[:, ref.prompt_len:])
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=1e-4, rtol=1e-4)


def test_static_engine_refuses_hooked_linears():
    model = tiny_qwen3()
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, i, o: o)
    with pytest.raises(ValueError, match="forward hooks"):
        generate(model, PROMPTS, max_new_tokens=2, temperature=0.0, top_p=1.0, eos_ids=[], pad_id=PAD, seed=0,
                 engine="static")


def test_static_engine_reads_current_weights():
    """The engine is cached per model; a later call must see weights changed in place (a merged knob)."""
    model = peaky(tiny_qwen3(4))
    kw = dict(max_new_tokens=10, temperature=0.0, top_p=1.0, eos_ids=[], pad_id=PAD, seed=0)
    a = generate(model, PROMPTS, engine="static", **kw)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    b = generate(model, PROMPTS, engine="static", **kw)
    assert torch.equal(b.ids, generate(model, PROMPTS, engine="hf", **kw).ids)
    assert not torch.equal(a.ids, b.ids)


def test_triton_decode_attention_matches_reference():
    """The flash-decoding kernel against the reference, in Triton's interpreter on CPU (TRITON_INTERPRET=1)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (with triton installed) to run the kernel on CPU")
    pytest.importorskip("triton")
    import numpy as np
    from triton.runtime import interpreter

    from projected_grpo.engine import attend_torch, attend_triton, attn_split

    # the interpreter holds scalars as 1-element arrays, which numpy >= 2.3 refuses to int() (range(lo, hi) in the
    # kernel): make its __index__ take the element
    orig = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched

    torch.manual_seed(0)
    for B, Hq, Hkv, hd, S in [(3, 8, 2, 32, 200), (2, 14, 2, 64, 130)]:
        q = torch.randn(B, Hq, hd)
        kc, vc = torch.randn(B, Hkv, S, hd), torch.randn(B, Hkv, S, hd)
        start = torch.tensor([0, 5, 17][:B])
        end = torch.tensor([S - 40])
        ref = attend_torch(q, kc, vc, start, end, None)
        for chunk, n_split in [attn_split(B, Hkv, S, 8), (64, 4)]:
            out = attend_triton(q, kc, vc, start, end, chunk, n_split)
            torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    # the fused elementwise kernels against their torch twins
    x, d, w = torch.randn(5, 96), torch.randn(5, 96), torch.rand(96) + 0.5
    for delta in (None, d):
        xa, ha = engine.add_rms_norm_triton(x.clone(), delta, w, 1e-6)
        xb, hb = engine.add_rms_norm_torch(x.clone(), delta, w, 1e-6)
        torch.testing.assert_close((xa, ha), (xb, hb))
    gu = torch.randn(3, 2 * 1500)
    torch.testing.assert_close(engine.silu_mul_triton(gu), engine.silu_mul_torch(gu))
    B, Hq, Hkv, hd, S = 3, 4, 2, 32, 40
    cos, sin = torch.randn(S, hd), torch.randn(S, hd)
    rpos, slot = torch.tensor([3, 0, 17]), torch.tensor([21])
    qkv = torch.randn(B, (Hq + 2 * Hkv) * hd)
    for qn, kn in [(None, None), (torch.rand(hd) + 0.5, torch.rand(hd) + 0.5)]:
        caches = [(torch.randn(B, Hkv, S, hd), torch.randn(B, Hkv, S, hd)) for _ in range(2)]
        k2, v2 = caches[1][0].clone(), caches[1][1].clone()
        caches[1] = (k2, v2)
        caches[0] = (caches[1][0].clone(), caches[1][1].clone())
        qa = engine.qkv_post_triton(qkv, qn, kn, cos, sin, rpos, slot, *caches[0], Hq, Hkv, 1e-6)
        qb = engine.qkv_post_torch(qkv, qn, kn, cos, sin, rpos, slot, *caches[1], Hq, Hkv, 1e-6)
        torch.testing.assert_close(qa, qb)
        torch.testing.assert_close(caches[0], caches[1])
    # the sampler: nucleus by bisection on the logit keys, Gumbel race, log-probs of the truncated distribution
    V, n, T, top_p = 300, 2000, 0.8, 0.9
    logits = torch.randn(V) * 3
    tok, lp = engine.sample_triton(logits.expand(n, V).contiguous(), T, top_p, torch.tensor([7]))
    p = torch.softmax(logits / T, dim=-1)
    q = nucleus(p, top_p)
    freq = torch.bincount(tok, minlength=V).float() / n
    assert (freq[q == 0] == 0).all()
    assert ((freq - q).abs() <= 5 * (q * (1 - q) / n).sqrt() + 2e-3).all(), (freq - q).abs().max()
    torch.testing.assert_close(lp, q[tok].log(), atol=1e-5, rtol=1e-5)
    tok1, _ = engine.sample_triton(logits.expand(n, V).contiguous(), T, 1.0, torch.tensor([8]))
    freq1, p1 = torch.bincount(tok1, minlength=V).float() / n, p
    assert ((freq1 - p1).abs() <= 5 * (p1 * (1 - p1) / n).sqrt() + 2e-3).all()
    # several blocks per row (BLOCK 2048) and bf16 logits with ties at the nucleus boundary
    V, n = 5000, 300
    logits = (torch.randn(V) * 2).bfloat16()
    tok, lp = engine.sample_triton(logits.expand(n, V).contiguous(), 0.7, 0.9, torch.tensor([9]))
    q = nucleus(torch.softmax(logits.float() / 0.7, dim=-1), 0.9)
    assert (q[tok] > 0).all()
    torch.testing.assert_close(lp, q[tok].log(), atol=1e-5, rtol=1e-5)
    # the whole engine on the kernels, reading the real cache layout
    for model in (peaky(tiny_qwen3()), peaky(tiny_qwen2(hidden_size=128))):
        kw = dict(max_new_tokens=12, temperature=0.0, top_p=1.0, eos_ids=[], pad_id=PAD, seed=0)
        eng = engine.StaticEngine(model, len(PROMPTS), 64, kernels="triton")
        assert torch.equal(eng.run(model, PROMPTS, **kw).ids, generate(model, PROMPTS, engine="hf", **kw).ids)


# ----------------------------------------------------------------------------------------------------------------
# the engine switch: --engine auto|static|hf


def unsupported_models() -> dict[str, tuple[torch.nn.Module, str]]:
    """Tiny models the static engine must refuse, with a word of the reason it gives."""
    def qwen2(**kw):
        torch.manual_seed(0)
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=300, **kw)).eval()

    return {
        "qwen2_sliding": (qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=0), "sliding-window"),
        "mistral_sliding": (tiny_llama(0, "Mistral", sliding_window=16), "sliding-window"),
        "gelu": (tiny_qwen3(hidden_act="gelu"), "hidden_act"),
        "dynamic_rope": (tiny_llama(0, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
                         "rope_type"),
        "gemma": (tiny_llama(0, "Gemma", head_dim=16), "model_type 'gemma'"),
    }


def test_static_support_accepts_the_implemented_models():
    for make in (tiny_qwen3, tiny_qwen2, tiny_llama, tiny_mistral):
        assert engine.static_support(make()) is None, make.__name__
    # Qwen2 slides only from layer max_window_layers on: none of a 2-layer model's layers do here
    m = tiny_llama(0, "Qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert engine.static_support(m) is None


def test_engine_switch_falls_back_refuses_or_obeys():
    from loguru import logger

    logged: list[str] = []
    sink = logger.add(lambda m: logged.append(str(m)), level="INFO", format="{message}")
    try:
        engine._FELL_BACK.clear()
        for name, (model, word) in unsupported_models().items():
            why = engine.static_support(model)
            assert why is not None and word in why, (name, why)
            assert "\n" not in why
            # auto on a CUDA model: HF generate, with the reason logged once
            assert engine.pick_engine(model, "auto", cuda=True) == "hf"
            assert engine.pick_engine(model, "auto", cuda=True) == "hf"
            assert sum(why in line for line in logged) == 1, (name, logged)
            with pytest.raises(ValueError, match=f"engine=static cannot run this model: .*{word}.*--engine hf"):
                engine.pick_engine(model, "static")
            assert engine.pick_engine(model, "hf") == "hf"
        ok = tiny_qwen3()
        assert engine.pick_engine(ok, "auto", cuda=True) == "static"
        assert engine.pick_engine(ok, "auto", cuda=False) == "hf"
        assert engine.pick_engine(ok, "static") == "static"
        assert engine.pick_engine(ok, "hf", cuda=True) == "hf"
        with pytest.raises(ValueError, match="engine='vllm' is not one of auto, static, hf"):
            engine.pick_engine(ok, "vllm")
    finally:
        logger.remove(sink)
    # through generate: static refuses, auto (CPU) and hf run HF generate
    model, _ = unsupported_models()["qwen2_sliding"]
    kw = dict(max_new_tokens=3, temperature=0.0, top_p=1.0, eos_ids=[], pad_id=PAD, seed=0)
    with pytest.raises(ValueError, match="sliding-window"):
        generate(model, PROMPTS, engine="static", **kw)
    assert torch.equal(generate(model, PROMPTS, **kw).ids, generate(model, PROMPTS, engine="hf", **kw).ids)
    # the older keyword still selects the back end
    with pytest.raises(ValueError, match="sliding-window"):
        generate(model, PROMPTS, backend="static", **kw)


# ----------------------------------------------------------------------------------------------------------------
# truncated completions (--mask-truncated-completions)


def test_truncated_mask():
    eos = [EOS, 9]
    rows = [[1, 2, 3, 4], [1, 2, 3, EOS], [1, 2, 9], [1, 2], [1, 2, 3, 4, 5], [], [EOS]]
    got = engine.truncated_mask(rows, eos, max_new_tokens=4)
    assert got.dtype == torch.bool and got.shape == (7,)
    assert got.tolist() == [True, False, False, False, True, False, False]
    assert engine.truncated_mask([[1, 2]], [], 2).tolist() == [True]  # no eos ids: every full-length row is cut


def test_truncated_mask_on_a_rollout():
    """Rows of a real rollout that hit max_new_tokens without eos are exactly the truncated ones."""
    model = tiny_qwen3(2)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform logits: half the vocabulary as eos stops rows at various steps
    eos = list(range(150))
    r = generate(model, PROMPTS * 4, max_new_tokens=3, temperature=1.0, top_p=1.0, eos_ids=eos, pad_id=PAD, seed=0,
                 engine="hf")
    cut = engine.truncated_mask(r.completions(), eos, 3)
    last = r.completion_ids[:, -1]
    want = r.completion_mask.all(1) & ~torch.isin(last, torch.tensor(eos))
    assert torch.equal(cut, want) and 0 < int(cut.sum()) < len(cut)


@pytest.mark.parametrize("engine_", ["hf", "static"])
def test_on_done_hands_over_every_row_once_as_it_finishes(engine_):
    model = tiny_qwen3(2)
    prompts = PROMPTS * 4
    eos = list(range(1, 300, 30))  # about one token in thirty ends a row: rows finish at different times
    kw = dict(max_new_tokens=64, temperature=1.0, top_p=1.0, eos_ids=eos, pad_id=PAD, seed=0, engine=engine_)
    calls = []
    r = generate(model, prompts, **kw, on_done=lambda rows, ids: calls.append((rows, ids)))
    got: dict[int, list[int]] = {}
    for rows, ids in calls:
        for row, i in zip(rows, ids, strict=True):
            assert row not in got  # once each
            got[row] = i
    assert got == dict(enumerate(r.completions()))  # every row, its tokens up to and including eos
    assert torch.equal(r.ids, generate(model, prompts, **kw).ids)  # handing rows over changes no token
    if engine_ == "static":
        check = engine.engine_for(model, len(prompts), 1).check_every
        assert len(calls) > 1 and all(len(i) <= check + 1 for i in calls[0][1])  # the early rows came early
