"""Pure functions on (g, V): how much of a gradient (or an optimizer update) points hack-ward, and removing it.

V (k, r) holds k orthonormal hack-ward axes of one module's knob δS ∈ ℝ^r, each oriented so that V·(g_hack − g_clean)
is mostly positive. For a gradient g (r,), c = V g are its coordinates on those axes.

- cin  = ‖relu(V g)‖ / ‖g‖  (relu before aggregating: only the hack-ward part counts)
- gates: `one_sided` removes relu(c) (only hack-ward motion; the default), `no_gate` removes c (the whole span),
  `reverse` removes 2c (reflects the span component: V g' = −V g)
- removed = overshoot · c_useᵀ V ∈ span(V); g' = g − removed (optionally rescaled to ‖g‖); cout = cin(g').

Where the projection is applied (`project_on`; see `effective_project_on` for "auto", the default):
- `grad`: the gradient before clipping (the seed). AdamW's moments and preconditioner can still move δS hack-ward.
- `update`: the step the optimizer actually applied, Δ = δS_after − δS_before, is projected and δS reset to
  δS_before + Δ'. A step moves *against* its gradient, so the update's gradient-like form is u = −Δ and its hack-ward
  part is relu(V u); after projection the applied change has none (one_sided: relu(−V Δ') = 0).
- `moments`: `update`, and the gated (hack-ward) part of Adam's first moment is removed too, so the hack-ward momentum
  built from earlier steps does not keep pushing. The first moment is gradient-like (an average of gradients), so
  with `one_sided` only relu(V m) goes and the anti-hack momentum stays, as in every other mode.

Route (`intervention="route"`) moves the removed part into the deletable quarantine knob δS_hack:
- in `update`/`moments` mode (the default: "auto" resolves to `update`) it is exact: δS_hack receives exactly the
  removed part of each applied step, so δS_hack ∈ span(V) and the live model δS + δS_hack moves as vanilla would
  (with AdamW weight decay 0 on δS; decay would shrink vanilla's hack-ward motion, which δS_hack keeps).
- in `grad` mode (the seed's variant, only on an explicit `project_on="grad"`) it is not: δS_hack.grad is the
  removed gradient, but δS_hack has its own Adam state, which normalises each coordinate, so δS_hack steps ~lr per
  coordinate however small the routed gradient, is not confined to span(V), and the live model can move hack-ward
  faster than vanilla.

Note: with `one_sided`, cout ≈ 0 is an arithmetic identity, not evidence that anything worked. Evidence comes from the
hack rate of the trained model and from the negative controls (random V, shuffled-label V).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

Gate = Literal["one_sided", "no_gate", "reverse"]
from projected_grpo.config import GATES, INTERVENTIONS, PROJECT_ON, ProjectionConfig  # noqa: E402,F401

EPS = 1e-12


def hackward_fraction(g: Float[Tensor, " r"], V: Float[Tensor, "k r"]) -> float:
    """cin: ‖relu(V g)‖ / ‖g‖ (0 for a zero gradient)."""
    norm = g.norm()
    if norm <= EPS:
        return 0.0
    return float(torch.relu(V.to(g) @ g).norm() / norm)


def gate_coefficients(c: Float[Tensor, " k"], gate: str) -> Float[Tensor, " k"]:
    """The coordinates to remove along each axis of V, given the gradient's coordinates c = V g."""
    if gate == "one_sided":
        return torch.relu(c)
    if gate == "no_gate":
        return c
    if gate == "reverse":
        return 2.0 * c
    raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")


def project(
    g: Float[Tensor, " r"],
    V: Float[Tensor, "k r"],
    gate: str = "one_sided",
    overshoot: float = 1.0,
    preserve_magnitude: bool = False,
) -> tuple[Float[Tensor, " r"], Float[Tensor, " r"], float, float]:
    """Remove the gated hack-ward component of g. Returns (g', removed, cin, cout); removed ∈ span(V)."""
    assert g.ndim == 1 and V.ndim == 2 and V.shape[1] == g.shape[0], f"g {tuple(g.shape)} vs V {tuple(V.shape)}"
    Vf = V.to(g)  # dtype and device of the gradient
    c = Vf @ g  # (k,)
    removed = overshoot * (gate_coefficients(c, gate) @ Vf)  # (r,)
    g_new = g - removed
    if preserve_magnitude:
        new_norm = g_new.norm()
        if new_norm > EPS:
            g_new = g_new * (g.norm() / new_norm)
    return g_new, removed, hackward_fraction(g, Vf), hackward_fraction(g_new, Vf)


def strip_span(m: Float[Tensor, " r"], V: Float[Tensor, "k r"]) -> Float[Tensor, " r"]:
    """m minus its whole span(V) component (= `strip_hackward(m, V, "no_gate")`)."""
    Vf = V.to(m)
    return m - (Vf @ m) @ Vf


def strip_hackward(m: Float[Tensor, " r"], V: Float[Tensor, "k r"], gate: str = "one_sided") -> Float[Tensor, " r"]:
    """A gradient-like vector (Adam's first moment in `moments` mode) minus the part `gate` removes from a gradient:
    one_sided relu(V m) (the hack-ward momentum; the anti-hack momentum is kept), no_gate the whole span, reverse
    reflects it. No overshoot: that scales the removal from each applied step, and applied to the moment as well it
    would compound across steps through the momentum."""
    Vf = V.to(m)
    return m - gate_coefficients(Vf @ m, gate) @ Vf


def random_orthonormal(k: int, r: int, generator: torch.Generator) -> Float[Tensor, "k r"]:
    """k random orthonormal rows in ℝ^r (the random_V control): QR of a Gaussian matrix."""
    if not 0 < k <= r:
        raise ValueError(f"random_orthonormal needs 0 < k <= r, got k={k}, r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, k, generator=generator, dtype=torch.float64))  # (r, k)
    return q.T.contiguous().float()


@dataclass
class StepStats:
    """Aggregates of one projection pass over all modules (means over modules that have a V)."""

    cin: float
    cout: float
    fired: float  # fraction of modules with cin > 1e-6
    n_modules: int

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}cin": self.cin, f"{prefix}cout": self.cout, f"{prefix}fired": self.fired}


def project_all(
    grads: dict[str, Float[Tensor, " r"]],
    Vs: dict[str, Float[Tensor, "k r"]],
    gate: str = "one_sided",
    overshoot: float = 1.0,
    preserve_magnitude: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor], StepStats]:
    """`project` per module. Modules without a V (dropped by the noise floor) pass through unchanged."""
    new, removed, cins, couts = {}, {}, [], []
    for name, g in grads.items():
        if name not in Vs:
            new[name], removed[name] = g, torch.zeros_like(g)
            continue
        new[name], removed[name], ci, co = project(g, Vs[name], gate, overshoot, preserve_magnitude)
        cins.append(ci)
        couts.append(co)
    n = len(cins)
    stats = StepStats(
        cin=sum(cins) / n if n else 0.0,
        cout=sum(couts) / n if n else 0.0,
        fired=sum(c > 1e-6 for c in cins) / n if n else 0.0,
        n_modules=n,
    )
    return new, removed, stats


def measure_all(grads: dict[str, Tensor], Vs: dict[str, Tensor]) -> float:
    """Mean cin over modules with a V (cin_s / cin_t diagnostics on the student and teacher gradients)."""
    vals = [hackward_fraction(g, Vs[n]) for n, g in grads.items() if n in Vs]
    return sum(vals) / len(vals) if vals else 0.0


# ---------------------------------------------------------------------------------------------------------------
# The training-loop side: one object plugged into train.py's hooks. It touches only the knob parameters it is given
# (each knob has `dS` and `dS_hack` parameters) and, in `moments` mode, the optimizer state of `dS`.



def effective_project_on(intervention: str, project_on: str) -> str:
    """Where a Projector applies the projection: `project_on` itself if it is grad|update|moments; for "auto",
    `update` under route (the exact route: δS_hack gets exactly the removed part of each applied step) and `grad`
    otherwise (erase as in the seed; none only measures). Grad-mode route, the seed's inexact variant (δS_hack's own
    Adam state moves it ~lr per coordinate, off span(V)), runs only when asked for explicitly."""
    if intervention not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {intervention!r}; expected one of {INTERVENTIONS}")
    if project_on not in PROJECT_ON:
        raise ValueError(f"unknown --project-on {project_on!r}; expected one of {PROJECT_ON}")
    if project_on != "auto":
        return project_on
    return "update" if intervention == "route" else "grad"




@dataclass
class Projector:
    """Measure (`none`), erase or route the hack-ward part of each δS gradient or update, given V per module.

    `project_on` is resolved by `effective_project_on` at construction ("auto": update for route, grad otherwise);
    the attribute holds the resolved mode."""

    Vs: dict[str, Tensor]
    intervention: str = "erase"
    gate: str = "one_sided"
    overshoot: float = 1.0
    preserve_magnitude: bool = False
    project_on: str = "auto"

    def __post_init__(self) -> None:
        self.project_on = effective_project_on(self.intervention, self.project_on)
        if self.gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}; expected one of {GATES}")
        self._before: dict[str, Tensor] = {}

    def on_grad(self, step: int, knobs: dict, g_student: dict[str, Tensor], g_teacher: dict[str, Tensor]) -> dict:
        """After backward, before clipping. Logs cin_s, cin_t, cin, cout, fired; in grad mode rewrites dS.grad (erase,
        route) and sets dS_hack.grad to the removed part (route). cout is measured on the dS.grad left in the knobs."""
        metrics = {"cin_s": measure_all(g_student, self.Vs), "cin_t": measure_all(g_teacher, self.Vs)}
        grads = {n: k.dS.grad.detach().clone() for n, k in knobs.items() if k.dS.grad is not None}
        new, removed, stats = project_all(grads, self.Vs, self.gate, self.overshoot, self.preserve_magnitude)
        metrics.update(stats.as_dict(""))
        if self.intervention != "none" and self.project_on == "grad":
            for n, k in knobs.items():
                if n in self.Vs and n in new:
                    k.dS.grad.copy_(new[n])
                    if self.intervention == "route":
                        k.dS_hack.grad = removed[n].to(k.dS_hack.dtype).clone()
        # cout on what the optimizer will see: the gradient actually left in dS.grad
        metrics["cout"] = measure_all({n: k.dS.grad.detach() for n, k in knobs.items() if k.dS.grad is not None},
                                      self.Vs)
        # remember δS before the optimizer step, for measuring (and in update/moments mode, projecting) Δδ
        self._before = {n: k.dS.detach().clone() for n, k in knobs.items()}
        return metrics

    def after_step(self, step: int, knobs: dict, optimizer: torch.optim.Optimizer,
                   prev_dS: dict[str, Tensor] | None = None, prev_dS_hack: dict[str, Tensor] | None = None) -> dict:
        """After optimizer.step(). Measures the applied update Δδ; in update/moments mode projects it (route: the
        removed motion is added to δS_hack, so δS + δS_hack moves by the unprojected step) and, in moments mode,
        removes the gated part of dS's Adam first moment. Works on u = −Δ (descent direction, gradient-like) so that
        "hack-ward" means the same as for gradients. upd_cout is measured on the δS change left after all this."""
        if prev_dS is not None:
            self._before = prev_dS
        us = {n: (self._before[n] - k.dS.detach()) for n, k in knobs.items() if n in self._before}
        new, removed, stats = project_all(us, self.Vs, self.gate, self.overshoot, preserve_magnitude=False)
        metrics = {"upd_cin": stats.cin}
        if self.intervention != "none" and self.project_on in ("update", "moments"):
            with torch.no_grad():
                for n, k in knobs.items():
                    if n not in self.Vs or n not in new:
                        continue
                    k.dS.copy_(self._before[n] - new[n])
                    if self.intervention == "route":  # the hack-ward motion goes to the deletable knob instead
                        k.dS_hack.sub_(removed[n].to(k.dS_hack.dtype))
                    state = optimizer.state.get(k.dS, {})
                    if self.project_on == "moments" and "exp_avg" in state:
                        state["exp_avg"].copy_(strip_hackward(state["exp_avg"], self.Vs[n], self.gate))
        after = {n: (self._before[n] - k.dS.detach()) for n, k in knobs.items() if n in self._before}
        metrics["upd_cout"] = measure_all(after, self.Vs)
        return metrics
