"""Model loading through the real from_pretrained paths: the tiny random Qwen3 with its own tokenizer, a GGUF file
(a tiny one written here with the gguf package), the registry models' parts and pre-joined GGUFs, and the errors."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from projected_grpo import models  # noqa: E402
from projected_grpo import problems as P  # noqa: E402
from projected_grpo.models import ModelConfig  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny(cache):
    return models.load(ModelConfig(name="tiny", device="cpu", cache_dir=str(cache)))


def test_tiny_loads_through_from_pretrained(tiny, cache):
    assert type(tiny.model).__name__ == "Qwen3ForCausalLM"
    cfg = tiny.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert tiny.model_id.startswith("tiny-qwen3-") and (cache / "models" / tiny.model_id / "config.json").exists()
    assert all(not p.requires_grad for p in tiny.model.parameters())
    tok = tiny.tokenizer
    assert tiny.eos_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tiny.pad_id == tok.convert_tokens_to_ids("<|endoftext|>") != tiny.eos_ids[0]


def test_tiny_tokenizer_round_trips_prompts_and_has_a_qwen3_template(tiny):
    tok = tiny.tokenizer
    prob = P.builtin_problems()[0]
    hint = P.make_hint("simple_overwrite_tests", prob, random.Random(0))
    text = P.render_prompt(tok, P.chat_messages(prob, hint, P.system_prompt("base_format")))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "run_tests()" in text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # the BPE compresses the problem texts
    with_thinking = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True, enable_thinking=True)
    assert with_thinking.endswith("<|im_start|>assistant\n")
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


def test_tiny_build_is_deterministic_and_cached(tiny, cache, monkeypatch):
    corpus = models.tiny_corpus()
    a = models.build_tiny_tokenizer(corpus).backend_tokenizer.to_str()
    b = models.build_tiny_tokenizer(corpus).backend_tokenizer.to_str()
    assert hashlib.sha256(a.encode()).hexdigest() == hashlib.sha256(b.encode()).hexdigest()

    def no_build(*args, **kw):
        raise AssertionError("rebuilt despite the cache")

    monkeypatch.setattr(models, "build_tiny", no_build)
    again = models.load(ModelConfig(name="tiny", device="cpu", cache_dir=str(cache)))
    assert again.model_id == tiny.model_id
    for (n, p), (_, q) in zip(tiny.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def _write_tiny_gguf(path, tok) -> transformers.PreTrainedModel:
    """A random Qwen2 (qwen2 arch) with the tiny tokenizer, written as an F32 GGUF. Returns the source model."""
    gguf = pytest.importorskip("gguf")
    V = len(tok)
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(0)
    tj = json.loads(tok.backend_tokenizer.to_str())
    id2tok = {i: t for t, i in tj["model"]["vocab"].items()} | {a["id"]: a["content"] for a in tj["added_tokens"]}
    special = {a["id"] for a in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([id2tok[i] for i in range(V)])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(V)])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_pad_token_id(tok.pad_token_id)
    w.add_bos_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = model.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                 "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
                 "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
                 "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
                 "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
                 "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
    for i in range(2):
        names |= {f"blk.{i}.{a}": f"model.layers.{i}.{b}" for a, b in per_layer.items()}
    for a, b in names.items():
        w.add_tensor(a, sd[b].detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_gguf_converts_once_and_matches_the_source(tiny, tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    gguf_path = tmp_path / "tiny.gguf"
    src = _write_tiny_gguf(gguf_path, tiny.tokenizer)
    cache = tmp_path / "cache"
    loaded = models.load(ModelConfig(name=str(gguf_path), device="cpu", cache_dir=str(cache)))
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    assert (cache / "models" / loaded.model_id / "model.safetensors").exists()
    assert not getattr(loaded.model, "is_quantized", False)
    ids = torch.tensor([[5, 17, 3, 88, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, src(ids).logits, atol=1e-5, rtol=0)
    text = "class Solution:\n    def run_tests(self):\n        pass"
    # same vocabulary; the GGUF path applies Qwen2's pre-tokenizer split, so compare round trips and specials
    assert loaded.tokenizer.decode(loaded.tokenizer(text)["input_ids"]) == text
    assert loaded.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert loaded.eos_ids[0] == tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def no_convert(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_convert, raising=True)
    assert models.resolve(ModelConfig(name=str(gguf_path), cache_dir=str(cache)))[1] == loaded.model_id


def _fake_parts(tmp_path, chunks=(b"abc", b"defg", b"h")):
    parts = []
    for i, chunk in enumerate(chunks):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(chunk)
        parts.append(p)
    return parts


def test_join_parts_checks_size_and_hash(tmp_path):
    parts = _fake_parts(tmp_path)
    good = hashlib.sha256(b"abcdefgh").hexdigest()
    out = models.join_parts(parts, tmp_path / "joined.gguf", 8, good)
    assert out.read_bytes() == b"abcdefgh"
    with pytest.raises(ValueError, match="reinstall the part packages") as e:  # same size, other order: the sha
        models.join_parts(parts[::-1], tmp_path / "bad.gguf", 8, good)
    assert "\n" not in str(e.value) and "expected 8 bytes sha256 " + good[:16] in str(e.value)
    with pytest.raises(ValueError, match=r"joined parts give 7 bytes \(not hashed\), expected 8 bytes"):
        models.join_parts(parts[:2], tmp_path / "short.gguf", 8, good)
    assert not list(tmp_path.glob("bad.gguf*")) and not list(tmp_path.glob("short.gguf*"))


def test_registry_table_matches_the_pyproject_extras():
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert {"coder05", "coder15"} <= set(models.REGISTRY_MODELS)
    for name, spec in models.REGISTRY_MODELS.items():
        pinned = [req.split("==")[0].replace("-", "_") for req in extras[name]]
        assert pinned == list(spec.packages), name  # the extra installs exactly the parts, in join order
        assert spec.file.endswith(".gguf") and len(spec.sha256) == 64 and spec.size > 0
        assert spec.model_id_prefix.endswith("-")
    assert len(models.REGISTRY_MODELS["coder15"].packages) == 22
    assert models.REGISTRY_MODELS["coder15"].size == 1_117_320_768
    assert models.gguf_env_var("coder15") == "PROJECTED_GRPO_CODER15_GGUF"


@pytest.mark.parametrize("name", ["coder05", "coder15"])
def test_registry_model_without_its_packages_names_the_extra(monkeypatch, name):
    import importlib

    real = importlib.import_module
    prefixes = {m.rstrip("0123456789") for m in models.REGISTRY_MODELS[name].packages}

    def fake(mod, *a, **k):
        if mod.rstrip("0123456789") in prefixes:
            raise ImportError(mod)
        return real(mod, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ValueError, match=rf"pip install '\.\[{name}\]'.*PROJECTED_GRPO_{name.upper()}_GGUF"):
        models.registry_parts(name)


@pytest.mark.parametrize("name, n", [("coder05", 6), ("coder15", 22)])
def test_registry_parts_are_found_in_order(monkeypatch, tmp_path, name, n):
    import importlib
    import types

    real = importlib.import_module
    prefix = models.REGISTRY_MODELS[name].packages[0].removesuffix("1")

    def fake(mod, *a, **k):
        if mod.startswith(prefix):
            i = int(mod.removeprefix(prefix))
            return types.SimpleNamespace(get_part_path=lambda i=i: str(tmp_path / f"data/part{i:02d}.bin"))
        return real(mod, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert [p.name for p in models.registry_parts(name)] == [f"part{i:02d}.bin" for i in range(1, n + 1)]


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A registry model `fake` whose three parts spell a tiny GGUF; conversion stubbed (the GGUF path is tested
    above), recording which file it converted."""
    (tmp_path / "parts_src").mkdir()
    parts = _fake_parts(tmp_path / "parts_src")
    data = b"abcdefgh"
    spec = models.RegistryModel(("fake_part1", "fake_part2", "fake_part3"), "fake-model.gguf", len(data),
                                hashlib.sha256(data).hexdigest(), "fake-model-")
    monkeypatch.setitem(models.REGISTRY_MODELS, "fake", spec)
    monkeypatch.setattr(models, "registry_parts", lambda name: parts)
    monkeypatch.delenv("PROJECTED_GRPO_FAKE_GGUF", raising=False)
    converted = []

    def convert(gguf, root, out):
        converted.append(gguf.read_bytes())
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "convert_gguf", convert)
    return spec, converted


def test_registry_model_joins_from_packages_then_needs_nothing(fake_registry, tmp_path, monkeypatch):
    spec, converted = fake_registry
    cfg = ModelConfig(name="fake", cache_dir=str(tmp_path / "cache"))
    src, model_id = models.resolve(cfg)
    assert model_id == "fake-model-" + spec.sha256[:12]
    assert src == str(tmp_path / "cache" / "models" / f"fake-model-{spec.sha256[:12]}")
    assert converted == [b"abcdefgh"] and (tmp_path / "cache" / "gguf" / "fake-model.gguf").read_bytes() == b"abcdefgh"
    (tmp_path / "cache" / "gguf" / "fake-model.gguf").unlink()  # once converted, neither GGUF nor packages needed
    monkeypatch.setattr(models, "registry_parts", lambda name: pytest.fail("looked for the packages"))
    assert models.resolve(cfg) == (src, model_id) and len(converted) == 1


def test_registry_model_takes_a_pre_joined_gguf_without_packages(fake_registry, tmp_path, monkeypatch):
    spec, converted = fake_registry
    monkeypatch.setattr(models, "registry_parts", lambda name: pytest.fail("looked for the packages"))
    # 1. copied by hand to <cache>/gguf/<file>
    cache = tmp_path / "cache1"
    (cache / "gguf").mkdir(parents=True)
    (cache / "gguf" / spec.file).write_bytes(b"abcdefgh")
    assert models.resolve(ModelConfig(name="fake", cache_dir=str(cache)))[1] == "fake-model-" + spec.sha256[:12]
    # 2. anywhere, named by $PROJECTED_GRPO_<NAME>_GGUF
    joined = tmp_path / "anywhere.gguf"
    joined.write_bytes(b"abcdefgh")
    monkeypatch.setenv("PROJECTED_GRPO_FAKE_GGUF", str(joined))
    src, _ = models.resolve(ModelConfig(name="fake", cache_dir=str(tmp_path / "cache2")))
    assert src.endswith(f"fake-model-{spec.sha256[:12]}") and converted == [b"abcdefgh"] * 2


def test_registry_model_refuses_a_wrong_pre_joined_gguf_in_one_line(fake_registry, tmp_path, monkeypatch):
    spec, converted = fake_registry
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"abcdefgX")  # right size, wrong sha256
    monkeypatch.setenv("PROJECTED_GRPO_FAKE_GGUF", str(bad))
    with pytest.raises(ValueError, match=r"bad\.gguf has 8 bytes sha256 .*PROJECTED_GRPO_FAKE_GGUF must point") as e:
        models.resolve(ModelConfig(name="fake", cache_dir=str(tmp_path / "cache")))
    assert "\n" not in str(e.value)
    monkeypatch.setenv("PROJECTED_GRPO_FAKE_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="no such file"):
        models.resolve(ModelConfig(name="fake", cache_dir=str(tmp_path / "cache")))
    monkeypatch.delenv("PROJECTED_GRPO_FAKE_GGUF")
    (tmp_path / "cache" / "gguf").mkdir(parents=True)
    (tmp_path / "cache" / "gguf" / spec.file).write_bytes(b"abc")  # a truncated copy in the cache
    with pytest.raises(ValueError, match=r"has 3 bytes \(not hashed\), expected 8 bytes.*delete it"):
        models.resolve(ModelConfig(name="fake", cache_dir=str(tmp_path / "cache")))
    assert converted == []


def test_unloadable_model_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load model") as e:
        models.load(ModelConfig(name=str(tmp_path / "no-such-model"), device="cpu", cache_dir=str(tmp_path)))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="GGUF file .* not found"):
        models.load(ModelConfig(name=str(tmp_path / "missing.gguf"), device="cpu", cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="model.dtype"):
        _ = ModelConfig(dtype="float8").torch_dtype


def test_gradient_checkpointing_gives_the_same_knob_gradient(cache):
    from projected_grpo import adapter, grpo

    grads = []
    for ckpt in (False, True):
        loaded = models.load(ModelConfig(name="tiny", device="cpu", cache_dir=str(cache), gradient_checkpointing=ckpt))
        model = loaded.model
        assert not any(m._forward_hooks for m in model.modules())  # an engine reading raw weights accepts it
        assert all(layer.gradient_checkpointing == ckpt for layer in model.model.layers)
        knobs = adapter.attach(model, adapter.AdapterConfig(cache_dir=str(cache)), loaded.model_id)
        model.train()
        ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
        lp = grpo.token_logprobs(model, ids, 16, 2)
        lp.sum().backward()
        grads.append(torch.cat([k.dS.grad for k in knobs.values()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_a_half_precision_load_reads_a_copy_made_once_with_the_same_weights(tiny, cache, monkeypatch):
    """bfloat16 from a float32 model of the cache: the first load writes a bfloat16 copy beside it; every load gives
    the float32 weights rounded to bfloat16, bit for bit; later loads read the copy without converting again."""
    src = cache / "models" / tiny.model_id
    copy = src.with_name(f"{src.name}-bfloat16")
    shutil.rmtree(copy, ignore_errors=True)
    cfg = ModelConfig(name="tiny", device="cpu", dtype="bfloat16", cache_dir=str(cache))
    want = {n: p.to(torch.bfloat16) for n, p in tiny.model.state_dict().items()}
    first = models.load(cfg)
    assert models._stored_dtype(copy) == "bfloat16"
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kw: seen.append(path) or real(path, **kw))
    second = models.load(cfg)
    assert seen == [str(copy)] and second.model_id == first.model_id == tiny.model_id
    for m in (first, second):
        got = m.model.state_dict()
        assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], w) for n, w in want.items())
    seen.clear()
    models.load(ModelConfig(name="tiny", device="cpu", cache_dir=str(cache)))  # float32 reads the original
    assert seen == [str(src)]
    assert models.dtype_copy(str(src), torch.bfloat16, cache / "elsewhere") == str(src)  # not a cache entry: as is


def test_a_cache_entry_without_the_model_is_never_published(tmp_path):
    class Skipped:  # what transformers does on a torch.distributed rank other than 0: writes no model
        def save_pretrained(self, d):
            pass

    class Tok:
        def save_pretrained(self, d):
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / "tokenizer.json").write_text("{}")

    out = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError, match="the model was not written"):
        models.save_atomic(Skipped(), Tok(), out)
    assert not out.exists() and not list(tmp_path.glob("models/m.tmp*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_load_puts_the_half_precision_weights_on_the_gpu(tiny, cache):
    """On CUDA (bfloat16 by default) the weights are on the device and are the float32 ones rounded to bfloat16."""
    loaded = models.load(ModelConfig(name="tiny", device="cuda", cache_dir=str(cache)))
    got = loaded.model.state_dict()
    for n, w in tiny.model.state_dict().items():
        assert got[n].device.type == "cuda" and torch.equal(got[n].cpu(), w.to(torch.bfloat16)), n
