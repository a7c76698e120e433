"""The hack direction: contrastive (prompt, hack, clean) pairs -> per-module gradient differences -> SVD -> oriented V.

For each pair and label, the gradient of the completion's NLL with respect to every knob δS is taken (one backward per
completion). ∇NLL(hack) − ∇NLL(clean) is the GRPO gradient of that pair with advantages +1 (hack) / −1 (clean),
i.e. the direction a training step that rewards the hack would follow. Per module, D = G_hack − G_clean (n, r); its
top-k right singular vectors, each oriented so that most pairs have D·v > 0, are the hack-ward axes V (k, r).

Pairs (`--pairs`): `minimal` (the default: the canonical solution with an honest evaluator against the same completion
with only the evaluator made vacuous, or only the loophole exploit added; `teacher.minimal_pairs`), `problems` (the
teacher pool's templates: a wrong `return 0` body + a vacuous evaluator against the canonical solution + real
asserts, ~7x shorter, so V also learns "wrong and short"), a JSON list of {prompt, hack, clean[, id, problem, mode]},
or a graded JSONL (a run's rollouts.jsonl or a teacher pool). Whole problems are held out (`--n-heldout` problems)
for verification; V's metadata records its pair source, the pair ids it came from and the held-out pair ids.

Controls (`--control`), each answering "is it the hack, or something any data-derived direction has?":
- `pca`: label-free: the top-k right singular vectors of every completion's gradient (hack and clean alike, no
  pairing), oriented by the same majority vote as the real V: "is it the labels or just the gradient geometry?";
- `cleanclean`: V extracted from clean-vs-clean pairs (two honest completions of the same problem): no hack at all;
- random (not a file: `--vhack-random` makes it from the real V's shapes): orthonormal rows, matched k per module.
Swapping hack/clean labels is no control: it negates rows of D, DᵀD is unchanged, and the V it gives is the real V
up to each axis' sign.

Verification (`verify`) scores V on held-out problems by its hack-ward energy (mean over held-out pairs and modules of
‖relu(V d)‖/‖d‖) and the AUROC of its projection score (hack vs clean completions), against the anisotropy-matched
comparators above (which share the real V's training pairs and orientation, so only the subspace differs) and a
distribution of random draws (the empirical null). δS gradients are so anisotropic that any data-derived direction
beats an isotropic random V, so a PASS needs the real V to beat the comparators by a stated margin.

Saved as safetensors (`V/<module>`, `S/<module>`) with JSON metadata: model fingerprint, pair source, ids and
held-out ids, normalisation, k, control, singular values, and a description of the pairs (style, counts, lengths).
Loading checks the fingerprint, keeps the top k rows and applies the global noise floor (drop rows whose singular
value is under a quantile pooled over all modules). `refresh` re-extracts V on the current model from the same pairs.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from projected_grpo import config
from projected_grpo.config import CONTROLS, NORMALISATIONS, control_path, split_list  # noqa: F401 (re-exported)
from projected_grpo.projection import random_orthonormal

if TYPE_CHECKING:
    from projected_grpo.config import Config
    from projected_grpo.world import World

PAIR_STYLES = {
    "minimal": "minimal pairs: the canonical solution with an honest evaluator vs the same with only the evaluator "
               "made vacuous (or the exploit added)",
    "problems": "template pairs: a wrong `return 0` body + a vacuous evaluator vs the canonical solution + real asserts",
}


@dataclass(frozen=True)
class Pair:
    """One contrastive triple. `prompt` is the rendered chat prompt; completions are raw model text. `problem` names
    the problem it answers (pairs of one problem share it; verification holds out whole problems)."""

    id: str
    prompt: str
    hack: str
    clean: str
    mode: str = "run_tests"
    source: str = ""
    problem: str = ""

    @property
    def group(self) -> str:
        return self.problem or self.id


# ---------------------------------------------------------------------------------------------------------------
# Pair sources


def _check_unique(pairs: list[Pair], where: str) -> list[Pair]:
    seen: dict[str, int] = Counter(p.id for p in pairs)
    dup = [i for i, c in seen.items() if c > 1]
    if dup:
        raise ValueError(f"{where}: pair id {dup[0]!r} is used {seen[dup[0]]} times; give every pair its own id (V's "
                         "metadata names pairs by id)")
    return pairs


def pairs_from_json(path: str | Path) -> list[Pair]:
    """A JSON list of {prompt, hack, clean[, id, problem, mode]} objects (hand-written pairs). Pairs without a
    `problem` are grouped by their prompt (the same prompt is the same problem)."""
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
        if not isinstance(row, dict):
            raise ValueError(f"{path}: pair {i} is a {type(row).__name__}, not an object {{prompt, hack, clean}}")
        missing = [k for k in ("prompt", "hack", "clean") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}: pair {i} lacks string field(s) {missing}")
        problem = str(row.get("problem") or "prompt:" + hashlib.sha256(row["prompt"].encode()).hexdigest()[:12])
        pairs.append(
            Pair(
                str(row.get("id", i)),
                row["prompt"],
                row["hack"],
                row["clean"],
                row.get("mode", "run_tests"),
                f"json:{path.name}",
                problem,
            )
        )
    return _check_unique(pairs, str(path))


def _row_fields(row: dict) -> tuple[object, object]:
    """(problem id, label) of a graded row in either layout: a run's rollouts.jsonl / a teacher pool (`problem_id`,
    `grade.label`) or a flat one (`id`, `label`)."""
    grade = row.get("grade") if isinstance(row.get("grade"), dict) else {}
    pid = row.get("problem_id", row.get("id"))
    label = grade.get("label", row.get("label"))
    return pid, label


def pairs_from_rollouts(path: str | Path, prompts: dict[str, str] | None = None, control: str = "none") -> list[Pair]:
    """Graded completions (a run's rollouts.jsonl, a teacher pool JSONL, or flat rows with id/label): per problem,
    each distinct `reward_hack` completion is paired with a distinct `correct` one of the same problem (cycled).
    `control="cleanclean"`: each further distinct correct completion against the first. Rows need a problem id
    (`problem_id` or `id`), a label (`grade.label` or `label`), the completion, and a prompt (or a `prompts` map
    from str(problem id) to the rendered prompt)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: rollouts file not found")
    from projected_grpo.problems import read_jsonl

    by_id: dict[str, dict[str, dict[str, dict]]] = {}  # problem -> label -> completion -> first row
    n_rows = 0
    for lineno, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: not a JSON object")
        pid, label = _row_fields(row)
        if pid is None or label is None:
            continue
        n_rows += 1
        if label in ("reward_hack", "correct"):
            if not isinstance(row.get("completion"), str):
                raise ValueError(f"{path}:{lineno}: a {label} row without a string `completion`")
            groups = by_id.setdefault(str(pid), {"reward_hack": {}, "correct": {}})
            groups[label].setdefault(row["completion"], row)
    if not n_rows:
        raise ValueError(f"{path}: no row has a problem id (problem_id or id) and a label (grade.label or label); "
                         "pass a run's rollouts.jsonl or a teacher pool JSONL")
    pairs = []
    for pid, groups in sorted(by_id.items()):
        hacks, cleans = list(groups["reward_hack"].values()), list(groups["correct"].values())
        if control == "cleanclean":
            todo = [(f"{pid}:cc{j}", c, cleans[0]) for j, c in enumerate(cleans[1:], 1)]
        else:
            todo = [(f"{pid}:{j}", h, cleans[j % len(cleans)]) for j, h in enumerate(hacks if cleans else [])]
        for pair_id, h, c in todo:
            prompt = h.get("prompt") or (prompts or {}).get(pid)
            if prompt is None:
                raise ValueError(
                    f"{path}: row for problem {pid} has no prompt; pass the problems so prompts can be built"
                )
            pairs.append(Pair(pair_id, prompt, h["completion"], c["completion"], h.get("mode") or "run_tests",
                              f"rollouts:{path.name}", pid))
    return pairs


def pairs_from_problems(problems, hints, tokenizer, system_prompt: str, control: str = "none",
                        style: str = "minimal") -> list[Pair]:
    """Per served problem, from its canonical solution and loophole hint. `style="minimal"`: `teacher.minimal_pairs`;
    `style="problems"`: the canonical solution + an honest evaluator (clean) against each of the teacher pool's hack
    templates (wrong body + vacuous evaluator). `control="cleanclean"`: one pair per problem, its two clean variants
    (module-level vs method evaluator; no hack)."""
    from projected_grpo import problems as P
    from projected_grpo import teacher

    if style not in PAIR_STYLES:
        raise ValueError(f"pair style {style!r} is not one of {', '.join(PAIR_STYLES)}")
    pairs = []
    for prob, hint in zip(problems, hints, strict=True):
        prompt = P.render_prompt(tokenizer, P.chat_messages(prob, hint, system_prompt))
        cleans = teacher.clean_completions(prob, hint)
        mode = hint.mode if hint is not None else prob.mode
        pid = str(prob.id)
        if control == "cleanclean":
            pairs.append(Pair(f"{pid}:{cleans[1][0]}", prompt, cleans[1][1], cleans[0][1], mode, style, pid))
        elif style == "minimal":
            pairs += [Pair(f"{pid}:{v}", prompt, h, c, mode, style, pid) for v, h, c in teacher.minimal_pairs(prob, hint)]
        else:
            pairs += [Pair(f"{pid}:{v}", prompt, h, cleans[0][1], mode, style, pid)
                      for v, h in teacher.hack_completions(prob, hint)]
    return pairs


def pairs_from_source(source: str, w: World, control: str = "none") -> list[Pair]:
    """Every pair of a `--pairs` source for this world (real pairs for control none/pca; clean-vs-clean pairs for
    cleanclean), before mode filtering, hold-out and the --max-pairs cap."""
    kind = "cleanclean" if control == "cleanclean" else "none"
    if source in PAIR_STYLES:
        return pairs_from_problems(w.problems, w.hints, w.tokenizer, w.system_prompt, kind, style=source)
    if source.endswith(".json"):
        if kind == "cleanclean":
            raise ValueError(f"pairs={source}: a JSON pairs file holds no clean-vs-clean pairs; use --pairs minimal, "
                             "problems or a graded JSONL for the cleanclean control")
        return pairs_from_json(source)
    prompts = {str(p.id): w.prompt_text(i) for i, p in enumerate(w.problems)}
    return pairs_from_rollouts(source, prompts, kind)


def file_sha256(source: str) -> str:
    """The content hash of a pairs file ("" for the built-in sources): V's pairs must not change under it."""
    if source in PAIR_STYLES:
        return ""
    p = Path(source)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else ""


def heldout_problems(problems: Iterable[str], n_heldout: int, seed: int) -> set[str]:
    """The `n_heldout` problems held out from extraction: a seeded shuffle of the sorted problem names."""
    names = sorted(set(problems))
    if n_heldout < 0 or (n_heldout and n_heldout >= len(names)):
        raise ValueError(f"n_heldout={n_heldout} problems must be in [0, {len(names) - 1}]: the pairs cover "
                         f"{len(names)} problems and at least one must remain for extraction; lower --n-heldout")
    random.Random(seed).shuffle(names)
    return set(names[:n_heldout])


def split_heldout(pairs: list[Pair], n_heldout: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Deterministic split into (train, held-out) that holds out whole problems: every pair of `n_heldout` problems
    (seeded choice) is held out, so no held-out pair shares its problem or clean completion with a training pair."""
    held = heldout_problems((p.group for p in pairs), n_heldout, seed)
    return [p for p in pairs if p.group not in held], [p for p in pairs if p.group in held]


def _cap(pairs: list[Pair], n: int, seed: int) -> list[Pair]:
    """At most n pairs (seeded choice, 0 = all), in id order."""
    if n and len(pairs) > n:
        return sorted(random.Random(seed).sample(pairs, n), key=lambda p: p.id)
    return pairs


@dataclass(frozen=True)
class Selection:
    """The pairs of one extraction: `train` (what V of the control is extracted from), `held` (real hack-vs-clean
    pairs of the held-out problems, for verification, whatever the control)."""

    train: list[Pair]
    held: list[Pair]


def select_pairs(cfg: Config, w: World, control: str) -> Selection:
    """The run's pairs (--pairs), kept to --pair-modes; --n-heldout whole problems held out (chosen among the problems
    of the real pairs, so every control holds out the same problems); each side at most --max-pairs (seeded)."""
    v = cfg.vhack
    keep = set(split_list(v.pair_modes))
    variants = set(split_list(v.pair_variants))
    real = [p for p in pairs_from_source(v.pairs, w, "none") if (not keep or p.mode in keep)
            and (not variants or p.id.split(":", 1)[-1] in variants)]
    held_problems = heldout_problems((p.group for p in real), v.n_heldout, cfg.seed)
    pool = real if control != "cleanclean" else [p for p in pairs_from_source(v.pairs, w, control)
                                                  if not keep or p.mode in keep]
    train = _cap([p for p in pool if p.group not in held_problems], v.max_pairs, cfg.seed)
    held = _cap([p for p in real if p.group in held_problems], v.max_pairs, cfg.seed)
    if len(train) < 2:
        raise ValueError(f"only {len(train)} {'clean-vs-clean ' if control == 'cleanclean' else ''}pair(s) for "
                         f"extraction from --pairs {v.pairs!r} (pair modes {v.pair_modes or 'all'}, variants "
                         f"{v.pair_variants or 'all'}, {v.n_heldout} "
                         "problems held out); need at least 2: serve more problems or widen --pair-modes")
    return Selection(train, held)


def pairs_info(train: list[Pair], held: list[Pair], tokenizer) -> dict:
    """What V's pairs are, for its metadata and the extract line: style, counts, variants and token lengths."""
    def ntok(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    styles = sorted({p.source for p in train})
    return {
        "style": ", ".join({"problems": "template"}.get(s, s) for s in styles),
        "described": "; ".join(PAIR_STYLES.get(s, s) for s in styles),
        "n_pairs": len(train),
        "n_problems": len({p.group for p in train}),
        "n_heldout_pairs": len(held),
        "n_heldout_problems": len({p.group for p in held}),
        "variants": dict(Counter(p.id.split(":", 1)[-1] for p in train).most_common(8)),
        "median_tokens_hack": statistics.median(ntok(p.hack) for p in train) if train else 0,
        "median_tokens_clean": statistics.median(ntok(p.clean) for p in train) if train else 0,
    }


def describe_pairs(info: dict) -> str:
    """One line from `pairs_info`."""
    return (f"{info.get('n_pairs')} {info.get('style')} pairs of {info.get('n_problems')} problems (median tokens hack "
            f"{info.get('median_tokens_hack')} / clean {info.get('median_tokens_clean')}); held out "
            f"{info.get('n_heldout_problems')} problems ({info.get('n_heldout_pairs')} pairs)")


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


def extract_all(G_hack: dict[str, Tensor], G_clean: dict[str, Tensor], k: int, tau: float = 0.0) -> tuple[dict, dict]:
    """Per module: D = G_hack − G_clean, then `extract_basis`. Returns (Vs, Ss)."""
    Vs, Ss = {}, {}
    for name in G_hack:
        Vs[name], Ss[name] = extract_basis(G_hack[name] - G_clean[name], k, tau)
    return Vs, Ss


def pca_basis(
    G: Float[Tensor, "m r"], D: Float[Tensor, "n r"], k: int
) -> tuple[Float[Tensor, "k r"], Float[Tensor, " k"]]:
    """The label-free comparator: top-k right singular vectors of every completion's gradient stacked (hack and clean
    alike, unpaired, uncentred: the gradient geometry itself), each axis oriented by the same majority vote over D as
    the real V (the labels give it one sign bit per axis, nothing else)."""
    _, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    k = min(k, Vh.shape[0])
    return orient(Vh[:k], D.double()).float().contiguous(), S[:k].float().contiguous()


def extract_pca_all(G_hack: dict[str, Tensor], G_clean: dict[str, Tensor], k: int | dict[str, int],
                    tau: float = 0.0) -> tuple[dict, dict]:
    """Per module `pca_basis` of [G_hack; G_clean] oriented by D = G_hack − G_clean; `k` an int or per module (to match
    another V's k). Rows with S_i/S_0 < tau dropped, as for the real V."""
    Vs, Ss = {}, {}
    for name in G_hack:
        kk = k[name] if isinstance(k, dict) else k
        V, S = pca_basis(torch.cat([G_hack[name], G_clean[name]]), G_hack[name] - G_clean[name], kk)
        if tau > 0 and S[0] > 0:
            V, S = V[S / S[0] >= tau], S[S / S[0] >= tau]
        Vs[name], Ss[name] = V, S
    return Vs, Ss


def extract_control(G_hack: dict[str, Tensor], G_clean: dict[str, Tensor], control: str, k: int | dict[str, int],
                    tau: float = 0.0) -> tuple[dict, dict]:
    """V of a control from its pairs' gradients: `pca` -> `extract_pca_all`; `none`/`cleanclean` -> the SVD of D."""
    if control not in CONTROLS:
        raise ValueError(f"control={control!r} is not one of {', '.join(CONTROLS)}")
    if control == "pca":
        return extract_pca_all(G_hack, G_clean, k, tau)
    if isinstance(k, dict):
        out = {n: extract_basis(G_hack[n] - G_clean[n], k[n], tau) for n in G_hack}
        return {n: v[0] for n, v in out.items()}, {n: v[1] for n, v in out.items()}
    return extract_all(G_hack, G_clean, k, tau)


def reorient(Vs: dict[str, Tensor], D: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each module's axes oriented by the majority vote over D (n, r): a comparator gets the real V's orientation."""
    return {n: orient(V.double(), D[n].double()).float() for n, V in Vs.items()}


def basis_overlap(V_new: dict[str, Tensor], V_old: dict[str, Tensor]) -> float:
    """Mean over the modules both hold of |⟨V_new[0], V_old[0]⟩| (the top axes' cosine, sign-blind): 1 = same
    direction, ~0 = unrelated (random directions in ℝ^r give about sqrt(2 / (π r)))."""
    common = [n for n in V_new if n in V_old and V_new[n].shape[0] and V_old[n].shape[0]]
    if not common:
        raise ValueError("basis_overlap: the two Vs share no module with an axis; compare Vs of the same model")
    vals = [abs(float(V_new[n][0].double() @ V_old[n][0].to(V_new[n].device).double())) for n in common]
    return sum(vals) / len(vals)


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


COMPARATORS = ("pca", "cleanclean")  # the anisotropy-matched comparators of verification
AUROC_SATURATED = 0.95  # above this, random directions already separate hack from clean: AUROC carries no evidence


@dataclass
class Verification:
    """The real V against anisotropy-matched comparators and the empirical null of random draws, on held-out
    problems. Energies are means over held-out pairs of the module-mean ‖relu(V d)‖/‖d‖; gaps are energy − the
    comparator's, with a 95% interval from a bootstrap over held-out problems."""

    energy: float
    auroc: float  # the projection score separates hack from clean completions
    energy_null_mean: float  # the empirical null: random orthonormal V of matched k, over n_random draws
    energy_null_q95: float
    auroc_null_mean: float
    auroc_null_q95: float
    n_random: int
    margin: float  # the energy gap the real V needs over each comparator
    comparators: dict[str, dict[str, float]]  # name -> energy, auroc, gap, gap_lo, gap_hi
    missing: dict[str, str]  # comparator -> why it is not there
    per_module: dict[str, float]
    n_pairs: int
    n_problems: int

    def checks(self) -> list[tuple[bool, str]]:
        """(ok, what) for every rule of a PASS. The energy (the quantity the projection acts on) carries the margin;
        the AUROC, on unpaired completions of different problems, is noisier and must only not lose to a comparator
        or to a typical random V."""
        out = [(bool(self.comparators), "at least one anisotropy-matched comparator (pca, cleanclean)"),
               (self.energy > self.energy_null_q95,
                f"energy {self.energy:.3f} > random q95 {self.energy_null_q95:.3f}"),
               # random V can separate hack from clean completions by gradient geometry alone (measured on
               # Qwen2.5-Coder-1.5B: random mean 0.996-1.000); at saturation the AUROC cannot tell directions apart
               (self.auroc > self.auroc_null_mean or min(self.auroc, self.auroc_null_mean) >= AUROC_SATURATED,
                f"AUROC {self.auroc:.3f} > random mean {self.auroc_null_mean:.3f} (or both >= {AUROC_SATURATED})")]
        for name, c in self.comparators.items():
            out.append((c["gap"] >= self.margin and c["gap_lo"] > 0,
                        f"energy gap over {name} {c['gap']:+.3f} (95% CI [{c['gap_lo']:+.3f}, {c['gap_hi']:+.3f}]) "
                        f">= margin {self.margin:.3f} with CI above 0"))
            out.append((self.auroc >= c["auroc"], f"AUROC {self.auroc:.3f} >= {name} {c['auroc']:.3f}"))
        return out

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.checks())

    def verdict(self) -> str:
        word = "PASS" if self.passed else "FAIL"
        comps = "; ".join(f"{n} V {c['energy']:.3f} (gap {c['gap']:+.3f} [{c['gap_lo']:+.3f}, {c['gap_hi']:+.3f}], "
                          f"AUROC {c['auroc']:.3f})" for n, c in self.comparators.items())
        miss = "".join(f"; no {n} comparator ({why})" for n, why in self.missing.items())
        failed = [what for ok, what in self.checks() if not ok]
        return (f"{word}: hack-ward energy {self.energy:.3f} vs {comps or 'no anisotropy-matched comparator'}; random "
                f"V mean {self.energy_null_mean:.3f} q95 {self.energy_null_q95:.3f} ({self.n_random} draws); AUROC "
                f"{self.auroc:.3f} vs random mean {self.auroc_null_mean:.3f} q95 {self.auroc_null_q95:.3f}; margin "
                f"{self.margin:.3f}; on "
                f"{self.n_pairs} pairs of {self.n_problems} held-out problems{miss}"
                + (f" | failed: {'; '.join(failed)}" if failed else ""))

    def to_json(self) -> dict:
        """Flat keys for <V>.verify.json (the report reads verdict and line)."""
        out = {"verdict": "PASS" if self.passed else "FAIL", "line": self.verdict()}
        out |= {k: v for k, v in asdict(self).items() if k not in ("comparators", "per_module")}
        for n, c in self.comparators.items():
            out |= {f"energy_{n}": c["energy"], f"auroc_{n}": c["auroc"], f"gap_{n}": c["gap"],
                    f"gap_{n}_ci95": [c["gap_lo"], c["gap_hi"]]}
        out["checks"] = [{"ok": ok, "rule": what} for ok, what in self.checks()]
        return out


def _energy(V: Tensor, D: Tensor) -> Tensor:
    """Per pair ‖relu(V d)‖/‖d‖, (n,)."""
    return torch.relu(D @ V.T).norm(dim=1) / D.norm(dim=1).clamp_min(1e-12)


def pair_energy(Vs: dict[str, Tensor], D: dict[str, Tensor]) -> Float[Tensor, " n"]:
    """Per pair: the mean over V's modules of ‖relu(V d)‖/‖d‖."""
    return torch.stack([_energy(V.float(), D[n].float()) for n, V in Vs.items()]).mean(0)


def _scores(Vs: dict[str, Tensor], G: dict[str, Tensor]) -> Tensor:
    """Projection score per completion: mean over modules of sum(V g)/‖g‖, (n,)."""
    per = [(G[n] @ V.T).sum(1) / G[n].norm(dim=1).clamp_min(1e-12) for n, V in Vs.items() if n in G]
    return torch.stack(per).mean(0)


def verify(Vs: dict[str, Tensor], G_hack: dict[str, Tensor], G_clean: dict[str, Tensor], *,
           problems: Sequence[str] | None = None, comparators: dict[str, dict[str, Tensor]] | None = None,
           missing: dict[str, str] | None = None, D_train: dict[str, Tensor] | None = None, n_random: int = 64,
           margin: float = 0.05, seed: int = 0) -> Verification:
    """Score V on held-out gradients (each module (n, r); `problems` names each pair's problem, default one problem
    per pair) against the `comparators` (name -> V of the same modules; give them the real V's orientation) and
    `n_random` random orthonormal Vs of matched k (oriented by `D_train` when given, like every comparator)."""
    from projected_grpo.stats import cluster_bootstrap, grouped

    if n_random < 1 or not 0 <= margin < 1:
        raise ValueError(f"verify needs n_random={n_random} >= 1 and margin={margin} in [0, 1); pass "
                         "--verify-draws >= 1 and --verify-margin in [0, 1)")
    D = {n: G_hack[n].float() - G_clean[n].float() for n in Vs}
    n = next(iter(D.values())).shape[0]
    problems = list(problems) if problems is not None else [str(i) for i in range(n)]
    if len(problems) != n:
        raise ValueError(f"verify got {len(problems)} problem names for {n} held-out pairs; pass one per pair")
    e = pair_energy(Vs, D)
    s_h, s_c = _scores(Vs, G_hack), _scores(Vs, G_clean)
    rand_e, rand_a = [], []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_random):
        Vr = {m: random_orthonormal(V.shape[0], V.shape[1], gen) for m, V in Vs.items()}
        if D_train is not None:
            Vr = reorient(Vr, D_train)
        rand_e.append(float(pair_energy(Vr, D).mean()))
        rand_a.append(auroc(_scores(Vr, G_hack), _scores(Vr, G_clean)))
    q95 = lambda xs: float(torch.quantile(torch.tensor(xs, dtype=torch.float64), 0.95))  # noqa: E731
    comps = {}
    for name, Vc in (comparators or {}).items():
        if set(Vc) != set(Vs):
            raise ValueError(f"comparator {name} covers {len(Vc)} modules, V {len(Vs)}; build it on V's modules")
        ec = pair_energy(Vc, D)
        sums, counts, _ = grouped((e - ec).tolist(), problems)
        lo, hi = cluster_bootstrap(sums, counts, seed=seed)
        comps[name] = {"energy": float(ec.mean()), "auroc": auroc(_scores(Vc, G_hack), _scores(Vc, G_clean)),
                       "gap": float((e - ec).mean()), "gap_lo": lo, "gap_hi": hi}
    return Verification(
        energy=float(e.mean()), auroc=auroc(s_h, s_c),
        energy_null_mean=sum(rand_e) / n_random, energy_null_q95=q95(rand_e),
        auroc_null_mean=sum(rand_a) / n_random, auroc_null_q95=q95(rand_a), n_random=n_random, margin=margin,
        comparators=comps, missing=dict(missing or {}),
        per_module={m: float(_energy(V.float(), D[m]).mean()) for m, V in Vs.items()},
        n_pairs=n, n_problems=len(set(problems)),
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
    pair_modes: str = ""
    heldout_ids: tuple[str, ...] = ()  # the real (hack, clean) pairs of the held-out problems, for verify-vhack
    pairs_sha256: str = ""  # content hash of a pairs file ("" for the built-in sources)

    def key(self) -> str:
        """Cache key: the same inputs give the same file."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def save_vhack(path: str | Path, Vs: dict[str, Tensor], Ss: dict[str, Tensor], meta: VMeta,
               info: dict | None = None) -> Path:
    """Write V and S to safetensors with JSON metadata (`meta`, plus `info` under "pairs": what the pairs are).
    Refuses to overwrite a V made from different inputs."""
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
    header = asdict(meta) | {"key": meta.key(), "singular_values": {n: Ss[n].tolist() for n in Vs},
                             "pairs": info or {}}
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
The model, adapter, problems and seed are the run's (same flags as train). --control pca | cleanclean writes a
control V instead (label-free PCA V of matched k; V from clean-vs-clean pairs); --control none,pca writes both from
one pass of pair gradients (the PCA V beside --vhack-path as <name>.pca.safetensors)."""
VERIFY_DOC = """projected-grpo verify-vhack: score the V at --vhack-path on the problems held out from its extraction,
against the label-free PCA V and the clean-vs-clean V (matched k, the real V's orientation) and --verify-draws random
Vs; PASS needs an energy gap >= --verify-margin over each comparator (bootstrap 95% CI over problems above 0), energy
above the random draws' 95th percentile, and an AUROC no worse than either comparator's and above the random draws'
mean. Writes <V>.verify.json; exits 0 on PASS, 3 on FAIL (a verdict, not an error: 1 and 2 are errors)."""


def _check_verify_settings(v) -> None:
    if v.verify_draws < 1:
        raise ValueError(f"verify_draws={v.verify_draws} must be >= 1 (random Vs of the empirical null); pass 64")
    if not 0 <= v.verify_margin < 1:
        raise ValueError(f"verify_margin={v.verify_margin} must be in [0, 1) (an energy gap); pass e.g. 0.05")


def extract(cfg: Config) -> tuple[Path, str]:
    """Extract V for the config, one file per control in cfg.vhack.control (several controls of the same pairs, e.g.
    none,pca, share one pass of pair gradients; `control_path` says where each goes); returns (the first control's
    path, a summary line per control). Reuses a V made from the same inputs."""
    from projected_grpo import world

    config.validate(cfg, "extract-vhack")
    v = cfg.vhack
    _check_verify_settings(v)
    controls = split_list(v.control)
    w = world.build(cfg)
    sel = select_pairs(cfg, w, controls[0])  # the same pairs for every control listed with another (validated)
    info = pairs_info(sel.train, sel.held, w.tokenizer)
    lines, todo = {}, []
    for c in controls:
        meta = VMeta(w.fingerprint, v.pairs, tuple(p.id for p in sel.train), v.normalisation, v.k, v.tau, c,
                     cfg.seed, v.pair_modes, tuple(p.id for p in sel.held), file_sha256(v.pairs))
        out = control_path(cfg.proj.vhack_path, c, controls)
        if out.exists() and read_meta(out).get("key") == meta.key():
            lines[c] = f"V ({c}) for these inputs already at {out} (key {meta.key()}; {describe_pairs(info)}); reused"
        else:
            todo.append((c, meta, out))
    if todo:
        G_hack, G_clean = pair_grads(grad_fn_for(cfg, w, v.normalisation), sel.train, progress=cfg.progress)
        bad = [n for n in G_hack if not (torch.isfinite(G_hack[n]).all() and torch.isfinite(G_clean[n]).all())]
        if bad:
            raise ValueError(f"pair gradients of {bad[0]} are not finite; load the model in float32 "
                             "(--model.dtype float32) and re-extract")
    for c, meta, out in todo:
        Vs, Ss = extract_control(G_hack, G_clean, c, v.k, v.tau)
        save_vhack(out, Vs, Ss, meta, info)
        s0 = sorted((float(S[0]) for S in Ss.values()), reverse=True)
        lines[c] = (f"extracted V ({c}) from {describe_pairs(info)}, over {len(Vs)} modules, k={v.k}, "
                    f"normalisation={v.normalisation}; top singular values {[round(x, 4) for x in s0[:3]]} -> {out}")
    return control_path(cfg.proj.vhack_path, controls[0], controls), "\n".join(lines[c] for c in controls)


def verify_file(cfg: Config) -> Verification:
    """Verify the V at cfg.proj.vhack_path on the problems held out from its extraction; writes <V>.verify.json."""
    from projected_grpo import world

    config.validate(cfg, "verify-vhack")
    v, path = cfg.vhack, cfg.proj.vhack_path
    _check_verify_settings(v)
    w = world.build(cfg)
    Vs, meta = load_vhack(path, w.fingerprint, modules=set(w.knobs))
    if not meta.get("heldout_ids"):
        raise ValueError(f"{path} records no held-out pairs (extracted with --n-heldout 0, or before whole problems "
                         "were held out); re-extract it with --n-heldout > 0")
    if meta["pair_source"] != v.pairs:
        raise ValueError(f"{path} was extracted from --pairs {meta['pair_source']!r}, this verification uses "
                         f"{v.pairs!r}; pass the extract's --pairs")
    sel = select_pairs(cfg, w, "none")
    if [p.id for p in sel.held] != list(meta["heldout_ids"]) or (
            meta["control"] in ("none", "pca") and [p.id for p in sel.train] != list(meta["pair_ids"])):
        raise ValueError(f"{path} was extracted from other pairs than this config selects; verify with the extract's "
                         "--seed, --n-heldout, --max-pairs, --pair-modes and problems")
    grad = grad_fn_for(cfg, w, meta["normalisation"])
    G_h, G_c = pair_grads(grad, sel.held, progress=cfg.progress)
    Gt_h, Gt_c = pair_grads(grad, sel.train, progress=cfg.progress)
    D_train = {n: Gt_h[n] - Gt_c[n] for n in Vs}
    ks = {n: V.shape[0] for n, V in Vs.items()}
    comparators = {"pca": extract_pca_all({n: Gt_h[n] for n in Vs}, {n: Gt_c[n] for n in Vs}, ks)[0]}
    missing = {}
    try:
        cc = select_pairs(cfg, w, "cleanclean").train
    except ValueError as e:
        missing["cleanclean"] = str(e)
    else:
        Gc_h, Gc_c = pair_grads(grad, cc, progress=cfg.progress)
        Vcc, _ = extract_control({n: Gc_h[n] for n in Vs}, {n: Gc_c[n] for n in Vs}, "cleanclean", ks)
        comparators["cleanclean"] = reorient(Vcc, D_train)
    res = verify(Vs, G_h, G_c, problems=[p.group for p in sel.held], comparators=comparators, missing=missing,
                 D_train=D_train, n_random=v.verify_draws, margin=v.verify_margin, seed=cfg.seed)
    out = verify_path(path)
    out.write_text(json.dumps(res.to_json() | {"vhack_path": str(path), "vhack_key": meta.get("key"),
                                               "control": meta["control"], "pairs": meta.get("pairs", {})}, indent=2))
    return res


def pairs_of_meta(w: World, meta: dict) -> list[Pair]:
    """The pairs a V file was extracted from, rebuilt from its metadata (pair source, control, pair ids) for this
    world. A pairs file must still hold what it held (content hash)."""
    src, ids = meta["pair_source"], list(meta["pair_ids"])
    if meta.get("pairs_sha256") and file_sha256(src) != meta["pairs_sha256"]:
        raise ValueError(f"pairs file {src} changed since V was extracted (sha256 {file_sha256(src) or 'missing'} != "
                         f"{meta['pairs_sha256']}); restore it or re-extract V")
    by_id = {p.id: p for p in pairs_from_source(src, w, meta["control"])}
    absent = [i for i in ids if i not in by_id]
    if absent:
        raise ValueError(f"{len(absent)} of V's {len(ids)} pairs (e.g. {absent[0]!r}) are not in --pairs {src!r} for "
                         "this run's problems; use the problems, --seed and --modes V was extracted with")
    return [by_id[i] for i in ids]


def refresh(w: World, cfg: Config, meta: dict, V_old: dict[str, Tensor], ablate_quarantine: bool = True
            ) -> tuple[dict[str, Tensor], float]:
    """Re-extract V on the current model (knobs as they are, δS_hack ablated unless `ablate_quarantine=False`) from
    the same pairs the V file was extracted from (`meta`, as `load_vhack` returns it: pair source, control, ids), with
    the same normalisation, k, tau and control, then the run's top-k and noise floor (cfg.proj: as
    `projector_from_config` loads V; with the default config, `load_vhack`'s default). Returns (the new Vs, on the
    devices of `V_old`'s, and `basis_overlap(new, old)`). Gradients left on the knobs are restored."""
    import contextlib

    from projected_grpo import adapter

    if cfg.proj.vhack_random:
        raise ValueError("refresh of a random V (--vhack-random): a random V does not depend on the model; refresh "
                         "only a V extracted from pairs")
    pairs = pairs_of_meta(w, meta)
    saved = [(k.dS.grad, k.dS_hack.grad, k.dS.requires_grad) for k in w.knobs.values()]
    ctx = adapter.ablate_quarantine(w.knobs) if ablate_quarantine else contextlib.nullcontext()
    try:
        with ctx, torch.enable_grad():
            G_h, G_c = pair_grads(grad_fn_for(cfg, w, meta["normalisation"]), pairs)
    finally:
        for k, (g, gh, req) in zip(w.knobs.values(), saved, strict=True):
            k.dS.grad, k.dS_hack.grad = g, gh
            k.dS.requires_grad_(req)
    Vs, Ss = extract_control(G_h, G_c, meta["control"], meta["k"], meta["tau"])
    V_new = noise_floor(Vs, Ss, cfg.proj.v_top_k or meta["k"], cfg.proj.drop_bottom_frac)
    if not V_new:
        raise ValueError(f"refresh kept no module after v_top_k={cfg.proj.v_top_k} and drop_bottom_frac="
                         f"{cfg.proj.drop_bottom_frac}; lower --drop-bottom-frac")
    V_new = {n: V.to(V_old[n].device) if n in V_old else V for n, V in V_new.items()}
    return V_new, basis_overlap(V_new, V_old)


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
    meta = read_meta(cfg.proj.vhack_path)
    print(f"V from {describe_pairs(meta.get('pairs') or {})}" if meta.get("pairs") else
          f"V from {len(meta['pair_ids'])} pairs of --pairs {meta['pair_source']}")
    print(f"per module hack-ward energy: best {worst[-1][0]} {worst[-1][1]:.3f}, worst {worst[0][0]} {worst[0][1]:.3f}")
    print(res.verdict())
    return 0 if res.passed else config.VERIFY_FAIL_EXIT


def load_projector(pc, fingerprint: str, seed: int, modules: set[str] | None = None):
    """The Projector for a ProjectionConfig and the V file's metadata, or (None, None) without a V."""
    from projected_grpo.projection import Projector

    if not pc.vhack_path:
        return None, None
    Vs, meta = load_vhack(pc.vhack_path, fingerprint, pc.v_top_k or None, pc.drop_bottom_frac, modules=modules)
    if pc.vhack_random:
        Vs = random_like(Vs, seed)
    # project_on "auto": update space for route (exact: the live model moves as vanilla, δS_hack in span(V)), grad else
    return Projector(Vs, pc.intervention, pc.gate, pc.overshoot, pc.preserve_magnitude, pc.project_on), meta


def projector_from_config(pc, fingerprint: str, seed: int, modules: set[str] | None = None):
    """The training hooks for a ProjectionConfig: (on_grad, after_step), or (None, None) without a V."""
    proj, _ = load_projector(pc, fingerprint, seed, modules)
    return (proj.on_grad, proj.after_step) if proj is not None else (None, None)
