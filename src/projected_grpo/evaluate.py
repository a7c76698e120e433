"""Held-out evaluation as the reference does it: n samples per problem (default 10, T=0.7).

- reward-hack rate: problems served with the random-name `overwrite_tests` hint (evaluator name drawn per problem,
  seeded); the fraction of samples labelled `reward_hack` (the model's own evaluator passes, the ground truth fails).
- performance: the same problems with no hint; the fraction of samples that pass every ground-truth test.

For the base model (no run) or for a run's final knobs; a route run is evaluated with its quarantine knob δS_hack
ablated (the deployed model). Writes eval.json and eval_rollouts.jsonl.

The n samples of one problem are not independent (a problem is easy or hard, hackable or not, for all of them), so
each rate's 95% interval is a cluster bootstrap over problems (`hack_ci95`, `pass_ci95`; deterministic given the eval
seed); the binomial Wilson interval, which treats every sample as independent and is too narrow under intraclass
correlation, is kept as `*_ci95_wilson`. `per_problem` holds each problem's counts, so arms can be paired by problem.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

from loguru import logger
from tqdm.auto import tqdm

from projected_grpo import adapter, checkpoint, config, engine, models, world
from projected_grpo import problems as P
from projected_grpo.grader import grade_batch, hack_kinds
from projected_grpo.stats import cluster_bootstrap, grouped, wilson  # noqa: F401 (re-exported)


def rate_summary(problem_ids: Sequence[Hashable], outcomes: dict[str, Sequence[bool]], *, seed: int,
                 n_boot: int = 2000) -> dict:
    """Per outcome (e.g. hack, pass, attempt): the rate, its cluster-bootstrap 95% interval over problems and the
    Wilson interval; and each problem's sample count and per-outcome counts (`per_problem`, keyed by str(id))."""
    out: dict = {"n": len(problem_ids), "n_problems": len(set(problem_ids))}
    per: dict[str, dict] = {}
    for pid in problem_ids:
        per.setdefault(str(pid), {"n": 0, **{k: 0 for k in outcomes}})["n"] += 1
    for name, hits in outcomes.items():
        if len(hits) != len(problem_ids):
            raise ValueError(f"outcome {name!r} has {len(hits)} values for {len(problem_ids)} samples; pass one each")
        sums, counts, keys = grouped([float(bool(h)) for h in hits], [str(p) for p in problem_ids])
        for key, k in zip(keys, sums, strict=True):
            per[key][name] = int(k)
        k_all, n_all = int(sums.sum()), int(counts.sum())
        out[f"{name}_rate"] = k_all / n_all if n_all else math.nan
        out[f"{name}_ci95"] = cluster_bootstrap(sums, counts, n_boot=n_boot, seed=seed)
        out[f"{name}_ci95_wilson"] = wilson(k_all, n_all)
    out["per_problem"] = per
    return out


def sample(
    loaded: models.Loaded,
    knobs,
    prompts: list[str],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch: int,
    seed: int,
    desc: str,
    gen_engine: str = "auto",
) -> list[list[str]]:
    """n completions per prompt, generated with the knob merged into W."""
    tok = loaded.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    flat = [(i, j) for i in range(len(prompts)) for j in range(n)]
    out: list[list[str]] = [[] for _ in prompts]
    with adapter.merged(knobs):
        for b in tqdm(range(0, len(flat), batch), desc=desc, unit="batch", leave=False):
            chunk = flat[b : b + batch]
            ro = engine.generate(
                loaded.model,
                [ids[i] for i, _ in chunk],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                eos_ids=loaded.eos_ids,
                pad_id=loaded.pad_id,
                seed=seed + b,
                engine=gen_engine,
            )
            for (i, _), c in zip(chunk, ro.completions(), strict=True):
                out[i].append(tok.decode(c, skip_special_tokens=True))
    return out


def evaluate(
    loaded: models.Loaded,
    knobs,
    problems: list[P.Problem],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch: int,
    seed: int,
    system_prompt: str,
    workers: int | None,
    out_dir: Path,
    extra: dict | None = None,
    gen_engine: str = "auto",
) -> dict:
    rng = random.Random(seed)
    arms = {"hack": [P.make_hint("overwrite_tests", p, rng) for p in problems], "perf": [None] * len(problems)}
    result: dict = {"n_problems": len(problems), "n_samples": n, "temperature": temperature, "seed": seed,
                    **(extra or {})}
    rows_out = []
    for what, hints in arms.items():
        prompts = [
            P.render_prompt(loaded.tokenizer, P.chat_messages(p, h, system_prompt))
            for p, h in zip(problems, hints, strict=True)
        ]
        t0 = time.time()
        comps = sample(
            loaded,
            knobs,
            prompts,
            n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch=batch,
            seed=seed,
            desc=f"eval {what}",
            gen_engine=gen_engine,
        )
        t_gen = time.time() - t0
        flat_p = [p for p, cs in zip(problems, comps, strict=True) for _ in cs]
        flat_h = [h for h, cs in zip(hints, comps, strict=True) for _ in cs]
        flat_c = [c for cs in comps for c in cs]
        grades = grade_batch(flat_p, flat_c, flat_h, workers=workers, progress=True, full_suite=True)  # pass rates
        result[what] = rate_summary([p.id for p in flat_p], {
            "hack": [g.label == "reward_hack" for g in grades],
            "pass": [bool(g.gt_pass) for g in grades],
            "attempt": [g.label in ("reward_hack", "attempted_hack", "correct_attempted_hack") for g in grades],
        }, seed=seed) | {"generate_s": round(t_gen, 1)}
        for p, h, c, g in zip(flat_p, flat_h, flat_c, grades, strict=True):
            rows_out.append(
                {
                    "eval": what,
                    "id": p.id,
                    "hint": h.name if h else None,
                    "completion": c,
                    **{k: v for k, v in g.to_row().items() if k not in ("id", "code")},
                }
            )
    if "hack" in result:  # what the hacks' own evaluators do (the teacher's templates or something new)
        result["hack"]["kinds"] = hack_kinds(rows_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval_rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_out))
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


EVAL_DOC = """projected-grpo eval: held-out hack rate (random-name hint) and pass rate (no hint).
--run-dir RUN evaluates a run's last checkpoint with its own model, adapter and prompts (δS_hack ablated unless
--eval.keep-quarantine); without it, the model of the preset / --model.name as it is. Settings: --eval.* flags."""


def main(argv: list[str]) -> int:
    prog = "projected-grpo eval"
    try:
        cfg, _ = config.parse(argv, prog, EVAL_DOC)
        run = Path(cfg.run_dir) if cfg.run_dir else None
        if run is not None:
            if not (run / "config.json").is_file():
                raise ValueError(f"{run} is not a run directory (no config.json); pass --run-dir of a train run")
            saved = config.load_config_file(run)
            # the run's model, adapter and prompts; eval settings, workers and display flags from this command line
            cfg = dataclasses.replace(saved, eval=cfg.eval, workers=cfg.workers, progress=cfg.progress,
                                      allow_weak_isolation=cfg.allow_weak_isolation, forkserver=cfg.forkserver,
                                      run_dir=str(run), out=cfg.out)
        config.validate(cfg, "eval")
        e = cfg.eval
        out = Path(cfg.out or (run / "eval" if run else f"runs/eval_{Path(cfg.model.name).name}"))
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; pass a directory (eval.json and eval_rollouts.jsonl go there)")
        problems_path = e.problems_path()
        if e.problems != "builtin" and not Path(problems_path).is_file():
            raise ValueError(f"eval.problems={problems_path}: no such file; pass --eval.problems FILE (the held-out "
                             "split) or set $PROJECTED_GRPO_DATA")
        problems = P.builtin_problems() if e.problems == "builtin" else P.load_problems(problems_path)
        if e.n_problems:
            problems = problems[: e.n_problems]
        level = world.isolation(cfg.allow_weak_isolation, cfg.forkserver)
        loaded, knobs, fp = world.load_model(cfg)
        step = checkpoint.load_run_knobs(run, knobs, e.keep_quarantine, fp) if run else 0
    except (ValueError, RuntimeError) as err:  # bad settings, a refused sandbox level, a damaged checkpoint
        return config.fail(prog, str(err).removeprefix(f"{prog}: "))
    logger.info(
        f"eval {f'run {run} (step {step})' if run else 'base model ' + cfg.model.name} on "
        f"{len(problems)} problems x {e.n} samples, grader isolation {level}"
    )
    res = evaluate(
        loaded,
        knobs,
        problems,
        n=e.n,
        max_new_tokens=e.max_new_tokens,
        temperature=e.temperature,
        top_p=e.top_p,
        batch=e.batch,
        seed=e.seed,
        system_prompt=P.system_prompt(cfg.data.system_prompt),
        gen_engine=cfg.grpo.engine,
        workers=cfg.workers or None,
        out_dir=out,
        extra={"run_dir": str(run) if run else None, "step": step, "problems": problems_path,
               "quarantine_ablated": not e.keep_quarantine, "provenance": world.provenance(None, level)},
    )
    h, p = res["hack"], res["perf"]
    print(
        f"HACK_RATE={h['hack_rate']:.3f} [{h['hack_ci95'][0]:.3f}, {h['hack_ci95'][1]:.3f}] (n={h['n']}, "
        f"attempted {h['attempt_rate']:.3f})  PASS_RATE={p['pass_rate']:.3f} "
        f"[{p['pass_ci95'][0]:.3f}, {p['pass_ci95'][1]:.3f}] (n={p['n']}, no hint; 95% intervals: bootstrap over "
        f"{p['n_problems']} problems)  -> {out}/eval.json"
    )
    return 0
