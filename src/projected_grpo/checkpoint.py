"""A run directory's files: checkpoints (knobs + optimizer tensors in safetensors, the rest in JSON), its one-writer
lock, and JSONL logs that survive a kill or a full disk.

    <run>/config.json            the run's Config (+ provenance)
    <run>/metrics.jsonl          one row per step
    <run>/rollouts.jsonl         one row per completion
    <run>/ckpt/step_NNNNNN/      knobs.safetensors, optimizer.safetensors, state.json
    <run>/.lock                  held (flock) by the one process writing the run
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from projected_grpo.adapter import SVDKnob


class RunLocked(RuntimeError):
    """Another process is writing this run directory."""


class RunLock:
    """An exclusive, non-blocking flock on <run>/.lock, held for the life of the writer (released by the kernel if it
    dies). The holder's pid is written into the file so the refusal can name it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is being written by another process (pid {holder}); wait for it or "
                            "stop it, then resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def is_locked(run_dir: Path) -> bool:
    """True while some process holds the run's lock."""
    p = Path(run_dir) / ".lock"
    if not p.exists():
        return False
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _clean(x):
    """NaN/inf -> None, recursively: metrics files are strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows as strict JSON lines (NaN/inf written as null) and flush them to disk."""
    data = "".join(json.dumps(_clean(r), allow_nan=False) + "\n" for r in rows)
    with open(path, "a") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_rows(path: Path) -> list[dict]:
    """Every whole row of a run's JSONL log; a torn last line (a kill or full disk mid-write) is skipped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn tail
            raise ValueError(f"{path}:{i + 1}: not valid JSON in the middle of the file; the log is damaged") from None
    return out


def truncate_jsonl(path: Path, before_step: int) -> int:
    """Keep the rows of steps < before_step (a killed run may have logged past its last checkpoint) and drop a torn
    last line. Returns how many lines were dropped."""
    if not path.exists():
        return 0
    rows = read_jsonl_rows(path)
    n_lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    keep = [r for r in rows if isinstance(r, dict) and r.get("step", -1) < before_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(path)
    return n_lines - len(keep)


def save_checkpoint(run_dir: Path, step: int, knobs: dict[str, SVDKnob], opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, fingerprint: str = "",
                    vhack: dict[str, Tensor] | None = None) -> Path:
    """ckpt/step_NNNNNN/ after `step` completed steps; written to a temp dir and renamed, so it is whole or absent.
    `vhack`: the V in effect (when the run refreshes it), saved beside the knobs so a resume continues with it."""
    final = run_dir / "ckpt" / f"step_{step:06d}"
    tmp = run_dir / "ckpt" / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({f"{n}.{p}": getattr(k, p).detach().cpu().contiguous() for n, k in knobs.items()
               for p in ("dS", "dS_hack")}, str(tmp / "knobs.safetensors"), metadata={"fingerprint": fingerprint})
    sd = opt.state_dict()
    tensors, small = {}, {}
    for pid, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{pid}.{key}"] = v.detach().cpu().contiguous()
            else:
                small[f"{pid}.{key}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    if vhack is not None:
        save_file({n: V.detach().cpu().contiguous() for n, V in vhack.items()}, str(tmp / "vhack.safetensors"))
    np_state = np.random.get_state()
    state = {"step": step, "param_groups": sd["param_groups"], "optimizer_small": small,
             "scheduler": sched.state_dict(), "rng_python": random.getstate(),
             "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "fingerprint": fingerprint}
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_vhack_state(path: Path) -> dict[str, Tensor] | None:
    """The refreshed V a checkpoint holds, or None."""
    f = path / "vhack.safetensors"
    return _load_tensors(f) if f.exists() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (Path(run_dir) / "ckpt").glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); the "
                         "checkpoint is damaged: delete its step directory to resume from the one before") from None


def load_knobs(path: Path, knobs: dict[str, SVDKnob], fingerprint: str = "") -> None:
    """Copy a checkpoint's δS and δS_hack into `knobs` (which must be the same modules of the same model)."""
    k = _load_tensors(path / "knobs.safetensors")
    want = {f"{n}.{p}" for n in knobs for p in ("dS", "dS_hack")}
    if set(k) != want:
        raise ValueError(f"checkpoint {path} holds knobs for other modules ({len(set(k) ^ want)} differ); "
                         "use the run's own model and adapter settings")
    from safetensors import safe_open

    with safe_open(str(path / "knobs.safetensors"), framework="pt") as f:
        saved_fp = (f.metadata() or {}).get("fingerprint", "")
    if fingerprint and saved_fp and saved_fp != fingerprint:
        raise ValueError(f"checkpoint {path} was made for model {saved_fp.split('|')[0]!r}, not "
                         f"{fingerprint.split('|')[0]!r}; use the run's own --model.name and adapter settings")
    with torch.no_grad():
        for n, knob in knobs.items():
            if knob.dS.shape != k[f"{n}.dS"].shape:
                raise ValueError(f"checkpoint {path}: {n} has rank {k[f'{n}.dS'].shape[0]}, the model's knob "
                                 f"{knob.dS.shape[0]}; use the run's own --adapter.rank-cap")
            if not (torch.isfinite(k[f"{n}.dS"]).all() and torch.isfinite(k[f"{n}.dS_hack"]).all()):
                raise ValueError(f"checkpoint {path}: {n} holds NaN/inf; resume from an earlier checkpoint")
            knob.dS.copy_(k[f"{n}.dS"])
            knob.dS_hack.copy_(k[f"{n}.dS_hack"])


def load_checkpoint(path: Path, knobs: dict[str, SVDKnob], opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, fingerprint: str = "") -> int:
    """Restore knobs, optimizer, scheduler and RNG states; returns the number of completed steps."""
    load_knobs(path, knobs, fingerprint)
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / 'state.json'}: damaged ({type(e).__name__}); delete {path} to resume from the "
                         "checkpoint before it") from None
    t = _load_tensors(path / "optimizer.safetensors")
    opt_state: dict[int, dict] = {}
    for key, v in [*t.items(), *state["optimizer_small"].items()]:
        if key.startswith("rng."):
            continue
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(t["rng.torch"])
    random.setstate((state["rng_python"][0], tuple(state["rng_python"][1]), state["rng_python"][2]))
    np_state = state["rng_numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return int(state["step"])


def load_run_knobs(run_dir: Path, knobs: dict[str, SVDKnob], quarantine: bool, fingerprint: str = "") -> int:
    """Put a run's last checkpointed knobs into `knobs`; δS_hack zeroed unless `quarantine`. Returns its step."""
    ck = latest_checkpoint(run_dir)
    if ck is None:
        raise ValueError(f"{run_dir}: no checkpoint under ckpt/; evaluate a run that has checkpointed")
    load_knobs(ck, knobs, fingerprint)
    if not quarantine:
        with torch.no_grad():
            for k in knobs.values():
                k.dS_hack.zero_()
    return int(ck.name.split("_")[1])
