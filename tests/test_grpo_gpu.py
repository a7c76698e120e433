"""GPU test of the trainer's log-probs: micro-batches run only through their rows' last kept position
(`token_logprobs(completion_mask=...)`, rows in `length_order`) against every row run to the step's full length, on
a bf16 model with the knobs attached, under the GPU's attention kernels."""

import pytest
import torch

from projected_grpo import adapter, grpo
from projected_grpo.adapter import AdapterConfig

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_length_trimmed_micro_batches_match_full_rows_in_bf16(tmp_path, arch):
    torch.manual_seed(0)
    kw = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=1024, vocab_size=4096, max_position_embeddings=4096)
    cfg = transformers.Qwen3Config(head_dim=64, **kw) if arch == "qwen3" else transformers.Qwen2Config(**kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # peaked, context-dependent next-token distributions (random init is nearly flat)
        model.get_output_embeddings().weight.mul_(20.0)
    model = model.to("cuda", torch.bfloat16).eval()
    knobs = adapter.attach(model, AdapterConfig(cache_dir=str(tmp_path)), f"tiny-{arch}")
    for k in knobs.values():
        k.dS.data.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    n_prompt, t_new, B = 300, 512, 16
    n_real = torch.randint(120, n_prompt + 1, (B,), generator=g)
    extent = torch.randint(0, t_new + 1, (B,), generator=g)
    extent[0] = t_new  # one row runs to the budget, as in a step
    ids = torch.randint(1, 4096, (B, n_prompt + t_new), generator=g)
    attn = torch.arange(n_prompt + t_new)[None] >= (n_prompt - n_real)[:, None]
    ids[~attn] = 0
    cmask = torch.arange(t_new)[None] < extent[:, None]
    o = grpo.length_order(attn, cmask, n_prompt)
    ids, attn, cmask = ids[o].cuda(), attn[o].cuda(), cmask[o].cuda()
    weights = torch.randn(B, t_new, generator=g).cuda() * cmask

    def run(mask):
        for k in knobs.values():
            k.dS.grad = None
        lp = grpo.token_logprobs(model, ids, n_prompt, 4, attn, temperature=0.7, completion_mask=mask)
        (lp * weights).sum().backward()
        return lp.detach(), torch.cat([k.dS.grad.flatten() for k in knobs.values()])

    lp_m, g_m = run(cmask)
    lp_w, g_w = run(None)
    assert torch.isfinite(lp_m).all() and torch.isfinite(g_m).all()
    assert (lp_m[~cmask] == 0).all()
    assert (lp_m[cmask] - lp_w[cmask]).abs().mean() < 0.1  # bf16 rounding of other shapes, the same context
    assert torch.nn.functional.cosine_similarity(g_m, g_w, dim=0) > 0.998


@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_a_forward_run_ahead_gives_the_same_gradient_on_the_gpu(tmp_path, where):
    """train.forward_ahead + backward_pass(ahead=...) on a CUDA model, with the step's tensors on the host (the
    trainer's) or on the GPU (the benchmark's): the knobs' gradient equals a pass that ran every forward later."""
    import dataclasses

    from projected_grpo import train
    from projected_grpo.config import GRPOConfig

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=64, intermediate_size=512, vocab_size=1024)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to("cuda", torch.float32).eval()
    knobs = adapter.attach(model, AdapterConfig(cache_dir=str(tmp_path)), "tiny-ahead")
    for k in knobs.values():
        k.dS.data.normal_(0, 0.05)
    B, n_prompt, t_new = 6, 8, 12
    ids = torch.randint(1, 1024, (B, n_prompt + t_new))
    attn = torch.ones_like(ids, dtype=torch.bool)
    cmask = torch.arange(t_new)[None] < torch.tensor([12, 3, 9, 12, 5, 7])[:, None]
    ids, attn, cmask = ids.to(where), attn.to(where), cmask.to(where)
    adv, keep = torch.randn(B), torch.tensor([True, False, True, True, True, False])
    g = GRPOConfig(micro_batch=2, beta=0.1, temperature=0.7)
    ref = train.reference_logprobs(model, knobs, ids, attn, cmask, n_prompt, g)
    got = []
    for n in (0, 2):
        for k in knobs.values():
            k.dS.grad = None
        ga = dataclasses.replace(g, forward_ahead=n)
        ahead = train.forward_ahead(model, ids, attn, cmask, n_prompt, ga)
        totals = dict.fromkeys(("kl_sum", "tokens", "loss", "clipped", "logp_x", "tokens_x"), 0.0)
        train.backward_pass(model, knobs, ids, attn, cmask, n_prompt, adv, ga, 100.0, totals, "x", 0, ref,
                            keep=keep, ahead=ahead)
        got.append([k.dS.grad.clone() for k in knobs.values()])
    assert any(a.abs().sum() > 0 for a in got[0])
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
