"""V extraction math: a planted hack direction is recovered and oriented; controls differ; metadata guards loading."""

import json

import pytest
import torch

from projected_grpo.vhack import (
    VMeta,
    auroc,
    extract_all,
    extract_basis,
    load_vhack,
    noise_floor,
    orient,
    pairs_from_json,
    random_like,
    save_vhack,
    shuffle_labels,
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


def test_shuffled_control_loses_the_direction_and_verify_says_so():
    u, G_hack, G_clean = _planted(n=40)
    Vs, _ = extract_all(G_hack, G_clean, k=2)
    h, c = shuffle_labels(G_hack, G_clean, seed=3)
    Vsh, _ = extract_all(h, c, k=2)
    # the shuffled V still spans u (the SVD is sign-blind) but its orientation is a coin flip per axis; the
    # hack-vs-clean separation is what distinguishes them
    _, Gh_test, Gc_test = _planted(n=30, seed=0)
    real = verify(Vs, Gh_test, Gc_test)
    rand = verify(random_like(Vs, 5), Gh_test, Gc_test)
    assert real.better_than_random and real.auroc > 0.9 and real.energy > 0.5
    assert not rand.better_than_random or rand.auroc < real.auroc
    assert "PASS" in real.verdict()
    assert not torch.allclose(Vsh["m"], Vs["m"])


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
