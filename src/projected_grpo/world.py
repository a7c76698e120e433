"""A run's world, assembled once: the served problems and their hints, the model, tokenizer, knobs, prompt ids, the
(model, adapter) fingerprint that V files and checkpoints must match, and the grader's isolation level.

train, extract-vhack, verify-vhack and eval all call `build(cfg)`, so they see the same problems, hints and model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from projected_grpo import adapter, models, teacher
from projected_grpo import problems as P
from projected_grpo.adapter import SVDKnob
from projected_grpo.config import Config


@dataclass
class World:
    cfg: Config
    problems: list[P.Problem]  # served: each with its loophole mode
    hints: list[P.Hint | None]  # one per problem
    loaded: models.Loaded
    knobs: dict[str, SVDKnob]
    system_prompt: str  # the rendered system prompt text
    prompt_ids: list[list[int]]  # per problem, the chat-templated prompt's token ids
    fingerprint: str  # model id + adapter basis: what V files and checkpoints are checked against
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # what building it took, by part

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def prompt_text(self, i: int) -> str:
        return P.render_prompt(self.tokenizer, P.chat_messages(self.problems[i], self.hints[i], self.system_prompt))


def model_fingerprint(model_id: str, knobs: dict[str, SVDKnob]) -> str:
    """What a V file or checkpoint must have been made for: the model id and the adapter's basis."""
    return f"{model_id}|{adapter.fingerprint(model_id, knobs)}"


def load_problems(cfg: Config) -> list[P.Problem]:
    """The run's problems, before serving (first, so a bad file fails before a slow model load)."""
    d = cfg.data
    problems = P.load_problems(d.problems) if d.problems else P.builtin_problems()
    problems = problems[:d.n_problems] if d.n_problems else problems
    if not problems:
        raise ValueError(f"no problems in {d.problems or 'the built-in set'}; pass a non-empty --problems file")
    return problems


def load_model(cfg: Config, seconds: dict[str, float] | None = None) -> tuple[models.Loaded, dict[str, SVDKnob], str]:
    """The model with its knobs attached (SVDs cached beside the model) and the fingerprint. `seconds`, when given,
    gets the time of each part ("model", "knobs")."""
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    t0 = time.perf_counter()
    loaded = models.load(cfg.model)
    t1 = time.perf_counter()
    acfg = cfg.adapter if cfg.adapter.cache_dir else dataclasses.replace(cfg.adapter, cache_dir=str(cfg.model.root))
    knobs = adapter.attach(loaded.model, acfg, loaded.model_id)
    if seconds is not None:
        seconds |= {"model": t1 - t0, "knobs": time.perf_counter() - t1}
    return loaded, knobs, model_fingerprint(loaded.model_id, knobs)


def build(cfg: Config, problems: list[P.Problem] | None = None) -> World:
    """Serve the problems (loophole modes dealt and hints drawn, seeded by cfg.seed), load the model and knobs, and
    tokenize every prompt. World.seconds: the time of each part (problems, model, knobs, prompts)."""
    d = cfg.data
    t0 = time.perf_counter()
    problems = load_problems(cfg) if problems is None else problems
    served, hints = teacher.serve(problems, d.hint, d.mode_list, cfg.seed)
    t1 = time.perf_counter()
    parts: dict[str, float] = {}
    loaded, knobs, fp = load_model(cfg, parts)
    t2 = time.perf_counter()
    system = P.system_prompt(d.system_prompt)
    tok = loaded.tokenizer
    prompt_ids = [tok(P.render_prompt(tok, P.chat_messages(p, h, system)), add_special_tokens=False)["input_ids"]
                  for p, h in zip(served, hints, strict=True)]
    seconds = {"problems": t1 - t0, **parts, "prompts": time.perf_counter() - t2}
    return World(cfg, served, hints, loaded, knobs, system, prompt_ids, fp, seconds)


# ----------------------------------------------------------------------------------------------------------------
# grading isolation and provenance


def isolation(allow_weak: bool, forkserver: bool = True) -> str:
    """The grader's isolation level here (checked once per process). Refuses a level that does not keep programs
    away from the data, the project and the network unless `allow_weak`. `forkserver`: whether this process grades in
    fork servers where the level allows (grader.set_forkserver)."""
    from projected_grpo import grader, sandbox

    grader.set_forkserver(forkserver)
    req = getattr(sandbox, "require_isolation", None)
    if req is not None:
        return req(allow_weak)
    return sandbox.isolation_level()


def _isolation_info() -> str | None:
    from projected_grpo import sandbox

    info = getattr(sandbox, "isolation_info", None)
    return info() if info is not None else None


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def source_sha256(root: Path | None = None) -> str:
    """sha256 (16 hex digits) over the package's .py files, names and bytes in sorted order: names the exact code
    that ran, where a "-dirty" git commit or a copy without .git cannot."""
    root = root or Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(world: World | None, isolation_level: str | None) -> dict:
    """What produced a result: package and library versions, git commit and a hash of the package's source, model id
    and weights hash, grader isolation, the device."""
    from projected_grpo import __version__
    from projected_grpo.grader import use_forkserver

    out = {
        "projected_grpo": __version__, "git_commit": _git_commit(), "source_sha256": source_sha256(),
        "python": platform.python_version(),
        "torch": torch.__version__, "transformers": _version("transformers"), "isolation": isolation_level,
        "isolation_info": _isolation_info(),
        # programs graded in fork servers (a pre-imported interpreter per server, a fresh child per program)
        "grader_forkserver": use_forkserver(isolation_level, None) if isolation_level else None,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if world is not None:
        out["model_id"] = world.loaded.model_id
        out["fingerprint"] = world.fingerprint
        out["weights_sha256"] = adapter.fingerprint(world.loaded.model_id, world.knobs)
        out["n_knobs"] = len(world.knobs)
    logger.debug(f"provenance: {out}")
    return out
