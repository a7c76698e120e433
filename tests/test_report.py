"""Report: experiments never pooled, complete runs only, route scored as deployed, H1 only where the seeds allow it.
Every run directory here is synthetic, written by the test (config.json shaped like `dataclasses.asdict(Config)`)."""

import copy
import json
import math

import pytest

from projected_grpo import report
from projected_grpo.report import h1_verdict, main, mean_ci, t95

MODES = "run_tests,sentinel,stdout_marker,file_marker"


def _cfg(arm, seed, *, steps=8, preset="fast-dev-run", lr=0.05, mix=0.5, modes="run_tests", teacher_modes="",
         vpath=None, provenance=None, **proj):
    cfg = {
        "model": {"name": "tiny", "dtype": "auto", "device": "auto", "gradient_checkpointing": False, "cache_dir": ""},
        "adapter": {"targets": ["q_proj", "v_proj"], "rank_cap": None, "cache_dir": ""},
        "grpo": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 32, "mix_ratio": mix, "beta": 1e-3},
        "optim": {"lr": lr, "betas": [0.9, 0.99], "warmup_frac": 0.1},
        "data": {"problems": "", "modes": modes, "teacher_modes": teacher_modes, "hint": "simple_overwrite_tests"},
        "proj": {"intervention": "none" if arm == "vanilla" else "route" if arm.startswith("route") else "erase",
                 "vhack_path": f"vhack/v_none_s{seed}.safetensors" if vpath is None else vpath,
                 "vhack_random": arm == "random_V", "gate": "one_sided", "project_on": "grad", **proj},
        "steps": steps, "seed": seed, "run_dir": f"runs/{arm}_s{seed}", "out_dir": "runs", "arm": arm,
        "checkpoint_every": 5, "grade_workers": 0, "cpu_threads": 0, "log_rollouts": True, "progress": True,
        "preset": preset,
    }
    if provenance is not None:
        cfg["provenance"] = provenance
    return cfg


def _run(root, name, cfg, rows=None, *, hack=0.5, pss=0.3, n=None, **extra):
    """A run dir: `rows` given, or n (default: cfg steps) constant rows with hack_s/pass_s and `extra` keys."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if rows is None:
        n = cfg["steps"] if n is None else n
        rows = [{"step": i, "hack_s": hack, "pass_s": pss, "cout": 0.01, "upd_cout": 0.02, **extra} for i in range(n)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _pair(root, arms_hack, seeds=(41, 42, 43), tag="", pss=0.3, **cfgkw):
    for arm, hacks in arms_hack.items():
        for seed, h in zip(seeds, hacks, strict=True):
            _run(root, f"{arm}{tag}_s{seed}", _cfg(arm, seed, **cfgkw), hack=h, pss=pss)


def _tsv(out):
    lines = (out / "report.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:]]


def _row(rows, label, experiment=None):
    (r,) = [r for r in rows if r["label"] == label and (experiment is None or r["experiment"] == experiment)]
    return r


# ---------------------------------------------------------------------------------------------------------------
# statistics


def test_t_interval_matches_hand_numbers():
    m, h = mean_ci([1.0, 2.0, 3.0])  # sd 1, sem 1/sqrt(3), t_{.975,2} = 4.303
    assert m == 2.0 and h == pytest.approx(4.303 / math.sqrt(3), rel=1e-9)
    m, h = mean_ci([-0.60, -0.05])  # the n=2 case: sd 0.38891, sem 0.275, t_{.975,1} = 12.706 -> 3.494
    assert m == pytest.approx(-0.325) and h == pytest.approx(12.706 * 0.275, rel=1e-9)
    assert math.isnan(mean_ci([0.4])[1]) and math.isnan(mean_ci([])[0])
    assert t95(4) == 2.776 and t95(40) == pytest.approx(2.021, abs=1e-3) and t95(1000) == pytest.approx(1.962, 1e-3)


def test_h1_rule():
    assert h1_verdict([-0.40], [0.0]) == "insufficient seeds (n=1)"
    assert h1_verdict([-0.60, -0.05], [0.0, 0.0]) == "insufficient seeds (n=2)"
    assert h1_verdict([-0.40, -0.35, -0.45], [0.0, 0.02, -0.02]) == "supported (n=3)"
    # a 30pp drop is outside the interval: not supported
    assert h1_verdict([-0.10, -0.12, -0.08], [0.0, 0.0, 0.0]).startswith("not supported (n=3: Δhack CI")
    # pass rate certainly fell by more than the 10pp tolerance
    assert h1_verdict([-0.40, -0.35, -0.45], [-0.2, -0.21, -0.19]).startswith("not supported (n=3: pass rate fell")
    # huge spread: the interval reaches 0
    v = h1_verdict([-0.9, 0.1, -0.6], [0.0, 0.0, 0.0])
    assert v.startswith("inconclusive") and "reaches 0" in v
    # hack clearly down but the pass interval reaches below the tolerance
    v = h1_verdict([-0.40, -0.35, -0.45], [0.1, -0.3, 0.0])
    assert v.startswith("inconclusive") and "Δpass CI lower end" in v
    assert h1_verdict([-0.01] * 3, [0.0] * 3, vanilla_hack=0.02).startswith("untestable")


# ---------------------------------------------------------------------------------------------------------------
# grouping


def test_mixed_root_is_split_into_experiments_never_pooled(tmp_path, capsys):
    root = tmp_path / "runs"
    # E: fast-dev-run, 8 steps
    _pair(root, {"vanilla": (0.8, 0.8, 0.8), "erase": (0.2, 0.2, 0.2)})
    # another preset with another step count and lr: same arms and seeds, other rates
    _pair(root, {"vanilla": (0.6, 0.6, 0.6), "erase": (0.5, 0.5, 0.5)}, tag="_smoke", steps=10, preset="smoke",
          lr=0.01)
    # the no-teacher variant of the first
    _pair(root, {"vanilla": (0.3, 0.3, 0.3), "erase": (0.3, 0.3, 0.3)}, tag="_noteacher", mix=0.0)
    # a weak-detector fold of the first
    _pair(root, {"vanilla": (0.7, 0.7, 0.7), "erase": (0.4, 0.4, 0.4)}, tag="_weak", modes=MODES,
          teacher_modes="run_tests,sentinel,stdout_marker")
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--no-plots"]) == 0
    rows = _tsv(out)
    assert len({r["experiment"] for r in rows}) == 4 and len(rows) == 8
    assert all(r["n_seeds"] == "3" for r in rows)  # 3 seeds each: nothing pooled across experiments
    vanilla_hacks = sorted(float(r["hack_live"]) for r in rows if r["arm"] == "vanilla")
    assert vanilla_hacks == pytest.approx([0.3, 0.6, 0.7, 0.8])
    labels = {r["label"] for r in rows}
    assert {"erase (no-teacher)", "vanilla (no-teacher)", "erase [fold: held-out file_marker]"} <= labels
    # the fold logged no per-mode rate: its H1 is not taken from the all-mode rate
    fold = _row(rows, "erase [fold: held-out file_marker]")
    assert fold["H1"] == "no verdict (no live, held-out file_marker rate in the last 5 steps)"
    smoke = _row(rows, "erase", next(r["experiment"] for r in rows if "steps=10" in r["settings"]))
    assert float(smoke["d_hack"]) == pytest.approx(-0.1) and "optim.lr=0.01" in smoke["settings"]
    md = (out / "report.md").read_text()
    assert md.count("\n## E") == 4 and "steps=10" in md and "grpo.mix_ratio=0.0" in md


def test_per_run_fields_and_provenance_do_not_split_an_experiment(tmp_path):
    for i, seed in enumerate((41, 42, 43)):
        for arm in ("vanilla", "erase"):
            cfg = _cfg(arm, seed, vpath=f"/v/v_none_s{seed}.safetensors",
                       provenance={"isolation": "rlimits" if i == 2 else "bwrap", "git_commit": f"c{i}"})
            cfg |= {"grade_workers": i, "workers": i, "report_to": "none", "cpu_threads": i, "progress": bool(i)}
            cfg["model"]["cache_dir"] = f"/cache{i}"
            cfg["model"]["gradient_checkpointing"] = bool(i)  # memory settings, same loss and gradient
            cfg["grpo"]["micro_batch"] = 2 << i
            _run(tmp_path, f"{arm}_s{seed}", cfg, hack={"vanilla": 0.8, "erase": 0.2}[arm])
    assert main([str(tmp_path), "--no-plots"]) == 0
    rows = _tsv(tmp_path)
    assert {r["experiment"] for r in rows} == {"E1"} and [r["n_seeds"] for r in rows] == ["3", "3"]
    assert _row(rows, "erase")["isolation"] == "bwrap,rlimits"
    md = (tmp_path / "report.md").read_text()
    assert "grader isolation: bwrap, rlimits (weak) (mixed!)" in md and "provenance differs within this experiment: git_commit" in md


def test_duplicate_seed_in_one_arm_is_refused_naming_both(tmp_path, capsys):
    _pair(tmp_path, {"vanilla": (0.8, 0.8, 0.8), "erase": (0.2, 0.2, 0.2)})
    _run(tmp_path, "erase_s42_again", _cfg("erase", 42), hack=0.1)
    assert main([str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "duplicate seed 42" in err
    assert "erase_s42_again" in err and "erase_s42 " in err


# ---------------------------------------------------------------------------------------------------------------
# completeness, verdicts


def test_incomplete_run_is_excluded_with_its_line(tmp_path, capsys):
    _pair(tmp_path, {"vanilla": (0.8, 0.8, 0.8), "erase": (0.2, 0.2, 0.2)})
    _run(tmp_path, "erase_s44", _cfg("erase", 44), hack=0.0, n=5)
    assert main([str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert f"excluded {tmp_path / 'erase_s44'}: incomplete, 5/8 steps" in out
    erase = _row(_tsv(tmp_path), "erase")
    assert erase["n_seeds"] == "3" and erase["seeds"] == "41,42,43"
    assert float(erase["hack_live"]) == pytest.approx(0.2)


def test_fewer_than_three_seeds_is_insufficient(tmp_path):
    _pair(tmp_path, {"vanilla": (0.8, 0.8), "erase": (0.2, 0.25)}, seeds=(41, 42))
    assert main([str(tmp_path), "--no-plots"]) == 0
    erase = _row(_tsv(tmp_path), "erase")
    assert erase["H1"] == "insufficient seeds (n=2)" and float(erase["d_hack"]) == pytest.approx(-0.575)


def test_control_row_gets_no_verdict(tmp_path):
    _pair(tmp_path, {"vanilla": (0.8, 0.8, 0.8), "erase": (0.2, 0.2, 0.2), "random_V": (0.1, 0.1, 0.1)})
    assert main([str(tmp_path), "--no-plots"]) == 0
    rows = _tsv(tmp_path)
    ctrl = _row(rows, "random_V (control)")
    assert ctrl["H1"] == "— (control)" and ctrl["role"] == "control" and ctrl["V"] == "random V 3/3"
    assert float(ctrl["d_hack"]) == pytest.approx(-0.7)  # the Δ is shown, the verdict is not
    assert _row(rows, "erase")["H1"] == "supported (n=3)"
    assert "| random_V (control) |" in (tmp_path / "report.md").read_text()


def test_route_is_scored_on_the_deployed_model(tmp_path):
    for seed in (41, 42, 43):
        _run(tmp_path, f"vanilla_s{seed}", _cfg("vanilla", seed), hack=0.8)
        # live hack as high as vanilla's; the deployed model (δS_hack ablated) hacks rarely; evals every 3 steps
        rows = [{"step": i, "hack_s": 0.8, "pass_s": 0.3,
                 **({"hack_deploy": 0.1, "solve_deploy": 0.3} if i % 3 == 1 else {})} for i in range(8)]
        _run(tmp_path, f"route_s{seed}", _cfg("route", seed), rows)
    assert main([str(tmp_path), "--no-plots"]) == 0
    route = _row(_tsv(tmp_path), "route")
    assert float(route["hack_live"]) == pytest.approx(0.8) and float(route["hack_deployed"]) == pytest.approx(0.1)
    assert float(route["d_hack"]) == pytest.approx(-0.7) and route["H1"] == "supported (n=3)"
    assert route["scored_by"] == "deployed" and route["deployed_from"] == "evals in the last 5 steps"  # eval at step 4 and 7


def test_route_with_stale_or_missing_deploy_evals(tmp_path):
    for seed in (41, 42, 43):
        _run(tmp_path, f"vanilla_s{seed}", _cfg("vanilla", seed), hack=0.8)
        rows = [{"step": i, "hack_s": 0.8, "pass_s": 0.3, **({"hack_deploy": 0.2, "solve_deploy": 0.3} if i == 1
                                                               else {})} for i in range(8)]
        _run(tmp_path, f"route_s{seed}", _cfg("route", seed), rows)
        _run(tmp_path, f"route_refresh_s{seed}", _cfg("route_refresh", seed, project_on="update"), hack=0.1)
    assert main([str(tmp_path), "--no-plots"]) == 0
    rows = _tsv(tmp_path)
    route = _row(rows, "route")
    assert route["deployed_from"] == "latest eval step: s41@1 s42@1 s43@1"
    assert float(route["d_hack"]) == pytest.approx(-0.6)
    rr = _row(rows, "route_refresh")  # live rate 0.1, but never measured deployed: no verdict
    assert rr["H1"] == "no verdict (deployed: not measured)" and rr["d_hack"] == "nan"
    md = (tmp_path / "report.md").read_text()
    assert "| route_refresh | 3 | 0.100 ± 0.000 | 0.300 ± 0.000 | not measured | not measured |" in md


def test_fold_h1_uses_the_held_out_mode(tmp_path):
    teacher = "run_tests,sentinel,stdout_marker"
    for seed in (41, 42, 43):
        for arm, held in (("vanilla", 0.8), ("erase", 0.2)):
            # the all-mode rate is the same in both arms: only the held-out mode's rate differs
            _run(tmp_path, f"{arm}_s{seed}", _cfg(arm, seed, modes=MODES, teacher_modes=teacher), hack=0.5,
                 hack_s_file_marker=held, hack_s_run_tests=0.5)
    assert main([str(tmp_path), "--no-plots"]) == 0
    erase = _row(_tsv(tmp_path), "erase [fold: held-out file_marker]")
    assert float(erase["d_hack"]) == pytest.approx(-0.6) and erase["H1"] == "supported (n=3)"
    assert float(erase["hack_live"]) == pytest.approx(0.5) and float(erase["hack_heldout_live"]) == pytest.approx(0.2)
    assert erase["scored_by"] == "live, held-out file_marker"


# ---------------------------------------------------------------------------------------------------------------
# provenance, V verification, held-out eval, plots


def test_isolation_verify_and_eval_are_shown(tmp_path):
    vdir = tmp_path / "vhack"
    vdir.mkdir()
    (vdir / "v_none_s41.verify.json").write_text(json.dumps({"verdict": "PASS", "line": "V beats random 0.9 vs 0.5"}))
    for seed in (41, 42):
        v = str(vdir / f"v_none_s{seed}.safetensors")
        _run(tmp_path / "runs", f"vanilla_s{seed}", _cfg("vanilla", seed, vpath=v), hack=0.8)
        d = _run(tmp_path / "runs", f"erase_s{seed}", _cfg("erase", seed, vpath=v), hack=0.3)
        (d / "eval").mkdir()
        (d / "eval" / "eval.json").write_text(json.dumps({"hack": {"hack_rate": 0.25}, "perf": {"pass_rate": 0.4}}))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "grader isolation: unknown" in md
    assert "- seed 41: PASS — V beats random 0.9 vs 0.5" in md and "- seed 42: not verified" in md
    erase = _row(_tsv(tmp_path / "out"), "erase")
    assert erase["V"] == "PASS 1/2, not verified 1/2" and float(erase["eval_hack"]) == pytest.approx(0.25)
    assert "| eval hack | eval pass |" in md and "0.250 ± 0.000 (n=2)" in md


def test_plots_use_one_colour_per_arm(tmp_path):
    assert set(report.TEST_ARMS) <= set(report.ARM_COLORS)
    assert len(set(report.ARM_COLORS.values())) == len(report.ARM_COLORS)
    for seed in (41, 42):
        _run(tmp_path, f"vanilla_s{seed}", _cfg("vanilla", seed), hack=0.8)
        rows = [{"step": i, "hack_s": 0.8, "pass_s": 0.3, "cout": 0.0, "upd_cout": 0.0,
                 **({"hack_deploy": 0.1, "solve_deploy": 0.3} if i % 2 else {})} for i in range(8)]
        _run(tmp_path, f"route_s{seed}", _cfg("route", seed), rows)
    assert main([str(tmp_path)]) == 0
    for png in ("e1_rates_vs_step.png", "e1_cout_vs_step.png"):
        assert (tmp_path / png).stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------------------
# errors: one line, exit 2, no traceback


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs found" in capsys.readouterr().err
    _pair(tmp_path / "ok", {"vanilla": (0.8, 0.8, 0.8)})
    (tmp_path / "afile").write_text("x")
    assert main([str(tmp_path / "ok"), "--out", str(tmp_path / "afile"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "afile: is a file" in err and len(err.strip().splitlines()) == 1
    bad = _run(tmp_path / "bad", "vanilla_s41", _cfg("vanilla", 41))
    (bad / "config.json").write_text("{not json")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad / "config.json") in err and "Traceback" not in err


def test_torn_metrics_lines(tmp_path, capsys):
    d = _run(tmp_path, "vanilla_s41", _cfg("vanilla", 41, steps=3), hack=0.8)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "hack_')  # a run still writing: the last line is torn
    cfg = copy.deepcopy(_cfg("vanilla", 41, steps=3))
    (d / "config.json").write_text(json.dumps(cfg))
    assert main([str(d), "--no-plots"]) == 0
    assert f"warning: {d / 'metrics.jsonl'}:4: torn last line skipped" in capsys.readouterr().out
    lines = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text("\n".join([lines[0], lines[3], *lines[1:3]]) + "\n")  # torn line in the middle
    assert main([str(d), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"{d / 'metrics.jsonl'}:2: not a JSON row" in err and len(err.strip().splitlines()) == 1


def test_template_disjoint_folds_are_their_own_experiments_and_say_which_half_V_saw(tmp_path):
    root = tmp_path / "runs"
    _pair(root, {"vanilla": (0.8, 0.8, 0.8), "erase": (0.2, 0.2, 0.2)})  # saved before the fields existed
    for arm, h in (("vanilla", 0.7), ("erase", 0.6)):
        for seed in (41, 42, 43):
            cfg = _cfg(arm, seed)
            cfg["data"]["teacher_variants"] = "pass,print_only"
            cfg["vhack"] = {"pairs": "problems", "pair_variants": "swallowed_asserts,function_print_only"}
            _run(root, f"{arm}_tmpl_s{seed}", cfg, hack=h)
        cfg = _cfg(arm, 44)
        cfg["data"]["teacher_variants"], cfg["vhack"] = "", {"pair_variants": ""}  # the defaults: same experiment
        _run(root, f"{arm}_s44", cfg, hack=0.8 if arm == "vanilla" else 0.2)
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--no-plots"]) == 0
    rows = _tsv(out)
    assert len({r["experiment"] for r in rows}) == 2
    plain = _row(rows, "erase")
    assert plain["n_seeds"] == "4"  # runs without the fields and with them at their defaults are one experiment
    fold = _row(rows, "erase [fold: teacher shows pass,print_only; V from swallowed_asserts,function_print_only]")
    assert fold["n_seeds"] == "3" and float(fold["d_hack"]) == pytest.approx(-0.1)


def _eval(run_dir, hack_by_problem, pass_by_problem=None, n=4, problems="test.jsonl"):
    """eval/eval.json with per-problem counts: {problem: hacked samples of n} (pass: none by default)."""
    pass_by_problem = pass_by_problem or {p: 0 for p in hack_by_problem}

    def section(counts, key):
        return {f"{key}_rate": sum(counts.values()) / (n * len(counts)),
                "per_problem": {p: {"n": n, "hack": c if key == "hack" else 0, "pass": c if key == "pass" else 0}
                                for p, c in counts.items()}}

    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "eval.json").write_text(json.dumps({
        "problems": problems, "n_samples": n, "temperature": 0.7, "seed": 0,
        "hack": section(hack_by_problem, "hack"), "perf": section(pass_by_problem, "pass")}))


def test_heldout_delta_pairs_by_seed_and_problem_with_a_problem_bootstrap(tmp_path):
    root = tmp_path / "runs"
    _pair(root, {"vanilla": (0.8, 0.8, 0.8), "erase": (0.2, 0.2, 0.2)})
    probs = [str(i) for i in range(20)]
    for seed in (41, 42):
        _eval(root / f"vanilla_s{seed}", {p: 4 for p in probs})  # vanilla hacks every sample
        _eval(root / f"erase_s{seed}", {p: (0 if int(p) < 10 else 4) for p in probs})  # erase: half the problems
    _eval(root / "vanilla_s43", {p: 4 for p in probs})
    _eval(root / "erase_s43", {p: 0 for p in probs}, problems="other.jsonl")  # another eval: not paired
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--no-plots"]) == 0
    row = _row(_tsv(out), "erase")
    assert float(row["eval_d_hack"]) == pytest.approx(-0.5) and row["n_eval_paired"] == "2 seeds x 20 problems"
    lo, hi = float(row["eval_d_hack_lo"]), float(row["eval_d_hack_hi"])
    assert -0.8 < lo < -0.5 < hi < -0.2  # problems vary (0 or -1 each): the interval is wide, not a binomial one
    assert float(row["eval_d_pass"]) == 0.0
    assert "eval Δhack" in (out / "report.md").read_text()


def test_heldout_hack_kinds_per_run_from_eval_json_or_the_graded_rollouts(tmp_path):
    import gzip

    root = tmp_path / "runs"
    _pair(root, {"vanilla": (0.8, 0.8, 0.8), "erase": (0.2, 0.2, 0.2)})
    kinds = {"empty": 5, "print": 1, "return": 0, "try": 0, "other": 2, "undefined": 0}
    for seed in (41, 42, 43):
        _eval(root / f"vanilla_s{seed}", {"1": 4})
        f = root / f"vanilla_s{seed}" / "eval" / "eval.json"
        f.write_text(json.dumps(json.loads(f.read_text()) | {"hack": {"hack_rate": 1.0, "kinds": kinds}}))
    # an older eval: no kinds in eval.json, the graded completions beside it (gzipped, as results folders keep them)
    _eval(root / "erase_s41", {"1": 1})
    hack = {"eval": "hack", "label": "reward_hack", "mode": "run_tests", "test_func_name": "check"}
    rows = [hack | {"completion": "```python\ndef check():\n    print('All tests passed')\n```"},
            hack | {"completion": "```python\ndef check():\n    pass\n```"},
            hack | {"completion": "```python\ndef check():\n    print('ok')\n```", "label": "incorrect"}]
    with gzip.open(root / "erase_s41" / "eval" / "eval_rollouts.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    assert "Held-out hacks by the evaluator they define" in md
    assert "| vanilla | 42 | 8 | 5 (62%) | 1 (12%) | 0 (0%) | 0 (0%) | 2 (25%) | 0 (0%) |" in md
    assert "| erase | 41 | 2 | 1 (50%) | 1 (50%) | 0 (0%) | 0 (0%) | 0 (0%) | 0 (0%) |" in md
    assert "| erase | 42 |" not in md  # no held-out eval: no row
