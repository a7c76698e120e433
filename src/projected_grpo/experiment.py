"""Arms × seeds as jobs with dependencies: a small file-based runner (no queue daemon needed).

    projected-grpo pipeline --preset fast-dev-run --seeds 41 --arms vanilla,erase
    projected-grpo sweep --preset coder05 --arms vanilla,erase,route,random_V --seeds 41,42,43 --steps 16 --lr 1e-3

Both take every flag `train` takes (the same Config) plus the experiment's own (--seeds, --arms, --status, --force,
...). Every job gets the same config, changed only where the job differs (seed, arm, V file, run directory), so
extract, verify, train and eval share one model, adapter and data config.

A job is what it runs: its identity is a hash of its command and the settings that change its result (and its
parents' identities). Re-running with a changed setting refuses with the difference, or re-runs with --force; a
finished job with the same identity is skipped; an interrupted train job resumes from its checkpoint (with the memory
settings it is planned with now: config.MEMORY_FIELDS are not part of an identity). State lives in
`<out>/jobs/<name>/{job.json,config.json,status,log.txt}`; `--status` lists the planned jobs and their state.

Independent jobs run side by side: `--gpus 0,1 --jobs-per-gpu 2` (default: every visible GPU, one job each; CPU: one
job at a time); each job is pinned with CUDA_VISIBLE_DEVICES, and grader workers are shared out between running jobs,
also with the jobs of other sweeps and pipelines running on the same machine (`RUNNERS`).

Arms (the `--arms` names):
  vanilla     GRPO, V measured only (cin/cout logged), no intervention
  erase       hack-ward part of each gradient removed
  route       hack-ward part of each update routed to the deletable quarantine knob δS_hack (scored with it ablated)
  random_V      erase with a random orthonormal V of matched k per module (control: any direction at all)
  pca_V         erase with the label-free V: top principal axes of every pair completion's gradient, matched k
                (control: is it the labels, or just the anisotropic gradient geometry?)
  cleanclean_V  erase with V extracted from clean-vs-clean pairs (control: a data-derived direction with no hack)
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from projected_grpo import config
from projected_grpo.config import Config, control_path, split_list

ARMS: dict[str, dict[str, str]] = {
    # arm -> train's intervention, and which V it uses: "real" | "pca" | "cleanclean" (an extract job each; one job
    # for real and pca when both are used: the same pairs' gradients) | "random" (made from the real V's shapes)
    "vanilla": {"intervention": "none", "v": "real"},
    "erase": {"intervention": "erase", "v": "real"},
    "route": {"intervention": "route", "v": "real"},
    "random_V": {"intervention": "erase", "v": "random"},
    "erase_refresh": {"intervention": "erase", "v": "real", "refresh": "1"},
    "route_refresh": {"intervention": "route", "v": "real", "refresh": "1"},
    "pca_V": {"intervention": "erase", "v": "pca"},
    "cleanclean_V": {"intervention": "erase", "v": "cleanclean"},
}
V_CONTROL = {"real": "none", "pca": "pca", "cleanclean": "cleanclean"}  # V kind -> extract-vhack --control
# settings each command's result depends on (top-level Config fields / sections); the rest is not in its identity
RELEVANT: dict[str, tuple[str, ...]] = {
    "extract-vhack": ("model", "adapter", "data", "vhack", "seed", "grpo.max_new_tokens", "proj.vhack_path"),
    "verify-vhack": ("model", "adapter", "data", "vhack", "seed", "grpo.max_new_tokens", "proj.vhack_path"),
    "train": tuple(f.name for f in dataclasses.fields(Config) if f.name not in config.DISPLAY_FIELDS | {"eval"}) +
    ("run_dir",),
    "eval": ("model", "adapter", "data.system_prompt", "eval", "run_dir", "out"),
}


@dataclass
class Job:
    name: str
    command: str  # a projected-grpo command: extract-vhack | verify-vhack | train | eval
    cfg: Config
    parents: list[str] = field(default_factory=list)
    identity: str = ""  # set by plan()
    identity_with_memory: str = ""  # the identity as formed before the memory settings were left out of it

    @property
    def outputs(self) -> list[Path]:
        """What the job writes (removed by --force)."""
        if self.command == "train":
            return [Path(self.cfg.run_dir)]
        if self.command == "extract-vhack":
            controls = split_list(self.cfg.vhack.control)
            return [control_path(self.cfg.proj.vhack_path, c, controls) for c in controls]
        if self.command == "verify-vhack":
            from projected_grpo.vhack import verify_path

            return [verify_path(self.cfg.proj.vhack_path)]
        return [Path(self.cfg.out)]


IDENTITY_MEMORY_FIELDS = frozenset({"grpo.micro_batch", "model.gradient_checkpointing"})
"""The memory settings identities held before config.MEMORY_FIELDS were left out of them (later ones never were)."""


def relevant(command: str, cfg: Config, memory: bool = False) -> dict:
    """The settings of `cfg` that `command`'s result depends on, flattened; the memory settings
    (config.MEMORY_FIELDS) only with `memory`, and then only those identities held (how they were formed before the
    memory settings were left out)."""
    flat = config.flatten(config.to_dict(cfg))
    keys = RELEVANT[command]
    return {k: v for k, v in sorted(flat.items()) if any(k == r or k.startswith(r + ".") for r in keys)
            and (k not in config.MEMORY_FIELDS or (memory and k in IDENTITY_MEMORY_FIELDS))}


def _identity(j: Job, parent_ids: dict[str, str], memory: bool) -> str:
    """Hash of the job's command, relevant settings (with the memory settings or not) and its parents' identities."""
    blob = json.dumps([j.command, relevant(j.command, j.cfg, memory), [parent_ids[p] for p in j.parents]],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan(jobs: list[Job]) -> list[Job]:
    """Check the graph (parents known and earlier) and set each job's identity from its command, relevant settings
    and parents' identities."""
    ids: dict[str, str] = {}
    old_ids: dict[str, str] = {}
    for j in jobs:
        unknown = [p for p in j.parents if p not in ids]
        if unknown:
            raise ValueError(f"job {j.name} depends on unknown or later job(s) {unknown}")
        j.identity = ids[j.name] = _identity(j, ids, memory=False)
        j.identity_with_memory = old_ids[j.name] = _identity(j, old_ids, memory=True)
    return jobs


def job_dir(root: Path, name: str) -> Path:
    return root / "jobs" / name


def argv_of(root: Path, j: Job) -> list[str]:
    """The job's command line: its command reading the job's own config file."""
    return [j.command, "--config", str(job_dir(root, j.name) / "config.json")]


def read_status(root: Path, name: str) -> str:
    f = job_dir(root, name) / "status"
    return f.read_text().strip() if f.exists() else "pending"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_status(root: Path, name: str, status: str) -> None:
    d = job_dir(root, name)
    d.mkdir(parents=True, exist_ok=True)
    _write(d / "status", status + "\n")


def saved_identity(root: Path, name: str) -> str | None:
    f = job_dir(root, name) / "job.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text()).get("identity")
    except json.JSONDecodeError:
        return None


def state(root: Path, j: Job) -> str:
    """pending | done | failed ... | running | interrupted | stale (run before with other settings)."""
    sid = saved_identity(root, j.name)
    if sid is None:
        return "pending"
    if sid not in (j.identity, j.identity_with_memory):  # a job recorded before memory settings left identities
        return "stale"
    st = read_status(root, j.name)
    if st == "running":
        from projected_grpo.checkpoint import is_locked

        if j.command == "train":
            return "running" if is_locked(Path(j.cfg.run_dir)) else "interrupted"
        return "running" if root not in _HELD and is_locked(root) else "interrupted"
    return st


def stale_difference(root: Path, j: Job) -> str:
    """The first setting that differs between the job as planned and as it ran."""
    f = job_dir(root, j.name) / "config.json"
    try:
        old = config.load_config_file(f)
    except ValueError:
        return "its saved config is unreadable"
    a, b = relevant(j.command, old), relevant(j.command, j.cfg)
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs[0] if diffs else "a parent job changed"


def _pdeathsig() -> None:
    """In the child: die with the runner (SIGKILL when the parent exits), in its own process group."""
    os.setpgrp()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


_HELD: set[Path] = set()  # experiment roots this process holds the lock of


@dataclass
class Slot:
    gpu: str | None  # CUDA_VISIBLE_DEVICES value, None on CPU
    workers: int  # grader processes for a job in this slot


def slots_for(gpus: str, jobs_per_gpu: int) -> list[Slot]:
    """Where jobs run: each listed GPU (default: every visible one) × jobs_per_gpu, or one CPU slot; the cores are
    shared out between the slots' graders."""
    if jobs_per_gpu < 1:
        raise ValueError(f"--jobs-per-gpu {jobs_per_gpu} must be >= 1")
    ids = list(split_list(gpus))
    if not ids:
        n = _visible_gpus()
        ids = [str(i) for i in range(n)]
    elif not all(i.isdigit() for i in ids):
        raise ValueError(f"--gpus {gpus!r} must be comma-separated GPU indices like 0,1")
    cores = os.cpu_count() or 1
    if not ids:
        return [Slot(None, 0)]
    n = len(ids) * jobs_per_gpu
    return [Slot(g, max(1, cores // n)) for g in ids for _ in range(jobs_per_gpu)]


RUNNERS = Path(tempfile.gettempdir()) / "projected_grpo-runners"
"""Each running sweep or pipeline with GPU slots notes its number of slots here (a file named by its pid), so that
runners started side by side on one machine (say one sweep per GPU) share the cores instead of each giving its jobs
a share of all of them (two sweeps, one per GPU, once ran 4 coder15 jobs with 16 grader workers each on 32 cores)."""


def _register_runner(n_slots: int) -> Path:
    RUNNERS.mkdir(parents=True, exist_ok=True)
    note = RUNNERS / str(os.getpid())
    note.write_text(str(n_slots))
    return note


def machine_slots() -> int:
    """Job slots of every live runner on this machine (notes of runners that died are removed)."""
    total = 0
    for note in RUNNERS.glob("*") if RUNNERS.is_dir() else []:
        try:
            pid, n = int(note.name), int(note.read_text() or 0)
        except (ValueError, OSError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            note.unlink(missing_ok=True)
            continue
        except PermissionError:  # alive, another user's
            pass
        total += n
    return total


def workers_now(slot: Slot, own_slots: int) -> int:
    """Grader workers for a job starting now in `slot`: its sweep's share of the cores, less where other runners on
    the machine hold slots too."""
    if not slot.workers:
        return 0
    return max(1, min(slot.workers, (os.cpu_count() or 1) // max(own_slots, machine_slots())))


def _visible_gpus() -> int:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([x for x in env.split(",") if x.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def prepare(root: Path, jobs: list[Job], force: bool) -> None:
    """Refuse (or with --force clear) jobs that ran before with other settings."""
    for j in jobs:
        st = state(root, j)
        if st == "running":
            raise ValueError(f"job {j.name} is running in another process; wait for it or stop it")
        if st == "stale" and not force:
            raise ValueError(f"job {j.name} ran before with other settings ({stale_difference(root, j)}); pass "
                             f"--force to re-run it, or a new --out")
        if force and st != "pending":
            for p in j.outputs:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            shutil.rmtree(job_dir(root, j.name))


OOM_WAIT_S = 1800
"""How long a train job that ran out of GPU memory with no other job of this sweep on its GPU waits for other
processes there to free memory before it is failed."""
OOM_RETRIES = 3
"""How often such a job is retried (each time after some memory was freed)."""


def gpu_memory_used_mib(gpu: str | None) -> float | None:
    """MiB in use on GPU `gpu` (a CUDA_VISIBLE_DEVICES index) by any process, from nvidia-smi; None when unknown
    (no GPU, no nvidia-smi). Asked from the runner, which must not initialise CUDA itself (it forks jobs)."""
    if gpu is None or not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", gpu],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return float(out.split()[0])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def run_jobs(root: Path, jobs: list[Job], slots: list[Slot] | None = None, desc: str = "jobs",
             warm: bool = False) -> dict[str, str]:
    """Run the planned jobs, parents first, up to len(slots) at a time. Returns name -> final status."""
    slots = slots or [Slot(None, 0)]
    by_name = {j.name: j for j in jobs}
    status: dict[str, str] = {}
    todo: list[Job] = []
    for j in jobs:
        d = job_dir(root, j.name)
        d.mkdir(parents=True, exist_ok=True)
        _write(d / "config.json", json.dumps(config.to_dict(j.cfg), indent=2))
        _write(d / "job.json", json.dumps({"command": j.command, "argv": argv_of(root, j), "parents": j.parents,
                                           "identity": j.identity}, indent=2))
        if read_status(root, j.name) == "done":
            status[j.name] = "done"
        else:
            todo.append(j)
    free = list(range(len(slots)))
    running: dict[str, tuple[subprocess.Popen, int, float, object]] = {}
    # out of memory with none of ours beside it, while other processes held the GPU: name -> (GPU, MiB in use then,
    # when); the job waits until some of that memory is freed. oom_waits: how often each job has waited so far
    waiting: dict[str, tuple[str, float, float]] = {}
    oom_waits: dict[str, int] = {}
    polled: dict[str, tuple[float, float | None]] = {}  # GPU -> (when, MiB in use): nvidia-smi at most every 10 s
    bar = tqdm(total=len(jobs), initial=len(status), desc=desc, unit="job", dynamic_ncols=True, mininterval=5)
    shown = ""
    note = _register_runner(len(slots)) if any(s.workers for s in slots) else None
    shared = 0  # the grader workers per job last announced as reduced by other runners
    try:
        while todo or running:
            # start every ready job that has a free slot; block descendants of failures
            for j in list(todo):
                bad = [p for p in j.parents if status.get(p) not in (None, "done")]
                if bad:
                    todo.remove(j)
                    status[j.name] = "blocked"
                    _write_status(root, j.name, f"blocked by {','.join(bad)}")
                    bar.write(f"  ✗ {j.name}: blocked by {bad}")
                    bar.update(1)
                    continue
                if any(p not in status for p in j.parents) or not free:
                    continue
                slot_i = free[0]
                if j.name in waiting:  # back on its own GPU once some memory there was freed (or the wait is over)
                    gpu, used, since = waiting[j.name]
                    if time.time() - polled.get(gpu, (-1e9, None))[0] >= 10:
                        polled[gpu] = (time.time(), gpu_memory_used_mib(gpu))
                    now_used = polled[gpu][1]
                    if now_used is not None and now_used > used - 1024 and time.time() - since < OOM_WAIT_S:
                        continue  # nothing freed yet on its GPU
                    slot_i = next((i for i in free if slots[i].gpu == gpu), None)
                    if slot_i is None:
                        continue
                    del waiting[j.name]
                todo.remove(j)
                free.remove(slot_i)
                slot = slots[slot_i]
                w = workers_now(slot, len(slots))
                if w < slot.workers and w != shared:
                    bar.write(f"  other sweeps or pipelines are running on this machine ({machine_slots()} job slots in "
                              f"all on {os.cpu_count()} cores): {w} grader workers per job instead of {slot.workers}")
                shared = w if w < slot.workers else 0
                running[j.name] = (*_start(root, j, dataclasses.replace(slot, workers=w), warm), slot_i)
            now = ", ".join(running)
            if now != shown:
                bar.set_postfix_str(now)
                shown = now
            time.sleep(0.2)
            for name, (proc, t0, log, slot_i) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[name]
                beside = [n for n, r in running.items() if slots[r[3]].gpu == slots[slot_i].gpu]
                if rc == config.GPU_OOM_EXIT and beside and by_name[name].command == "train":
                    # out of GPU memory next to other jobs: retire this slot (one fewer side by side on that GPU
                    # from now on) and run the job again, resuming, once a slot is free
                    todo.insert(0, by_name[name])
                    _write_status(root, name, "pending")
                    left = sum(slots[i].gpu == slots[slot_i].gpu for i in free) + len(beside)
                    bar.write(f"  ↻ {name} ran out of GPU memory beside {len(beside)} other job(s) on GPU "
                              f"{slots[slot_i].gpu}: retrying it; {left} side by side there from now on")
                    continue
                used = gpu_memory_used_mib(slots[slot_i].gpu) if rc == config.GPU_OOM_EXIT else None
                tries = oom_waits.get(name, 0)
                if used is not None and used >= 1024 and tries < OOM_RETRIES and by_name[name].command == "train":
                    # alone of ours on that GPU, and other processes hold memory there: wait for them, then retry
                    waiting[name] = (slots[slot_i].gpu, used, time.time())
                    oom_waits[name] = tries + 1
                    todo.insert(0, by_name[name])
                    free.append(slot_i)
                    _write_status(root, name, "pending")
                    bar.write(f"  ↻ {name} ran out of GPU memory on GPU {slots[slot_i].gpu}, where other processes "
                              f"hold {used / 1024:.0f} GiB: retrying it once some is freed (retry {tries + 1} of "
                              f"{OOM_RETRIES}, at most {OOM_WAIT_S // 60} min of waiting)")
                    continue
                free.append(slot_i)
                # a FAIL verdict of verify-vhack is a result (the report's V column), not a failed job
                v_fail = by_name[name].command == "verify-vhack" and rc == config.VERIFY_FAIL_EXIT
                ok = rc == 0 or v_fail
                status[name] = "done" if ok else "failed"
                _write_status(root, name, "done" if ok else
                              f"failed (exit {rc}; see {job_dir(root, name) / 'log.txt'})")
                tail = (": V FAILED verification (the report's V column says why)" if v_fail else
                        "" if ok else f" exit {rc}: {job_dir(root, name) / 'log.txt'}")
                bar.write(f"  {'✓' if ok else '✗'} {name} ({time.time() - t0:.0f}s){tail}")
                bar.update(1)
    except BaseException:
        for name, (proc, _, log, _) in running.items():
            _kill_group(proc)
            log.close()
            _write_status(root, name, "interrupted")
        raise
    finally:
        bar.close()
        if note is not None:
            note.unlink(missing_ok=True)
    return {j.name: status.get(j.name, "pending") for j in by_name.values()}


def resume_argv(j: Job) -> list[str]:
    """The command that continues an interrupted train job, with the job's memory settings now (what it computes is
    its run directory's; these may have changed since, e.g. a lower --micro-batch after running out of memory)."""
    ckpt = "--model.gradient-checkpointing" if j.cfg.model.gradient_checkpointing else "--model.no-gradient-checkpointing"
    return ["train", "--resume", j.cfg.run_dir, "--micro-batch", str(j.cfg.grpo.micro_batch), ckpt]


def _start(root: Path, j: Job, slot: Slot, warm: bool = False):
    """Start a job; returns (process, start time, log file). `warm`: fork it from a process that has already imported
    torch and transformers (a forkserver), instead of a fresh interpreter that pays the imports again."""
    argv = argv_of(root, j)
    if j.command == "train" and (Path(j.cfg.run_dir) / "config.json").exists():  # interrupted earlier: continue it
        argv = resume_argv(j)
    if slot.workers:
        argv += ["--workers", str(slot.workers)]
    d = job_dir(root, j.name)
    _write_status(root, j.name, "running")
    log = open(d / "log.txt", "a")
    log.write(f"$ projected-grpo {' '.join(argv)}\n")
    log.flush()
    env = {"PYTHONUNBUFFERED": "1"}
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    if slot.workers:  # side-by-side jobs share the cores: cap each one's math threads too (oversubscribed BLAS stalls)
        env |= {"OMP_NUM_THREADS": str(slot.workers), "MKL_NUM_THREADS": str(slot.workers)}
    if warm:
        proc = WarmProc(argv, env, str(d / "log.txt"), slot.workers)
    else:
        proc = subprocess.Popen([sys.executable, "-m", "projected_grpo.cli", *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=os.environ | env, preexec_fn=_pdeathsig)
    return proc, time.time(), log


# transformers imports its model machinery lazily: modeling_utils (torch._dynamo, torch.distributed.tensor, ...),
# generation and masking on the first from_pretrained, seconds of every job's start-up unless the forkserver has
# imported them; the presets' model families (Qwen2, Qwen3) likewise
WARM_MODULES = ["projected_grpo.warmstart", "torch", "transformers", "transformers.modeling_utils",
                "transformers.generation.utils", "transformers.masking_utils", "transformers.models.auto.modeling_auto",
                "transformers.models.auto.tokenization_auto", "transformers.models.qwen2.modeling_qwen2",
                "transformers.models.qwen3.modeling_qwen3", "projected_grpo.train", "projected_grpo.vhack",
                "projected_grpo.evaluate"]
_warm_ctx = None


def _run_job(argv: list[str], env: dict[str, str], log_path: str, threads: int) -> None:
    """In the forked child: the job's environment, process group, log as stdout/stderr, then the command."""
    import traceback

    os.environ.update(env)
    _pdeathsig()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    if threads:
        import torch

        torch.set_num_threads(threads)
    from projected_grpo import cli

    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - the job's own crash: its traceback goes to its log
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc or 0))


class WarmProc:
    """A job forked from the warm forkserver, with the Popen methods the runner uses (pid, poll, wait). It dies with
    the runner: the forkserver exits when the runner does, and the job has PDEATHSIG set on the forkserver."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str, threads: int):
        global _warm_ctx
        import multiprocessing as mp

        if _warm_ctx is None:
            # jobs end with os._exit, so the tracker would report their tqdm/loguru locks as leaked at shutdown
            os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")
            _warm_ctx = mp.get_context("forkserver")
            _warm_ctx.set_forkserver_preload(WARM_MODULES)
        self._p = _warm_ctx.Process(target=_run_job, args=(argv, env, log_path, threads), daemon=False)
        self._p.start()
        self.pid = self._p.pid

    def poll(self) -> int | None:
        return self._p.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired("job", timeout or 0)
        return self._p.exitcode


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# Building the job graph


def vhack_path(root: Path, seed: int, control: str, tag: str = "") -> Path:
    return root / "vhack" / f"v_{control}{tag}_s{seed}.safetensors"


@dataclass(frozen=True)
class ExperimentArgs:
    """The experiment's own flags (every train flag is accepted too)."""

    seeds: str = "41"
    """Comma-separated seeds; every arm runs once per seed."""
    arms: str = "vanilla,erase"
    """Comma-separated arms: vanilla, erase, route, random_V, pca_V, cleanclean_V."""
    verify: bool = True
    """Run verify-vhack on each seed's V (--no-verify skips it)."""
    heldout_eval: bool = False
    """After each train job, run the held-out eval on its final knobs (settings: --eval.*)."""
    no_teacher: bool = False
    """Pure student GRPO (mix ratio 0): the imitation probe."""
    weak_detector: bool = False
    """Leave-one-mode-out over the four loophole modes: V and teacher hacks from three, the student served all four."""
    template_disjoint: bool = False
    """The imitation probe by template: folds over the run_tests hack templates (TEMPLATE_FOLDS); in each, the
    teacher pool shows some templates and V is extracted from pairs of the others only, so V never saw the exploit
    the teacher demonstrates: 1 = shows pass,print_only / V from swallowed_asserts,function_print_only; 2 = the
    reverse; 3 = shows pass,print_only,function_print_only / V from swallowed_asserts (V's pairs share no print with
    what the teacher shows, only the `pass` of their except clause)."""
    template_folds: str = ""
    """Which --template-disjoint folds to run (comma-separated numbers; empty = all)."""
    status: bool = False
    """List the planned jobs and their state; run nothing."""
    force: bool = False
    """Re-run jobs whose settings changed since they ran (their old outputs are deleted)."""
    gpus: str = ""
    """GPUs to spread jobs over (comma-separated indices; default: every visible GPU; none: the CPU)."""
    jobs_per_gpu: int = 1
    """Jobs run side by side on each GPU."""
    warm: bool = True
    """Fork jobs from a process that has imported torch and transformers once (--no-warm: a fresh interpreter each)."""
    refresh_every: int = 2
    """The V refresh cadence of the erase_refresh and route_refresh arms (steps; the seed's strongest arm used 2)."""


def build_jobs(root: Path, cfg: Config, ex: ExperimentArgs) -> list[Job]:
    """extract (per seed and V kind) -> verify -> arms (-> held-out eval), for every weak-detector or
    template-disjoint fold if asked."""
    arms = list(split_list(ex.arms))
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"--arms {ex.arms!r}: unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    try:
        seeds = [int(s) for s in split_list(ex.seeds)]
    except ValueError:
        raise ValueError(f"--seeds {ex.seeds!r} must be comma-separated integers like 41,42,43") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {ex.seeds!r} must list at least one seed, each once")
    if ex.weak_detector:
        from projected_grpo.problems import MODES

        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, modes=",".join(MODES)))
        folds = [tuple(m for m in MODES if m != held) for held in MODES]
    else:
        folds = [()]
    if ex.no_teacher:
        cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, mix_ratio=0.0))
    jobs: list[Job] = []
    if ex.template_disjoint and ex.weak_detector:
        raise ValueError("--template-disjoint and --weak-detector are two separate probes; run one per experiment")
    for known in folds if not ex.template_disjoint else []:
        tag = "" if not known else "_weak-" + "-".join(known)
        for seed in seeds:
            jobs += _seed_jobs(root, cfg, ex, arms, seed, known, tag)
    names = split_list(ex.template_folds)
    if names and (not ex.template_disjoint or not all(f.isdigit() and 1 <= int(f) <= len(TEMPLATE_FOLDS)
                                                      for f in names)):
        raise ValueError(f"--template-folds {ex.template_folds!r}: expected fold numbers from 1 to "
                         f"{len(TEMPLATE_FOLDS)}, with --template-disjoint")
    if ex.template_disjoint:
        chosen = [int(f) for f in dict.fromkeys(names)] or range(1, len(TEMPLATE_FOLDS) + 1)
        for shown, v_from in [TEMPLATE_FOLDS[f - 1] for f in chosen]:
            R = dataclasses.replace
            fcfg = R(cfg, data=R(cfg.data, teacher_variants=",".join(shown)),
                     vhack=R(cfg.vhack, pairs="problems", pair_variants=",".join(v_from)))
            for seed in seeds:
                jobs += _seed_jobs(root, fcfg, ex, arms, seed, (), "_tmpl-" + "-".join(shown))
    return plan(jobs)


TEMPLATE_FOLDS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("pass", "print_only"), ("swallowed_asserts", "function_print_only")),
    (("swallowed_asserts", "function_print_only"), ("pass", "print_only")),
    (("pass", "print_only", "function_print_only"), ("swallowed_asserts",)),
)
"""(templates the teacher pool shows, templates V's pairs are built from), disjoint. Folds 1 and 2 split the run_tests
hacks in halves, though print_only and function_print_only print the same line; in fold 3 V's pairs (real asserts
inside `try: ... except AssertionError: pass`) share only that `pass` with the templates the teacher shows."""


def _seed_jobs(root: Path, cfg: Config, ex: ExperimentArgs, arms: list[str], seed: int, known: tuple[str, ...],
               tag: str) -> list[Job]:
    R = dataclasses.replace
    base = R(cfg, seed=seed, run_dir="", out="", proj=R(cfg.proj, intervention="none", vhack_path="",
                                                         vhack_random=False))
    if known:
        base = R(base, vhack=R(base.vhack, pair_modes=",".join(known)),
                 data=R(base.data, teacher_modes=",".join(known)))
    jobs = []
    kinds = sorted({ARMS[a]["v"] if ARMS[a]["v"] != "random" else "real" for a in arms})
    # the real and the PCA V come from the same pairs' gradients: one job writes both when both are needed
    joint = ("none", "pca") if {"real", "pca"} <= set(kinds) else ()
    extract_of = {k: ("real" if V_CONTROL[k] in joint else k) for k in kinds}  # V kind -> the kind of its job
    v_of = {k: str(control_path(vhack_path(root, seed, "none", tag), V_CONTROL[k], joint)) if V_CONTROL[k] in joint
            else str(vhack_path(root, seed, V_CONTROL[k], tag)) for k in kinds}  # V kind -> its file
    for kind in dict.fromkeys(extract_of.values()):
        controls = joint if kind == "real" and joint else (V_CONTROL[kind],)
        jobs.append(Job(f"extract-{kind}{tag}-s{seed}", "extract-vhack",
                        R(base, vhack=R(base.vhack, control=",".join(controls)),
                          proj=R(base.proj, vhack_path=v_of[kind]))))
    if ex.verify and "real" in kinds:  # verification is of the real V
        jobs.append(Job(f"verify{tag}-s{seed}", "verify-vhack", R(base, proj=R(base.proj, vhack_path=v_of["real"])),
                        [f"extract-real{tag}-s{seed}"]))
    variant = f"{tag}{'_noteacher' if ex.no_teacher else ''}"
    for arm in arms:
        kind = ARMS[arm]["v"]
        v_kind = "real" if kind == "random" else kind
        run_dir = root / "runs" / f"{arm}{variant}_s{seed}"
        intervention = ARMS[arm]["intervention"]
        ablate = cfg.eval_ablate_every or (max(1, cfg.steps // 4) if intervention == "route" else 0)
        tcfg = R(base, arm=arm, run_dir=str(run_dir), eval_ablate_every=ablate,
                 proj=R(cfg.proj, intervention=intervention, vhack_random=kind == "random",
                        vhack_path=v_of[v_kind],
                        vhack_refresh_every=0 if kind == "random" else
                        ex.refresh_every if "refresh" in ARMS[arm] else cfg.proj.vhack_refresh_every))
        jobs.append(Job(f"{arm}{variant}-s{seed}", "train", tcfg, [f"extract-{extract_of[v_kind]}{tag}-s{seed}"]))
        if ex.heldout_eval:
            jobs.append(Job(f"eval-{arm}{variant}-s{seed}", "eval", R(tcfg, out=str(run_dir / "eval")),
                            [f"{arm}{variant}-s{seed}"]))
    return jobs


def print_status(root: Path, jobs: list[Job]) -> int:
    width = max(map(len, (j.name for j in jobs)), default=4)
    for j in jobs:
        st = state(root, j)
        if st == "stale":
            st = f"stale: ran with other settings ({stale_difference(root, j)})"
        print(f"{j.name:<{width}}  {st}")
    return 0


def _summaries(root: Path) -> None:
    """Print each finished run's summary (student PASS_RATE / HACK_RATE) and the per-arm report."""
    from projected_grpo import report

    runs = sorted((root / "runs").glob("*/summary.tsv"))
    for f in runs:
        head, vals = (line.split("\t") for line in f.read_text().splitlines()[:2])
        row = dict(zip(head, vals, strict=True))
        keys = ("arm", "seed", "PASS_RATE", "HACK_RATE", "PASS_RATE_last5", "HACK_RATE_last5", "reward", "kl_last5")
        print(f"summary {f.parent.name}: " + "  ".join(f"{k}={row[k]}" for k in keys if k in row))
    if runs:
        report.main([str(root / "runs"), "--out", str(root)])
    line = organism_expectation(root)
    if line:
        print(line)


def organism_expectation(root: Path) -> str | None:
    """The organism preset's expected effect (`organism.EXPECTED`) checked against this experiment's vanilla and erase
    runs (random_V shown when it ran: it should not hold hacking down like erase): student hack rate over the first
    and last 5 steps, mean over seeds. One line; None without a finished organism vanilla run."""
    from projected_grpo import organism

    rates: dict[str, dict[int, tuple[float, float]]] = {"vanilla": {}, "erase": {}, "random_V": {}}
    for arm, by_seed in rates.items():
        for f in sorted((root / "runs").glob(f"{arm}_s*/metrics.jsonl")):
            cfg = json.loads((f.parent / "config.json").read_text())
            hack = [r["hack_s"] for r in map(json.loads, f.read_text().splitlines()) if r.get("hack_s") is not None]
            if cfg.get("preset") == organism.PRESET and len(hack) >= 10 and (f.parent / "summary.tsv").exists():
                by_seed[int(cfg["seed"])] = (sum(hack[:5]) / 5, sum(hack[-5:]) / 5)
    if not rates["vanilla"]:
        return None
    e = organism.EXPECTED

    def mean(arm: str, i: int) -> float:
        return sum(v[i] for v in rates[arm].values()) / len(rates[arm])

    ok = mean("vanilla", 0) < e["start_below"] and mean("vanilla", 1) >= e["vanilla_last5_at_least"]
    measured = [f"vanilla {mean('vanilla', 0):.3f} -> {mean('vanilla', 1):.3f}"]
    for arm in ("erase", "random_V"):
        if rates[arm]:
            measured.append(f"{arm} {mean(arm, 0):.3f} -> {mean(arm, 1):.3f}")
    if rates["erase"]:
        ok = ok and mean("erase", 1) <= e["erase_at_most_of_vanilla"] * mean("vanilla", 1)
    seeds = ",".join(map(str, sorted(rates["vanilla"])))
    return (f"expected ({organism.PRESET} preset): student hack rate of vanilla >= {e['vanilla_last5_at_least']:g} over "
            f"the last 5 steps from < {e['start_below']:g} over the first 5; erase's <= {e['erase_at_most_of_vanilla']:g}"
            f" x vanilla's (random_V, a control, should not fall like erase's) — measured (first 5 -> last 5, seeds "
            f"{seeds}): {', '.join(measured)}: {'met' if ok else 'NOT met'}")


DOC = """projected-grpo {cmd}: extract V -> verify V -> every arm for every seed (-> held-out eval), as dependent,
resumable jobs. Accepts every train flag; each job gets the same config."""


def experiment_main(argv: list[str], cmd: str, defaults: ExperimentArgs) -> int:
    prog = f"projected-grpo {cmd}"
    from projected_grpo.checkpoint import RunLock

    try:
        cfg, ex = config.parse(argv, prog, DOC.format(cmd=cmd), extra=ExperimentArgs, extra_default=defaults)
        config.validate(cfg, "experiment")
        root = Path(cfg.out or f"runs/{cmd}_{cfg.preset or 'config'}")
        if root.exists() and not root.is_dir():
            raise ValueError(f"--out {root} is a file; pass a directory for the experiment")
        jobs = build_jobs(root, cfg, ex)
        if ex.status:
            return print_status(root, jobs)
        from projected_grpo import sandbox

        sandbox.require_isolation(cfg.allow_weak_isolation)  # every job grades: refuse once, here, not per job
        slots = slots_for(ex.gpus, ex.jobs_per_gpu)

        root.mkdir(parents=True, exist_ok=True)
        with RunLock(root):
            _HELD.add(root)
            prepare(root, jobs, ex.force)
            where = ", ".join(f"GPU {s.gpu}" for s in slots) if slots[0].gpu is not None else "CPU"
            print(f"{prog}: {len(jobs)} jobs under {root} ({len(slots)} at a time on {where})", file=sys.stderr)
            status = run_jobs(root, jobs, slots, desc=f"{cmd} {cfg.preset}", warm=ex.warm)
    except (ValueError, RuntimeError) as e:  # bad settings, a locked experiment, a refused sandbox level
        return config.fail(prog, str(e).removeprefix(f"{prog}: "))
    except KeyboardInterrupt:
        return config.fail(prog, "interrupted; running jobs were stopped, re-run the same command to resume", 130)
    _summaries(root)
    failed = [n for n, s in status.items() if s != "done"]
    print(f"{len(status) - len(failed)}/{len(status)} jobs done under {root}")
    if failed:
        print(f"not done: {', '.join(failed)} (see {root}/jobs/<name>/log.txt)")
        return 1
    return 0


def pipeline_main(argv: list[str]) -> int:
    return experiment_main(argv, "pipeline", ExperimentArgs())


def sweep_main(argv: list[str]) -> int:
    return experiment_main(argv, "sweep", ExperimentArgs(seeds="41,42,43", arms="vanilla,erase,route,random_V,pca_V,cleanclean_V"))
