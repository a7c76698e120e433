"""The fast-dev-run pipeline end to end (extract -> verify -> vanilla, erase, route, random_V, summaries printed), and
the job runner's contract: every job's command line parses, jobs are what they run, one writer per directory."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from projected_grpo import config, experiment
from projected_grpo.config import PRESETS
from projected_grpo.experiment import ExperimentArgs, build_jobs

ARMS = "vanilla,erase,route,random_V"


def _cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "projected_grpo.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    env = os.environ | {"PROJECTED_GRPO_CACHE": str(root / "cache")}
    out = _cli("pipeline", "--preset", "fast-dev-run", "--seeds", "41", "--arms", ARMS, "--out", str(root),
               "--steps", "8", "--lr", "0.04", env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, out.stdout, env


def _metrics(root: Path, arm: str) -> list[dict]:
    return [json.loads(x) for x in (root / "runs" / f"{arm}_s41" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pipeline_prints_summaries_and_every_job_shares_the_overrides(pipeline):
    root, stdout, _ = pipeline
    for arm in ARMS.split(","):
        assert f"summary {arm}_s41: arm={arm}" in stdout
        cfg = json.loads((root / "runs" / f"{arm}_s41" / "config.json").read_text())
        assert cfg["optim"]["lr"] == 0.04 and cfg["steps"] == 8  # the extra flag reached every train job
        assert cfg["provenance"]["isolation"] and cfg["provenance"]["torch"]
        assert cfg["provenance"]["grader_forkserver"] == (cfg["provenance"]["isolation"] == "userns")
    assert "| erase |" in stdout and (root / "report.tsv").exists()
    verdict = json.loads((root / "vhack" / "v_none_s41.verify.json").read_text())
    assert verdict["verdict"] in ("PASS", "FAIL") and verdict["line"]


@pytest.mark.slow
def test_erase_removes_the_hackward_gradient_and_vanilla_only_measures(pipeline):
    root, _, _ = pipeline
    van, era = _metrics(root, "vanilla"), _metrics(root, "erase")
    assert all(r["cin_t"] > 0 for r in van)  # V sees the teacher's hack gradients
    assert all(r["cout"] < 1e-5 for r in era)  # one_sided erase leaves relu(V g') = 0 in dS.grad
    assert any(r["cout"] > 1e-3 for r in van)  # vanilla measures, never edits
    # the runs share seeds: step 0 is identical before the projection changes anything
    assert van[0]["reward"] == era[0]["reward"] and van[0]["cin"] == pytest.approx(era[0]["cin"])
    assert _metrics(root, "random_V")[0]["cin"] != pytest.approx(era[0]["cin"])


@pytest.mark.slow
def test_route_logs_the_deployed_model(pipeline):
    root, _, _ = pipeline
    rt = _metrics(root, "route")
    deploy = [r for r in rt if "hack_deploy" in r]
    assert deploy and all(0 <= r["hack_deploy"] <= 1 and 0 <= r["solve_deploy"] <= 1 for r in deploy)
    assert deploy[-1]["step"] == 7  # the last step is always evaluated
    assert rt[-1]["dS_hack_norm"] > 0  # the quarantine holds what was routed


@pytest.mark.slow
def test_rerun_skips_finished_jobs_and_refuses_changed_ones(pipeline):
    root, _, env = pipeline
    out = _cli("pipeline", "--out", str(root), "--status", "--seeds", "41", "--arms", ARMS, "--steps", "8",
               "--lr", "0.04", env=env, timeout=120)
    assert re.search(r"^erase-s41 +done$", out.stdout, re.M), out.stdout
    # the same experiment with another step count is not the finished one: refused, naming the difference
    out = _cli("pipeline", "--out", str(root), "--seeds", "41", "--arms", "vanilla", "--steps", "4", "--lr", "0.04",
               env=env, timeout=120)
    assert out.returncode == 2 and "steps: 8 -> 4" in out.stderr and "--force" in out.stderr, out.stderr
    out = _cli("pipeline", "--out", str(root), "--status", "--seeds", "41", "--arms", "vanilla", "--steps", "4",
               "--lr", "0.04", env=env, timeout=120)
    assert re.search(r"^vanilla-s41 +stale", out.stdout, re.M), out.stdout


# --- fast: the job graph -----------------------------------------------------------------------------------------


def test_every_job_command_line_parses_to_the_job_config(tmp_path):
    """The contract: each job's argv, run through its command's parser, gives exactly the job's config."""
    cfg = dataclasses.replace(PRESETS["smoke"], optim=dataclasses.replace(PRESETS["smoke"].optim, lr=1e-3),
                              adapter=dataclasses.replace(PRESETS["smoke"].adapter, targets=("q_proj", "v_proj")))
    ex = ExperimentArgs(seeds="41", arms=",".join(experiment.ARMS), heldout_eval=True, weak_detector=True)
    jobs = build_jobs(tmp_path, cfg, ex)
    assert {j.command for j in jobs} == {"extract-vhack", "verify-vhack", "train", "eval"}
    for j in jobs:
        (tmp_path / "jobs" / j.name).mkdir(parents=True)
        (tmp_path / "jobs" / j.name / "config.json").write_text(json.dumps(config.to_dict(j.cfg)))
        argv = experiment.argv_of(tmp_path, j)
        assert argv[0] == j.command
        parsed, _ = config.parse(argv[1:], j.command, "")
        assert parsed == j.cfg, j.name
        assert parsed.optim.lr == 1e-3 and parsed.adapter.targets == ("q_proj", "v_proj")
        # and the flags form: what the user would type gives the same config
        again, _ = config.parse(config.to_argv(j.cfg), j.command, "")
        assert again == j.cfg, j.name


def test_job_identity_follows_what_the_job_computes(tmp_path):
    base = PRESETS["fast-dev-run"]
    a = {j.name: j.identity for j in build_jobs(tmp_path, base, ExperimentArgs(arms="vanilla,erase"))}
    more = {j.name: j.identity for j in build_jobs(tmp_path, dataclasses.replace(base, steps=99),
                                                   ExperimentArgs(arms="vanilla,erase"))}
    assert a["extract-real-s41"] == more["extract-real-s41"]  # V does not depend on the step count
    assert a["vanilla-s41"] != more["vanilla-s41"] and a["erase-s41"] != more["erase-s41"]
    shown = {j.name: j.identity for j in build_jobs(tmp_path, dataclasses.replace(base, progress=False, workers=2),
                                                    ExperimentArgs(arms="vanilla,erase"))}
    assert shown == a  # display settings are not part of what a job is
    other_model = {j.name: j.identity for j in build_jobs(
        tmp_path, dataclasses.replace(base, model=dataclasses.replace(base.model, name="elsewhere")),
        ExperimentArgs(arms="vanilla,erase"))}
    assert all(other_model[n] != a[n] for n in a)  # a new V invalidates every job built on it


def test_memory_settings_do_not_make_a_finished_job_stale_and_a_resumed_run_takes_the_new_ones(tmp_path):
    base = PRESETS["fast-dev-run"]
    R = dataclasses.replace
    ex = ExperimentArgs(arms="vanilla,erase")
    jobs = build_jobs(tmp_path, base, ex)
    for j in jobs:  # as the runner leaves finished jobs; one recorded under the identity formed before (legacy)
        d = experiment.job_dir(tmp_path, j.name)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config.to_dict(j.cfg)))
        ident = j.identity_with_memory if j.name == "erase-s41" else j.identity
        (d / "job.json").write_text(json.dumps({"identity": ident}))
        (d / "status").write_text("done\n")
    assert {experiment.state(tmp_path, j) for j in build_jobs(tmp_path, base, ex)} == {"done"}
    small = R(base, grpo=R(base.grpo, micro_batch=1), model=R(base.model, gradient_checkpointing=True))
    state = {j.name: experiment.state(tmp_path, j) for j in build_jobs(tmp_path, small, ex)}
    assert state.pop("erase-s41") == "stale"  # a legacy record names its memory settings; a re-run rewrites it
    assert set(state.values()) == {"done"}
    other = build_jobs(tmp_path, R(base, optim=R(base.optim, lr=0.5)), ex)
    assert {j.name: experiment.state(tmp_path, j) for j in other}["erase-s41"] == "stale"
    assert experiment.stale_difference(tmp_path, next(j for j in other if j.name == "vanilla-s41")) == \
        f"optim.lr: {base.optim.lr!r} -> 0.5"
    # an interrupted train job continues with the memory settings it is planned with now
    job = next(j for j in build_jobs(tmp_path, small, ex) if j.name == "vanilla-s41")
    argv = experiment.resume_argv(job)
    assert argv[:3] == ["train", "--resume", job.cfg.run_dir]
    run = Path(job.cfg.run_dir)
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config.to_dict(R(job.cfg, grpo=R(job.cfg.grpo, micro_batch=4)))))
    from projected_grpo import train

    resumed = train.resume_config(run, argv[3:], "train")
    assert resumed.grpo.micro_batch == 1 and resumed.model.gradient_checkpointing


def test_weak_detector_jobs_build_V_from_known_modes_only(tmp_path):
    jobs = build_jobs(tmp_path, PRESETS["smoke"], ExperimentArgs(arms="vanilla,erase", weak_detector=True))
    ex = next(j for j in jobs if j.name.startswith("extract") and "file_marker" not in j.name)
    tr = next(j for j in jobs if j.name == f"erase{ex.name.removeprefix('extract-real')}")
    assert ex.cfg.vhack.pair_modes == tr.cfg.data.teacher_modes == "run_tests,sentinel,stdout_marker"
    assert tr.cfg.data.modes == "run_tests,sentinel,stdout_marker,file_marker"


@pytest.mark.parametrize("bad, msg", [
    (ExperimentArgs(seeds="abc"), "--seeds 'abc' must be comma-separated integers"),
    (ExperimentArgs(arms="nuke"), "unknown arm(s) ['nuke']"),
    (ExperimentArgs(seeds="41,41"), "each once"),
])
def test_bad_experiment_arguments_are_one_line(tmp_path, bad, msg):
    with pytest.raises(ValueError) as e:
        build_jobs(tmp_path, PRESETS["fast-dev-run"], bad)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_a_second_runner_on_the_same_experiment_is_refused(tmp_path):
    from projected_grpo.checkpoint import RunLock

    with RunLock(tmp_path):
        out = _cli("pipeline", "--out", str(tmp_path), "--arms", "vanilla", timeout=120)
    assert out.returncode == 2 and "being written by another process" in out.stderr, out.stderr


@pytest.mark.slow
def test_a_killed_runner_takes_its_running_job_with_it(tmp_path):
    import signal
    import time

    from projected_grpo.checkpoint import is_locked

    env = os.environ | {"PROJECTED_GRPO_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "projected_grpo.cli", "pipeline", "--out", str(tmp_path / "x"),
                             "--arms", "vanilla", "--no-verify", "--steps", "200"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "x" / "runs" / "vanilla_s41"
    deadline = time.time() + 300
    while not is_locked(run):  # the train child holds its run's lock while it runs
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while is_locked(run):
        assert time.time() < deadline, "the train job outlived its runner"
        time.sleep(0.2)
    status = (tmp_path / "x" / "jobs" / "vanilla-s41" / "status").read_text().strip()
    assert status == "running"  # as the runner left it; the next runner sees it as interrupted and resumes it
    out = _cli("pipeline", "--out", str(tmp_path / "x"), "--arms", "vanilla", "--no-verify", "--steps", "200",
               "--status", env=env, timeout=120)
    assert re.search(r"^vanilla-s41 +interrupted$", out.stdout, re.M), out.stdout


def test_independent_jobs_run_side_by_side_and_children_wait_for_parents(tmp_path, monkeypatch):
    """Two slots: the two extract jobs start together; a train job starts only after its extract finished."""
    import time

    started: dict[str, float] = {}

    def fake_start(root, j, slot, warm=False):
        started[j.name] = time.time()
        log = open(tmp_path / f"{j.name}.log", "w")
        return subprocess.Popen(["sleep", "0.6"], stdout=log), time.time(), log

    monkeypatch.setattr(experiment, "_start", fake_start)
    jobs = build_jobs(tmp_path, PRESETS["fast-dev-run"], ExperimentArgs(seeds="41,42", arms="vanilla",
                                                                         verify=False))
    slots = [experiment.Slot("0", 1), experiment.Slot("1", 1)]
    status = experiment.run_jobs(tmp_path, jobs, slots)
    assert set(status.values()) == {"done"}
    assert abs(started["extract-real-s41"] - started["extract-real-s42"]) < 0.4  # side by side
    assert started["vanilla-s41"] >= started["extract-real-s41"] + 0.5  # after its parent
    assert all((tmp_path / "jobs" / j.name / "status").read_text().strip() == "done" for j in jobs)


def test_slots_share_the_cores_between_jobs(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    slots = experiment.slots_for("0,1", 2)
    assert [s.gpu for s in slots] == ["0", "0", "1", "1"] and all(s.workers == 4 for s in slots)
    monkeypatch.setattr(experiment, "_visible_gpus", lambda: 0)
    assert [s.gpu for s in experiment.slots_for("", 1)] == [None]
    with pytest.raises(ValueError, match="--gpus 'a' must be comma-separated GPU indices"):
        experiment.slots_for("a", 1)


def test_sweeps_running_side_by_side_on_one_machine_share_the_cores(tmp_path, monkeypatch):
    """Another live runner's slots shrink this sweep's grader workers; a dead runner's note is ignored and removed;
    this sweep's own note is gone when it ends."""
    monkeypatch.setattr(experiment, "RUNNERS", tmp_path / "runners")
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    cfg = PRESETS["fast-dev-run"]
    jobs = experiment.plan([experiment.Job(n, "train", dataclasses.replace(cfg, run_dir=str(tmp_path / n)))
                            for n in ("a", "b")])
    workers = []

    def start(root, j, slot, warm=False):
        workers.append(slot.workers)
        return _FakeJob(0, 1), 0.0, open(tmp_path / f"{j.name}.log", "w")

    monkeypatch.setattr(experiment, "_start", start)
    slots = experiment.slots_for("0", 2)
    assert [s.workers for s in slots] == [16, 16]
    (tmp_path / "runners").mkdir()
    other = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        (tmp_path / "runners" / str(other.pid)).write_text("2")
        (tmp_path / "runners" / str(dead.pid)).write_text("8")
        assert experiment.run_jobs(tmp_path, jobs, slots) == {"a": "done", "b": "done"}
        assert workers == [8, 8]  # 32 cores over this sweep's 2 slots and the other's 2
        assert sorted(p.name for p in (tmp_path / "runners").iterdir()) == [str(other.pid)]
    finally:
        other.kill()
        other.wait()
    workers.clear()
    for j in jobs:
        (tmp_path / "jobs" / j.name / "status").write_text("pending")
    assert experiment.run_jobs(tmp_path, jobs, slots) == {"a": "done", "b": "done"}
    assert workers == [16, 16]  # alone on the machine again


def test_template_disjoint_folds_show_the_teacher_one_half_and_build_V_from_the_other(tmp_path):
    jobs = build_jobs(tmp_path, PRESETS["fast-dev-run"], ExperimentArgs(arms="vanilla,erase", template_disjoint=True))
    trains = [j for j in jobs if j.command == "train"]
    assert len(trains) == 6 and all("_tmpl-" in j.name for j in jobs if j.command != "verify-vhack")
    from projected_grpo.teacher import HACK_VARIANTS

    folds = set()
    for tr in trains:
        ex = next(j for j in jobs if j.name == tr.parents[0])
        assert ex.command == "extract-vhack" and ex.cfg.proj.vhack_path == tr.cfg.proj.vhack_path
        shown = set(tr.cfg.data.teacher_variants.split(","))
        v_from = set(ex.cfg.vhack.pair_variants.split(","))
        assert ex.cfg.vhack.pairs == "problems" and shown and v_from and not shown & v_from
        assert shown | v_from == set(HACK_VARIANTS["run_tests"])
        folds.add((frozenset(shown), frozenset(v_from)))
    assert len(folds) == 3  # the two halves, each way, and the strict one
    # the strict fold: V's pairs share no line with the hacks the teacher shows but their except clause's `pass`
    from projected_grpo import problems as P
    from projected_grpo.teacher import hack_completions

    strict = next((s, v) for s, v in folds if v == {"swallowed_asserts"})
    p = P.builtin_problems()[0]
    body = {v: {ln.strip() for ln in c.split("def run_tests", 1)[-1].splitlines()[1:] if ln.strip() not in ("", "```")}
            for v, c in hack_completions(p, None)}
    assert set().union(*(body["swallowed_asserts"] & body[s] for s in strict[0])) == {"pass"}  # no print line
    assert body["print_only"] & body["function_print_only"] == {"print('All tests passed')"}  # folds 1 and 2 share it
    one = build_jobs(tmp_path, PRESETS["fast-dev-run"], ExperimentArgs(arms="vanilla", template_disjoint=True,
                                                                       template_folds="3"))
    assert {j.cfg.vhack.pair_variants for j in one if j.command == "extract-vhack"} == {"swallowed_asserts"}
    assert len([j for j in one if j.command == "train"]) == 1
    with pytest.raises(ValueError, match="two separate probes"):
        build_jobs(tmp_path, PRESETS["fast-dev-run"], ExperimentArgs(template_disjoint=True, weak_detector=True))
    for bad in ("4", "x", "0"):
        with pytest.raises(ValueError, match="--template-folds"):
            build_jobs(tmp_path, PRESETS["fast-dev-run"], ExperimentArgs(template_disjoint=True, template_folds=bad))
    with pytest.raises(ValueError, match="with --template-disjoint"):
        build_jobs(tmp_path, PRESETS["fast-dev-run"], ExperimentArgs(template_folds="1"))


class _FakeJob:
    """A started job that exits with `rc` after `polls` polls."""

    def __init__(self, rc, polls):
        self.rc, self.polls = rc, polls

    def poll(self):
        self.polls -= 1
        return self.rc if self.polls < 0 else None


def test_a_job_out_of_gpu_memory_beside_others_is_retried_with_one_fewer_side_by_side(tmp_path, monkeypatch):
    cfg = PRESETS["fast-dev-run"]
    jobs = experiment.plan([experiment.Job(n, "train", dataclasses.replace(cfg, run_dir=str(tmp_path / n)))
                            for n in ("a", "b", "c", "d")])
    # a runs long; b runs out of GPU memory beside it once; d runs out of memory even alone
    script = {"a": [(0, 6)], "b": [(config.GPU_OOM_EXIT, 1), (0, 1)], "c": [(0, 1)], "d": [(config.GPU_OOM_EXIT, 1)]}
    running, starts = set(), []

    class Log:
        def __init__(self, name):
            self.name = name

        def close(self):
            running.discard(self.name)

    def start(root, j, slot, warm=False):
        rc, polls = script[j.name].pop(0)
        starts.append((j.name, len(running)))
        running.add(j.name)
        return _FakeJob(rc, polls), 0.0, Log(j.name)

    monkeypatch.setattr(experiment, "_start", start)
    status = experiment.run_jobs(tmp_path, jobs, [experiment.Slot("0", 1), experiment.Slot("0", 1)])
    assert status == {"a": "done", "b": "done", "c": "done", "d": "failed"}
    assert [n for n, _ in starts] == ["a", "b", "b", "c", "d"]  # b again, first in line
    assert all(beside == 0 for _, beside in starts[2:])  # after the out-of-memory, one job at a time on that GPU


def test_a_job_out_of_gpu_memory_held_by_other_processes_waits_for_them_then_retries(tmp_path, monkeypatch):
    """Alone of this sweep on its GPU, a job that ran out of memory while other processes (another sweep) held the
    GPU is not failed: it waits until some of that memory is freed, then runs again; without such processes, or after
    OOM_RETRIES, it fails as before."""
    cfg = PRESETS["fast-dev-run"]
    jobs = experiment.plan([experiment.Job(n, "train", dataclasses.replace(cfg, run_dir=str(tmp_path / n)))
                            for n in ("a", "b")])
    script = {"a": [(config.GPU_OOM_EXIT, 1), (0, 1)],
              "b": [(config.GPU_OOM_EXIT, 1)] * (experiment.OOM_RETRIES + 1)}
    used = {"now": 60_000.0}  # MiB held on GPU 0 by a process outside this sweep
    starts = []

    class Log:
        def close(self):
            pass

    def start(root, j, slot, warm=False):
        rc, polls = script[j.name].pop(0)
        starts.append((j.name, used["now"]))
        return _FakeJob(rc, polls), 0.0, Log()

    polls = []

    def smi(gpu):
        polls.append(gpu)
        if len(polls) == 4:  # the other process frees its memory after a few polls
            used["now"] = 20_000.0
        return used["now"]

    monkeypatch.setattr(experiment, "_start", start)
    monkeypatch.setattr(experiment, "gpu_memory_used_mib", smi)
    monkeypatch.setattr(experiment.time, "time", iter(range(0, 10**9, 11)).__next__)  # 11 s per call: no real wait
    status = experiment.run_jobs(tmp_path, jobs[:1], [experiment.Slot("0", 1)])
    assert status == {"a": "done"}
    assert starts == [("a", 60_000.0), ("a", 20_000.0)]  # retried only once memory was freed
    starts.clear()
    status = experiment.run_jobs(tmp_path, jobs[1:], [experiment.Slot("0", 1)])
    assert status == {"b": "failed"} and len(starts) == experiment.OOM_RETRIES + 1
    monkeypatch.setattr(experiment, "gpu_memory_used_mib", lambda gpu: None)  # unknown (CPU, no nvidia-smi): fail
    script["b"] = [(config.GPU_OOM_EXIT, 1), (0, 1)]
    (tmp_path / "jobs" / "b" / "status").unlink(missing_ok=True)
    starts.clear()
    assert experiment.run_jobs(tmp_path, jobs[1:], [experiment.Slot("0", 1)]) == {"b": "failed"} and len(starts) == 1


_LOAD_AFTER_WARM_IMPORTS = """
import sys
from projected_grpo import experiment
for name in experiment.WARM_MODULES:
    __import__(name)
before = set(sys.modules)
from projected_grpo import models
from projected_grpo.config import ModelConfig
models.load(ModelConfig(name="tiny", device="cpu", cache_dir=sys.argv[1]))
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_a_warm_job_loads_its_model_without_importing_transformers_model_machinery(tmp_path):
    """The forkserver's preload covers what from_pretrained imports lazily (modeling_utils pulls in torch._dynamo and
    torch.distributed.tensor: seconds of every job's start-up otherwise), generation and masking, and the tiny
    model's family."""
    out = subprocess.run([sys.executable, "-c", _LOAD_AFTER_WARM_IMPORTS, str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    new = out.stdout.split()
    heavy = [m for m in new if m.startswith(("torch._dynamo", "torch.distributed.tensor", "transformers.modeling_utils",
                                             "transformers.models.auto", "transformers.generation",
                                             "transformers.masking_utils", "transformers.models.qwen3"))]
    assert not heavy, heavy
