"""Projection identities on random tensors; the Projector on real SVD knobs with AdamW wired as train.py wires it:
what is left in dS.grad / dS_hack.grad, the applied update, the first moment, and route against vanilla."""

import pytest
import torch

from projected_grpo import adapter
from projected_grpo.adapter import AdapterConfig
from projected_grpo.projection import (
    Projector,
    effective_project_on,
    hackward_fraction,
    measure_all,
    project,
    project_all,
    random_orthonormal,
    strip_hackward,
    strip_span,
)


def _setup(k=4, r=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    V = random_orthonormal(k, r, gen)
    g = torch.randn(r, generator=gen, dtype=torch.float64).float()
    return V, g


def test_random_orthonormal_is_orthonormal():
    V, _ = _setup(k=6, r=20)
    torch.testing.assert_close(V @ V.T, torch.eye(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gate", ["one_sided", "no_gate", "reverse"])
def test_removed_lies_in_span_of_V(gate):
    V, g = _setup()
    _, removed, _, _ = project(g, V, gate=gate)
    in_span = (V @ removed) @ V  # projection of removed onto span(V)
    torch.testing.assert_close(removed, in_span, atol=1e-5, rtol=0)
    assert removed.norm() > 0


def test_one_sided_leaves_no_hackward_component_and_keeps_the_rest():
    for seed in range(5):
        V, g = _setup(seed=seed)
        c = V @ g
        assert (c > 0).any() and (c < 0).any(), "pick seeds where both signs occur"
        g2, removed, cin, cout = project(g, V, gate="one_sided")
        assert torch.relu(V @ g2).max() < 1e-5
        # the anti-hack coordinates are untouched
        torch.testing.assert_close((V @ g2)[c < 0], c[c < 0], atol=1e-5, rtol=0)
        assert cin > 0 and cout < 1e-5
        torch.testing.assert_close(removed, torch.relu(c) @ V, atol=1e-6, rtol=0)


def test_no_gate_removes_whole_span_and_reverse_reflects_it():
    V, g = _setup(seed=3)
    g_ng, *_ = project(g, V, gate="no_gate")
    assert (V @ g_ng).abs().max() < 1e-5
    g_rev, *_ = project(g, V, gate="reverse")
    torch.testing.assert_close(V @ g_rev, -(V @ g), atol=1e-5, rtol=0)
    # the orthogonal complement is untouched by every gate
    P_perp = torch.eye(g.numel()) - V.T @ V
    for g2 in (g_ng, g_rev):
        torch.testing.assert_close(P_perp @ g2, P_perp @ g, atol=1e-5, rtol=0)


def test_preserve_magnitude_keeps_norm_and_overshoot_scales_removal():
    V, g = _setup(seed=1)
    g2, *_ = project(g, V, preserve_magnitude=True)
    torch.testing.assert_close(g2.norm(), g.norm(), atol=1e-5, rtol=0)
    _, r1, _, _ = project(g, V, overshoot=1.0)
    _, r2, _, _ = project(g, V, overshoot=1.5)
    torch.testing.assert_close(r2, 1.5 * r1)


def test_cin_matches_definition_and_is_zero_for_zero_grad():
    V, g = _setup(seed=2)
    assert hackward_fraction(g, V) == pytest.approx(float(torch.relu(V @ g).norm() / g.norm()), rel=1e-6)
    assert hackward_fraction(torch.zeros_like(g), V) == 0.0
    # a gradient built along +V[0] is fully hack-ward
    assert hackward_fraction(3 * V[0], V) == pytest.approx(1.0, abs=1e-5)
    assert hackward_fraction(-3 * V[0], V) == pytest.approx(0.0, abs=1e-6)


def test_strip_span_removes_span_component():
    V, g = _setup(seed=4)
    assert (V @ strip_span(g, V)).abs().max() < 1e-5


def test_project_all_passes_through_modules_without_V_and_reports_fired():
    V, g = _setup(seed=5)
    g = g + 3 * V[0]  # make sure module "a" has a hack-ward component
    new, removed, stats = project_all({"a": g, "b": g.clone()}, {"a": V})
    torch.testing.assert_close(new["b"], g)
    assert removed["b"].abs().sum() == 0
    assert stats.n_modules == 1 and stats.fired == 1.0 and stats.cout < 1e-5


class _Knob(torch.nn.Module):
    def __init__(self, r):
        super().__init__()
        self.dS = torch.nn.Parameter(torch.zeros(r))
        self.dS_hack = torch.nn.Parameter(torch.zeros(r))


def _adam_run(project_on, intervention="erase", steps=6, r=16, k=3):
    gen = torch.Generator().manual_seed(7)
    V = random_orthonormal(k, r, gen)
    knob = _Knob(r)
    knobs = {"m": knob}
    opt = torch.optim.AdamW(
        [{"params": [knob.dS], "weight_decay": 0.1}, {"params": [knob.dS_hack], "weight_decay": 0.0}],
        lr=0.1,
        betas=(0.9, 0.99),
    )
    proj = Projector({"m": V}, intervention=intervention, project_on=project_on)
    hack_dir = V.sum(0)  # the gradient keeps a strong hack-ward push every step
    deltas = []
    for step in range(steps):
        opt.zero_grad()
        g = hack_dir * 2.0 + 0.5 * torch.randn(r, generator=gen)
        knob.dS.grad = g.clone()
        proj.on_grad(step, knobs, {"m": g}, {"m": torch.zeros(r)})
        before = knob.dS.detach().clone()
        opt.step()
        m = proj.after_step(step, knobs, opt)
        deltas.append((knob.dS.detach() - before, m))
    return V, knob, deltas


def test_update_mode_applied_adamw_step_has_no_hackward_component():
    V, _, deltas = _adam_run("update")
    for delta, m in deltas:
        assert torch.relu(-(V @ delta)).max() < 1e-6, V @ delta  # a step moves against the gradient: u = −Δ
        assert m["upd_cout"] < 1e-5


def test_grad_mode_leaks_through_adam_where_update_mode_does_not():
    # the seed's grad-space projection: AdamW's moments + weight decay still move δS along +V on some step
    V, _, deltas = _adam_run("grad", steps=8)
    leaked = max(float(torch.relu(-(V @ d)).max()) for d, _ in deltas)
    V2, _, deltas2 = _adam_run("update", steps=8)
    kept = max(float(torch.relu(-(V2 @ d)).max()) for d, _ in deltas2)
    assert kept < 1e-6 <= leaked


def test_route_puts_removed_part_into_quarantine_knob():
    V, knob, _ = _adam_run("update", intervention="route")
    assert (-(V @ knob.dS_hack.detach())).max() > 0.1  # hack-ward motion went to the deletable knob
    assert torch.relu(-(V @ knob.dS.detach())).max() < 1e-6


@pytest.mark.parametrize("gate", ["one_sided", "no_gate"])
def test_moments_mode_strips_the_gated_part_of_adam_first_moment(gate):
    gen = torch.Generator().manual_seed(0)
    k = _Knob(8)
    V = random_orthonormal(2, 8, gen)
    opt = torch.optim.AdamW([k.dS], lr=0.1)
    proj = Projector({"m": V}, project_on="moments", gate=gate)
    k.dS.grad = V[0] * 3 - V[1] * 2 + 0.1 * torch.randn(8, generator=gen)  # hack-ward on V[0], anti-hack on V[1]
    proj.on_grad(0, {"m": k}, {"m": k.dS.grad}, {"m": torch.zeros(8)})
    opt.step()
    proj.after_step(0, {"m": k}, opt)
    c = V @ opt.state[k.dS]["exp_avg"]
    assert c[0].abs() < 1e-6  # the hack-ward momentum is gone
    if gate == "one_sided":  # the anti-hack momentum stays, as in every other one-sided mode
        torch.testing.assert_close(c[1], (1 - 0.9) * (V[1] @ k.dS.grad), atol=1e-6, rtol=0)
        assert c[1] < -0.1
    else:
        assert c[1].abs() < 1e-6


def test_strip_hackward_gates_like_project():
    V, g = _setup(seed=6)
    for gate in ("one_sided", "no_gate", "reverse"):
        torch.testing.assert_close(strip_hackward(g, V, gate), project(g, V, gate)[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(strip_hackward(g, V, "no_gate"), strip_span(g, V), atol=1e-6, rtol=0)


def test_effective_project_on_makes_route_exact_by_default():
    assert effective_project_on("route", "auto") == "update"
    assert effective_project_on("erase", "auto") == "grad"
    assert effective_project_on("none", "auto") == "grad"
    for mode in ("grad", "update", "moments"):  # an explicit choice is kept (grad + route: the seed's variant)
        assert effective_project_on("route", mode) == mode
        assert effective_project_on("erase", mode) == mode
    assert Projector({}, intervention="route").project_on == "update"
    assert Projector({}, intervention="route", project_on="grad").project_on == "grad"
    assert Projector({}, intervention="erase").project_on == "grad"


def test_bad_options_fail_loudly():
    with pytest.raises(ValueError, match="intervention"):
        Projector({}, intervention="delete")
    with pytest.raises(ValueError, match="project-on"):
        Projector({}, project_on="weights")
    with pytest.raises(ValueError, match="gate"):
        project(torch.ones(3), torch.eye(3)[:1], gate="two_sided")


# ---------------------------------------------------------------------------------------------------------------
# The Projector on real SVD knobs (adapter.attach on a small net), one step as train.py runs it: backward ->
# dS.grad = g, dS_hack.grad = None -> hook -> clip -> AdamW (dS decayed, dS_hack not) -> post_step.


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(12, 10, bias=False)
        self.down_proj = torch.nn.Linear(10, 8, bias=False)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.q_proj(x)))


def _real(tmp_path, k=3):
    torch.manual_seed(0)
    net = _Net()
    knobs = adapter.attach(net, AdapterConfig(targets=("q_proj", "down_proj"), cache_dir=str(tmp_path)), "tiny-proj")
    gen = torch.Generator().manual_seed(1)
    Vs = {n: random_orthonormal(k, kn.rank, gen) for n, kn in knobs.items()}
    return net, knobs, Vs


def _adamw(knobs, weight_decay=0.1):
    return torch.optim.AdamW([{"params": [k.dS for k in knobs.values()], "weight_decay": weight_decay},
                              {"params": [k.dS_hack for k in knobs.values()], "weight_decay": 0.0}],
                             lr=0.05, betas=(0.9, 0.99))


def _perp(v, V):
    """The part of v off span(V)."""
    return v - (V @ v) @ V


def _step(net, knobs, Vs, opt, proj, step, push=1.0):
    """One train.py step on a regression batch; the gradient gets a hack-ward push along V[0] and an anti-hack one
    along −V[1] so every mode has something to remove and something to keep. Returns g, the grads the hook left,
    δS before the step, and the metrics."""
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 12, generator=gen), torch.randn(16, 8, generator=gen)
    for k in knobs.values():
        k.dS.grad = k.dS_hack.grad = None
    ((net(x) - y) ** 2).mean().backward()
    g = {}
    for n, k in knobs.items():
        g[n] = k.dS.grad.detach() + push * (Vs[n][0] - 0.5 * Vs[n][1])
        k.dS.grad = g[n].clone()  # g = g_s + g_t
        k.dS_hack.grad = None  # δS_hack moves only if a hook routes into it
    metrics = {}
    if proj is not None:
        metrics = proj.on_grad(step, knobs, g, {n: torch.zeros_like(v) for n, v in g.items()})
    hooked = {n: (k.dS.grad.clone(), None if k.dS_hack.grad is None else k.dS_hack.grad.clone())
              for n, k in knobs.items()}
    torch.nn.utils.clip_grad_norm_(adapter.knob_params(knobs), 10.0)
    prev_dS = {n: k.dS.detach().clone() for n, k in knobs.items()}
    prev_dS_hack = {n: k.dS_hack.detach().clone() for n, k in knobs.items()}
    opt.step()
    if proj is not None:
        metrics.update(proj.after_step(step, knobs, opt, prev_dS, prev_dS_hack))
    return g, hooked, prev_dS, metrics


def test_grad_mode_erase_leaves_no_hackward_part_in_dS_grad(tmp_path):
    net, knobs, Vs = _real(tmp_path)
    opt = _adamw(knobs)
    proj = Projector(Vs, intervention="erase", project_on="grad")
    for step in range(3):
        g, hooked, _, m = _step(net, knobs, Vs, opt, proj, step)
        for n, (gd, gh) in hooked.items():
            assert torch.relu(Vs[n] @ gd).max() < 1e-6, Vs[n] @ gd  # in dS.grad itself
            torch.testing.assert_close(_perp(gd, Vs[n]), _perp(g[n], Vs[n]), atol=1e-6, rtol=0)
            assert (Vs[n] @ gd)[1] < -0.1  # the anti-hack part is kept
            assert gh is None
        assert m["cin"] > 0.1 and m["cout"] < 1e-6
        # cout is measured on the gradient left in the knobs
        assert m["cout"] == pytest.approx(measure_all({n: gd for n, (gd, _) in hooked.items()}, Vs), abs=1e-7)


def test_grad_mode_route_splits_g_into_dS_and_a_quarantine_in_span_V(tmp_path):
    net, knobs, Vs = _real(tmp_path)
    opt = _adamw(knobs)
    proj = Projector(Vs, intervention="route", project_on="grad")  # the seed's (inexact) route
    for step in range(3):
        g, hooked, _, m = _step(net, knobs, Vs, opt, proj, step)
        for n, (gd, gh) in hooked.items():
            assert gh is not None and gh.norm() > 0.1
            torch.testing.assert_close(gd + gh, g[n], atol=1e-6, rtol=0)
            assert _perp(gh, Vs[n]).norm() < 1e-6
            assert torch.relu(Vs[n] @ gd).max() < 1e-6
        assert m["cout"] < 1e-6
    assert all(k.dS_hack.detach().norm() > 0.01 for k in knobs.values())  # AdamW stepped the quarantine


@pytest.mark.parametrize("project_on", ["update", "moments"])
@pytest.mark.parametrize("intervention", ["erase", "route"])
def test_update_modes_applied_step_has_no_hackward_part(tmp_path, project_on, intervention):
    net, knobs, Vs = _real(tmp_path)
    opt = _adamw(knobs)
    proj = Projector(Vs, intervention=intervention, project_on=project_on)
    for step in range(4):
        g, hooked, before, m = _step(net, knobs, Vs, opt, proj, step)
        for n, k in knobs.items():
            torch.testing.assert_close(hooked[n][0], g[n])  # the gradient is left alone: Adam sees g
            assert hooked[n][1] is None
            delta = k.dS.detach() - before[n]  # the step applied to δS
            assert torch.relu(-(Vs[n] @ delta)).max() < 1e-6, Vs[n] @ delta  # u = −Δ has no hack-ward part
        assert m["upd_cin"] > 0.05 and m["upd_cout"] < 1e-6
        assert m["cout"] == pytest.approx(m["cin"])  # grads untouched


def test_moments_mode_keeps_only_anti_hack_momentum_through_adamw(tmp_path):
    net, knobs, Vs = _real(tmp_path)
    opt = _adamw(knobs)
    proj = Projector(Vs, intervention="erase", project_on="moments")
    _step(net, knobs, Vs, opt, proj, 0)
    for n, k in knobs.items():
        # after one step exp_avg = (1 − β1)·(the clipped grad Adam saw), then the hook removes relu(V m) only
        want = strip_hackward(0.1 * k.dS.grad, Vs[n], "one_sided")
        torch.testing.assert_close(opt.state[k.dS]["exp_avg"], want, atol=1e-7, rtol=0)
        c = Vs[n] @ opt.state[k.dS]["exp_avg"]
        assert torch.relu(c).max() < 1e-7 and c[1] < -0.01


def _route_vs_vanilla(tmp_path, project_on, steps=6):
    net0, knobs0, Vs = _real(tmp_path / "vanilla")
    net1, knobs1, _ = _real(tmp_path / "route")
    opt0, opt1 = _adamw(knobs0, weight_decay=0.0), _adamw(knobs1, weight_decay=0.0)
    proj = Projector(Vs, intervention="route", **({} if project_on == "auto" else {"project_on": project_on}))
    gaps, offspan = [], []
    for step in range(steps):
        _step(net0, knobs0, Vs, opt0, None, step)
        _step(net1, knobs1, Vs, opt1, proj, step)
        for n in knobs0:
            live = knobs1[n].dS.detach() + knobs1[n].dS_hack.detach()
            gaps.append(float((live - knobs0[n].dS.detach()).abs().max()))
            offspan.append(float(_perp(knobs1[n].dS_hack.detach(), Vs[n]).norm()))
    return knobs1, Vs, gaps, offspan


def test_route_by_default_moves_the_live_model_as_vanilla_with_quarantine_in_span_V(tmp_path):
    # AdamW weight decay 0 on δS (train.py's default): decay would shrink vanilla's hack-ward motion, kept in δS_hack
    knobs, Vs, gaps, offspan = _route_vs_vanilla(tmp_path, "auto")
    assert max(gaps) < 1e-5, gaps  # δS + δS_hack follows vanilla's δS (same gradients, since the same live model)
    assert max(offspan) < 1e-6, offspan
    for n, k in knobs.items():
        assert k.dS_hack.detach().norm() > 0.05  # the hack-ward motion went to the quarantine
        assert (Vs[n] @ k.dS_hack.detach())[0] < -0.05  # along −V[0]: the direction a hack-ward gradient descends


def test_grad_mode_route_is_the_inexact_variant(tmp_path):
    # the seed's route: δS_hack's own Adam state normalises each coordinate, off span(V), and the live model drifts
    _, _, gaps, offspan = _route_vs_vanilla(tmp_path, "grad")
    assert max(gaps) > 1e-2 and max(offspan) > 1e-2, (gaps, offspan)
