"""--mask-truncated-completions: rows cut at max_new_tokens (no eos) get advantage 0 and no gradient."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from projected_grpo import config, engine, train, world  # noqa: E402
from projected_grpo.config import PRESETS, GRPOConfig  # noqa: E402


def _grads(knobs) -> torch.Tensor:
    return torch.cat([(k.dS.grad if k.dS.grad is not None else torch.zeros_like(k.dS)).flatten()
                      for k in knobs.values()])


def test_flag_and_engine_parse_and_validate():
    cfg, _ = config.parse(["--mask-truncated-completions", "--engine", "hf"], "t", "")
    assert cfg.grpo.mask_truncated_completions is True and cfg.grpo.engine == "hf"
    assert config.parse([], "t", "")[0].grpo.engine == "auto"
    bad = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, engine="vllm"))
    with pytest.raises(ValueError, match=r"^engine='vllm' is not one of auto, static, hf; pass --engine auto$"):
        config.validate(bad, "eval")
    assert set(typing_args(GRPOConfig, "engine")) == set(engine.ENGINES)


def typing_args(cls, field: str) -> tuple:
    import typing

    return typing.get_args(typing.get_type_hints(cls)[field])


def test_zero_advantage_row_adds_no_gradient(cache):
    """Through train.backward_pass: rows [A, B] with advantages [a, 0] give A's gradient alone (β = 0). With β > 0
    and a moved knob a zero-advantage row still pulls through the KL term, which is why train drops masked rows from
    the loss instead of only zeroing their advantage."""
    cfg = PRESETS["fast-dev-run"]
    loaded, knobs, _ = world.load_model(cfg)
    pad = loaded.pad_id
    ids, attn, cmask, n_prompt = train.pad_sequences([[5, 6, 7, 8], [9, 10, 11]], [[20, 21, 22, 23], [30, 31, 32, 33]],
                                                     pad)
    adv = torch.tensor([1.0, 0.0])

    def grad_of(rows: list[int], beta: float) -> torch.Tensor:
        for k in knobs.values():
            k.dS.grad = None
        g = dataclasses.replace(cfg.grpo, beta=beta, micro_batch=1)  # one row per forward: same numerics each way
        totals = dict.fromkeys(("kl_sum", "tokens", "loss", "clipped", "logp_x", "tokens_x"), 0.0)
        train.backward_pass(loaded.model, knobs, ids[rows], attn[rows], cmask[rows], n_prompt, adv[rows], g, 100.0,
                            totals, "x", 0)
        return _grads(knobs)

    both, alone = grad_of([0, 1], 0.0), grad_of([0], 0.0)
    assert alone.abs().sum() > 0
    torch.testing.assert_close(both, alone, rtol=0, atol=0)
    assert grad_of([1], 0.0).abs().sum() == 0
    with torch.no_grad():
        for k in knobs.values():
            k.dS.normal_(0, 0.05)
    assert grad_of([1], 1.0).abs().sum() > 0  # the KL term of a zero-advantage row


def test_training_drops_truncated_rows(cache, tmp_path):
    """max_new_tokens 8: every teacher row is cut (no eos fits) and the random tiny model's students nearly always
    run to the budget. With the flag, truncated rows log advantage 0 and the teacher pass gets no gradient; without
    it, the teacher rows carry the group's signal."""
    def run(mask: bool, name: str) -> tuple[list[dict], list[float], list[dict]]:
        seen: list[float] = []

        def hook(step, knobs, g_s, g_t):
            seen.append(float(sum(v.abs().sum() for v in g_t.values())))
            return {}

        cfg = dataclasses.replace(PRESETS["fast-dev-run"], run_dir=str(tmp_path / name), progress=False, steps=2,
                                  checkpoint_every=0)
        cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, max_new_tokens=8,
                                                                mask_truncated_completions=mask))
        run_dir = Path(train.train(cfg, hook=hook))
        def read(f: str) -> list[dict]:
            return [json.loads(line) for line in (run_dir / f).read_text().splitlines()]

        return read("rollouts.jsonl"), seen, read("metrics.jsonl")

    masked, g_t_masked, m_masked = run(True, "masked")
    teachers = [r for r in masked if r["source"] == "teacher"]
    students = [r for r in masked if r["source"] == "student"]
    assert teachers and all(r["advantage"] == 0.0 for r in teachers)
    # (a student whose eos is exactly its 8th token would not be truncated; with this seed none is)
    assert students and all(r["advantage"] == 0.0 for r in students if r["n_tokens"] == 8)
    assert g_t_masked == [0.0, 0.0]
    assert [m["logp_t"] for m in m_masked] == [None, None], "no teacher token reaches the loss"
    plain, g_t_plain, m_plain = run(False, "plain")
    assert any(r["advantage"] != 0.0 for r in plain if r["source"] == "teacher")
    assert any(x > 0 for x in g_t_plain)
    assert all(m["logp_t"] is not None for m in m_plain)
