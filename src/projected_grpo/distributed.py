"""Data-parallel training over torch.distributed: launched with `torchrun`, NCCL on GPUs, gloo on CPU.

    torchrun --nproc_per_node 2 -m projected_grpo.cli train --preset coder15 ...

Each rank takes every world-th prompt of the step (rank r: positions r, r + W, ...), generates and grades its share,
and backpropagates it; the student and teacher knob gradients are summed over ranks before the projection hook, so
every rank projects and steps identically. Rank 0 alone writes metrics, rollouts and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> list[int]:
        """This rank's positions among n items: r, r + W, r + 2W, ..."""
        return list(range(self.rank, n, self.world))


def setup(device: str) -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), pinning this rank's GPU;
    a single process when there is no such environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} wants GPU {local} but this machine has {torch.cuda.device_count()}; launch "
                             "at most one process per GPU (torchrun --nproc_per_node N)")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def sum_grads(d: Dist, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum each module's gradient over ranks (in place; every rank gets the same tensors)."""
    if d.world > 1:
        names = list(grads)
        flat = torch.cat([grads[n].reshape(-1) for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        i = 0
        for n in names:
            k = grads[n].numel()
            grads[n].copy_(flat[i:i + k].view_as(grads[n]))
            i += k
    return grads


def sum_float(d: Dist, x: float, device: torch.device) -> float:
    if d.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def gather(d: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
