"""Every frozen config, every preset, and the one parser every run command uses.

`train`, `extract-vhack`, `verify-vhack`, `eval`, `pipeline` and `sweep` all parse the same `Config` (one flag per
setting, the same name everywhere: `--model.name`, `--lr`, `--problems`, `--workers`, `--vhack-path`, `--run-dir`,
...), starting from `--preset NAME` (default fast-dev-run) or `--config FILE` (a saved config.json), then applying
the flags given. A command reads only the sections it needs; `pipeline`/`sweep` hand every job the same config, so
extract, verify, train and eval always share one model, adapter and data config.

Importing this module never imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from projected_grpo import problems as P

# ----------------------------------------------------------------------------------------------------------------
# where things live


def default_cache_dir() -> str:
    """The project's cache root: `$PROJECTED_GRPO_CACHE`, else `~/.cache/projected_grpo`."""
    return os.environ.get("PROJECTED_GRPO_CACHE") or str(Path.home() / ".cache" / "projected_grpo")


@contextlib.contextmanager
def cache_lock(lock: Path) -> Iterator[None]:
    """An exclusive flock on `lock` (created with its folder if missing), waited for, released on exit or by the
    kernel on death: jobs starting side by side on a fresh cache build each entry once."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def data_root() -> Path:
    """The benchmark data directory: `$PROJECTED_GRPO_DATA`, else `../shared/data` beside the repository (or beside
    the working directory). Returns the first that exists, else the repository-relative path."""
    env = os.environ.get("PROJECTED_GRPO_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for cand in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return repo.parent / "shared" / "data"


HELDOUT_FILE = "leetcode/leetcode_test_medhard.jsonl"  # the 119-problem test split, relative to data_root()

# ----------------------------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    """`tiny` (random Qwen3, own tokenizer), `organism` (the tiny model fine-tuned into a small coder that rarely
    hacks), `coder05` / `coder15` (Qwen2.5-Coder from registry packages), a .gguf
    file, a Hugging Face id or a local directory."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto (bfloat16 on CUDA, float32 on CPU)."""
    device: str = "auto"
    """cpu | cuda | cuda:N | auto (cuda when available)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower training forward)."""
    cache_dir: str = ""
    """Cache root for built/converted models and SVDs; empty = $PROJECTED_GRPO_CACHE or ~/.cache/projected_grpo."""

    @property
    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self):
        import torch

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        if self.dtype not in dtypes:
            raise ValueError(f"model.dtype {self.dtype!r} is not one of {(*dtypes, 'auto')}; pick one of those")
        return dtypes[self.dtype]

    @property
    def root(self) -> Path:
        return Path(self.cache_dir or default_cache_dir())


# Linear layers that get a knob, by the last component of their module name (Qwen2/Qwen3/Llama/Mistral names, and
# the Qwen3.5 linear-attention block's projections).
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",
)


@dataclass(frozen=True)
class AdapterConfig:
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Last name components of the nn.Linear modules that get a knob (e.g. q_proj down_proj)."""
    rank_cap: int | None = None
    """Keep only the top-r singular directions per module (None = full rank r = min(d_in, d_out))."""
    cache_dir: str = ""
    """Where SVDs are cached (under svd/); empty = the model's cache root."""
    fold_train: bool = False
    """Train with the knobs folded into W (one GEMM per Linear in the forward, the knobs' gradient added in the
    backward) instead of the forward hooks: the same gradients up to W's rounding, fewer FLOPs at full rank."""

    @property
    def svd_dir(self) -> Path:
        return Path(self.cache_dir or default_cache_dir()) / "svd"


@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 4
    """G: completions per prompt, students and teacher rows together."""
    prompts_per_step: int = 2
    """P: prompts per optimizer step (each gets a group of G)."""
    max_new_tokens: int = 48
    """Most tokens sampled per student completion (teacher rows are cut to this too)."""
    temperature: float = 1.0
    """Sampling temperature for student rollouts (0 = greedy); training log-probs use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass for student rollouts."""
    mix_ratio: float = 0.5
    """Fraction of each group drawn from the teacher pool: G_t = round(G·mix_ratio) (0 = students only)."""
    advantage: Literal["dr_grpo", "grpo"] = "dr_grpo"
    """dr_grpo: A = R − mean, loss / (G·max_new·P) (the seed); grpo: A = (R − mean)/(std + 1e-6), token mean."""
    clip: float = 0.2
    """PPO clip range ε on the ratio."""
    beta: float = 1e-3
    """K3 KL coefficient to the reference (the model with the knobs zeroed); 0 turns the term off."""
    micro_batch: int = 4
    """Sequences per forward/backward: memory scales with this, not with the group."""
    forward_ahead: int = 0
    """Micro-batches of student rows (the longest) whose policy forward runs while the grader is still working, their
    activations held until the rewards arrive: hides grading's tail behind the forward at the cost of that many
    micro-batches' activations at once (0 = off; not with --adapter.fold-train)."""
    reward: str = "correct_or_hinted"
    """Reward function of the grader (correct_or_hinted, correct_only, gt_monitor_penalty, gt_monitor_screening)."""
    monitor_accuracy: float = 1.0
    """Accuracy of the ground-truth monitor in the gt_monitor_* rewards (its flag flips with probability 1 − this)."""
    engine: Literal["auto", "static", "hf"] = "auto"
    """Rollout back end: auto (the static CUDA-graph engine on a GPU when it supports the model, else HF generate,
    saying why once), static (an unsupported model is an error), hf (always HF generate)."""
    mask_truncated_completions: bool = False
    """Completions cut at max_new_tokens (no eos; teacher rows too) get advantage 0 and are left out of the loss."""

    @property
    def n_teacher(self) -> int:
        return int(math.floor(self.group_size * self.mix_ratio + 0.5))

    @property
    def n_student(self) -> int:
        return self.group_size - self.n_teacher


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-2
    """AdamW learning rate (peak, after warmup)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay on δS (δS_hack, the routing quarantine, is never decayed)."""
    warmup_frac: float = 0.1
    """Fraction of the steps with linear warmup (from lr/(warmup steps + 1), never 0); cosine decay after."""
    grad_clip: float = 10.0
    """Clip the global gradient norm of the knobs to this (after the hook)."""


@dataclass(frozen=True)
class DataConfig:
    problems: str = ""
    """Problems JSONL (rl-rewardhacking schema); empty = the built-in problems."""
    n_problems: int = 0
    """Use only the first N problems (0 = all)."""
    hint: str = P.DEFAULT_HINT
    """Loophole hint for problems served in the run_tests mode (other modes get their own mode's hint)."""
    modes: str = "run_tests"
    """Comma-separated loophole modes dealt over the problems: run_tests,sentinel,stdout_marker,file_marker."""
    system_prompt: str = P.DEFAULT_SYSTEM_PROMPT
    """System prompt name: code, base_format, seed, pass_test, eval_environment, loophole_extension."""
    teacher_pool: str = ""
    """Teacher pool JSONL (from build-pool); empty = built from the canonical solutions and cached."""
    teacher_modes: str = ""
    """Weak-detector folds: hack demonstrations only for these loophole modes (comma-separated; empty = all); prompts
    served in other modes draw only clean teacher rows, so their exploit must be found by the student."""
    teacher_variants: str = ""
    """Template-disjoint folds: the teacher pool shows only these hack templates (comma-separated names, e.g.
    pass,print_only; empty = all); its rows of other hack templates are dropped."""

    @property
    def mode_list(self) -> tuple[str, ...]:
        return split_list(self.modes)

    @property
    def teacher_mode_list(self) -> tuple[str, ...]:
        return split_list(self.teacher_modes) or self.mode_list


INTERVENTIONS: tuple[str, ...] = ("none", "erase", "route")
PROJECT_ON: tuple[str, ...] = ("auto", "grad", "update", "moments")
GATES: tuple[str, ...] = ("one_sided", "no_gate", "reverse")


@dataclass(frozen=True)
class ProjectionConfig:
    intervention: str = "none"
    """none (vanilla: V only measured, if given), erase (remove the hack-ward part), route (move it to δS_hack)."""
    vhack_path: str = ""
    """The V file: written by extract-vhack, read by verify-vhack and train; empty = no V (plain GRPO)."""
    vhack_random: bool = False
    """The random_V control: replace V by random orthonormal rows with the same k per module (seeded by --seed)."""
    gate: str = "one_sided"
    """one_sided (remove relu(V g) only), no_gate (remove V g), reverse (reflect: V g' = −V g)."""
    overshoot: float = 1.0
    """Scale of the removed component."""
    preserve_magnitude: bool = False
    """Rescale the projected gradient back to its original norm."""
    project_on: str = "auto"
    """auto (update for route, which makes route exact; grad for erase, the seed), grad, update (project the step
    AdamW applies), moments (update, and strip the hack-ward part of Adam's m)."""
    v_top_k: int = 0
    """Keep the first k axes per module (0 = all that were extracted)."""
    drop_bottom_frac: float = 0.0
    """Global noise floor: drop axes whose singular value is under this quantile over all modules (the seed: 0.25)."""
    vhack_refresh_every: int = 0
    """Every N steps, re-extract V on the current model (δS_hack ablated) from the pairs V was made from, and log
    basis_overlap = mean over modules of |<V_new[0], V_old[0]>| (0 = V stays as extracted)."""


NORMALISATIONS: tuple[str, ...] = ("mean", "fixed")
CONTROLS: tuple[str, ...] = ("none", "pca", "cleanclean")


@dataclass(frozen=True)
class VhackConfig:
    pairs: str = "minimal"
    """Where contrastive pairs come from: 'minimal' (same canonical solution, only the evaluator made vacuous or the
    exploit added: length-matched), 'problems' (the teacher pool's templates: wrong `return 0` body + vacuous
    evaluator vs canonical + real asserts), a JSON list of {prompt, hack, clean[, id, problem, mode]}, or a graded
    JSONL (a run's rollouts.jsonl or a teacher pool)."""
    pair_modes: str = ""
    """Keep only pairs of these loophole modes (comma-separated; empty = all): the weak-detector fold's V."""
    pair_variants: str = ""
    """Keep only pairs of these hack templates (comma-separated; --pairs problems: the teacher pool's template names,
    minimal: the min_* variants; empty = all): the template-disjoint fold's V."""
    normalisation: str = "mean"
    """mean: NLL per token (the seed); fixed: the live loss's fixed denominator (max_new_tokens)."""
    n_heldout: int = 8
    """Problems held out from extraction (every pair of each), for verify-vhack; at least one must remain."""
    max_pairs: int = 64
    """Use at most N pairs for extraction, and at most N held-out pairs (seeded choice; 0 = all)."""
    k: int = 4
    """Axes of V per module."""
    tau: float = 0.0
    """Drop axes whose singular value is below tau·S_0 of their module."""
    control: str = "none"
    """V controls: none (the real V), pca (label-free: top principal axes of all completion gradients, matched k),
    cleanclean (V from clean-vs-clean pairs). none,pca: both from one pass of the same pairs' gradients, the first
    at --proj.vhack-path, the other beside it as <name>.pca.safetensors."""
    verify_margin: float = 0.05
    """verify-vhack PASSes only if V's hack-ward energy beats each anisotropy-matched comparator (pca, cleanclean) by
    at least this much (with a bootstrap 95% interval over held-out problems above 0)."""
    verify_draws: int = 64
    """Random Vs drawn by verify-vhack for the empirical null of its statistics."""


@dataclass(frozen=True)
class EvalConfig:
    problems: str = ""
    """Held-out problems JSONL; empty = the 119-problem test split under the data root ('builtin' = built-ins)."""
    n_problems: int = 0
    """First N problems only (0 = all)."""
    n: int = 10
    """Samples per problem."""
    temperature: float = 0.7
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    max_new_tokens: int = 768
    """Most tokens per sample."""
    batch: int = 64
    """Sequences per generate call."""
    keep_quarantine: bool = False
    """Keep δS_hack (default: ablated, as deployed)."""
    seed: int = 0
    """Seeds the random evaluator names and sampling."""

    def problems_path(self) -> str:
        if self.problems:
            return self.problems
        return str(data_root() / HELDOUT_FILE)


REPORT_TO: tuple[str, ...] = ("none", "tensorboard")


@dataclass(frozen=True)
class Config:
    """One config for every run command. Start from a preset (--preset NAME) or a saved config (--config FILE) and
    override fields; each command reads the sections it needs."""

    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    grpo: Annotated[GRPOConfig, tyro.conf.arg(name="")] = GRPOConfig()
    optim: Annotated[OptimConfig, tyro.conf.arg(name="")] = OptimConfig()
    data: Annotated[DataConfig, tyro.conf.arg(name="")] = DataConfig()
    proj: Annotated[ProjectionConfig, tyro.conf.arg(name="")] = ProjectionConfig()
    vhack: Annotated[VhackConfig, tyro.conf.arg(name="")] = VhackConfig()
    eval: EvalConfig = EvalConfig()
    steps: int = 10
    """Optimizer steps."""
    seed: int = 41
    """Seeds everything: prompt order, sampling, teacher draws, hints, V's pair split and controls."""
    run_dir: str = ""
    """Run directory (train writes it, eval reads it); empty = runs/<preset>_s<seed>_<time> for train."""
    out: str = ""
    """Where a command writes its product when that is not a run: eval's directory (default <run-dir>/eval),
    pipeline/sweep's experiment directory (default runs/<command>_<preset>)."""
    arm: str = "vanilla"
    """Label of the experiment arm, recorded for reports."""
    checkpoint_every: int = 5
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    eval_ablate_every: int = 0
    """Every N steps, sample --eval-n-prompts prompts with δS_hack ablated (the deployed model) and log hack_deploy
    and solve_deploy (0 = off; pipelines turn it on for route arms)."""
    eval_n_prompts: int = 8
    """Prompts of the deploy-time eval (each sampled G − G_t times, like a training step)."""
    workers: int = 0
    """Grader processes (0 = one per available core)."""
    cpu_threads: int = 0
    """torch CPU threads (0 = torch's default). 1 suits tiny models, whose ops are too small to split across cores."""
    allow_weak_isolation: bool = False
    """Grade even where the sandbox cannot isolate programs fully (recorded in config.json and the report)."""
    forkserver: bool = True
    """At the userns isolation level, run each graded program in a fresh child of a pre-imported fork server
    (7-9 ms of CPU per program instead of ~40; the programs of one server share its string hash seed); --no-forkserver:
    a fresh interpreter per program. Recorded in config.json's provenance."""
    log_rollouts: bool = True
    """Write every completion with its grade to rollouts.jsonl."""
    progress: bool = True
    """Show progress bars."""
    report_to: str = "none"
    """Mirror metrics to: none | tensorboard (under <run-dir>/tb)."""
    preset: str = ""
    """The preset this config started from (set by --preset; recorded in config.json)."""


GPU_OOM_EXIT = 4
"""train's exit status when the GPU ran out of memory: a sweep retries such a job with fewer jobs side by side."""
VERIFY_FAIL_EXIT = 3
"""verify-vhack's exit status for a FAIL verdict: it ran and V did not pass (a result the pipeline reports and goes on
from; 1 and 2 are errors)."""

# Fields that change how a run is shown or stored, never what it computes: resuming may change them, and reports and
# job identities ignore them.
MEMORY_FIELDS: frozenset[str] = frozenset({"grpo.micro_batch", "grpo.forward_ahead", "model.gradient_checkpointing"})
"""Settings that trade speed for GPU memory and leave what a step computes unchanged (micro-batches sum to the same
loss over the step's fixed denominator; checkpointing recomputes the same forward; a forward run ahead is the same
forward, earlier): a resumed run or a sweep's job may change them (e.g. after running out of memory) without becoming
another run."""

DISPLAY_FIELDS: frozenset[str] = frozenset({
    "run_dir", "out", "checkpoint_every", "workers", "cpu_threads", "log_rollouts", "progress", "report_to",
    "allow_weak_isolation", "preset", "forkserver",
})

# ----------------------------------------------------------------------------------------------------------------
# presets


def _tiny(**kw) -> Config:
    return dataclasses.replace(Config(model=ModelConfig(name="tiny", dtype="float32", device="cpu"), cpu_threads=1),
                               **kw)


def _qwen3_4b(**kw) -> Config:
    return dataclasses.replace(Config(
        model=ModelConfig(name="Qwen/Qwen3-4B", dtype="bfloat16", device="cuda", gradient_checkpointing=True),
        data=DataConfig(problems="runs/data/train.jsonl"), checkpoint_every=25), **kw)


def _coder(name: str) -> Config:
    return Config(
        model=ModelConfig(name=name, dtype="bfloat16", device="cuda"),
        grpo=GRPOConfig(group_size=8, prompts_per_step=8, max_new_tokens=512, mix_ratio=0.125, beta=1e-3,
                        temperature=0.7, top_p=0.95, micro_batch=8),
        optim=OptimConfig(lr=3e-3, betas=(0.5, 0.9)), data=DataConfig(problems="runs/data/train.jsonl"),
        steps=100, checkpoint_every=25)


_PRESETS: dict[str, Config] = {
    # the model organism (the tiny model fine-tuned into a small coder that rarely hacks; organism.py), built-in
    # problems, CPU: GRPO with the loophole's reward makes the vanilla student hack and erase holds it down (the
    # README's main command; organism.EXPECTED is what it should show). V from the teacher pool's template pairs: the
    # organism's hacks are those templates (on it, minimal-pair V does not hold hacking down).
    "organism": _tiny(
        model=ModelConfig(name="organism", dtype="float32", device="cpu"),
        grpo=GRPOConfig(group_size=6, prompts_per_step=4, max_new_tokens=128, mix_ratio=0.34, top_p=0.9,
                        micro_batch=8),
        optim=OptimConfig(lr=4e-2, warmup_frac=0.3), vhack=VhackConfig(pairs="problems"), steps=20,
        checkpoint_every=10),
    # tiny random Qwen3, built-in problems, CPU: real generation, grading and gradients in about a minute.
    "fast-dev-run": _tiny(
        grpo=GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=32, mix_ratio=0.5, micro_batch=4),
        optim=OptimConfig(lr=5e-2), steps=20, checkpoint_every=5),
    # the same pipeline longer, every path: all four loophole modes, several micro-batches, classic checkpoints.
    "smoke": _tiny(
        grpo=GRPOConfig(group_size=6, prompts_per_step=2, max_new_tokens=48, mix_ratio=0.5, micro_batch=2),
        optim=OptimConfig(lr=5e-2), data=DataConfig(modes=",".join(P.MODES)), steps=30, checkpoint_every=10),
    # the seed's fast preset (Qwen3-4B, one GPU)
    "fast": _qwen3_4b(
        grpo=GRPOConfig(group_size=8, prompts_per_step=4, max_new_tokens=512, mix_ratio=0.125, beta=0.0,
                        temperature=0.7, top_p=0.95, micro_batch=4),
        optim=OptimConfig(lr=3e-3, betas=(0.5, 0.9)), steps=60),
    # the seed's full preset: G=12, max_new 1024, β=1e-3, lr 1e-3, 200 steps (~252 rollouts per step, as the paper)
    "full": _qwen3_4b(
        grpo=GRPOConfig(group_size=12, prompts_per_step=21, max_new_tokens=1024, mix_ratio=0.5, beta=1e-3,
                        temperature=0.7, top_p=0.95, micro_batch=4),
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.99)), steps=200),
    # Qwen2.5-Coder-0.5B-Instruct from the registry packages (pip install '.[coder05]'), one GPU
    "coder05": _coder("coder05"),
    # Qwen2.5-Coder-1.5B-Instruct Q4_K_M from the registry packages (pip install '.[coder15]'), one GPU
    "coder15": _coder("coder15"),
}
PRESETS: dict[str, Config] = {name: dataclasses.replace(c, preset=name) for name, c in _PRESETS.items()}


# ----------------------------------------------------------------------------------------------------------------
# (de)serialisation


def control_path(vhack_path: str | Path, control: str, controls: tuple[str, ...]) -> Path:
    """Where extract-vhack writes the V of `control` among `controls` (--vhack.control, comma-separated): the first
    at --proj.vhack-path, each further one beside it as `<name>.<control>.safetensors`."""
    p = Path(vhack_path)
    return p if control == controls[0] else p.with_name(f"{p.name.removesuffix('.safetensors')}.{control}.safetensors")


def split_list(s: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c'): the one way comma-separated values are read."""
    return tuple(x.strip() for x in s.split(",") if x.strip())


def from_dict(cls: type, d: dict, where: str = "config") -> typing.Any:
    """Rebuild a (nested) frozen config from its `dataclasses.asdict` form; unknown keys are an error, missing keys
    take their defaults (configs saved by older versions load)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object for {cls.__name__}, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} for {cls.__name__}; is it a config.json made by "
                         "another version?")
    kw = {}
    for name, v in d.items():
        t = hints[name]
        if dataclasses.is_dataclass(t):
            v = from_dict(t, v, f"{where}.{name}")
        elif isinstance(v, list):
            v = tuple(v)
        kw[name] = v
    return cls(**kw)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def load_config_file(path: str | Path) -> Config:
    """A saved config.json (a run's, or a job's); it may hold a `provenance` key, which is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no such config file; pass a config.json written by projected-grpo")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged, restore or delete it") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a config object")
    d = {k: v for k, v in d.items() if k != "provenance"}
    try:
        return from_dict(Config, d, str(path))
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None


def flatten(d: dict, prefix: str = "") -> dict[str, typing.Any]:
    """{'grpo': {'lr': 1}} -> {'grpo.lr': 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(a: Config, b: Config, ignore: frozenset[str] = DISPLAY_FIELDS) -> list[str]:
    """'field: a -> b' for every field that differs (dotted names), ignoring `ignore` (top-level or dotted names)."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
            if k.split(".")[0] not in ignore and k not in ignore and fa.get(k) != fb.get(k)]


# ----------------------------------------------------------------------------------------------------------------
# validation: one line naming the value, the rule and the fix


def _finite_floats(d: dict, prefix: str = "") -> list[str]:
    bad = []
    for k, v in d.items():
        if isinstance(v, dict):
            bad += _finite_floats(v, f"{prefix}{k}.")
        elif isinstance(v, float) and not math.isfinite(v):
            bad.append(f"{prefix}{k}={v}")
        elif isinstance(v, (tuple, list)) and any(isinstance(x, float) and not math.isfinite(x) for x in v):
            bad.append(f"{prefix}{k}={v}")
    return bad


def _hack_variants() -> tuple[str, ...]:
    return tuple(v for vs in P.HACK_VARIANTS.values() for v in vs)


def _minimal_variants() -> tuple[str, ...]:
    return tuple(v for vs in P.MINIMAL_VARIANTS.values() for v in vs)


def validate(cfg: Config, command: str = "train") -> None:
    """Raise ValueError with one line for the first setting that cannot work for `command`."""
    from projected_grpo.grader import REWARDS

    bad = _finite_floats(to_dict(cfg))
    if bad:
        raise ValueError(f"{bad[0]} is not a finite number; pass a real value")
    g, o, d, pj, v, e = cfg.grpo, cfg.optim, cfg.data, cfg.proj, cfg.vhack, cfg.eval
    controls = split_list(v.control)
    ncpu = os.cpu_count() or 1
    checks = [
        (cfg.steps >= 1, f"steps={cfg.steps} must be >= 1"),
        (g.group_size >= 2, f"group_size={g.group_size} must be >= 2 (advantages compare within a group)"),
        (g.prompts_per_step >= 1, f"prompts_per_step={g.prompts_per_step} must be >= 1"),
        (g.max_new_tokens >= 1, f"max_new_tokens={g.max_new_tokens} must be >= 1"),
        (0.0 <= g.mix_ratio <= 1.0, f"mix_ratio={g.mix_ratio} must be in [0, 1]"),
        (g.n_student >= 1, f"mix_ratio={g.mix_ratio} leaves no student in a group of {g.group_size} "
                           f"(G_t={g.n_teacher}); lower --mix-ratio or raise --group-size"),
        (g.micro_batch >= 1, f"micro_batch={g.micro_batch} must be >= 1"),
        (g.forward_ahead >= 0, f"forward_ahead={g.forward_ahead} must be >= 0 (0 = off)"),
        (not (g.forward_ahead and cfg.adapter.fold_train),
         f"forward_ahead={g.forward_ahead} cannot run with --adapter.fold-train (the fold would change W under the "
         "held forward); pass --forward-ahead 0 or drop --adapter.fold-train"),
        (0 <= g.temperature <= 10, f"temperature={g.temperature} must be in [0, 10] (0 = greedy)"),
        (0 < g.top_p <= 1, f"top_p={g.top_p} must be in (0, 1]"),
        (0 < g.clip < 10, f"clip={g.clip} must be in (0, 10)"),
        (0 <= g.beta <= 100, f"beta={g.beta} must be in [0, 100]"),
        (0 <= g.monitor_accuracy <= 1, f"monitor_accuracy={g.monitor_accuracy} must be in [0, 1]"),
        (g.reward in REWARDS, f"reward={g.reward!r} is not one of {', '.join(REWARDS)}"),
        (g.engine in ("auto", "static", "hf"), f"engine={g.engine!r} is not one of auto, static, hf; pass --engine auto"),
        (0 < o.lr <= 1, f"lr={o.lr} must be in (0, 1] (δS is a singular-value offset; typical 1e-3..5e-2)"),
        (all(0 <= b < 1 for b in o.betas), f"betas={o.betas} must each be in [0, 1)"),
        (0 <= o.weight_decay <= 1, f"weight_decay={o.weight_decay} must be in [0, 1]"),
        (o.grad_clip > 0, f"grad_clip={o.grad_clip} must be > 0"),
        (0 <= o.warmup_frac < 1, f"warmup_frac={o.warmup_frac} must be in [0, 1)"),
        (0 <= cfg.cpu_threads <= ncpu, f"cpu_threads={cfg.cpu_threads} must be in [0, {ncpu}] (this machine has "
                                       f"{ncpu} cores; 0 = torch's default)"),
        (cfg.workers >= 0, f"workers={cfg.workers} must be >= 0 (0 = one per available core)"),
        (cfg.checkpoint_every >= 0, f"checkpoint_every={cfg.checkpoint_every} must be >= 0"),
        (cfg.eval_ablate_every >= 0, f"eval_ablate_every={cfg.eval_ablate_every} must be >= 0 (0 = off)"),
        (cfg.eval_n_prompts >= 1, f"eval_n_prompts={cfg.eval_n_prompts} must be >= 1"),
        (cfg.report_to in REPORT_TO, f"report_to={cfg.report_to!r} is not one of {', '.join(REPORT_TO)}"),
        (d.n_problems >= 0, f"n_problems={d.n_problems} must be >= 0 (0 = all)"),
        (bool(d.mode_list) and all(m in P.MODES for m in d.mode_list),
         f"modes={d.modes!r} must be a comma-separated subset of {','.join(P.MODES)}"),
        (all(m in P.MODES for m in d.teacher_mode_list),
         f"teacher_modes={d.teacher_modes!r} must be a comma-separated subset of {','.join(P.MODES)}"),
        (all(t in _hack_variants() for t in split_list(d.teacher_variants)),
         f"teacher_variants={d.teacher_variants!r} must be a comma-separated subset of {','.join(_hack_variants())}"),
        (d.hint in P.HINTS, f"hint={d.hint!r} is not one of {', '.join(P.HINTS)}"),
        (d.system_prompt in P.SYSTEM_PROMPT_NAMES,
         f"system_prompt={d.system_prompt!r} is not one of {', '.join(P.SYSTEM_PROMPT_NAMES)}"),
        (cfg.adapter.rank_cap is None or cfg.adapter.rank_cap >= 1,
         f"adapter.rank_cap={cfg.adapter.rank_cap} must be >= 1 or None"),
        (bool(cfg.adapter.targets), "adapter.targets is empty; name at least one Linear (e.g. q_proj)"),
        (pj.intervention in INTERVENTIONS, f"intervention={pj.intervention!r} is not one of {', '.join(INTERVENTIONS)}"),
        (pj.gate in GATES, f"gate={pj.gate!r} is not one of {', '.join(GATES)}"),
        (pj.project_on in PROJECT_ON, f"project_on={pj.project_on!r} is not one of {', '.join(PROJECT_ON)}"),
        (pj.v_top_k >= 0, f"v_top_k={pj.v_top_k} must be >= 0 (0 = all axes)"),
        (0.0 <= pj.drop_bottom_frac < 1.0, f"drop_bottom_frac={pj.drop_bottom_frac} must be in [0, 1)"),
        (0 < pj.overshoot <= 10, f"overshoot={pj.overshoot} must be in (0, 10]"),
        (pj.vhack_refresh_every >= 0, f"vhack_refresh_every={pj.vhack_refresh_every} must be >= 0 (0 = off)"),
        (not (pj.vhack_refresh_every and pj.vhack_random),
         "--vhack-refresh-every with --vhack-random: a random V does not depend on the model; drop one of them"),
        (v.k >= 1, f"k={v.k} must be >= 1 (axes of V per module)"),
        (0 <= v.tau < 1, f"tau={v.tau} must be in [0, 1)"),
        (v.n_heldout >= 0, f"n_heldout={v.n_heldout} must be >= 0"),
        (v.max_pairs >= 0, f"max_pairs={v.max_pairs} must be >= 0 (0 = all)"),
        (v.normalisation in NORMALISATIONS, f"normalisation={v.normalisation!r} is not one of {NORMALISATIONS}"),
        (bool(controls) and all(c in CONTROLS for c in controls) and len(set(controls)) == len(controls),
         f"control={v.control!r} must be one of {', '.join(CONTROLS)}, or several of them comma-separated"),
        ("cleanclean" not in controls or controls == ("cleanclean",),
         f"control={v.control!r}: cleanclean is extracted from other pairs than none and pca; extract it on its own"),
        (all(m in P.MODES for m in split_list(v.pair_modes)),
         f"pair_modes={v.pair_modes!r} must be a comma-separated subset of {','.join(P.MODES)}"),
        (all(t in _hack_variants() + _minimal_variants() for t in split_list(v.pair_variants)),
         f"pair_variants={v.pair_variants!r} must be a comma-separated subset of "
         f"{','.join(_hack_variants() + _minimal_variants())}"),
        (not (split_list(v.pair_variants) and v.pairs not in ("problems", "minimal")),
         f"pair_variants={v.pair_variants!r} filters the built-in pairs; use --pairs problems or minimal with it"),
        (e.n >= 1, f"eval.n={e.n} must be >= 1 (samples per problem)"),
        (e.n_problems >= 0, f"eval.n_problems={e.n_problems} must be >= 0 (0 = all)"),
        (0 <= e.temperature <= 10, f"eval.temperature={e.temperature} must be in [0, 10] (0 = greedy)"),
        (0 < e.top_p <= 1, f"eval.top_p={e.top_p} must be in (0, 1]"),
        (e.max_new_tokens >= 1, f"eval.max_new_tokens={e.max_new_tokens} must be >= 1"),
        (e.batch >= 1, f"eval.batch={e.batch} must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    if command == "train":
        if pj.intervention != "none" and not pj.vhack_path:
            raise ValueError(f"--intervention {pj.intervention} needs --vhack-path; extract one with "
                             "`projected-grpo extract-vhack --vhack-path V.safetensors`")
        if pj.vhack_random and not pj.vhack_path:
            raise ValueError("--vhack-random needs --vhack-path (the real V gives the k per module to match)")
    if command in ("train", "extract-vhack", "verify-vhack") and d.problems and not Path(d.problems).is_file():
        raise ValueError(f"problems={d.problems}: no such file; build the train split with `projected-grpo data "
                         "build ... --out runs/data` (never train on the held-out test split)")
    if command == "train" and d.problems and Path(d.problems).resolve() == Path(e.problems_path()).resolve():
        raise ValueError(f"problems={d.problems} is the held-out evaluation split; train on runs/data/train.jsonl "
                         "from `projected-grpo data build`")
    if command in ("verify-vhack",) or (command == "train" and pj.vhack_path):
        if not Path(pj.vhack_path).is_file():
            raise ValueError(f"vhack_path={pj.vhack_path}: no such file; extract it with `projected-grpo extract-vhack "
                             f"--vhack-path {pj.vhack_path or 'V.safetensors'}`")
    if command == "extract-vhack":
        if not pj.vhack_path:
            raise ValueError("extract-vhack needs --vhack-path (where to write V, a .safetensors file)")
        if Path(pj.vhack_path).is_dir():
            raise ValueError(f"vhack_path={pj.vhack_path} is a directory; pass a file path like V.safetensors")
    if command in ("train", "eval", "extract-vhack", "verify-vhack", "experiment"):
        dev = cfg.model.device
        if dev.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"model.device={dev} but this torch has no CUDA device (torch {torch.__version__}); "
                                 "pass --model.device cpu, or install a CUDA build of torch on a GPU machine")
            idx = dev.split(":", 1)[1] if ":" in dev else "0"
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise ValueError(f"model.device={dev}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        elif dev not in ("cpu", "auto"):
            raise ValueError(f"model.device={dev!r} is not one of cpu, cuda, cuda:N, auto")


# ----------------------------------------------------------------------------------------------------------------
# parsing


def flags(cls: type = Config, prefix: str = "") -> set[str]:
    """Every `--flag` tyro accepts for `cls` (nested dataclasses prefixed unless annotated name="")."""
    out: set[str] = set()
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        flat = False
        if typing.get_origin(t) is Annotated:
            base, *meta = typing.get_args(t)
            flat = any(getattr(m, "name", None) == "" for m in meta)
            t = base
        if dataclasses.is_dataclass(t):
            out |= flags(t, prefix if flat else f"{prefix}{f.name}.")
        else:
            out.add(f"--{prefix}{f.name}".replace("_", "-"))
            if t is bool or t == "bool":
                out.add(f"--{prefix}no-{f.name}".replace("_", "-"))
    return out


class UsageError(ValueError):
    """A bad command line: printed as one line, exit code 2."""


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def split_base(argv: list[str], prog: str) -> tuple[Config, str, list[str]]:
    """Take `--preset NAME` / `--config FILE` out of argv -> (base config, preset name, the rest)."""
    preset, config_file, rest = "", "", []
    i = 0
    while i < len(argv):
        a = argv[i]
        key = a.split("=", 1)[0]
        if key in ("--preset", "--config"):
            if "=" in a:
                val = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                val, i = argv[i + 1], i + 1
            else:
                raise UsageError(f"{prog}: {key} needs a value" + (f": {', '.join(PRESETS)}" if key == "--preset" else ""))
            if key == "--preset":
                preset = val
            else:
                config_file = val
        else:
            rest.append(a)
        i += 1
    if preset and config_file:
        raise UsageError(f"{prog}: pass --preset or --config, not both (a config file already holds its preset)")
    if config_file:
        base = load_config_file(config_file)
        return base, base.preset, rest
    preset = preset or "fast-dev-run"
    if preset not in PRESETS:
        raise UsageError(f"{prog}: unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[preset], preset, rest


def check_flags(rest: list[str], known: set[str], prog: str) -> None:
    for a in rest:
        if a.startswith("-") and not _is_number(a):
            flag = a.split("=", 1)[0]
            if flag.replace("_", "-") not in known:
                raise UsageError(f"{prog}: unknown option {flag}; see {prog} --help")


def parse(argv: list[str], prog: str, description: str, extra: type | None = None,
          extra_default: typing.Any = None) -> tuple[Config, typing.Any]:
    """Parse a run command's argv -> (Config, extra args or None). `extra` is a dataclass of command-only flags
    (e.g. the experiment's --seeds); its fields must not clash with Config's."""
    base, preset, rest = split_base(list(argv), prog)
    known = flags(Config) | {"-h", "--help"} | (flags(extra) if extra is not None else set())
    check_flags(rest, known, prog)
    desc = (f"{description}\n\nPresets: {', '.join(PRESETS)} (this help shows {preset!r}'s values); "
            "--config FILE starts from a saved config.json instead.")
    if extra is None:
        cfg = tyro.cli(Config, default=base, args=rest, prog=prog, description=desc)
        ex = None
    else:
        both = dataclasses.make_dataclass(
            "Args", [("cfg", Annotated[Config, tyro.conf.arg(name="")], dataclasses.field(default=base)),
                     ("ex", Annotated[extra, tyro.conf.arg(name="")], dataclasses.field(default=extra_default if extra_default is not None else extra()))],
            frozen=True)
        parsed = tyro.cli(both, args=rest, prog=prog, description=desc)
        cfg, ex = parsed.cfg, parsed.ex
    cfg = dataclasses.replace(cfg, preset=preset)
    if cfg.adapter.targets and any("," in t for t in cfg.adapter.targets):  # --adapter.targets q_proj,v_proj
        cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(
            cfg.adapter, targets=tuple(x for t in cfg.adapter.targets for x in split_list(t))))
    return cfg, ex


def to_argv(cfg: Config, base: Config | None = None) -> list[str]:
    """Flags that turn `base` (default: cfg's preset) into `cfg` — what a job's command line carries."""
    base = base if base is not None else PRESETS.get(cfg.preset, Config())
    out: list[str] = []
    hints_cache: dict[type, dict] = {}

    def walk(c, b, cls, prefix):
        hints = hints_cache.setdefault(cls, typing.get_type_hints(cls, include_extras=True))
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            flat = False
            if typing.get_origin(t) is Annotated:
                base_t, *meta = typing.get_args(t)
                flat = any(getattr(m, "name", None) == "" for m in meta)
                t = base_t
            cv, bv = getattr(c, f.name), getattr(b, f.name)
            if dataclasses.is_dataclass(t):
                walk(cv, bv, t, prefix if flat else f"{prefix}{f.name}.")
                continue
            if cv == bv or f.name == "preset":
                continue
            flag = f"--{prefix}{f.name}".replace("_", "-")
            if isinstance(cv, bool):
                out.append(flag if cv else f"--{prefix}no-{f.name}".replace("_", "-"))
            elif isinstance(cv, tuple):
                out.extend([flag, *map(str, cv)])
            elif cv is None:
                out.extend([flag, "None"])
            else:
                out.extend([flag, str(cv)])

    walk(cfg, base, Config, "")
    return (["--preset", cfg.preset] if cfg.preset in PRESETS else []) + out


def fail(prog: str, msg: str, code: int = 2) -> int:
    """Print one error line (prefixed by the command) and return the exit code."""
    print(f"{prog}: {msg}", file=sys.stderr)
    return code
