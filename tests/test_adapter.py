"""The SVD knob: exact base model at δS = 0, exact merge/unmerge, the SVD disk cache and its guards."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from projected_grpo import adapter, models  # noqa: E402
from projected_grpo.adapter import AdapterConfig  # noqa: E402


def tiny_qwen3(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    cfg = transformers.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 3, 88, 42, 9, 1, 60], [7, 7, 20, 31, 2, 96, 14, 0]])


def randomize(knobs: dict, scale: float = 0.5, hack: bool = True) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in knobs.values():
            k.dS.copy_(scale * torch.randn(k.rank, generator=g))
            if hack:
                k.dS_hack.copy_(scale * torch.randn(k.rank, generator=g))


@pytest.fixture
def cfg(tmp_path) -> AdapterConfig:
    return AdapterConfig(cache_dir=str(tmp_path))


def test_zero_knob_is_bit_identical_to_base(cfg):
    base = logits(tiny_qwen3(), IDS)
    model = tiny_qwen3()
    knobs = adapter.attach(model, cfg, "tiny-test")
    assert len(knobs) == 2 * 7  # q k v o gate up down, 2 layers
    assert torch.equal(logits(model, IDS), base)


def test_each_knob_is_keyed_by_its_own_W(cfg):
    """The Ws are hashed together before the knobs are made: each knob still carries its own W's sha256 (the SVD
    cache key and part of V's fingerprint), and its cache entry is the SVD of that W."""
    model = tiny_qwen3()
    knobs = adapter.attach(model, cfg, "tiny-test")
    mods = dict(model.named_modules())
    shas = {name: adapter._w_sha256(mods[name].weight) for name in knobs}
    assert {name: k.w_sha256 for name, k in knobs.items()} == shas and len(set(shas.values())) == len(shas)
    for name, k in knobs.items():
        torch.testing.assert_close(k.U @ torch.diag(k.S) @ k.Vh, mods[name].weight, atol=1e-5, rtol=1e-4)


def test_knob_changes_output_and_zeroed_restores_base(cfg):
    base = logits(tiny_qwen3(), IDS)
    model = tiny_qwen3()
    knobs = adapter.attach(model, cfg, "tiny-test")
    randomize(knobs)
    moved = logits(model, IDS)
    assert (moved - base).abs().max() > 1e-3
    with adapter.zeroed(knobs):
        assert torch.equal(logits(model, IDS), base)
    assert torch.equal(logits(model, IDS), moved)  # knobs restored on exit


def test_zeroed_reference_forward_skips_the_knob_gemms(cfg, monkeypatch):
    """The KL reference forward costs a plain forward: inside zeroed no knob computes its delta; after it, all do."""
    model = tiny_qwen3()
    knobs = adapter.attach(model, cfg, "tiny-test")
    randomize(knobs)
    calls = []
    real = adapter.SVDKnob.delta
    monkeypatch.setattr(adapter.SVDKnob, "delta", lambda self, x: calls.append(1) or real(self, x))
    with adapter.zeroed(knobs):
        logits(model, IDS)
    assert calls == []
    logits(model, IDS)
    assert len(calls) == len(knobs)


def test_ablate_quarantine_zeroes_only_dS_hack(cfg):
    model = tiny_qwen3()
    knobs = adapter.attach(model, cfg, "tiny-test")
    randomize(knobs, hack=True)
    with adapter.ablate_quarantine(knobs):
        assert all(float(k.dS_hack.detach().abs().sum()) == 0 and float(k.dS.detach().abs().sum()) > 0 for k in knobs.values())
        ablated = logits(model, IDS)
    assert all(float(k.dS_hack.detach().abs().sum()) > 0 for k in knobs.values())  # restored on exit
    ref = tiny_qwen3()  # the same model with δS only
    ref_knobs = adapter.attach(ref, cfg, "tiny-test")
    with torch.no_grad():
        for n, k in knobs.items():
            ref_knobs[n].dS.copy_(k.dS)
    assert torch.equal(ablated, logits(ref, IDS))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_merge_unmerge_exact(tmp_path, dtype, atol):
    model = tiny_qwen3(dtype=dtype)
    knobs = adapter.attach(model, AdapterConfig(cache_dir=str(tmp_path)), f"tiny-{dtype}")
    randomize(knobs, scale=0.3)
    w_before = {n: k.linear.weight.detach().clone() for n, k in knobs.items()}
    hooked = logits(model, IDS)
    with adapter.merged(knobs):
        assert all(not k.active and not k.linear._forward_hooks for k in knobs.values())  # plain Linears
        merged = logits(model, IDS)
        for n, k in knobs.items():  # W + U diag(s) Vh, rounded once to the dtype
            want = (w_before[n].float() + k.delta_weight()).to(dtype)
            assert torch.equal(k.linear.weight, want), n
    torch.testing.assert_close(merged.float(), hooked.float(), atol=atol, rtol=0)
    for n, k in knobs.items():
        assert torch.equal(k.linear.weight, w_before[n]), f"{n}: W not restored bit-exactly"
    assert torch.equal(logits(model, IDS), hooked)


def test_dS_gradient_matches_closed_form(cfg):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=False)
    model = nn.Sequential(lin)
    knobs = adapter.attach(model, AdapterConfig(targets=("0",), cache_dir=cfg.cache_dir), "one-linear")
    k = knobs["0"]
    x = torch.randn(3, 6)
    model(x).sum().backward()
    # d/d dS_i sum_b 1ᵀ U[:, i] (Vh[i] · x_b) = (1ᵀ U[:, i]) · sum_b Vh[i] · x_b
    want = k.U.sum(0) * (x @ k.Vh.T).sum(0)
    torch.testing.assert_close(k.dS.grad, want)
    assert not lin.weight.requires_grad


def test_only_knobs_train_and_params_are_ordered(cfg):
    model = tiny_qwen3()
    knobs = adapter.attach(model, cfg, "tiny-test")
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = adapter.knob_params(knobs)
    assert len(params) == 2 * len(knobs) and {id(p) for p in trainable} == {id(p) for p in params}
    for k in knobs.values():
        r = min(k.linear.weight.shape)
        assert k.rank == r and k.U.shape == (k.linear.weight.shape[0], r) and k.Vh.shape == (r, k.linear.weight.shape[1])
        assert float(k.dS.detach().abs().sum()) == 0 and float(k.dS_hack.detach().abs().sum()) == 0


def test_svd_reconstructs_W_and_rank_cap(tmp_path):
    model = tiny_qwen3()
    knobs = adapter.attach(model, AdapterConfig(cache_dir=str(tmp_path)), "tiny-test")
    for n, k in knobs.items():
        torch.testing.assert_close((k.U * k.S) @ k.Vh, k.linear.weight, atol=1e-5, rtol=0, msg=n)
    capped = tiny_qwen3()
    base = logits(capped, IDS)
    cknobs = adapter.attach(capped, AdapterConfig(rank_cap=4, cache_dir=str(tmp_path)), "tiny-test")
    assert all(k.rank == 4 for k in cknobs.values())
    assert torch.equal(logits(capped, IDS), base)


def test_svd_cache_is_reused(tmp_path, monkeypatch):
    cfg = AdapterConfig(cache_dir=str(tmp_path))
    first = adapter.attach(tiny_qwen3(), cfg, "tiny-test")
    files = sorted((tmp_path / "svd").rglob("*.safetensors"))
    assert len(files) == len(first)

    def no_svd(*a, **k):
        raise AssertionError("SVD recomputed despite a cache entry")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    second = adapter.attach(tiny_qwen3(), cfg, "tiny-test")
    for n in first:
        assert torch.equal(first[n].U, second[n].U) and torch.equal(first[n].Vh, second[n].Vh)


def test_a_half_precision_models_svd_entry_is_kept_in_its_dtype_and_reads_back_the_same_knobs(tmp_path, monkeypatch):
    """A bf16 model's U and Vh are stored in bf16 (half the bytes a job reads at start-up), and a knob built from the
    entry holds exactly what a knob built from the fresh float32 SVD holds."""
    from safetensors import safe_open

    cfg = AdapterConfig(cache_dir=str(tmp_path))
    first = adapter.attach(tiny_qwen3().to(torch.bfloat16), cfg, "tiny-test")
    for f in sorted((tmp_path / "svd").rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            assert [sf.get_slice(k).get_dtype() for k in ("U", "S", "Vh")] == ["BF16", "F32", "BF16"]
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("SVD recomputed despite a cache entry"))
    second = adapter.attach(tiny_qwen3().to(torch.bfloat16), cfg, "tiny-test")
    for n, k in first.items():
        assert k.U.dtype == k.Vh.dtype == torch.bfloat16 and k.S.dtype == torch.float32
        assert all(torch.equal(getattr(k, b), getattr(second[n], b)) for b in ("U", "S", "Vh")), n


_ATTACH_COUNTING_SVDS = """
import sys, time, torch, transformers
from projected_grpo import adapter
from projected_grpo.adapter import AdapterConfig
svd = torch.linalg.svd
def counted(*a, **k):
    with open(sys.argv[2], "a") as f:
        f.write("svd\\n")
    time.sleep(0.05)  # long enough for the other process to want the same entry
    return svd(*a, **k)
torch.linalg.svd = counted
cfg = transformers.Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg)
knobs = adapter.attach(model, AdapterConfig(cache_dir=sys.argv[1]), "tiny-race")
torch.save({n: k.U for n, k in knobs.items()}, sys.argv[3])
"""


def test_jobs_starting_together_compute_each_svd_once(tmp_path):
    """Side-by-side jobs on a fresh cache: one process computes each SVD entry (under a lock), the other reads it."""
    import subprocess
    import sys

    count = tmp_path / "svd_calls"
    procs = [subprocess.Popen([sys.executable, "-c", _ATTACH_COUNTING_SVDS, str(tmp_path / "cache"), str(count),
                               str(tmp_path / f"U{i}.pt")]) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    entries = sorted((tmp_path / "cache" / "svd").rglob("*.safetensors"))
    assert entries and len(count.read_text().split()) == len(entries)  # 14 Linears, 14 SVDs in all, not 28
    u0, u1 = torch.load(tmp_path / "U0.pt"), torch.load(tmp_path / "U1.pt")
    assert all(torch.equal(u0[n], u1[n]) for n in u0)


def test_stale_or_foreign_cache_entry_is_an_error(tmp_path):
    cfg = AdapterConfig(cache_dir=str(tmp_path))
    adapter.attach(tiny_qwen3(), cfg, "tiny-test")
    victim = sorted((tmp_path / "svd").rglob("*.safetensors"))[0]
    r = 8
    save_file({"U": torch.zeros(2, r), "S": torch.zeros(r), "Vh": torch.zeros(r, 2)}, str(victim),
              metadata={"model_id": "some-other-model", "w_sha256": "0" * 64, "shape": "2x2", "rank": str(r)})
    with pytest.raises(ValueError, match="stale or foreign SVD cache entry"):
        adapter.attach(tiny_qwen3(), cfg, "tiny-test")


def test_fingerprint_tracks_model_and_weights(cfg):
    a = adapter.attach(tiny_qwen3(seed=0), cfg, "m")
    b = adapter.attach(tiny_qwen3(seed=0), cfg, "m")
    c = adapter.attach(tiny_qwen3(seed=1), cfg, "m")
    assert adapter.fingerprint("m", a) == adapter.fingerprint("m", b)
    assert adapter.fingerprint("m", a) != adapter.fingerprint("other", a)
    assert adapter.fingerprint("m", a) != adapter.fingerprint("m", c)


def test_no_target_is_a_clear_error(cfg):
    with pytest.raises(ValueError, match="no nn.Linear named like"):
        adapter.attach(tiny_qwen3(), AdapterConfig(targets=("nope_proj",), cache_dir=cfg.cache_dir), "tiny-test")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_folded_training_pass_matches_the_hooks_in_output_and_knob_gradients(cfg, checkpointing):
    """One GEMM per Linear with W + delta folded in: the same logits and the same ∂L/∂δS, ∂L/∂δS_hack as the hooks
    (also when gradient checkpointing recomputes the forward inside the backward); W restored bit-exactly."""
    model = tiny_qwen3()
    knobs = adapter.attach(model, cfg, "tiny-test")
    randomize(knobs, scale=0.3)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "svd_knob")}
    if checkpointing:
        models.enable_checkpointing(model)
        model.train()
    weights = torch.randn(2, 8, 97, generator=torch.Generator().manual_seed(5))

    def grads(fold: bool):
        for k in knobs.values():
            k.dS.grad = k.dS_hack.grad = None
        ctx = adapter.folded(knobs) if fold else torch.enable_grad()
        with ctx:
            out = model(input_ids=IDS).logits
            (out * weights).sum().backward()
        return out.detach(), [(k.dS.grad.clone(), k.dS_hack.grad.clone()) for k in knobs.values()]

    out_h, g_h = grads(False)
    out_f, g_f = grads(True)
    torch.testing.assert_close(out_f, out_h, atol=1e-5, rtol=1e-5)
    for (a, b), (c, d) in zip(g_f, g_h, strict=True):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b, d, atol=1e-4, rtol=1e-4)
        assert float(c.abs().sum()) > 0
    assert all(torch.equal(m.weight, w0[n]) for n, m in model.named_modules() if hasattr(m, "svd_knob"))
    with adapter.folded(knobs), pytest.raises(AssertionError, match="inside folded"):
        with adapter.zeroed(knobs):
            pass
