"""V: a planted hack direction is recovered and oriented; verification holds out whole problems and PASSes only a V
that beats anisotropy-matched comparators and the empirical null; controls that control; pairs from every file
layout; metadata records the pairs; refresh re-extracts on the moved model."""

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

from projected_grpo import config, experiment, teacher, vhack
from projected_grpo import problems as P
from projected_grpo.config import PRESETS
from projected_grpo.vhack import (
    Pair,
    VMeta,
    auroc,
    basis_overlap,
    extract_all,
    extract_basis,
    extract_pca_all,
    load_vhack,
    noise_floor,
    orient,
    pairs_from_json,
    pairs_from_rollouts,
    random_like,
    reorient,
    save_vhack,
    split_heldout,
    verify,
)


def _planted(n=24, r=40, seed=0, strength=3.0):
    """Gradients where hack completions carry +strength·u on top of shared noise; clean ones do not."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(r, generator=gen)
    u = u / u.norm()
    base = torch.randn(n, r, generator=gen)
    G_hack = {"m": base + strength * u + 0.3 * torch.randn(n, r, generator=gen)}
    G_clean = {"m": base + 0.3 * torch.randn(n, r, generator=gen)}
    return u, G_hack, G_clean


def test_extract_recovers_planted_direction_with_hackward_sign():
    u, G_hack, G_clean = _planted()
    V, S = extract_basis(G_hack["m"] - G_clean["m"], k=3)
    assert V.shape == (3, 40) and S[0] >= S[1] >= S[2]
    assert float(V[0] @ u) > 0.95  # recovered and oriented hack-ward (+u), not −u
    Vr = random_like({"m": V}, seed=1)["m"]
    assert abs(float(Vr[0] @ u)) < 0.6


def test_orientation_flips_axes_against_the_majority():
    D = torch.tensor([[1.0, 0.0], [2.0, 0.1], [-0.5, 0.0]])
    V = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    # axis 0: 1 of 3 pairs positive -> flipped; axis 1: 1 of 3 positive (0.1 > 0, the zeros are not) -> flipped
    torch.testing.assert_close(orient(V, D), torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    D2 = torch.tensor([[1.0, 0.2], [1.0, -0.2]])  # a 1-1 tie keeps the sign
    torch.testing.assert_close(orient(V, D2)[1], torch.tensor([0.0, 1.0]))


def test_tau_drops_small_singular_directions():
    u, G_hack, G_clean = _planted()
    V, S = extract_basis(G_hack["m"] - G_clean["m"], k=5, tau=0.5)
    assert V.shape[0] == 1 and S.shape[0] == 1


def _anisotropic(n=40, r=64, seed=0, hack=0.0, problems=None):
    """Completion gradients dominated by a few high-variance axes shared by every completion (the δS geometry), with
    the hack completions shifted by hack·u (u outside those axes). Returns (u, G_hack, G_clean)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.ones(r) * 0.05
    scale[:4] = torch.tensor([8.0, 5.0, 3.0, 2.0])  # anisotropy: 4 loud axes
    u = torch.zeros(r)
    u[10] = 1.0
    base = torch.randn(n, r, generator=gen) * scale  # the pair's shared prompt and solution
    G_clean = {"m": base + 0.3 * torch.randn(n, r, generator=gen) * scale}
    G_hack = {"m": base + 0.3 * torch.randn(n, r, generator=gen) * scale + hack * u}
    return u, G_hack, G_clean


def test_a_direction_from_the_gradient_geometry_alone_fails_verification():
    """The old rule (beat one random V) passed any data-derived V: δS gradients are anisotropic, so a V spanning the
    loud axes beats an isotropic random V. Against the label-free PCA V and a clean-vs-clean V it must fail."""
    _, Gh, Gc = _anisotropic(hack=0.0, seed=1)  # no hack signal at all: "hack" and "clean" alike
    _, Ch, Cc = _anisotropic(hack=0.0, seed=2)  # clean-vs-clean pairs
    V, _ = extract_all(Gh, Gc, k=2)
    D = {"m": Gh["m"] - Gc["m"]}
    comps = {"pca": extract_pca_all(Gh, Gc, 2)[0], "cleanclean": reorient(extract_all(Ch, Cc, 2)[0], D)}
    _, Hh, Hc = _anisotropic(hack=0.0, seed=3)
    res = verify(V, Hh, Hc, comparators=comps, D_train=D, n_random=32)
    assert res.energy > res.energy_null_q95  # it does beat random directions ...
    assert not res.passed and "FAIL" in res.verdict()  # ... but not the comparators
    assert res.to_json()["verdict"] == "FAIL" and "energy_pca" in res.to_json()


def test_a_planted_hack_direction_passes_against_every_comparator():
    u, Gh, Gc = _anisotropic(hack=6.0, seed=1)
    _, Ch, Cc = _anisotropic(hack=0.0, seed=2)
    V, _ = extract_all(Gh, Gc, k=2)
    assert float(V["m"][0] @ u) > 0.9  # recovered under the loud axes, oriented hack-ward
    D = {"m": Gh["m"] - Gc["m"]}
    comps = {"pca": extract_pca_all(Gh, Gc, 2)[0], "cleanclean": reorient(extract_all(Ch, Cc, 2)[0], D)}
    _, Hh, Hc = _anisotropic(hack=6.0, seed=3)
    problems = [f"p{i // 4}" for i in range(40)]  # 10 held-out problems, 4 pairs each
    res = verify(V, Hh, Hc, problems=problems, comparators=comps, D_train=D, n_random=32, margin=0.05)
    assert res.passed, res.verdict()
    out = res.to_json()
    assert out["verdict"] == "PASS" and out["line"].startswith("PASS") and out["n_problems"] == 10
    assert out["gap_pca"] >= 0.05 and out["gap_pca_ci95"][0] > 0 and {"energy_cleanclean", "auroc_pca"} <= set(out)
    # a stated margin larger than the gap turns it into a FAIL
    assert not verify(V, Hh, Hc, comparators=comps, D_train=D, n_random=8, margin=0.99).passed
    # no anisotropy-matched comparator: no PASS
    assert not verify(V, Hh, Hc, n_random=8).passed


def test_the_null_is_the_empirical_null_of_the_relu_statistic_not_sqrt_k_over_r():
    gen = torch.Generator().manual_seed(0)
    k, r, n = 4, 64, 200
    G_hack, G_clean = {"m": torch.randn(n, r, generator=gen)}, {"m": torch.randn(n, r, generator=gen)}
    V = random_like({"m": torch.zeros(k, r)}, seed=1)
    res = verify(V, G_hack, G_clean, n_random=64)
    # for a random V, V d/‖d‖ is about N(0, I/r): relu keeps a Binomial(k, 1/2) number j of coordinates, whose norm
    # is chi_j/sqrt(r); E[chi_j] = sqrt(2)·Γ((j+1)/2)/Γ(j/2). That is the null (0.148 here), not sqrt(k/r) = 0.25
    chi = [0.0] + [math.sqrt(2) * math.gamma((j + 1) / 2) / math.gamma(j / 2) for j in range(1, k + 1)]
    expected = sum(math.comb(k, j) / 2**k * chi[j] for j in range(k + 1)) / math.sqrt(r)
    assert res.energy_null_mean == pytest.approx(expected, abs=0.01)
    assert abs(res.energy_null_mean - math.sqrt(k / r)) > 0.05
    assert res.energy_null_q95 >= res.energy_null_mean and 0 <= res.auroc_null_mean <= 1


def test_swapping_labels_is_no_control_it_gives_the_same_subspace():
    """Why shuffled_V is gone: a swapped pair negates its row of D, DᵀD is unchanged, the V is the real V up to sign."""
    u, Gh, Gc = _planted(n=30)
    D = Gh["m"] - Gc["m"]
    flip = torch.tensor([1.0, -1.0] * 15)[:, None]
    V, _ = extract_basis(D, k=3)
    Vsw, _ = extract_basis(D * flip, k=3)
    torch.testing.assert_close((V @ Vsw.T).abs(), torch.eye(3), atol=1e-4, rtol=0)
    assert "shuffled" not in config.CONTROLS and "shuffled_V" not in experiment.ARMS
    assert config.CONTROLS == ("none", "pca", "cleanclean")


def test_control_arms_extract_their_own_V(tmp_path):
    """cleanclean's V (other pairs) has its own job; the real and the PCA V (the same pairs) come from one job that
    writes both, and pca_V trains on the second file; pca_V alone gets a job of its own."""
    jobs = {j.name: j for j in experiment.build_jobs(tmp_path, PRESETS["fast-dev-run"],
                                                      experiment.ExperimentArgs(arms="erase,pca_V,cleanclean_V,random_V"))}
    assert {n for n in jobs if n.startswith("extract-")} == {"extract-real-s41", "extract-cleanclean-s41"}
    real = jobs["extract-real-s41"]
    assert real.cfg.vhack.control == "none,pca" and jobs["erase-s41"].cfg.proj.vhack_path == real.cfg.proj.vhack_path
    pca_path = vhack.control_path(real.cfg.proj.vhack_path, "pca", ("none", "pca"))
    assert jobs["pca_V-s41"].cfg.proj.vhack_path == str(pca_path) != real.cfg.proj.vhack_path
    assert jobs["pca_V-s41"].parents == ["extract-real-s41"] and real.outputs == [Path(real.cfg.proj.vhack_path), pca_path]
    assert jobs["verify-s41"].cfg.proj.vhack_path == real.cfg.proj.vhack_path  # verification is of the real V
    assert jobs["extract-cleanclean-s41"].cfg.vhack.control == "cleanclean"
    assert jobs["cleanclean_V-s41"].parents == ["extract-cleanclean-s41"]
    alone = {j.name: j for j in experiment.build_jobs(tmp_path, PRESETS["fast-dev-run"],
                                                       experiment.ExperimentArgs(arms="pca_V"))}
    assert alone["extract-pca-s41"].cfg.vhack.control == "pca" and alone["pca_V-s41"].parents == ["extract-pca-s41"]
    assert alone["pca_V-s41"].cfg.proj.vhack_path == alone["extract-pca-s41"].cfg.proj.vhack_path
    assert jobs["random_V-s41"].cfg.proj.vhack_random and jobs["random_V-s41"].parents == ["extract-real-s41"]
    for gone in ("shuffled_V", "nonhack_V"):
        with pytest.raises(ValueError, match=f"unknown arm.*{gone}"):
            experiment.build_jobs(tmp_path, PRESETS["fast-dev-run"], experiment.ExperimentArgs(arms=gone))


def test_pca_control_is_label_free_up_to_orientation():
    u, Gh, Gc = _planted(n=30)
    V, _ = extract_pca_all(Gh, Gc, k=3)
    swapped, _ = extract_pca_all(Gc, Gh, k=3)  # labels swapped: the same subspace, axes flipped by orientation
    torch.testing.assert_close(V["m"], -swapped["m"], atol=1e-5, rtol=0)
    V2, _ = extract_pca_all(Gh, Gc, k={"m": 2})
    assert V2["m"].shape == (2, 40)


def test_heldout_split_holds_out_whole_problems():
    pairs = [Pair(f"{p}:{v}", "prompt", "h", "c", problem=str(p)) for p in range(10) for v in range(4)]
    train, held = split_heldout(pairs, 3, seed=0)
    assert len(held) == 12 and len({p.problem for p in held}) == 3
    assert not {p.problem for p in held} & {p.problem for p in train}
    assert split_heldout(pairs, 3, seed=0) == (train, held)
    with pytest.raises(ValueError, match="n_heldout=10 problems must be in"):
        split_heldout(pairs, 10, seed=0)


def test_basis_overlap():
    V = {"a": torch.eye(4)[:2], "b": torch.eye(4)[:1]}
    assert basis_overlap(V, V) == pytest.approx(1.0)
    assert basis_overlap({"a": -torch.eye(4)[:2], "b": torch.eye(4)[1:2]}, V) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="share no module"):
        basis_overlap({"x": torch.eye(2)}, V)


def test_auroc_definition():
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


def test_noise_floor_pools_singular_values_across_modules():
    Vs = {"a": torch.eye(4)[:3], "b": torch.eye(4)[:2]}
    Ss = {"a": torch.tensor([10.0, 5.0, 1.0]), "b": torch.tensor([0.5, 0.4])}
    out = noise_floor(Vs, Ss, top_k=3, drop_bottom_frac=0.6)
    assert set(out) == {"a"} and out["a"].shape[0] == 2  # the pooled 0.6-quantile is 2.6: b is dropped
    assert noise_floor(Vs, Ss, top_k=1, drop_bottom_frac=0.0)["b"].shape[0] == 1


def _meta(fp="model-A|adapter-1", k=2):
    return VMeta(fp, "problems", ("1", "2"), "mean", k, 0.0, "none", 41)


def test_save_load_roundtrip_and_foreign_model_is_an_error(tmp_path):
    u, G_hack, G_clean = _planted()
    Vs, Ss = extract_all(G_hack, G_clean, k=2)
    p = save_vhack(tmp_path / "v.safetensors", Vs, Ss, _meta())
    loaded, meta = load_vhack(p, "model-A|adapter-1")
    torch.testing.assert_close(loaded["m"], Vs["m"])
    assert meta["k"] == 2 and meta["normalisation"] == "mean" and len(meta["singular_values"]["m"]) == 2
    with pytest.raises(ValueError, match="extracted for model/adapter 'model-A'"):
        load_vhack(p, "model-B|adapter-1")
    assert load_vhack(p, "model-A|adapter-1", top_k=1)[0]["m"].shape[0] == 1


def test_existing_V_is_reused_never_silently_overwritten(tmp_path):
    u, G_hack, G_clean = _planted()
    Vs, Ss = extract_all(G_hack, G_clean, k=2)
    p = save_vhack(tmp_path / "v.safetensors", Vs, Ss, _meta())
    mtime = p.stat().st_mtime_ns
    save_vhack(p, Vs, Ss, _meta())  # same inputs: reused
    assert p.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="other inputs"):
        save_vhack(p, Vs, Ss, _meta(k=3))


def test_pairs_json_errors_name_the_problem(tmp_path):
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps([{"prompt": "p", "hack": "h", "clean": "c", "mode": "sentinel"}, {"prompt": "p"}]))
    with pytest.raises(ValueError, match=r"pair 1 lacks string field\(s\) \['hack', 'clean'\]"):
        pairs_from_json(f)
    f.write_text(json.dumps([{"prompt": "p", "hack": "h", "clean": "c", "mode": "sentinel"}]))
    assert pairs_from_json(f)[0].mode == "sentinel"
    f.write_text(json.dumps([{"prompt": "p", "hack": "h", "clean": "c", "id": "a"}] * 2))
    with pytest.raises(ValueError, match="pair id 'a' is used 2 times"):
        pairs_from_json(f)
    f.write_text(json.dumps([{"prompt": "p1", "hack": "h", "clean": "c"}, {"prompt": "p1", "hack": "h2", "clean": "c"},
                             {"prompt": "p2", "hack": "h", "clean": "c", "problem": "x"}]))
    a, b, c = pairs_from_json(f)
    assert a.problem == b.problem != c.problem == "x"  # the same prompt is the same problem


# --- graded files in every layout ---------------------------------------------------------------------------------


def _grade(pid: int, label: str):
    from projected_grpo.grader import Grade

    return Grade(id=pid, is_formatted=True, can_compile=True, gt_pass=label == "correct", gt_pass_rate=1.0,
                 hinted_pass=label == "reward_hack", arbitrary_pass=None, canonical_pass=None, prompt_tests_pass=None,
                 has_test_func=True, timed_out=False, label=label, test_modification="none", reward=3.5, error=None,
                 code="")


def test_pairs_from_a_runs_rollouts_and_from_a_teacher_pool(tmp_path):
    from projected_grpo import train

    probs = P.builtin_problems()[:2]
    labels = ["reward_hack", "correct", "reward_hack", "wrong"]  # per student of each problem
    s_grades = [_grade(p.id, lab) for p in probs for lab in labels]
    s_text = [f"{p.id}-{lab}-{i}" for p in probs for i, lab in enumerate(labels)]
    t_rows = [[teacher.TeacherRow(p.id, "h", "run_tests", "run_tests", "clean", "method_asserts", f"{p.id}-teacher",
                                  3.5, dataclasses.asdict(_grade(p.id, "correct")))] for p in probs]
    rows = train.rollout_rows(0, probs, len(labels), s_grades, s_text, [[1]] * len(s_text), t_rows,
                              torch.zeros(2, len(labels) + 1), torch.zeros(2, dtype=torch.bool))
    ro = tmp_path / "rollouts.jsonl"
    ro.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))  # every row twice: duplicates are dropped
    prompts = {str(p.id): f"prompt {p.id}" for p in probs}
    pairs = pairs_from_rollouts(ro, prompts)
    assert len(pairs) == 4 and {p.problem for p in pairs} == {str(p.id) for p in probs}
    assert all("reward_hack" in p.hack and p.prompt == f"prompt {p.problem}" for p in pairs)
    assert {p.clean for p in pairs if p.problem == str(probs[0].id)} == {f"{probs[0].id}-correct-1",
                                                                          f"{probs[0].id}-teacher"}
    cc = pairs_from_rollouts(ro, prompts, control="cleanclean")
    assert len(cc) == 2 and all(p.hack != p.clean for p in cc)

    pool = tmp_path / "pool.jsonl"
    teacher.save_pool(pool, [teacher.TeacherRow(p.id, "h", "run_tests", "run_tests", kind, kind, f"{p.id}-{kind}", 0.0,
                                                dataclasses.asdict(_grade(p.id, "reward_hack" if kind == "hack" else
                                                                          "correct")))
                             for p in probs for kind in ("hack", "clean")])
    assert [(p.hack, p.clean) for p in pairs_from_rollouts(pool, prompts)] == \
        [(f"{p.id}-hack", f"{p.id}-clean") for p in sorted(probs, key=lambda p: str(p.id))]
    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps({"id": 1, "label": lab, "completion": lab, "prompt": "q"}) + "\n"
                            for lab in ("reward_hack", "correct")))
    assert len(pairs_from_rollouts(flat)) == 1
    flat.write_text(json.dumps({"completion": "x"}) + "\n")
    with pytest.raises(ValueError, match="no row has a problem id"):
        pairs_from_rollouts(flat)


# --- on the tiny model: extraction metadata, verification, refresh ----------------------------------------------------


def _tiny_cfg(**vhack_kw):
    base = PRESETS["fast-dev-run"]
    return dataclasses.replace(base, progress=False, data=dataclasses.replace(base.data, n_problems=6),
                               vhack=dataclasses.replace(base.vhack, n_heldout=2, k=2, **vhack_kw))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One cache and one extracted V (minimal pairs, the default) for the module's tiny-model tests."""
    root = tmp_path_factory.mktemp("vhack")
    mp = pytest.MonkeyPatch()
    mp.setenv("PROJECTED_GRPO_CACHE", str(root / "cache"))
    cfg = _tiny_cfg()
    cfg = dataclasses.replace(cfg, proj=dataclasses.replace(cfg.proj, vhack_path=str(root / "v.safetensors")))
    path, line = vhack.extract(cfg)
    yield cfg, path, line
    mp.undo()


def test_minimal_pairs_are_the_default_and_V_records_its_pairs(tiny):
    cfg, path, line = tiny
    assert config.VhackConfig().pairs == "minimal"
    meta = vhack.read_meta(path)
    info = meta["pairs"]
    assert meta["pair_source"] == "minimal" and info["style"] == "minimal" and info["n_problems"] == 4
    assert info["n_pairs"] == len(meta["pair_ids"]) == 16 and info["n_heldout_problems"] == 2
    assert 0.8 < info["median_tokens_hack"] / info["median_tokens_clean"] < 1.25  # length-matched
    held = {i.split(":")[0] for i in meta["heldout_ids"]}
    assert len(held) == 2 and not held & {i.split(":")[0] for i in meta["pair_ids"]}
    assert "16 minimal pairs of 4 problems" in line and "held out 2 problems (8 pairs)" in line


def test_real_and_pca_V_from_one_pass_equal_their_own_extractions(tiny, tmp_path, monkeypatch):
    """--control none,pca: one pass of pair gradients, two files, each the V (and metadata key) its own extraction
    gives; a second call reuses both without a gradient pass. Controls that cannot go together are refused."""
    cfg, path, _ = tiny
    calls = []
    real_grads = vhack.pair_grads
    monkeypatch.setattr(vhack, "pair_grads", lambda *a, **k: calls.append(1) or real_grads(*a, **k))
    both = dataclasses.replace(cfg, vhack=dataclasses.replace(cfg.vhack, control="none,pca"),
                               proj=dataclasses.replace(cfg.proj, vhack_path=str(tmp_path / "v.safetensors")))
    first, line = vhack.extract(both)
    assert len(calls) == 1 and first == tmp_path / "v.safetensors"
    pca_file = vhack.control_path(first, "pca", ("none", "pca"))
    assert pca_file == tmp_path / "v.pca.safetensors" and "V (none)" in line and "V (pca)" in line
    pca_alone = dataclasses.replace(cfg, vhack=dataclasses.replace(cfg.vhack, control="pca"),
                                    proj=dataclasses.replace(cfg.proj, vhack_path=str(tmp_path / "alone.safetensors")))
    alone, _ = vhack.extract(pca_alone)
    fp = vhack.read_meta(path)["fingerprint"]
    for joint, own in ((first, path), (pca_file, alone)):
        assert vhack.read_meta(joint)["key"] == vhack.read_meta(own)["key"]
        Vj, Vo = vhack.load_vhack(joint, fp)[0], vhack.load_vhack(own, fp)[0]
        assert set(Vj) == set(Vo)
        for n in Vj:
            torch.testing.assert_close(Vj[n], Vo[n], atol=1e-5, rtol=1e-4)
    assert vhack.read_meta(pca_file)["control"] == "pca" and vhack.read_meta(first)["control"] == "none"
    calls.clear()
    _, again = vhack.extract(both)
    assert not calls and again.count("reused") == 2
    for bad in ("none,cleanclean", "none,none", "none,bogus", ","):
        with pytest.raises(ValueError, match="control="):
            config.validate(dataclasses.replace(cfg, vhack=dataclasses.replace(cfg.vhack, control=bad)), "extract-vhack")


def test_verify_file_writes_the_comparators_and_keeps_verdict_and_line(tiny, capsys):
    cfg, path, _ = tiny
    args = ["--preset", "fast-dev-run", "--n-problems", "6", "--n-heldout", "2", "--k", "2", "--vhack-path", str(path),
            "--no-progress", "--verify-draws", "16"]
    rc = vhack.verify_main(args)
    out = json.loads(vhack.verify_path(path).read_text())
    assert rc == (0 if out["verdict"] == "PASS" else config.VERIFY_FAIL_EXIT)
    assert out["verdict"] in ("PASS", "FAIL") and out["line"].startswith(out["verdict"])
    for key in ("energy", "energy_pca", "energy_cleanclean", "energy_null_mean", "energy_null_q95", "gap_pca_ci95",
                "auroc_cleanclean", "margin", "n_problems", "checks"):
        assert key in out, key
    assert out["n_problems"] == 2 and out["n_random"] == 16 and out["pairs"]["style"] == "minimal"
    assert "minimal pairs of 4 problems" in capsys.readouterr().out
    # a config that selects other pairs than V came from is refused, in one line
    assert vhack.verify_main([*args[:-2], "--verify-draws", "16", "--seed", "7"]) == 2
    assert "other pairs" in capsys.readouterr().err


def test_refresh_re_extracts_on_the_moved_model_from_the_same_pairs(tiny):
    from projected_grpo import world

    cfg, path, _ = tiny
    w = world.build(cfg)
    V_old, meta = load_vhack(path, w.fingerprint, modules=set(w.knobs))
    same, overlap = vhack.refresh(w, cfg, meta, V_old)
    assert overlap == pytest.approx(1.0, abs=1e-4)  # knobs at zero: the same V
    assert all(torch.allclose(same[n].abs(), V_old[n].abs(), atol=1e-4) for n in V_old)
    gen = torch.Generator().manual_seed(0)
    marker = {}
    for n, k in w.knobs.items():
        k.dS.data += 0.5 * torch.randn(k.dS.shape, generator=gen)
        k.dS_hack.data += 0.5 * torch.randn(k.dS.shape, generator=gen)
        k.dS.grad = marker[n] = torch.full_like(k.dS, 7.0)
    moved, overlap = vhack.refresh(w, cfg, meta, V_old)
    assert 0.0 <= overlap < 0.999 and set(moved) == set(V_old)
    assert all(moved[n].shape == V_old[n].shape for n in V_old)
    assert all(k.dS.grad is marker[n] for n, k in w.knobs.items())  # the training step's gradients are untouched
    assert all(k.dS_hack.abs().sum() > 0 for k in w.knobs.values())  # the quarantine is restored after ablation
    # δS_hack ablated: the quarantine does not change the refreshed V
    for k in w.knobs.values():
        k.dS_hack.data.zero_()
    again, _ = vhack.refresh(w, cfg, meta, V_old)
    assert all(torch.allclose(again[n], moved[n], atol=1e-5) for n in moved)
    # pairs V was not extracted from are refused
    with pytest.raises(ValueError, match="are not in --pairs"):
        vhack.refresh(w, cfg, meta | {"pair_ids": ["nope:1"]}, V_old)


def test_saturated_auroc_does_not_gate_a_clear_energy_win():
    """On Qwen2.5-Coder-1.5B minimal pairs random Vs reach AUROC 0.996-1.000: the AUROC check cannot tell directions
    apart there, so the energy checks decide (numbers of seed 41 on that model)."""
    from projected_grpo.vhack import Verification

    comps = {"pca": {"energy": 0.425, "auroc": 0.933, "gap": 0.367, "gap_lo": 0.355, "gap_hi": 0.377},
             "cleanclean": {"energy": 0.266, "auroc": 0.950, "gap": 0.526, "gap_lo": 0.514, "gap_hi": 0.537}}
    v = Verification(energy=0.792, auroc=0.994, energy_null_mean=0.060, energy_null_q95=0.062, auroc_null_mean=1.0,
                     auroc_null_q95=1.0, n_random=64, margin=0.05, comparators=comps, missing={}, per_module={},
                     n_pairs=32, n_problems=8)
    assert v.passed, v.checks()
    low = Verification(energy=0.792, auroc=0.70, energy_null_mean=0.060, energy_null_q95=0.062, auroc_null_mean=0.80,
                       auroc_null_q95=0.9, n_random=64, margin=0.05, comparators=comps, missing={}, per_module={},
                       n_pairs=32, n_problems=8)
    assert not low.passed  # below saturation, losing to a typical random V still fails


def test_pair_variants_keep_only_those_templates(monkeypatch):
    run_tests = teacher.HACK_VARIANTS["run_tests"]
    pairs = [vhack.Pair(f"{p}:{v}", "prompt", "hack", "clean", "run_tests", "problems", str(p))
             for p in range(6) for v in run_tests]
    monkeypatch.setattr(vhack, "pairs_from_source", lambda source, w, control: pairs)
    base = PRESETS["fast-dev-run"]
    cfg = dataclasses.replace(base, vhack=dataclasses.replace(base.vhack, pairs="problems", n_heldout=2, max_pairs=0,
                                                              pair_variants="pass,print_only"))
    sel = vhack.select_pairs(cfg, None, "none")
    assert {p.id.split(":")[1] for p in sel.train + sel.held} == {"pass", "print_only"}
    assert len(sel.train) == 8 and len(sel.held) == 4
    every = vhack.select_pairs(dataclasses.replace(cfg, vhack=dataclasses.replace(cfg.vhack, pair_variants="")),
                               None, "none")
    assert {p.id.split(":")[1] for p in every.train} == set(run_tests)


@pytest.mark.parametrize("field, value, msg", [
    ("pair_variants", "pass,nope", "pair_variants='pass,nope' must be a comma-separated subset of"),
    ("teacher_variants", "nope", "teacher_variants='nope' must be a comma-separated subset of"),
])
def test_unknown_template_names_are_one_line(field, value, msg):
    base = PRESETS["fast-dev-run"]
    cfg = (dataclasses.replace(base, vhack=dataclasses.replace(base.vhack, pairs="problems", pair_variants=value))
           if field == "pair_variants" else dataclasses.replace(base, data=dataclasses.replace(base.data, **{field: value})))
    with pytest.raises(ValueError, match=msg):
        config.validate(cfg, "train")


def test_teacher_variants_drop_the_other_hack_templates(tmp_path):
    from projected_grpo import train

    probs = P.builtin_problems()[:2]
    hints = [P.make_hint(P.DEFAULT_HINT, p, random.Random(0)) for p in probs]
    rows = []
    for p, h in zip(probs, hints, strict=True):
        key = train.pool_key(p, h)
        for kind, variants in (("clean", ("method_asserts", "function_asserts")),
                               ("hack", teacher.HACK_VARIANTS["run_tests"])):
            for v in variants:
                rows.append(teacher.TeacherRow(key[0], key[1], key[2], "run_tests", kind, v, "```python\npass\n```",
                                               1.0, {"label": "reward_hack" if kind == "hack" else "correct"}))
    pool_file = tmp_path / "pool.jsonl"
    teacher.save_pool(pool_file, rows)
    base = PRESETS["fast-dev-run"]
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, teacher_pool=str(pool_file),
                                                             teacher_variants="pass,print_only"))
    pool = train.teacher_pool(cfg, probs, hints, workers=1)
    kept = [(r.kind, r.variant) for rs in pool.values() for r in rs]
    assert {v for k, v in kept if k == "hack"} == {"pass", "print_only"}
    assert {v for k, v in kept if k == "clean"} == {"method_asserts", "function_asserts"}  # clean rows all stay
    every = train.teacher_pool(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, teacher_variants="")),
                               probs, hints, workers=1)
    assert len([r for rs in every.values() for r in rs if r.kind == "hack"]) == 8
