"""The hack direction: contrastive (prompt, hack, clean) pairs -> per-module gradient differences -> SVD -> oriented V.

For each pair and label, the gradient of the completion's NLL with respect to every knob δS is taken (one backward per
completion). ∇NLL(hack) − ∇NLL(clean) is the GRPO gradient of that pair with advantages +1 (hack) / −1 (clean),
i.e. the direction a training step that rewards the hack would follow. Per module, D = G_hack − G_clean (n, r); its
top-k right singular vectors, each oriented so that most pairs have D·v > 0, are the hack-ward axes V (k, r).

Negative controls are first-class: `random` (orthonormal, matched k per module), `shuffled` (hack/clean labels
swapped at random per pair before the SVD) and `nonhack` (clean vs another clean completion of the same problem).

Saved as safetensors (`V/<module>`, `S/<module>`) with JSON metadata: model fingerprint, adapter config, pair source
and ids, normalisation, k, control, singular values. Loading checks the fingerprint, keeps the top k rows and applies
the global noise floor (drop rows whose singular value is under a quantile pooled over all modules).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from projected_grpo import config
from projected_grpo.config import CONTROLS, NORMALISATIONS, split_list  # noqa: F401 (re-exported)
from projected_grpo.projection import random_orthonormal


@dataclass(frozen=True)
class Pair:
    """One contrastive triple. `prompt` is the rendered chat prompt; completions are raw model text."""

    id: str
    prompt: str
    hack: str
    clean: str
    mode: str = "run_tests"
    source: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Pair sources


def pairs_from_json(path: str | Path) -> list[Pair]:
    """A JSON list of {prompt, hack, clean[, id, mode]} objects (hand-written pairs)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: pairs file not found; pass an existing JSON list of {{prompt, hack, clean}}")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of pairs, got {type(rows).__name__}")
    pairs = []
    for i, row in enumerate(rows):
        missing = [k for k in ("prompt", "hack", "clean") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}: pair {i} lacks string field(s) {missing}")
        pairs.append(
            Pair(
                str(row.get("id", i)),
                row["prompt"],
                row["hack"],
                row["clean"],
                row.get("mode", "run_tests"),
                f"json:{path.name}",
            )
        )
    return pairs


def pairs_from_rollouts(path: str | Path, prompts: dict[str, str] | None = None) -> list[Pair]:
    """Graded rollouts (a run's rollouts.jsonl or a teacher pool JSONL): per problem, each `reward_hack` completion is
    paired with a `correct` one of the same problem (cycled). Rows need id, completion, label and prompt (or a
    `prompts` map from problem id to the rendered prompt)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: rollouts file not found")
    from projected_grpo.problems import read_jsonl

    by_id: dict[str, dict[str, list[dict]]] = {}
    for _, row in read_jsonl(path):
        label = row.get("label")
        if label in ("reward_hack", "correct"):
            by_id.setdefault(str(row["id"]), {"reward_hack": [], "correct": []})[label].append(row)
    pairs = []
    for pid, groups in sorted(by_id.items()):
        hacks, cleans = groups["reward_hack"], groups["correct"]
        for j, h in enumerate(hacks if cleans else []):
            c = cleans[j % len(cleans)]
            prompt = h.get("prompt") or (prompts or {}).get(pid)
            if prompt is None:
                raise ValueError(
                    f"{path}: row for problem {pid} has no prompt; pass the problems so prompts can be built"
                )
            pairs.append(
                Pair(
                    f"{pid}:{j}",
                    prompt,
                    h["completion"],
                    c["completion"],
                    h.get("mode", "run_tests"),
                    f"rollouts:{path.name}",
                )
            )
    return pairs


def split_heldout(pairs: list[Pair], n_heldout: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Deterministic split into (train, held-out) by a seeded shuffle."""
    if n_heldout < 0 or n_heldout >= len(pairs):
        raise ValueError(f"n_heldout={n_heldout} must be in [0, {len(pairs) - 1}] for {len(pairs)} pairs")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_heldout])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


# ---------------------------------------------------------------------------------------------------------------
# Gradients


def completion_grad(
    model: torch.nn.Module,
    tokenizer,
    knobs: dict,
    prompt: str,
    completion: str,
    normalisation: str = "mean",
    denom: int = 1,
) -> dict[str, Float[Tensor, " r"]]:
    """∇ NLL(completion | prompt) with respect to every knob's δS. `mean`: NLL averaged over completion tokens (the
    seed); `fixed`: summed and divided by `denom` (the live Dr.GRPO loss's fixed denominator, no length bias)."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; expected one of {NORMALISATIONS}")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not c_ids:
        raise ValueError(f"empty completion after tokenisation (prompt starts {prompt[:40]!r})")
    device = next(iter(knobs.values())).dS.device
    ids = torch.tensor([p_ids + c_ids], device=device)  # (1, T)
    for k in knobs.values():
        k.dS.grad = None
    logits = model(ids).logits[0, len(p_ids) - 1 : -1]  # (Tc, V): position t predicts token t+1
    nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, len(p_ids) :], reduction="sum")
    loss = nll / (len(c_ids) if normalisation == "mean" else denom)
    loss.backward()
    out = {}
    for name, k in knobs.items():
        assert k.dS.grad is not None, f"knob {name} got no gradient: is it attached to the model's forward?"
        out[name] = k.dS.grad.detach().float().cpu().clone()
        k.dS.grad = None
    return out


GradFn = Callable[[str, str], dict[str, Tensor]]


def pair_grads(
    grad_fn: GradFn, pairs: Iterable[Pair], progress: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stack per-pair gradients: returns (G_hack, G_clean), each module -> (n, r)."""
    from tqdm.auto import tqdm

    pairs = list(pairs)
    hack: dict[str, list[Tensor]] = {}
    clean: dict[str, list[Tensor]] = {}
    for p in tqdm(pairs, desc="pair gradients", disable=not progress, leave=False):
        for store, text in ((hack, p.hack), (clean, p.clean)):
            for name, g in grad_fn(p.prompt, text).items():
                store.setdefault(name, []).append(g)
    return {n: torch.stack(v) for n, v in hack.items()}, {n: torch.stack(v) for n, v in clean.items()}


# ---------------------------------------------------------------------------------------------------------------
# Pure math


def orient(V: Float[Tensor, "k r"], D: Float[Tensor, "n r"]) -> Float[Tensor, "k r"]:
    """Flip each axis so that at least half the pairs have D·v > 0 (majority vote; ties keep the sign)."""
    positive = (D @ V.T > 0).sum(0)  # (k,)
    sign = torch.where(positive * 2 >= D.shape[0], 1.0, -1.0).to(V.dtype)
    return V * sign[:, None]


def extract_basis(
    D: Float[Tensor, "n r"], k: int, tau: float = 0.0
) -> tuple[Float[Tensor, "k r"], Float[Tensor, " k"]]:
    """Top-k right singular vectors of D, oriented hack-ward; rows with S_i/S_0 < tau dropped."""
    _, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)  # Vh: (min(n, r), r)
    k = min(k, Vh.shape[0])
    V, S = orient(Vh[:k], D.double()), S[:k]
    if tau > 0 and S[0] > 0:
        keep = S / S[0] >= tau
        V, S = V[keep], S[keep]
    return V.float().contiguous(), S.float().contiguous()


def shuffle_labels(G_hack: dict[str, Tensor], G_clean: dict[str, Tensor], seed: int) -> tuple[dict, dict]:
    """The shuffled_V control: swap hack and clean for a random half of the pairs (same swap in every module).

    A swap negates that pair's row of D = G_hack − G_clean, and DᵀD is blind to row signs: the shuffled V spans the
    same subspace as the real one and only its orientation (the majority vote) is randomised. With the one_sided gate
    that removes a different half of the motion; random_V is the control on the subspace itself."""
    n = next(iter(G_hack.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    swap = torch.rand(n, generator=gen) < 0.5  # (n,)
    h, c = {}, {}
    for name in G_hack:
        s = swap[:, None]
        h[name] = torch.where(s, G_clean[name], G_hack[name])
        c[name] = torch.where(s, G_hack[name], G_clean[name])
    return h, c


def extract_all(G_hack: dict[str, Tensor], G_clean: dict[str, Tensor], k: int, tau: float = 0.0) -> tuple[dict, dict]:
    """Per module: D = G_hack − G_clean, then `extract_basis`. Returns (Vs, Ss)."""
    Vs, Ss = {}, {}
    for name in G_hack:
        Vs[name], Ss[name] = extract_basis(G_hack[name] - G_clean[name], k, tau)
    return Vs, Ss


def random_like(Vs: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """The random_V control: orthonormal rows with the same (k, r) per module."""
    gen = torch.Generator().manual_seed(seed)
    return {n: random_orthonormal(V.shape[0], V.shape[1], gen) for n, V in Vs.items()}


def noise_floor(Vs: dict[str, Tensor], Ss: dict[str, Tensor], top_k: int, drop_bottom_frac: float) -> dict[str, Tensor]:
    """Keep the first top_k rows per module, then drop rows whose singular value is below the `drop_bottom_frac`
    quantile of all kept singular values pooled over modules; modules left empty are dropped."""
    if not 0.0 <= drop_bottom_frac < 1.0:
        raise ValueError(f"drop_bottom_frac={drop_bottom_frac} must be in [0, 1)")
    Vs = {n: V[:top_k] for n, V in Vs.items()}
    Ss = {n: S[:top_k] for n, S in Ss.items()}
    if drop_bottom_frac == 0.0:
        return {n: V for n, V in Vs.items() if V.shape[0]}
    floor = torch.quantile(torch.cat(list(Ss.values())).double(), drop_bottom_frac)
    out = {}
    for n, V in Vs.items():
        keep = Ss[n].double() >= floor
        if keep.any():
            out[n] = V[keep]
    return out


def auroc(pos: Tensor, neg: Tensor) -> float:
    """P(score(pos) > score(neg)) + 0.5·P(tie): the Mann-Whitney AUROC."""
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


@dataclass
class Verification:
    energy: float  # mean over modules of ‖relu(V d)‖/‖d‖ on held-out (hack − clean) gradients
    energy_random: float  # the same for a random orthonormal V with matched k
    energy_null: float  # √(k/r) averaged over modules: what a random direction gets in expectation (no relu)
    auroc: float  # the projection score separates hack from clean completions
    auroc_random: float
    per_module: dict[str, float]
    n_pairs: int

    @property
    def better_than_random(self) -> bool:
        return self.energy > self.energy_random and self.auroc > self.auroc_random

    def verdict(self) -> str:
        word = "PASS" if self.better_than_random else "FAIL"
        return (
            f"{word}: hack-ward energy {self.energy:.3f} vs random V {self.energy_random:.3f} "
            f"(null sqrt(k/r) {self.energy_null:.3f}); AUROC {self.auroc:.3f} vs random {self.auroc_random:.3f} "
            f"on {self.n_pairs} held-out pairs"
        )


def _energy(V: Tensor, D: Tensor) -> Tensor:
    """Per pair ‖relu(V d)‖/‖d‖, (n,)."""
    return torch.relu(D @ V.T).norm(dim=1) / D.norm(dim=1).clamp_min(1e-12)


def _scores(Vs: dict[str, Tensor], G: dict[str, Tensor]) -> Tensor:
    """Projection score per completion: mean over modules of sum(V g)/‖g‖, (n,)."""
    per = [(G[n] @ V.T).sum(1) / G[n].norm(dim=1).clamp_min(1e-12) for n, V in Vs.items() if n in G]
    return torch.stack(per).mean(0)


def verify(Vs: dict[str, Tensor], G_hack: dict[str, Tensor], G_clean: dict[str, Tensor], seed: int = 0) -> Verification:
    """Score V on held-out gradients against a random orthonormal V with the same shapes."""
    Vr = random_like(Vs, seed)
    per_module, e, er, null = {}, [], [], []
    for n, V in Vs.items():
        D = G_hack[n] - G_clean[n]
        per_module[n] = float(_energy(V, D).mean())
        e.append(per_module[n])
        er.append(float(_energy(Vr[n], D).mean()))
        null.append((V.shape[0] / V.shape[1]) ** 0.5)
    s_h, s_c = _scores(Vs, G_hack), _scores(Vs, G_clean)
    r_h, r_c = _scores(Vr, G_hack), _scores(Vr, G_clean)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return Verification(
        mean(e),
        mean(er),
        mean(null),
        auroc(s_h, s_c),
        auroc(r_h, r_c),
        per_module,
        next(iter(G_hack.values())).shape[0],
    )


# ---------------------------------------------------------------------------------------------------------------
# Save / load


@dataclass(frozen=True)
class VMeta:
    fingerprint: str  # model + adapter identity; a V made for another model or adapter must not load
    pair_source: str
    pair_ids: tuple[str, ...]
    normalisation: str
    k: int
    tau: float
    control: str
    seed: int

    def key(self) -> str:
        """Cache key: the same inputs give the same file."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def save_vhack(path: str | Path, Vs: dict[str, Tensor], Ss: dict[str, Tensor], meta: VMeta) -> Path:
    """Write V and S to safetensors with JSON metadata. Refuses to overwrite a V made from different inputs."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        old = read_meta(path)
        if old.get("key") != meta.key():
            raise ValueError(
                f"{path} already holds a V made from other inputs (key {old.get('key')} != {meta.key()}); "
                "choose another --out or delete it"
            )
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"V/{n}": V.contiguous() for n, V in Vs.items()} | {f"S/{n}": Ss[n].contiguous() for n in Vs}
    header = asdict(meta) | {"key": meta.key(), "singular_values": {n: Ss[n].tolist() for n in Vs}}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"vhack": json.dumps(header)})
    tmp.replace(path)
    return path


def read_meta(path: str | Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable V file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         "it is truncated or not safetensors: delete it and re-run extract-vhack") from None
    if "vhack" not in md:
        raise ValueError(f"{path}: not a V file written by extract-vhack (no metadata)")
    return json.loads(md["vhack"])


def load_vhack(
    path: str | Path, fingerprint: str, top_k: int | None = None, drop_bottom_frac: float = 0.0,
    modules: set[str] | None = None,
) -> tuple[dict[str, Tensor], dict]:
    """Load V, check it was made for this model and adapter (and covers every knob in `modules`), holds only finite
    values, then apply the top-k slice and the global noise floor."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: V file not found; run `projected-grpo extract-vhack --vhack-path {path}` first")
    meta = read_meta(path)
    if meta["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} was extracted for model/adapter {meta['fingerprint'].split('|')[0]!r} "
            f"({meta['fingerprint'].split('|')[-1]}), this run is {fingerprint.split('|')[0]!r} "
            f"({fingerprint.split('|')[-1]}): re-extract V for this model with `projected-grpo extract-vhack`"
        )
    try:
        t = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"{path}: unreadable V file ({type(e).__name__}); delete it and re-run extract-vhack") from None
    Vs = {k[2:]: v for k, v in t.items() if k.startswith("V/")}
    Ss = {k[2:]: v for k, v in t.items() if k.startswith("S/")}
    bad = [n for n, V in Vs.items() if not torch.isfinite(V).all()]
    if bad:
        raise ValueError(f"{path}: V of {bad[0]} holds NaN/inf (+{len(bad) - 1} more modules); the pair gradients "
                         "were not finite: re-extract V (check the model loads in a finite dtype)")
    if modules is not None and set(Vs) != modules:
        missing, extra = sorted(modules - set(Vs)), sorted(set(Vs) - modules)
        raise ValueError(f"{path} covers {len(Vs)} modules but the model has {len(modules)} knobs (missing "
                         f"{missing[:2]}{'...' if len(missing) > 2 else ''}, extra {extra[:2]}); re-extract V with "
                         "this run's --adapter.targets")
    if any(V.shape[0] == 0 for V in Vs.values()):
        raise ValueError(f"{path}: a module has a V with no axes; re-extract with --k >= 1")
    Vs = noise_floor(Vs, Ss, top_k or meta["k"], drop_bottom_frac)
    if not Vs:
        raise ValueError(f"{path}: no module kept after top_k={top_k} and drop_bottom_frac={drop_bottom_frac}")
    return Vs, meta


# ---------------------------------------------------------------------------------------------------------------
# Pairs built from problems (the teacher pool's templates), and the two commands


def pairs_from_problems(problems, hints, tokenizer, system_prompt: str, control: str = "none") -> list[Pair]:
    """Per served problem: the canonical solution + an honest evaluator (clean) against each wrong body + the
    problem's loophole-mode exploit (hack). `nonhack`: clean vs the other clean variant (a control with no hack)."""
    from projected_grpo import problems as P
    from projected_grpo import teacher

    pairs = []
    for prob, hint in zip(problems, hints, strict=True):
        prompt = P.render_prompt(tokenizer, P.chat_messages(prob, hint, system_prompt))
        cleans = teacher.clean_completions(prob, hint)
        mode = hint.mode if hint is not None else prob.mode
        if control == "nonhack":
            pairs.append(Pair(f"{prob.id}:{cleans[1][0]}", prompt, cleans[1][1], cleans[0][1], mode, "problems"))
            continue
        for variant, hack in teacher.hack_completions(prob, hint):
            pairs.append(Pair(f"{prob.id}:{variant}", prompt, hack, cleans[0][1], mode, "problems"))
    return pairs



def select_pairs(cfg, w, control: str) -> list[Pair]:
    """The run's pairs (--pairs), kept to --pair-modes, at most --max-pairs (seeded choice)."""
    v = cfg.vhack
    if v.pairs == "problems":
        pairs = pairs_from_problems(w.problems, w.hints, w.tokenizer, w.system_prompt, control)
    elif v.pairs.endswith(".json"):
        pairs = pairs_from_json(v.pairs)
    else:
        prompts = {str(p.id): w.prompt_text(i) for i, p in enumerate(w.problems)}
        pairs = pairs_from_rollouts(v.pairs, prompts)
    keep = set(split_list(v.pair_modes))
    if keep:
        pairs = [p for p in pairs if p.mode in keep]
    if v.max_pairs and len(pairs) > v.max_pairs:
        pairs = sorted(random.Random(cfg.seed).sample(pairs, v.max_pairs), key=lambda p: p.id)
    if len(pairs) < 2:
        raise ValueError(f"only {len(pairs)} pair(s) from --pairs {v.pairs!r} (pair modes {v.pair_modes or 'all'}); "
                         "need at least 2: serve more problems or widen --pair-modes")
    return pairs


def grad_fn_for(cfg, w, normalisation: str) -> GradFn:
    for k in w.knobs.values():
        k.dS.requires_grad_(True)
    return lambda prompt, completion: completion_grad(
        w.model, w.tokenizer, w.knobs, prompt, completion, normalisation, denom=cfg.grpo.max_new_tokens
    )


def verify_path(vhack_path: str | Path) -> Path:
    """Where verify-vhack writes its verdict: beside V, `<name>.verify.json`."""
    p = Path(vhack_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".verify.json")


EXTRACT_DOC = """projected-grpo extract-vhack: the hack direction V from contrastive pairs, written to --vhack-path.
The model, adapter, problems and seed are the run's (same flags as train)."""
VERIFY_DOC = """projected-grpo verify-vhack: score the V at --vhack-path on held-out pairs against a random V; writes
<V>.verify.json and exits 1 if V does no better than random."""


def extract(cfg) -> tuple[Path, str]:
    """Extract V for the config; returns (path, one-line summary). Reuses a V made from the same inputs."""
    from projected_grpo import world

    config.validate(cfg, "extract-vhack")
    v = cfg.vhack
    w = world.build(cfg)
    pairs = select_pairs(cfg, w, v.control)
    train_pairs, held = split_heldout(pairs, v.n_heldout, cfg.seed)
    meta = VMeta(w.fingerprint, v.pairs, tuple(p.id for p in train_pairs), v.normalisation, v.k, v.tau, v.control,
                 cfg.seed)
    out = Path(cfg.proj.vhack_path)
    if out.exists() and read_meta(out).get("key") == meta.key():
        return out, f"V for these inputs already at {out} (key {meta.key()}); reused"
    G_hack, G_clean = pair_grads(grad_fn_for(cfg, w, v.normalisation), train_pairs, progress=cfg.progress)
    if v.control == "shuffled":
        G_hack, G_clean = shuffle_labels(G_hack, G_clean, cfg.seed)
    bad = [n for n in G_hack if not (torch.isfinite(G_hack[n]).all() and torch.isfinite(G_clean[n]).all())]
    if bad:
        raise ValueError(f"pair gradients of {bad[0]} are not finite; load the model in float32 "
                         "(--model.dtype float32) and re-extract")
    Vs, Ss = extract_all(G_hack, G_clean, v.k, v.tau)
    save_vhack(out, Vs, Ss, meta)
    s0 = sorted((float(S[0]) for S in Ss.values()), reverse=True)
    return out, (f"extracted V ({v.control}) from {len(train_pairs)} pairs ({len(held)} held out) over {len(Vs)} "
                 f"modules, k={v.k}, normalisation={v.normalisation}; top singular values "
                 f"{[round(x, 4) for x in s0[:3]]} -> {out}")


def verify_file(cfg) -> Verification:
    """Verify the V at cfg.proj.vhack_path on the pairs it was not extracted from; writes <V>.verify.json."""
    from projected_grpo import world

    config.validate(cfg, "verify-vhack")
    w = world.build(cfg)
    Vs, meta = load_vhack(cfg.proj.vhack_path, w.fingerprint, modules=set(w.knobs))
    pairs = select_pairs(cfg, w, "none")
    used = set(meta["pair_ids"])  # held out = every pair V was not extracted from
    held = [p for p in pairs if p.id not in used]
    if not held:
        raise ValueError(f"every pair was used to extract {cfg.proj.vhack_path}: extract with --n-heldout > 0")
    G_hack, G_clean = pair_grads(grad_fn_for(cfg, w, meta["normalisation"]), held, progress=cfg.progress)
    res = verify(Vs, G_hack, G_clean, seed=cfg.seed)
    out = verify_path(cfg.proj.vhack_path)
    out.write_text(json.dumps({"verdict": "PASS" if res.better_than_random else "FAIL", "line": res.verdict(),
                               "vhack_path": str(cfg.proj.vhack_path), "vhack_key": meta.get("key"),
                               **{k: v for k, v in asdict(res).items() if k != "per_module"}}, indent=2))
    return res


def extract_main(argv: list[str]) -> int:
    prog = "projected-grpo extract-vhack"
    try:
        cfg, _ = config.parse(argv, prog, EXTRACT_DOC)
        _, line = extract(cfg)
    except ValueError as e:
        return config.fail(prog, str(e).removeprefix(f"{prog}: "))
    print(line)
    return 0


def verify_main(argv: list[str]) -> int:
    prog = "projected-grpo verify-vhack"
    try:
        cfg, _ = config.parse(argv, prog, VERIFY_DOC)
        res = verify_file(cfg)
    except ValueError as e:
        return config.fail(prog, str(e).removeprefix(f"{prog}: "))
    worst = sorted(res.per_module.items(), key=lambda kv: kv[1])
    print(f"per module hack-ward energy: best {worst[-1][0]} {worst[-1][1]:.3f}, worst {worst[0][0]} {worst[0][1]:.3f}")
    print(res.verdict())
    return 0 if res.better_than_random else 1


def projector_from_config(pc, fingerprint: str, seed: int, modules: set[str] | None = None):
    """The training hooks for a ProjectionConfig: (on_grad, after_step), or (None, None) without a V."""
    from projected_grpo.projection import Projector

    if not pc.vhack_path:
        return None, None
    Vs, _ = load_vhack(pc.vhack_path, fingerprint, pc.v_top_k or None, pc.drop_bottom_frac, modules=modules)
    if pc.vhack_random:
        Vs = random_like(Vs, seed)
    # project_on "auto": update space for route (exact: the live model moves as vanilla, δS_hack in span(V)), grad else
    proj = Projector(Vs, pc.intervention, pc.gate, pc.overshoot, pc.preserve_magnitude, pc.project_on)
    return proj.on_grad, proj.after_step
