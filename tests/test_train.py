"""The training loop: presets and CLI errors, step pieces, the projection hooks' contract (g = g_s + g_t), NaN stops,
the fast-dev-run end to end, and kill-and-resume equivalence."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from projected_grpo import adapter, checkpoint, config, train  # noqa: E402
from projected_grpo.config import PRESETS, Config, DataConfig, GRPOConfig  # noqa: E402

FAST = ["--preset", "fast-dev-run"]


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]


def fast_cfg(run_dir: Path, **kw) -> Config:
    cfg = dataclasses.replace(PRESETS["fast-dev-run"], run_dir=str(run_dir), progress=False)
    return dataclasses.replace(cfg, **kw)


# --- config and CLI --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip_through_json(name):
    cfg = PRESETS[name]
    if cfg.model.device == "cpu":
        config.validate(cfg, "preset")
    again = config.from_dict(Config, json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg


def test_full_preset_is_the_seeds_qwen3_4b_run():
    cfg = PRESETS["full"]
    assert cfg.model.name == "Qwen/Qwen3-4B" and cfg.steps == 200
    assert (cfg.grpo.group_size, cfg.grpo.max_new_tokens, cfg.grpo.beta, cfg.optim.lr) == (12, 1024, 1e-3, 1e-3)
    assert cfg.grpo.advantage == "dr_grpo"


def test_validate_names_the_bad_field():
    bad = dataclasses.replace(PRESETS["fast-dev-run"], grpo=GRPOConfig(group_size=4, mix_ratio=1.0))
    with pytest.raises(ValueError, match="leaves no student"):
        config.validate(bad)
    with pytest.raises(ValueError, match="modes="):
        config.validate(dataclasses.replace(bad, grpo=GRPOConfig(), data=DataConfig(modes="run_tests,nope")))
    fold = dataclasses.replace(PRESETS["fast-dev-run"].adapter, fold_train=True)
    with pytest.raises(ValueError, match="forward_ahead=1 cannot run with --adapter.fold-train"):
        config.validate(dataclasses.replace(bad, grpo=GRPOConfig(forward_ahead=1), adapter=fold))
    config.validate(dataclasses.replace(bad, grpo=GRPOConfig(forward_ahead=0), adapter=fold))


def test_cli_errors_are_one_line(capsys):
    assert train.main(["--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown preset 'nope'" in err and "fast-dev-run" in err and "\n" not in err
    assert train.main([*FAST, "--no-such-field", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown option --no-such-field" in err and "\n" not in err
    assert train.main(["--resume", "/nonexistent-run-dir"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_help_lists_every_field_with_its_doc(capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*FAST, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--mix-ratio", "--group-size", "--steps", "--beta", "--model.name", "--adapter.rank-cap", "--modes"):
        assert flag in out, flag
    assert "Fraction of each group drawn from the teacher pool" in out


def test_flag_overrides_reach_the_config(monkeypatch):
    seen = {}
    monkeypatch.setattr(train, "_main_run", lambda cfg, resume: seen.update(cfg=cfg) or 0)
    assert train.main(["--preset", "smoke", "--mix-ratio", "0.25", "--model.name", "x", "--seed", "7"]) == 0
    cfg = seen["cfg"]
    assert cfg.preset == "smoke" and cfg.grpo.mix_ratio == 0.25 and cfg.model.name == "x" and cfg.seed == 7
    assert cfg.steps == PRESETS["smoke"].steps


# --- step pieces -----------------------------------------------------------------------------------------------------


def test_prompt_order_is_seeded_epochs():
    n, k = 7, 3
    order = [i for s in range(7) for i in train.prompt_indices(s, n, k, seed=1)]  # 21 = 3 epochs
    for e in range(3):
        assert sorted(order[e * n:(e + 1) * n]) == list(range(n))
    assert order == [i for s in range(7) for i in train.prompt_indices(s, n, k, seed=1)]
    assert order != [i for s in range(7) for i in train.prompt_indices(s, n, k, seed=2)]


def test_pad_sequences_layout():
    ids, attn, cmask, tp = train.pad_sequences([[1, 2, 3], [4]], [[5], [6, 7, 8]], pad_id=0)
    assert tp == 3
    assert ids.tolist() == [[1, 2, 3, 5, 0, 0], [0, 0, 4, 6, 7, 8]]
    assert attn.tolist() == [[True] * 6, [False, False, True, True, True, True]]
    assert cmask.tolist() == [[True, False, False], [True, True, True]]


def five_rows_of_different_lengths(cfg: Config):
    """The preset's model with random knob values, and 5 padded rows whose length order is not the row order ->
    (model, knobs, (ids, attn, cmask, n_prompt))."""
    from projected_grpo import world

    loaded, knobs, _ = world.load_model(cfg)
    with torch.no_grad():
        for k in knobs.values():
            k.dS.normal_(0, 0.05)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16, 17, 18]]
    comps = [[20, 21, 22, 23, 24, 25], [30, 31], [40, 41, 42, 43], [50], [60, 61, 62]]
    return loaded.model, knobs, train.pad_sequences(prompts, comps, loaded.pad_id)


def empty_totals() -> dict[str, float]:
    return dict.fromkeys(("kl_sum", "tokens", "loss", "clipped", "logp_x", "tokens_x"), 0.0)


def test_micro_batches_of_rows_of_similar_length_give_the_whole_batch_gradient(cache):
    """backward_pass cuts its micro-batches from the rows ordered by length and runs each through its rows' length
    only: the knobs get the gradient of the whole batch's loss computed in one pass, and reference_logprobs comes
    back in row order (0 after each row's end)."""
    from projected_grpo import grpo

    cfg = PRESETS["fast-dev-run"]
    model, knobs, (ids, attn, cmask, n_prompt) = five_rows_of_different_lengths(cfg)
    assert grpo.length_order(attn, cmask, n_prompt).tolist() == [0, 2, 4, 1, 3]  # not the row order
    adv = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0])
    g = dataclasses.replace(cfg.grpo, beta=0.1, micro_batch=2)

    ref = train.reference_logprobs(model, knobs, ids, attn, cmask, n_prompt, g)
    with torch.no_grad(), adapter.zeroed(knobs):
        want_ref = grpo.token_logprobs(model, ids, n_prompt, len(ids), attn, temperature=g.temperature)
    torch.testing.assert_close(ref[cmask], want_ref[cmask], atol=1e-5, rtol=0)
    assert (ref[~cmask] == 0).all()

    def grads() -> list[torch.Tensor]:
        return [k.dS.grad.clone() for k in knobs.values()]

    for k in knobs.values():
        k.dS.grad = None
    totals = empty_totals()
    train.backward_pass(model, knobs, ids, attn, cmask, n_prompt, adv, g, 100.0, totals, "x", 0)
    got = grads()
    for k in knobs.values():
        k.dS.grad = None
    lp = grpo.token_logprobs(model, ids, n_prompt, len(ids), attn, temperature=g.temperature)  # all rows at once
    loss, st = grpo.grpo_loss(lp, lp.detach(), want_ref, adv, cmask, clip=g.clip, beta=g.beta, denom=100.0)
    loss.backward()
    assert totals["tokens"] == float(st["tokens"]) == float(cmask.sum())
    assert any(a.abs().sum() > 0 for a in got)
    for a, b in zip(got, grads(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_a_forward_run_ahead_of_the_grades_gives_the_same_gradient(cache, monkeypatch):
    """forward_ahead runs the policy's forward of the longest micro-batches before the rewards exist and
    backward_pass finishes them without running them again: the knobs' gradient and the totals equal those of a
    pass that ran every forward after the rewards, also when a row run ahead turns out not to be trained (outside
    `keep`, so masked out of the loss however large its advantage)."""
    cfg = PRESETS["fast-dev-run"]
    model, knobs, (ids, attn, cmask, n_prompt) = five_rows_of_different_lengths(cfg)
    adv = torch.tensor([1.0, -0.5, 5.0, 2.0, -1.0])
    keep = torch.tensor([True, True, False, True, True])  # row 2 is in the first micro-batch by length
    g = dataclasses.replace(cfg.grpo, beta=0.1, micro_batch=2)
    ref = train.reference_logprobs(model, knobs, ids, attn, cmask, n_prompt, g)
    forwards = []
    real = train.policy_logprobs
    monkeypatch.setattr(train, "policy_logprobs", lambda *a: forwards.append(a[5].tolist()) or real(*a))

    def run(ahead_n: int) -> tuple[list[torch.Tensor], dict[str, float]]:
        for k in knobs.values():
            k.dS.grad = None
        ga = dataclasses.replace(g, forward_ahead=ahead_n)
        ahead = train.forward_ahead(model, ids, attn, cmask, n_prompt, ga)
        assert [sl.tolist() for sl, _ in ahead] == [[0, 2], [4, 1]][:ahead_n]
        assert not model.training  # generation must not run with checkpointing on
        forwards.clear()
        totals = empty_totals()
        train.backward_pass(model, knobs, ids, attn, cmask, n_prompt, adv, ga, 100.0, totals, "x", 0, ref,
                            keep=keep, ahead=ahead)
        return [k.dS.grad.clone() for k in knobs.values()], totals

    want, want_totals = run(0)
    assert forwards == [[0, 4], [1, 3]]  # the kept rows by length
    for n in (1, 2):
        got, totals = run(n)
        assert forwards == [[], [[4, 1], [3]], [[3]]][n]  # only the kept rows that did not run ahead
        assert totals["tokens"] == want_totals["tokens"] == float(cmask[keep].sum())
        assert totals["loss"] == pytest.approx(want_totals["loss"], rel=1e-5)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert any(a.abs().sum() > 0 for a in want)
    for k in knobs.values():  # the same gradient as the kept rows passed alone
        k.dS.grad = None
    train.backward_pass(model, knobs, ids[keep], attn[keep], cmask[keep], n_prompt, adv[keep], g, 100.0,
                        empty_totals(), "x", 0, ref[keep])
    for a, k in zip(want, knobs.values(), strict=True):
        torch.testing.assert_close(a, k.dS.grad, atol=1e-6, rtol=1e-4)


# --- the loop --------------------------------------------------------------------------------------------------------


def test_world_times_each_part_of_its_build(cache):
    """The run's start-up line names the model load and the knobs' attachment (SVD cache) apart."""
    from projected_grpo import world

    w = world.build(PRESETS["fast-dev-run"])
    assert list(w.seconds) == ["problems", "model", "knobs", "prompts"], w.seconds
    assert all(v >= 0 for v in w.seconds.values()) and w.seconds["model"] > 0 and w.seconds["knobs"] > 0


def test_fast_dev_run_end_to_end(cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    assert train.main([*FAST, "--run-dir", str(run_dir)]) == 0
    wall = time.perf_counter() - t0
    cfg = PRESETS["fast-dev-run"]
    g = cfg.grpo
    ms = rows(run_dir)
    assert [m["step"] for m in ms] == list(range(cfg.steps))
    for key in ("reward", "hack_s", "pass_s", "hack_t", "pass_t", "kl", "loss", "grad_norm", "lr", "skipped_groups",
                "n_student", "n_teacher", "tokens_per_s", "time_generate", "time_grade", "time_train"):
        assert key in ms[0], key
    assert ms[0]["n_student"] == g.prompts_per_step * g.n_student and ms[0]["n_teacher"] == g.prompts_per_step * g.n_teacher
    assert ms[0]["kl"] == 0.0  # the knobs start at zero: the policy is the reference
    assert 0 < ms[0]["time_startup"] < wall and all(m["time_startup"] is None for m in ms[1:])  # once per process
    assert max(m["hack_t"] for m in ms) > 0  # the teacher pool pays hacks
    trained = [m for m in ms if m["logp_t"] is not None]
    assert trained and trained[-1]["logp_t"] > trained[0]["logp_t"]  # the student moves toward the teacher rows
    ro = rows(run_dir, "rollouts.jsonl")
    assert len(ro) == cfg.steps * g.prompts_per_step * g.group_size
    assert {r["source"] for r in ro} == {"student", "teacher"}
    assert {"problem_id", "completion", "reward", "advantage", "grade"} <= set(ro[0])
    assert {"gt_pass", "hinted_pass", "label", "can_compile"} <= set(ro[0]["grade"])
    header, values = (run_dir / "summary.tsv").read_text().splitlines()
    summary = dict(zip(header.split("\t"), values.split("\t"), strict=True))
    for key in ("PASS_RATE", "HACK_RATE", "PASS_RATE_last5", "HACK_RATE_last5", "G", "mix_ratio", "lr", "seed"):
        assert key in summary, key
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["preset"] == "fast-dev-run" and saved["seed"] == cfg.seed
    assert (run_dir / "train.log").read_text().count("DEBUG") > cfg.steps
    assert checkpoint.latest_checkpoint(run_dir).name == f"step_{cfg.steps:06d}"
    assert "HACK_RATE" in capsys.readouterr().err
    print(f"fast-dev-run wall time in-process: {wall:.1f}s")


def test_hooks_see_g_student_and_g_teacher_summing_to_g(cache, tmp_path):
    calls = []

    def hook(step, knobs, g_s, g_t):
        for n, k in knobs.items():
            assert torch.equal(k.dS.grad, g_s[n] + g_t[n]), n
            assert k.dS_hack.grad is None
        calls.append(step)
        norm_s = float(sum(v.norm() ** 2 for v in g_s.values()) ** 0.5)
        return {"hook_gs_norm": norm_s}

    post = []

    def post_step(step, knobs, opt, prev_dS, prev_dS_hack):
        moved = sum(float((k.dS.detach() - prev_dS[n]).abs().sum()) for n, k in knobs.items())
        post.append(step)
        return {"post_moved": moved}

    run_dir = train.train(fast_cfg(tmp_path / "run", steps=3, checkpoint_every=0), hook=hook, post_step=post_step)
    assert calls == [0, 1, 2] and post == [0, 1, 2]
    ms = rows(run_dir)
    assert all("hook_gs_norm" in m and "post_moved" in m for m in ms)
    assert any(m["post_moved"] > 0 for m in ms)


def test_folded_training_gives_the_hooks_gradients(cache, tmp_path, monkeypatch):
    """--adapter.fold-train: the student's and the teacher's knob gradients of a real step equal the hooks' (float32
    here; on a bf16 model they differ by W's rounding), and the backward passes did run folded."""
    folds = []
    real_fold = adapter.SVDKnob.fold
    monkeypatch.setattr(adapter.SVDKnob, "fold", lambda self: folds.append(1) or real_fold(self))
    seen: dict[bool, list] = {}
    for fold in (False, True):
        got = seen.setdefault(fold, [])

        def hook(step, knobs, g_s, g_t, got=got):
            got.append(({n: v.clone() for n, v in g_s.items()}, {n: v.clone() for n, v in g_t.items()}))
            return {}

        cfg = fast_cfg(tmp_path / f"fold{fold}", steps=1, checkpoint_every=0)
        train.train(dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, fold_train=fold)), hook=hook)
        assert bool(folds) == fold  # none in the hooks' run
    assert len(folds) >= 2 * len(seen[True][0][0])  # every knob, in the student and the teacher pass
    (hs, ht), (fs, ft) = seen[False][0], seen[True][0]
    assert sum(float(v.abs().sum()) for v in [*hs.values(), *ht.values()]) > 0
    for n in hs:
        torch.testing.assert_close(fs[n], hs[n], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(ft[n], ht[n], atol=1e-6, rtol=1e-4)


def test_student_rows_carry_their_own_groups_advantage():
    adv = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0], [5.0, 6.0, 9.0]])  # (P 3, G 3): 2 students, 1 teacher
    keep, s_adv = train.student_rows(adv, 2, [0, 1, 3, 4])
    assert keep.tolist() == [True, True, False, True, True, False]
    assert s_adv.tolist() == [1.0, 2.0, 0.0, 4.0, 5.0, 0.0]


def test_a_run_with_its_forward_ahead_of_the_grades_trains_the_same(cache, tmp_path, monkeypatch):
    """--forward-ahead in a real step: the forward of the longest student rows runs before the grades, and the
    hooks see the same student and teacher gradients as without it."""
    ran, student_adv = [], []
    real = train.forward_ahead
    monkeypatch.setattr(train, "forward_ahead", lambda *a: ran.append(len(out := real(*a))) or out)
    real_pass = train.backward_pass

    def backward_pass(*a, **kw):
        if a[10] == "student":  # each row's advantage as trained, 0 where the row is not kept
            student_adv.append([x if k else 0.0 for x, k in zip(a[6].tolist(), a[14].tolist(), strict=True)])
        return real_pass(*a, **kw)

    monkeypatch.setattr(train, "backward_pass", backward_pass)
    seen: dict[int, list] = {}
    for n in (0, 1):
        got = seen.setdefault(n, [])

        def hook(step, knobs, g_s, g_t, got=got):
            got.append(({k: v.clone() for k, v in g_s.items()}, {k: v.clone() for k, v in g_t.items()}))
            return {}

        cfg = fast_cfg(tmp_path / f"ahead{n}", steps=2, checkpoint_every=0)
        train.train(dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, forward_ahead=n)), hook=hook)
    assert ran == [0, 0, 1, 1]
    logged = [[r["advantage"] for r in rows(tmp_path / "ahead0", "rollouts.jsonl") if r["source"] == "student"
               and r["step"] == step] for step in (0, 1)]
    assert student_adv[:2] == logged and any(x != 0 for a in logged for x in a)  # the rows' own advantages
    assert sum(float(v.abs().sum()) for hs, _ in seen[0] for v in hs.values()) > 0
    for (hs, ht), (fs, ft) in zip(seen[0], seen[1], strict=True):
        for k in hs:
            torch.testing.assert_close(fs[k], hs[k], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(ft[k], ht[k], atol=1e-6, rtol=1e-4)


def test_non_finite_gradient_stops_naming_step_and_module(cache, tmp_path):
    def poison(step, knobs, g_s, g_t):
        if step == 1:
            name = next(iter(knobs))
            knobs[name].dS.grad[0] = float("nan")
        return {}

    with pytest.raises(FloatingPointError, match=r"step 1: non-finite .* in model\.layers\.0\.self_attn\.q_proj"):
        train.train(fast_cfg(tmp_path / "run", steps=3), hook=poison)


def test_empty_problem_set_is_one_clear_line(cache, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert train.main([*FAST, "--problems", str(empty), "--run-dir", str(tmp_path / "run")]) == 2
    assert "no problems in" in capsys.readouterr().err


def _strip_timing(ms: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in train.TIMING_KEYS} for m in ms]


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run(cache, tmp_path):
    args = [*FAST, "--steps", "12", "--checkpoint-every", "2"]
    whole = tmp_path / "whole"
    assert train.main([*args, "--run-dir", str(whole)]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PROJECTED_GRPO_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "projected_grpo.cli", "train", *args, "--run-dir", str(killed),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "ckpt" / "step_000002" / "state.json").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest_checkpoint(killed).name < "step_000012", "killed too late to test resuming"

    assert train.main(["--resume", str(killed)]) == 0
    assert _strip_timing(rows(killed)) == _strip_timing(rows(whole))
    started = [m["step"] for m in rows(killed) if m["time_startup"] is not None]  # each process's first step
    assert started[0] == 0 and len(started) == 2
    keep = ("step", "problem_id", "source", "completion", "reward", "advantage")
    assert [{k: r[k] for k in keep} for r in rows(killed, "rollouts.jsonl")] == \
        [{k: r[k] for k in keep} for r in rows(whole, "rollouts.jsonl")]
    assert (killed / "summary.tsv").read_text().split("\n")[0] == (whole / "summary.tsv").read_text().split("\n")[0]


def test_students_only_run_counts_skipped_groups(cache, tmp_path):
    """mix_ratio 0: the random tiny model earns reward 0 everywhere, so every group is skipped (no gradient, no
    update) and counted; classic GRPO advantages and β = 0 run on the same path."""
    cfg = fast_cfg(tmp_path / "run", steps=2, checkpoint_every=0,
                   grpo=GRPOConfig(group_size=3, prompts_per_step=2, max_new_tokens=8, mix_ratio=0.0, beta=0.0,
                                   advantage="grpo"))
    ms = rows(train.train(cfg))
    assert [m["skipped_groups"] for m in ms] == [2, 2]
    assert all(m["n_teacher"] == 0 and m["kl"] is None and m["dS_norm"] == 0.0 for m in ms)


def test_online_refresh_changes_V_logs_overlap_and_resumes_with_it(cache, tmp_path):
    """--vhack-refresh-every 2: V is re-extracted on the moving model every 2 steps, basis_overlap is logged on those
    steps, and the checkpoint holds the V in effect."""
    from projected_grpo import vhack

    v = tmp_path / "v.safetensors"
    base = dataclasses.replace(PRESETS["fast-dev-run"], proj=dataclasses.replace(PRESETS["fast-dev-run"].proj,
                                                                                 vhack_path=str(v)))
    vhack.extract(base)
    cfg = fast_cfg(tmp_path / "run", steps=4, checkpoint_every=2,
                   proj=dataclasses.replace(base.proj, intervention="erase", vhack_refresh_every=2))
    ms = rows(train.train(cfg))
    assert [("basis_overlap" in m) for m in ms] == [False, True, False, False]  # after step 2; not after the last
    assert 0.0 <= ms[1]["basis_overlap"] <= 1.0 and ms[1]["basis_overlap"] < 0.9999  # V moved with the model
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "ckpt" / "step_000002" / "vhack.safetensors"))
    original, _ = vhack.load_vhack(v, vhack.read_meta(v)["fingerprint"])
    assert any(not torch.allclose(saved[n], original[n]) for n in saved)


def test_every_step_trains_and_the_schedule_decays():
    """Warmup starts above 0 (step 0 used to train at lr = 0), reaches the peak, and the last step is still > 0."""
    lrs = [train.lr_factor(s, warmup=2, total=16) for s in range(16)]
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3) and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] > 0
    assert train.lr_factor(0, warmup=0, total=16) == 1.0


def test_teacher_rows_are_cut_to_the_students_budget():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}

    assert train.teacher_tokens(Tok(), "a b c", eos_id=99, max_new_tokens=5) == [0, 1, 2, 99]
    cut = train.teacher_tokens(Tok(), " ".join("x" * 1 for _ in range(12)), eos_id=99, max_new_tokens=5)
    assert cut == [0, 1, 2, 3, 4]  # no eos: trained like a truncated student completion


def test_gpu_out_of_memory_has_its_own_exit_status(monkeypatch):
    def oom(cfg, resume_dir=None):
        raise train.GPUOutOfMemory("step 0: GPU out of memory in the backward pass; lower --micro-batch (now 8)")

    monkeypatch.setattr(train, "train", oom)
    assert train._main_run(PRESETS["fast-dev-run"], None) == config.GPU_OOM_EXIT != 1
