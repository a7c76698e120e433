"""Data-parallel training: 2 gloo processes give the same knobs (within float tolerance) as 1 process on the same
total batch; rank 0 alone writes the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from projected_grpo.distributed import Dist

ARGS = ["--preset", "fast-dev-run", "--steps", "2", "--temperature", "0", "--no-progress"]


def test_each_rank_takes_every_world_th_prompt():
    assert Dist(0, 2).share(5) == [0, 2, 4] and Dist(1, 2).share(5) == [1, 3]
    assert sorted(Dist(0, 3).share(7) + Dist(1, 3).share(7) + Dist(2, 3).share(7)) == list(range(7))
    assert Dist().share(3) == [0, 1, 2]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    env = os.environ | {"PROJECTED_GRPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    # the ranks first, on an empty cache: they must not race to build the model (transformers writes a model only
    # on rank 0 under torch.distributed)
    out = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "projected_grpo.cli", "train", *ARGS,
                          "--run-dir", str(two)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "projected_grpo.cli", "train", *ARGS, "--run-dir", str(one)], env=env,
                   check=True, capture_output=True, timeout=600)
    a = load_file(str(one / "ckpt" / "step_000002" / "knobs.safetensors"))
    b = load_file(str(two / "ckpt" / "step_000002" / "knobs.safetensors"))
    assert set(a) == set(b)
    assert max(float(a[k].abs().max()) for k in a) > 1e-3  # the knobs moved
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ma = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mb] == [0, 1]  # one writer: no duplicated rows
    assert [(m["n_student"], m["n_teacher"], m["hack_t"]) for m in ma] == \
        [(m["n_student"], m["n_teacher"], m["hack_t"]) for m in mb]
    assert len((two / "rollouts.jsonl").read_text().splitlines()) == len((one / "rollouts.jsonl").read_text().splitlines())
