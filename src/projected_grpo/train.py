"""One GRPO run on the singular-value knob: rollout -> grade -> advantages -> backward -> hook -> clip -> step -> log.

    projected-grpo train --preset fast-dev-run            # tiny random Qwen3, built-in problems, CPU, ~15 s
    projected-grpo train --preset full --seed 42          # the seed's Qwen3-4B run (one GPU)
    projected-grpo train --preset smoke --mix-ratio 0.25  # any field can be overridden; --help lists them all
    projected-grpo train --resume runs/fast-dev-run_s41   # continue a killed run where it checkpointed
    projected-grpo train --resume runs/fast-dev-run_s41 --steps 40   # ... and run it longer

Each step: P prompts, each served with its loophole hint; G_s = G − G_t sampled student completions per prompt
(knob merged into W, `engine.generate`) and G_t = round(G·mix_ratio) teacher-pool rows with frozen grades; students
graded by the real grader in parallel processes; group advantages (Dr.GRPO by default); the PPO-clip loss with K3 KL
to the free reference (the same model with the knobs zeroed) backpropagated in micro-batches, student and teacher
parts separately so the projection hook sees g_s and g_t (g = g_s + g_t exactly); hook; clip; AdamW; log; checkpoint.

A run directory holds config.json (+ provenance), metrics.jsonl (one row per step), rollouts.jsonl (one row per
completion), train.log (DEBUG), ckpt/step_NNNNNN/ (knobs, optimizer, scheduler, RNG), summary.tsv, and .lock while a
process writes it (a second writer is refused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from torch import Tensor
from tqdm.auto import tqdm

from projected_grpo import adapter, checkpoint, config, distributed, engine, grpo, teacher, vhack, world
from projected_grpo import problems as P
from projected_grpo.adapter import SVDKnob
from projected_grpo.config import Config, GRPOConfig
from projected_grpo.grpo import pad_sequences

# step, knobs, g_student per module, g_teacher per module -> metrics. Runs after backward, before clipping; it may
# rewrite knob.dS.grad and knob.dS_hack.grad (δS_hack.grad is None on entry: it moves only if a hook routes into it).
ProjectionHook = Callable[[int, dict[str, SVDKnob], dict[str, Tensor], dict[str, Tensor]], dict[str, float]]
# step, knobs, optimizer, δS before the step, δS_hack before the step -> metrics. Runs right after optimizer.step()
# (update-space projection: it may rewrite knob.dS.data / dS_hack.data and the optimizer state).
PostStepHook = Callable[[int, dict[str, SVDKnob], torch.optim.Optimizer, dict[str, Tensor], dict[str, Tensor]],
                        dict[str, float]]

class GPUOutOfMemory(RuntimeError):
    """The GPU ran out of memory in a step (the message says which setting to lower)."""


TIMING_KEYS = ("tokens_per_s", "time_generate", "time_grade", "time_ref", "time_train", "time_step", "time_startup",
               "gpu_peak_gb")
"""Per-step measurements of the machine, not of the run (left out when runs are compared for reproducibility)."""


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup from 1/(warmup+1) (never 0: every step trains), then cosine decay towards 0 (the last step > 0)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------------------------------------------
# pieces of a step (pure or nearly)


def prompt_indices(step: int, n: int, k: int, seed: int) -> list[int]:
    """The k problem indices of `step`: consecutive slices of seeded per-epoch permutations of range(n)."""
    out = []
    for j in range(step * k, (step + 1) * k):
        epoch, pos = divmod(j, n)
        perm = list(range(n))
        random.Random(f"order:{seed}:{epoch}").shuffle(perm)
        out.append(perm[pos])
    return out


def _strip_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def backward_pass(model: torch.nn.Module, knobs: dict[str, SVDKnob], ids: Tensor, attn: Tensor, cmask: Tensor,
                  n_prompt: int, adv: Tensor, g: GRPOConfig, denom: float, totals: dict[str, float], who: str,
                  step: int, ref_all: Tensor | None = None, fold: bool = False, keep: Tensor | None = None,
                  ahead: list[tuple[Tensor, Tensor]] | None = None) -> None:
    """Accumulate ∇ of the GRPO loss of these sequences into the knobs' .grad, `g.micro_batch` rows at a time.
    ids (B, n_prompt + T), attn (B, n_prompt + T), cmask (B, T), adv (B,), ref_all (B, T) the reference log-probs
    when already computed (else computed here, all of it first: under `fold` the reference needs the unfolded W).
    `fold`: the knobs folded into W for the pass (adapter.folded). `keep` (B,) bool: the rows trained (None: all).
    `ahead`: micro-batches whose policy forward already ran (`forward_ahead`), each (rows (b,), log-probs (b, T) with
    their graph); their rows outside `keep` are masked out of the loss, and the other micro-batches are cut from the
    kept rows not among them. Adds loss, kl_sum, tokens, clipped and the summed completion log-prob (logp_<who>,
    tokens_<who>) into `totals`."""
    device = next(iter(knobs.values())).dS.device
    ahead = ahead or []
    if ahead and fold:
        raise ValueError("backward_pass: a forward run ahead cannot be finished with the knobs folded into W")
    keep = torch.ones(ids.shape[0], dtype=torch.bool) if keep is None else keep.cpu()
    if ref_all is None and g.beta:
        rows = keep.nonzero()[:, 0]
        ref_all = torch.zeros(cmask.shape, dtype=torch.float32)  # (B, T)
        ref_all[rows] = reference_logprobs(model, knobs, ids[rows], attn[rows], cmask[rows], n_prompt, g)
    # micro-batches of rows of similar length, longest first (on the CPU: it indexes adv and ref_all, CPU tensors)
    todo = keep.clone()
    for sl, _ in ahead:
        todo[sl] = False
    rest = todo.nonzero()[:, 0]
    rest = rest[grpo.length_order(attn[rest], cmask[rest], n_prompt).cpu()]
    batches = ahead + [(sl, None) for sl in rest.split(g.micro_batch)]
    model.train()  # these models have no dropout; this turns gradient checkpointing on where configured
    with adapter.folded(knobs) if fold else contextlib.nullcontext():
        for sl, lp in batches:
            m = cmask[sl].to(device) & keep[sl, None].to(device)  # (b, T)
            if not bool(m.any()):
                continue  # rows run ahead that the step does not train
            if lp is None:
                lp = policy_logprobs(model, ids, attn, cmask, n_prompt, sl, g)  # (b, T)
            ref = ref_all[sl].to(device) if ref_all is not None else None  # (b, T)
            loss, st = grpo.grpo_loss(lp, lp.detach(), ref, adv[sl].to(device), m, clip=g.clip, beta=g.beta,
                                      denom=denom)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: non-finite loss in the {who} pass (micro-batch of rows "
                                         f"{sl.tolist()}); "
                                         "lower --lr or --beta")
            loss.backward()
            totals["loss"] += float(loss.detach())
            totals[f"logp_{who}"] += float((lp.detach() * m).sum())
            totals[f"tokens_{who}"] += float(st["tokens"])
            for key in ("kl_sum", "tokens", "clipped"):
                totals[key] += float(st[key])
    model.eval()


def student_rows(adv: Tensor, n_student: int, keep: list[int]) -> tuple[Tensor, Tensor]:
    """adv (P, G) with each group's students first, `keep` the student rows (b = group · n_student + i) trained ->
    (keep (P·n_student,) bool, each student row's advantage (P·n_student,), 0 where not kept)."""
    mask = torch.zeros(adv.shape[0] * n_student, dtype=torch.bool)
    mask[keep] = True
    return mask, torch.where(mask, adv[:, :n_student].reshape(-1), 0.0)


def policy_logprobs(model: torch.nn.Module, ids: Tensor, attn: Tensor, cmask: Tensor, n_prompt: int, rows: Tensor,
                    g: GRPOConfig) -> Tensor:
    """The policy's log-probs of the completions of rows `rows` (b,) of ids, with their autograd graph -> (b, T)."""
    device = next(model.parameters()).device
    return grpo.token_logprobs(model, ids[rows].to(device), n_prompt, g.micro_batch, attn[rows].to(device),
                               temperature=g.temperature, completion_mask=cmask[rows].to(device))


def forward_ahead(model: torch.nn.Module, ids: Tensor, attn: Tensor, cmask: Tensor, n_prompt: int,
                  g: GRPOConfig) -> list[tuple[Tensor, Tensor]]:
    """The policy's forward of the first `g.forward_ahead` micro-batches of these rows (by length, longest first),
    graphs kept, for `backward_pass(ahead=...)`. It needs no reward, so train runs it while the grader works;
    how many is a fixed setting, never how long grading takes, so the step computes the same whatever the timing."""
    if g.forward_ahead == 0:
        return []
    order = grpo.length_order(attn, cmask, n_prompt).cpu()
    model.train()  # checkpointing, where configured, is decided here: its recompute runs in backward_pass
    try:
        return [(sl, policy_logprobs(model, ids, attn, cmask, n_prompt, sl, g))
                for sl in order[:g.forward_ahead * g.micro_batch].split(g.micro_batch)]
    finally:
        model.eval()


def reference_logprobs(model: torch.nn.Module, knobs: dict[str, SVDKnob], ids: Tensor, attn: Tensor, cmask: Tensor,
                       n_prompt: int, g: GRPOConfig) -> Tensor | None:
    """The reference's (knobs zeroed) log-probs of every row's completion, (B, T), 0 after each row's last position
    in cmask; None when β = 0. Needs no reward, so train computes it while the grader works."""
    if g.beta == 0:
        return None
    device = next(iter(knobs.values())).dS.device
    out = torch.zeros(cmask.shape, dtype=torch.float32)  # (B, T), on the CPU
    order = grpo.length_order(attn, cmask, n_prompt).cpu()  # indexes `out`
    with torch.no_grad(), adapter.zeroed(knobs):
        for sl in order.split(g.micro_batch):
            out[sl] = grpo.token_logprobs(model, ids[sl].to(device), n_prompt, g.micro_batch, attn[sl].to(device),
                                          temperature=g.temperature, completion_mask=cmask[sl].to(device)).cpu()
    return out


def rollout_rows(step: int, probs: list[P.Problem], n_student: int, s_grades: list, s_text: list[str],
                 s_ids: list[list[int]], t_rows: list[list[teacher.TeacherRow]], adv: Tensor, skip: Tensor
                 ) -> list[dict]:
    """One JSON row per completion of the step, students then teachers, with every grade field."""
    out = []
    for b, (gr, text) in enumerate(zip(s_grades, s_text, strict=True)):
        j = b // n_student
        out.append({"step": step, "problem_id": probs[j].id, "mode": probs[j].mode, "source": "student", "variant": "",
                    "completion": text, "reward": _num(float(gr.reward)), "advantage": float(adv[j, b % n_student]),
                    "group_skipped": bool(skip[j]), "n_tokens": len(s_ids[b]), "grade": dataclasses.asdict(gr)})
    for j, rs in enumerate(t_rows):
        for i, r in enumerate(rs):
            out.append({"step": step, "problem_id": r.problem_id, "mode": r.mode, "source": "teacher",
                        "variant": f"{r.kind}:{r.variant}", "completion": r.completion, "reward": _num(r.reward),
                        "advantage": float(adv[j, n_student + i]), "group_skipped": bool(skip[j]), "n_tokens": None,
                        "grade": r.grade})
    return out


def _grads(knobs: dict[str, SVDKnob]) -> dict[str, Tensor]:
    return {n: (k.dS.grad.detach().clone() if k.dS.grad is not None else torch.zeros_like(k.dS))
            for n, k in knobs.items()}


def _check_finite(step: int, grads: dict[str, Tensor], what: str) -> None:
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    if bad:
        raise FloatingPointError(f"step {step}: non-finite {what} gradient in {bad[0]}"
                                 f"{f' (+{len(bad) - 1} more modules)' if len(bad) > 1 else ''} although every loss of "
                                 "the step was finite: the backward pass made it (check the weights and the attention "
                                 "kernel; lowering --lr or --beta helps only a diverging run)")


def _mean(xs: list[float]) -> float | None:
    """Mean of the non-NaN values (NaN = a screened reward); None when there are none."""
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


# ----------------------------------------------------------------------------------------------------------------
# summary


def summarize(cfg: Config, run_dir: Path, rows: list[dict]) -> dict[str, typing.Any]:
    """PASS_RATE / HACK_RATE of the student rollouts, whole run and last 5 steps, plus the run's settings."""
    def avg(key: str, rs: list[dict]) -> float:
        xs = [r[key] for r in rs if r.get(key) is not None]
        return sum(xs) / len(xs) if xs else float("nan")

    last = rows[-5:]
    g, o = cfg.grpo, cfg.optim
    return {
        "PASS_RATE": avg("pass_s", rows), "HACK_RATE": avg("hack_s", rows),
        "PASS_RATE_last5": avg("pass_s", last), "HACK_RATE_last5": avg("hack_s", last),
        "reward": avg("reward", rows), "reward_last5": avg("reward", last), "kl_last5": avg("kl", last),
        "steps": len(rows), "arm": cfg.arm, "intervention": cfg.proj.intervention, "seed": cfg.seed, "model": cfg.model.name, "G": g.group_size,
        "G_teacher": g.n_teacher, "prompts_per_step": g.prompts_per_step, "max_new_tokens": g.max_new_tokens,
        "mix_ratio": g.mix_ratio, "advantage": g.advantage, "beta": g.beta, "lr": o.lr, "reward_fn": g.reward,
        "hint": cfg.data.hint, "modes": cfg.data.modes, "run_dir": str(run_dir),
    }


def write_summary(run_dir: Path, summary: dict[str, typing.Any]) -> str:
    """summary.tsv: a header line and one value line. Returns a printable block."""
    def fmt(v: typing.Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    (run_dir / "summary.tsv").write_text("\t".join(summary) + "\n" + "\t".join(fmt(v) for v in summary.values()) + "\n")
    width = max(map(len, summary))
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in summary.items())


# ----------------------------------------------------------------------------------------------------------------
# the run


def train(cfg: Config, hook: ProjectionHook | None = None, post_step: PostStepHook | None = None, *,
          resume_dir: str | Path | None = None) -> Path:
    """Run (or resume) one GRPO run; returns its run directory. One process writes a run directory at a time.
    Under torchrun each rank runs its share of every step (see distributed.py); rank 0 writes the run."""
    started = time.perf_counter()  # start-up is timed from here to the first step (time_startup)
    config.validate(cfg, "train")
    d = distributed.setup(cfg.model.device)
    if d.world > cfg.grpo.prompts_per_step:
        raise ValueError(f"{d.world} ranks but prompts_per_step={cfg.grpo.prompts_per_step}: each rank needs at least "
                         "one prompt; raise --prompts-per-step or launch fewer processes")
    isolation = world.isolation(cfg.allow_weak_isolation, cfg.forkserver)  # refuses before any work where programs are not isolated
    if resume_dir is not None:
        run_dir = Path(resume_dir)
    else:
        name = f"{cfg.preset or 'run'}_s{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(distributed.gather(d, cfg.run_dir or str(Path("runs") / name))[0])  # rank 0's choice
        if d.main and run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"run dir {run_dir} is a file; pass a directory to --run-dir")
        if d.main and run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(f"run dir {run_dir} is not empty; pass --resume {run_dir} to continue it or a new --run-dir")
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    if not d.main:
        cfg = dataclasses.replace(cfg, progress=False)
    with checkpoint.RunLock(run_dir) if d.main else contextlib.nullcontext():
        log_id = logger.add(run_dir / "train.log", level="DEBUG", enqueue=False) if d.main else None
        threads = torch.get_num_threads()
        try:
            _run(cfg, run_dir, hook, post_step, resume=resume_dir is not None, isolation=isolation, d=d,
                 started=started)
        except OSError as e:
            if checkpoint.disk_full(e):
                raise RuntimeError(f"disk full while writing {run_dir}; free space, then `projected-grpo train "
                                   f"--resume {run_dir}` continues from the last checkpoint") from e
            raise
        except Exception as e:  # the traceback goes to train.log (DEBUG); the caller prints the one-line reason
            logger.opt(exception=True).debug(f"run stopped: {type(e).__name__}: {e}")
            raise
        finally:
            torch.set_num_threads(threads)
            if log_id is not None:
                logger.remove(log_id)
            distributed.teardown(d)
    return run_dir


def _run(cfg: Config, run_dir: Path, hook: ProjectionHook | None, post_step: PostStepHook | None, resume: bool,
         isolation: str, d: distributed.Dist, started: float) -> None:
    g, o = cfg.grpo, cfg.optim
    from projected_grpo.grader import GradeStream

    logger.debug(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    workers = cfg.workers or None  # None: the grader's default, one per available core

    # --- the world: served problems and hints, model, knobs, prompt ids; the intervention; the teacher pool
    if not d.main:
        distributed.barrier(d)  # rank 0 builds (or reads) the cached model and SVDs first
    t_begin = time.perf_counter()
    w = world.build(cfg)
    if d.main:
        distributed.barrier(d)
    model, tok, knobs = w.model, w.tokenizer, w.knobs
    eos_ids, pad_id = w.loaded.eos_ids, w.loaded.pad_id
    problems, hints, prompt_tok = w.problems, w.hints, w.prompt_ids
    params = adapter.knob_params(knobs)
    proj, vmeta = None, None
    if hook is None and post_step is None:  # the intervention named in the config (none without a V)
        proj, vmeta = vhack.load_projector(cfg.proj, w.fingerprint, cfg.seed, set(knobs))
        hook, post_step = (proj.on_grad, proj.after_step) if proj is not None else (None, None)
    refresh_every = cfg.proj.vhack_refresh_every if proj is not None else 0
    t_v = time.perf_counter()
    if g.n_teacher and not d.main:
        distributed.barrier(d)  # rank 0 builds (or reads) the cached pool first
    pool = teacher_pool(cfg, problems, hints, workers) if g.n_teacher else {}
    t_pool = time.perf_counter()
    if g.n_teacher and d.main:
        distributed.barrier(d)
    if not resume and d.main:
        prov = world.provenance(w, isolation)
        (run_dir / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "provenance": prov}, indent=2))

    # δS_hack gets no weight decay: decay would leak the quarantined (routed) motion back towards zero
    opt = torch.optim.AdamW([{"params": [k.dS for k in knobs.values()], "weight_decay": o.weight_decay},
                             {"params": [k.dS_hack for k in knobs.values()], "weight_decay": 0.0}],
                            lr=o.lr, betas=o.betas)
    warmup = int(o.warmup_frac * cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, cfg.steps))
    start = 0
    metrics_f, rollouts_f = run_dir / "metrics.jsonl", run_dir / "rollouts.jsonl"
    if resume:
        ck = checkpoint.latest_checkpoint(run_dir)
        if ck is not None:
            start = checkpoint.load_checkpoint(ck, knobs, opt, sched, w.fingerprint)
            saved_v = checkpoint.load_vhack_state(ck) if refresh_every else None
            if saved_v is not None:  # the V in effect when the checkpoint was written
                proj.Vs = {n: V.to(proj.Vs[n].device) for n, V in saved_v.items()}
        logger.info(f"resuming {run_dir} at step {start}" + (f" from {ck.name}" if ck else " (no checkpoint)"))
        for f in (metrics_f, rollouts_f) if d.main else ():
            dropped = checkpoint.truncate_jsonl(f, start)
            if dropped:
                logger.info(f"{f.name}: dropped {dropped} row(s) logged after the last checkpoint")
    tb = _tensorboard(cfg, run_dir) if d.main else None
    logger.info(f"{w.loaded.model_id}: {len(knobs)} knobs, {len(problems)} problems, G={g.group_size} "
                f"(G_t={g.n_teacher}), P={g.prompts_per_step}, {cfg.steps} steps, grader isolation {isolation} "
                f"-> {run_dir}")
    logger.info("SHOULD: reward and hack_s rise over the run when the teacher pool pays hacks (vanilla arm); "
                "kl starts at 0")
    startup, age = time.perf_counter() - started, process_age()
    parts = {"isolation check and run dir": t_begin - started, **w.seconds,
             "V": t_v - t_begin - sum(w.seconds.values()), "teacher pool": t_pool - t_v,
             "optimizer and resume": time.perf_counter() - t_pool}
    logger.info(f"start-up {startup:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
                + " (the first step adds engine capture)" + (f"; the process is {age:.1f} s old (the interpreter "
                                                              f"and imports came before)" if age is not None else ""))

    bar = tqdm(total=cfg.steps, initial=start, desc=run_dir.name, dynamic_ncols=True, disable=not cfg.progress)
    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        if torch.cuda.is_available():  # the step's peak, logged as gpu_peak_gb: what sizes --jobs-per-gpu
            torch.cuda.reset_peak_memory_stats()
        step_idx = prompt_indices(step, len(problems), g.prompts_per_step, cfg.seed)
        mine = d.share(len(step_idx))  # this rank's positions in the step (all of them in one process)
        idx = [step_idx[j] for j in mine]
        probs, phints = [problems[i] for i in idx], [hints[i] for i in idx]

        # --- rollout: G_s student completions per prompt, knob merged into W; each completion goes to the grader
        # (parallel sandboxed processes) as soon as its row ends, so grading overlaps generation
        s_probs = [p for p in probs for _ in range(g.n_student)]
        with GradeStream(s_probs, [h for h in phints for _ in range(g.n_student)], workers=workers, reward=g.reward,
                         reward_kwargs={"seed": cfg.seed * 1_000_003 + step, "accuracy": g.monitor_accuracy}) as grading:
            t0 = time.perf_counter()
            roll, s_ids, s_text = rollout(w, [prompt_tok[i] for i in idx for _ in range(g.n_student)], g,
                                          seed=cfg.seed * 1_000_003 + step + 7919 * d.rank, step=step,
                                          on_text=grading.submit)
            time_generate = time.perf_counter() - t0
            # --- the reference log-probs while the last programs are graded; teacher rows carry frozen grades
            t0 = time.perf_counter()
            s_ref = reference_logprobs(model, knobs, roll.ids, roll.attention_mask(), roll.completion_mask,
                                       roll.prompt_len, g)
            time_ref = time.perf_counter() - t0
            try:  # and, with --forward-ahead, the policy's forward of the longest rows (graphs kept)
                ahead = forward_ahead(model, roll.ids, roll.attention_mask(), roll.completion_mask, roll.prompt_len, g)
            except torch.cuda.OutOfMemoryError as e:
                raise GPUOutOfMemory(f"step {step}: GPU out of memory in the forward run ahead of the grades; lower "
                                     f"--forward-ahead (now {g.forward_ahead}) or --micro-batch") from e
            s_grades = grading.result()
            time_grade = time.perf_counter() - t0  # the wait for grades after generation
        t_rows = [random.Random(f"teacher:{cfg.seed}:{step}:{j}").sample(pool[pool_key(p, h)], g.n_teacher)
                  if g.n_teacher else [] for j, p, h in zip(mine, probs, phints, strict=True)]

        # --- advantages per group: [students..., teachers...]; a NaN reward (screened) has no advantage
        R = torch.tensor([[float(s_grades[j * g.n_student + i].reward) for i in range(g.n_student)]
                          + [r.reward for r in t_rows[j]] for j in range(len(idx))])  # (P, G)
        adv = grpo.ADVANTAGES[g.advantage](R)  # (P, G)
        skip = grpo.zero_variance_groups(R)  # (P,)
        adv[skip] = 0.0
        t_all = [[teacher_tokens(tok, r.completion, eos_ids[0], g.max_new_tokens) for r in rs] for rs in t_rows]
        cut = torch.zeros_like(adv, dtype=torch.bool)  # (P, G): cut at max_new_tokens without eos
        if g.mask_truncated_completions:  # no advantage and no loss for truncated rows
            comps = [c for j in range(len(idx)) for c in s_ids[j * g.n_student:(j + 1) * g.n_student] + t_all[j]]
            cut = engine.truncated_mask(comps, eos_ids, g.max_new_tokens).view_as(adv)
            adv[cut] = 0.0

        # --- sequences to train, from groups with signal
        t0 = time.perf_counter()
        keep_s = [j * g.n_student + i for j in range(len(idx)) if not skip[j] for i in range(g.n_student)
                  if not cut[j, i]]
        keep_t = [(j, i) for j in range(len(idx)) if not skip[j] for i in range(g.n_teacher)
                  if not cut[j, g.n_student + i]]
        s_keep, s_adv = student_rows(adv, g.n_student, keep_s)
        t_adv = torch.tensor([float(adv[j, g.n_student + i]) for j, i in keep_t])
        t_prompts = [prompt_tok[idx[j]] for j, _ in keep_t]
        t_comps = [t_all[j][i] for j, i in keep_t]
        n_tok = int(roll.completion_mask[keep_s].sum()) + sum(map(len, t_comps))
        denom = (float(g.group_size * g.max_new_tokens * g.prompts_per_step) if g.advantage == "dr_grpo"
                 else max(1.0, distributed.sum_float(d, float(n_tok), R.device)))

        # --- backward: student pass -> g_s, teacher pass -> g_t (micro-batched; knobs zeroed = reference)
        totals = dict.fromkeys(("kl_sum", "tokens", "loss", "clipped", "logp_student", "tokens_student",
                                "logp_teacher", "tokens_teacher"), 0.0)
        opt.zero_grad(set_to_none=True)
        try:
            if keep_s:
                backward_pass(model, knobs, roll.ids, roll.attention_mask(), roll.completion_mask, roll.prompt_len,
                              s_adv, g, denom, totals, "student", step, s_ref, cfg.adapter.fold_train, s_keep, ahead)
            del ahead  # graphs of rows the step did not train
            g_s = _grads(knobs)
            opt.zero_grad(set_to_none=True)
            if keep_t:
                t_ids, t_attn, t_mask, t_np = pad_sequences(t_prompts, t_comps, pad_id)
                backward_pass(model, knobs, t_ids, t_attn, t_mask, t_np, t_adv, g, denom, totals, "teacher", step,
                              fold=cfg.adapter.fold_train)
            g_t = _grads(knobs)
        except torch.cuda.OutOfMemoryError as e:
            raise GPUOutOfMemory(f"step {step}: GPU out of memory in the backward pass; lower --micro-batch (now "
                               f"{g.micro_batch}) or --forward-ahead (now {g.forward_ahead}), or pass "
                               "--model.gradient-checkpointing") from e
        g_s, g_t = distributed.sum_grads(d, g_s), distributed.sum_grads(d, g_t)  # every rank: the whole step's g
        _check_finite(step, g_s, "student")
        _check_finite(step, g_t, "teacher")
        for n, k in knobs.items():
            k.dS.grad = g_s[n] + g_t[n]  # g = g_s + g_t exactly
            k.dS_hack.grad = None  # δS_hack moves only if a hook routes into it

        # --- projection hook, clip, step
        hook_metrics = hook(step, knobs, g_s, g_t) if hook is not None else {}
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip))
        if not math.isfinite(grad_norm):
            _check_finite(step, {n: k.dS.grad for n, k in knobs.items() if k.dS.grad is not None}, "dS (after hook)")
            _check_finite(step, {n: k.dS_hack.grad for n, k in knobs.items() if k.dS_hack.grad is not None},
                          "dS_hack (after hook)")
            raise FloatingPointError(f"step {step}: gradient norm {grad_norm} overflows; lower --lr")
        lr = sched.get_last_lr()[0]
        prev_dS = {n: k.dS.detach().clone() for n, k in knobs.items()}
        prev_dS_hack = {n: k.dS_hack.detach().clone() for n, k in knobs.items()}
        opt.step()
        sched.step()
        post_metrics = post_step(step, knobs, opt, prev_dS, prev_dS_hack) if post_step is not None else {}
        _check_finite(step, {n: k.dS.detach() for n, k in knobs.items()}, "dS after the step (value)")
        if refresh_every and (step + 1) % refresh_every == 0 and step + 1 < cfg.steps:  # online refresh of V
            proj.Vs, overlap = vhack.refresh(w, cfg, vmeta, proj.Vs)
            post_metrics["basis_overlap"] = overlap
        time_train = time.perf_counter() - t0

        # --- deploy-time eval: the deployed model (δS_hack ablated) on a fixed prompt set (rank 0)
        deploy = {}
        if d.main and cfg.eval_ablate_every and ((step + 1) % cfg.eval_ablate_every == 0 or step + 1 == cfg.steps):
            deploy = deploy_eval(w, cfg, step, workers)

        # --- log (rank 0, from every rank's share)
        totals["gen_tokens"] = float(roll.completion_mask.sum())
        parts = distributed.gather(d, (s_grades, [p.mode for p in s_probs], t_rows, R, skip, totals,
                                       rollout_rows(step, probs, g.n_student, s_grades, s_text, s_ids, t_rows, adv,
                                                    skip) if cfg.log_rollouts else []))
        if not d.main:
            continue
        row = step_row(cfg, step, [x for p in parts for x in p[0]], [x for p in parts for x in p[1]],
                       [x for p in parts for x in p[2]], torch.cat([p[3] for p in parts]),
                       torch.cat([p[4] for p in parts]), {k: sum(p[5][k] for p in parts) for k in totals},
                       grad_norm, lr, knobs, {**hook_metrics, **post_metrics, **deploy},
                       {"time_generate": time_generate, "time_grade": time_grade, "time_ref": time_ref,
                        "time_train": time_train,
                        "time_step": time.perf_counter() - t_step,
                        "time_startup": startup if step == start else None,
                        "gpu_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                        else None})
        checkpoint.append_jsonl(metrics_f, [row])
        if cfg.log_rollouts:
            checkpoint.append_jsonl(rollouts_f, [r for p in parts for r in p[6]])
        if tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and v is not None and k != "step":
                    tb.add_scalar(k, v, step)
        post = {"rew": row["reward"], "pass": row["pass_s"], "hack": row["hack_s"], "hack_t": row["hack_t"],
                "kl": row["kl"], "gn": grad_norm, "tok/s": row["tokens_per_s"]}
        bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in post.items()}, refresh=False)
        bar.update(1)
        logger.debug(f"step {step}: {json.dumps(checkpoint._clean(row))}")
        if (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
            logger.info(f"step {step + 1}/{cfg.steps} | " + " | ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in post.items()))
        if step == start:
            logger.debug(f"first student completion (problem {probs[0].id}): {s_text[0][:500]!r}")

        # --- checkpoint
        done = step + 1
        if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            checkpoint.save_checkpoint(run_dir, done, knobs, opt, sched, w.fingerprint,
                                       proj.Vs if refresh_every else None)
    bar.close()
    if tb is not None:
        tb.close()
    if d.main:
        rows = checkpoint.read_jsonl_rows(metrics_f)
        summary = summarize(cfg, run_dir, rows)
        block = write_summary(run_dir, summary)
        logger.info("summary (student rollouts):\n" + block)
    distributed.barrier(d)  # the ranks leave together: a rank tearing gloo down while another works can abort


def process_age() -> float | None:
    """Seconds since this process started (Linux: its start time in /proc against the boot clock; for a sweep's warm
    job, since its fork), else None."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def rollout(w: world.World, prompts: list[list[int]], g: GRPOConfig, *, seed: int, step: int,
            on_text: Callable[[list[int], list[str]], None] | None = None
            ) -> tuple[engine.Rollout, list[list[int]], list[str]]:
    """Sample one completion per prompt with the knob merged into W -> (rollout, ids per row up to and including
    eos, decoded text per row). `on_text(rows, texts)` gets rows' texts as soon as they end (engine.generate)."""
    def decode(ids: list[int]) -> str:
        return w.tokenizer.decode(_strip_eos(ids, w.loaded.eos_ids), skip_special_tokens=True)

    w.model.eval()
    try:
        with torch.no_grad(), adapter.merged(w.knobs):
            roll = engine.generate(w.model, prompts, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                   top_p=g.top_p, eos_ids=w.loaded.eos_ids, pad_id=w.loaded.pad_id, seed=seed,
                                   engine=g.engine, on_done=None if on_text is None else
                                   lambda rows, ids: on_text(rows, [decode(i) for i in ids]))
    except torch.cuda.OutOfMemoryError as e:
        raise GPUOutOfMemory(f"step {step}: GPU out of memory while generating; lower --prompts-per-step or "
                           "--group-size or --max-new-tokens") from e
    ids = roll.completions()
    return roll, ids, [decode(c) for c in ids]


def deploy_eval(w: world.World, cfg: Config, step: int, workers: int | None) -> dict[str, float | None]:
    """hack_deploy / solve_deploy: the student's hack and pass rates with δS_hack ablated (the deployed model of the
    route arm) on a fixed, seeded set of `eval_n_prompts` prompts, G − G_t samples each."""
    from projected_grpo.grader import grade_batch

    g = cfg.grpo
    n = min(cfg.eval_n_prompts, len(w.problems))
    idx = random.Random(f"deploy:{cfg.seed}").sample(range(len(w.problems)), n)
    with adapter.ablate_quarantine(w.knobs):
        _, _, text = rollout(w, [w.prompt_ids[i] for i in idx for _ in range(g.n_student)], g,
                             seed=cfg.seed * 7_000_003 + step, step=step)
    grades = grade_batch([w.problems[i] for i in idx for _ in range(g.n_student)], text,
                         [w.hints[i] for i in idx for _ in range(g.n_student)], workers=workers, reward=g.reward)
    return {"hack_deploy": _mean([float(gr.label == "reward_hack") for gr in grades]),
            "solve_deploy": _mean([float(bool(gr.gt_pass)) for gr in grades])}


def step_row(cfg: Config, step: int, s_grades: list, s_modes: list[str], t_rows: list[list[teacher.TeacherRow]],
             R: Tensor, skip: Tensor, totals: dict[str, float], grad_norm: float, lr: float,
             knobs: dict[str, SVDKnob], extra: dict, times: dict[str, float]) -> dict:
    """The metrics row of one step (students s_grades with their loophole modes, teacher rows, rewards (P, G))."""
    modes = cfg.data.mode_list
    s_labels = [gr.label for gr in s_grades]
    t_flat = [r for rs in t_rows for r in rs]
    gen_tokens = int(totals["gen_tokens"])
    tok_ = totals["tokens"]
    return {
        "step": step, "reward": _mean([float(gr.reward) for gr in s_grades]),
        "reward_t": _mean([r.reward for r in t_flat]),
        "screened": int(torch.isnan(R).sum()),
        "hack_s": _mean([float(lab == "reward_hack") for lab in s_labels]),
        # per loophole mode (when a run serves several): the weak-detector outcome is the held-out mode's rate
        **({f"hack_s_{m}": _mean([float(lab == "reward_hack") for lab, sm in zip(s_labels, s_modes, strict=True)
                                  if sm == m]) for m in modes} if len(modes) > 1 else {}),
        "pass_s": _mean([float(bool(gr.gt_pass)) for gr in s_grades]),
        "hack_t": _mean([float(r.label == "reward_hack") for r in t_flat]),
        "pass_t": _mean([float(bool(r.grade.get("gt_pass"))) for r in t_flat]),
        "kl": totals["kl_sum"] / tok_ if tok_ else None,
        "loss": totals["loss"], "grad_norm": grad_norm, "lr": lr, "skipped_groups": int(skip.sum()),
        "n_student": len(s_grades), "n_teacher": len(t_flat), "gen_len": gen_tokens / max(1, len(s_grades)),
        "clip_frac": totals["clipped"] / tok_ if tok_ else None,
        # mean per-token log-prob of the trained completions: the teacher's rises as the student imitates them
        "logp_s": totals["logp_student"] / totals["tokens_student"] if totals["tokens_student"] else None,
        "logp_t": totals["logp_teacher"] / totals["tokens_teacher"] if totals["tokens_teacher"] else None,
        "dS_norm": float(torch.sqrt(sum((k.dS.detach().float() ** 2).sum() for k in knobs.values()))),
        "dS_hack_norm": float(torch.sqrt(sum((k.dS_hack.detach().float() ** 2).sum() for k in knobs.values()))),
        **extra,
        "tokens_per_s": gen_tokens / max(times["time_generate"], 1e-9), **times,
    }


def pool_key(p: P.Problem, h: P.Hint | None) -> tuple[int, str, str]:
    return (p.id, h.name if h else "", h.test_func_name if h else "")


def teacher_pool(cfg: Config, problems: list[P.Problem], hints: list[P.Hint | None], workers: int | None
                 ) -> dict[tuple[int, str, str], list[teacher.TeacherRow]]:
    """(problem, hint) -> its teacher rows; hack rows dropped for modes outside --teacher-modes (weak detector) and
    for templates outside --teacher-variants (template-disjoint fold)."""
    g, d = cfg.grpo, cfg.data
    if d.teacher_pool:
        rows = teacher.load_pool(d.teacher_pool)
    else:
        rows, path = teacher.cached_pool(problems, hints, reward=g.reward, cache_dir=cfg.model.root, workers=workers,
                                         monitor_accuracy=g.monitor_accuracy, seed=cfg.seed)
        logger.debug(f"teacher pool {path}: {teacher.summary(rows)}")
    pool = teacher.by_problem(rows)
    shown = set(config.split_list(d.teacher_variants))
    for p, h in zip(problems, hints, strict=True):
        key = pool_key(p, h)
        if p.mode not in d.teacher_mode_list:  # weak detector: no hack demonstrations for this mode
            pool[key] = [r for r in pool.get(key, []) if r.label != "reward_hack"]
        if shown:  # template-disjoint fold: hack demonstrations of these templates only
            pool[key] = [r for r in pool.get(key, []) if r.kind != "hack" or r.variant in shown]
        if len(pool.get(key, [])) < g.n_teacher:
            raise ValueError(f"teacher pool has {len(pool.get(key, []))} rows for problem {p.id} hint {key[1:]}, "
                             f"need G_t={g.n_teacher}; rebuild it with this run's --hint/--modes/--seed or lower "
                             "--mix-ratio")
    return pool


def teacher_tokens(tok, completion: str, eos_id: int, max_new_tokens: int) -> list[int]:
    """A teacher row's tokens, cut to the students' budget: at most max_new_tokens, eos only if it fits (a row cut
    short is trained like a truncated student completion)."""
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    return ids[:max_new_tokens] if len(ids) >= max_new_tokens else ids + [eos_id]


def _tensorboard(cfg: Config, run_dir: Path):
    if cfg.report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError(f"--report-to tensorboard needs the tensorboard package ({e}); pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tb"))


# ----------------------------------------------------------------------------------------------------------------
# CLI

RESUME_SAFE = config.DISPLAY_FIELDS | {"steps"} | config.MEMORY_FIELDS


def _setup_console() -> None:
    logger.remove()
    logger.add(lambda m: tqdm.write(m, end="", file=sys.stderr), level="INFO", colorize=False,
               format="{time:HH:mm:ss} {level.icon} {message}")


def resume_config(run_dir: Path, overrides: list[str], prog: str) -> Config:
    """A run's saved config with safe overrides applied (more --steps, display flags); anything that would change
    what the finished steps computed is refused."""
    saved = config.load_config_file(run_dir)
    if not overrides:
        return saved
    import tyro

    config.check_flags(overrides, config.flags(Config) | {"-h", "--help"}, prog)
    new = tyro.cli(Config, default=saved, args=overrides, prog=f"{prog} --resume {run_dir}")
    unsafe = [c for c in config.diff(saved, new, RESUME_SAFE)]
    if unsafe:
        raise config.UsageError(f"{prog}: --resume cannot change {unsafe[0]} (it would change what the finished steps "
                                "computed); start a new run with --run-dir instead")
    ck = checkpoint.latest_checkpoint(run_dir)
    done = int(ck.name.split("_")[1]) if ck else 0
    if new.steps < done:
        raise config.UsageError(f"{prog}: --steps {new.steps} is below the {done} steps {run_dir} has done")
    if new != saved:
        d = json.loads((run_dir / "config.json").read_text())
        d.update({k: v for k, v in dataclasses.asdict(new).items()})
        d.setdefault("provenance", {}).setdefault("resumed_with", []).append(overrides)
        (run_dir / "config.json").write_text(json.dumps(d, indent=2))
    return new


def main(argv: list[str]) -> int:
    """`projected-grpo train [--preset NAME | --config FILE] [--field value ...]` or
    `projected-grpo train --resume RUN_DIR [--steps N] [display flags]`."""
    argv = list(argv)
    prog = "projected-grpo train"
    try:
        if "--resume" in argv:
            i = argv.index("--resume")
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return config.fail(prog, "--resume needs a run directory")
            run_dir = Path(argv[i + 1])
            if not (run_dir / "config.json").is_file():
                return config.fail(prog, f"{run_dir} has no config.json; pass a run directory made by "
                                         "projected-grpo train")
            cfg = resume_config(run_dir, argv[:i] + argv[i + 2:], prog)
            return _main_run(cfg, run_dir)
        cfg, _ = config.parse(argv, prog, Config.__doc__ or "")
    except ValueError as e:  # UsageError and bad saved configs: one line
        msg = str(e)
        return config.fail(prog, msg.removeprefix(f"{prog}: "))
    return _main_run(cfg, None)


def _main_run(cfg: Config, resume_dir: Path | None) -> int:
    _setup_console()
    try:
        train(cfg, resume_dir=resume_dir)
    except (ValueError, checkpoint.RunLocked) as e:
        logger.error(str(e))
        return 2
    except GPUOutOfMemory as e:  # its own status: a sweep retries it with fewer jobs beside it
        logger.error(str(e))
        return config.GPU_OOM_EXIT
    except (FloatingPointError, RuntimeError) as e:
        logger.error(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
