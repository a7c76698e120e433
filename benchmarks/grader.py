"""Grader throughput and sandbox overhead, against the same work run plainly in this process.

For each problem of the split: the canonical solution, a wrong solution (returns 0) and a hacking one (wrong + a
run_tests that only prints), graded under the default hint (run_tests mode). The baseline execs the same code and
runs the same checks in this process (setup + program, every ground-truth assert, and for the hack its evaluator,
the evaluator with the canonical solution and with the stub), serially. Then the grader runs (full suite, the same
work as the baseline) at each isolation level with 1 worker (overhead per program = (wall - in-process wall) /
programs; also in CPU time where it can be measured, which a shared machine's load distorts less) and with one
worker per core (throughput).

Then, at the detected level, on the first --compare-limit problems: early stop (the training default: the child is
killed at the first failing test) against the full suite, each as a ratio to the full suite measured in the same
run, for the three variants above and a wrong program with expensive tests ("slow_wrong": the canonical solution,
but every call burns 50 ms of CPU and returns None, so ~100 tests run into the 3 s limit). Per variant and mode:
programs/s with one worker per core, wall and CPU per program with 1 worker, and the tail of the per-program wall
time (p50/p99 of Grade.wall_s). Last, the harness sent precompiled (marshalled code objects) against sent as
source: each problem's main job through sandbox.run, 4 interleaved rounds, wall, the child's CPU and the parent's
CPU to build the program. Then (at level userns) fork servers against fresh interpreters: every variant of every
problem graded both ways in the same run, interleaved rounds, per program the CPU time (this process and every
sandbox process, servers included: they are stopped and reaped after each round) minus the in-process baseline's,
wall time with 1 worker, programs/s with one worker per core, and whether every verdict is identical. Prints
tables, then one JSON line.

    python benchmarks/grader.py [--problems ../shared/data/leetcode/leetcode_test_medhard.jsonl] [--limit N]
        [--compare-limit 24] [--only-compare] [--only-forkserver] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import resource
import subprocess
import sys
import time

from projected_grpo import grader, sandbox
from projected_grpo.grader import demo_completions, extract_code, find_test_func, grade_batch, stub_solution
from projected_grpo.problems import Problem, load_problems

VARIANTS = ("canonical", "wrong", "hack_run_tests")
WANT = {"canonical": "correct", "wrong": "incorrect", "hack_run_tests": "reward_hack", "slow_wrong": "incorrect"}
COMPARE = (*VARIANTS, "slow_wrong")
BURN_S = 0.05  # CPU seconds each call of slow_wrong burns


def completion(problem: Problem, variant: str) -> str:
    if variant != "slow_wrong":
        return demo_completions(problem)[variant]
    return grader.fence(problem.canonical_solution + (
        f"\n\nimport time as _t\n\n\nclass Solution(Solution):\n    def {problem.method}(self, *args, **kwargs):\n"
        f"        _end = _t.perf_counter() + {BURN_S}\n        while _t.perf_counter() < _end:\n            pass\n"
        f"        return None\n"))


def _exec_checks(problem: Problem, code: str) -> None:
    """What the grader checks, done plainly: exec the program, run each assert, call the evaluator if any."""
    ns: dict = {}
    exec(problem.setup_code, ns)
    exec(code, ns)
    for t in problem.tests:
        try:
            exec(t.source, ns)
        except Exception:  # a failed test is an outcome here, as in the grader
            pass
    tf = find_test_func(code, "run_tests")
    if tf is None:
        return
    for base in (code, problem.canonical_solution, stub_solution(problem.method)):
        env: dict = {}
        exec(problem.setup_code, env)
        exec(base if base is code else grader._with_test_func(base, tf), env)
        try:
            eval(tf.call, env)
        except Exception:  # a failing evaluator is an outcome too
            pass


def _cpu() -> float:
    """CPU seconds of this process and of its reaped children (the sandboxes): robust to other load, unlike wall."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def in_process(problems: list[Problem], variant: str) -> tuple[float, float]:
    """(wall, cpu) seconds to do the grader's checks plainly in this process, serially."""
    codes = [extract_code(demo_completions(p)[variant]) for p in problems]
    t0, c0 = time.perf_counter(), _cpu()
    with contextlib.redirect_stdout(io.StringIO()):  # the hack prints its marker
        for p, code in zip(problems, codes, strict=True):
            _exec_checks(p, code)
    return time.perf_counter() - t0, _cpu() - c0


def fresh_interpreter_ms(setup_code: str, n: int = 20) -> float:
    """The floor of any fresh-process design: start the interpreter as the sandbox does and run the setup code's
    imports, nothing else (no sandbox, no harness)."""
    argv = [sandbox._python(), "-I", "-S", "-B", "-X", "utf8", "-c", setup_code]
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(argv, check=True)
    return (time.perf_counter() - t0) / n * 1000


def graded(problems: list[Problem], variant: str, level: str, workers: int, full_suite: bool = True
           ) -> tuple[float, float, list[grader.Grade]]:
    """(wall, cpu) seconds and the grades of one variant under the run_tests hint."""
    texts = [completion(p, variant) for p in problems]
    hints = [grader.mode_hint("run_tests", p) for p in problems]
    t0, c0 = time.perf_counter(), _cpu()
    grades = grade_batch(problems, texts, hints, workers=workers, isolation=level, full_suite=full_suite)
    return time.perf_counter() - t0, _cpu() - c0, grades


def sandboxed(problems: list[Problem], variant: str, level: str, workers: int) -> tuple[float, float, int, int]:
    """(wall, cpu) seconds, programs with an unexpected label, timeouts (full suite: the baseline's work)."""
    wall, cpu, grades = graded(problems, variant, level, workers)
    return wall, cpu, sum(g.label != WANT[variant] for g in grades), sum(g.timed_out for g in grades)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else float("nan")


def early_vs_full(problems: list[Problem], level: str, cores: int) -> tuple[list[tuple], dict]:
    """Early stop against the full suite, per variant; every early number also as a ratio to the full one.
    Overhead per program = (1-worker wall - in-process wall of the full checks) / programs (not for slow_wrong,
    whose in-process run would take ~5 s a problem)."""
    rows, out = [], {}
    n = len(problems)
    for variant in COMPARE:
        in_proc = in_process(problems, variant)[0] / n * 1000 if variant in VARIANTS else None
        m: dict[str, dict] = {}
        for mode in ("full", "early"):  # full first: early's ratios divide by it
            full_suite = mode == "full"
            wall_n, _, grades_n = graded(problems, variant, level, cores, full_suite)
            wall1, _, grades1 = graded(problems, variant, level, 1, full_suite)
            tails = [g.wall_s for g in grades_n + grades1]
            bad = sum(g.label != WANT[variant] for g in grades_n + grades1)
            # (no CPU time here: a killed child's CPU is not handed back to us, and early stop kills)
            m[mode] = {"programs_per_s": n / wall_n, "wall_ms_per_program_1_worker": wall1 / n * 1000,
                       "overhead_ms_per_program": None if in_proc is None else wall1 / n * 1000 - in_proc,
                       "p50_ms": _pct(tails, 0.5) * 1000,
                       "p99_ms": _pct(tails, 0.99) * 1000, "max_ms": max(tails) * 1000,
                       "timeouts": sum(g.timed_out for g in grades_n + grades1), "unexpected_labels": bad,
                       "verdicts": [(g.gt_pass, g.hinted_pass, g.label, g.reward) for g in grades1]}
        same = m["early"].pop("verdicts") == m["full"].pop("verdicts")
        out[variant] = {mode: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in d.items()}
                        for mode, d in m.items()}
        out[variant]["in_process_ms_per_program"] = None if in_proc is None else round(in_proc, 2)
        out[variant]["early_over_full"] = {k: _ratio(m["early"][k], m["full"][k]) for k in (
            "programs_per_s", "wall_ms_per_program_1_worker", "p50_ms", "p99_ms")}
        if in_proc is not None:
            out[variant]["early_over_full"]["overhead_ms_per_program"] = _ratio(
                m["early"]["overhead_ms_per_program"], m["full"]["overhead_ms_per_program"])
        out[variant]["same_verdicts_1_worker"] = same
        for mode in ("full", "early"):
            d, r = m[mode], out[variant]["early_over_full"]
            def fmt(key: str, d=d, r=r, mode=mode) -> str:
                v = d[key]
                return "n/a" if v is None else f"{v:.1f}" if mode == "full" else f"{v:.1f} ({r.get(key, 1):.2f}x)"
            rows.append((variant, mode, fmt("programs_per_s"), fmt("wall_ms_per_program_1_worker"),
                         fmt("overhead_ms_per_program"), fmt("p50_ms"), fmt("p99_ms"), f"{d['max_ms']:.0f}",
                         d["timeouts"], d["unexpected_labels"], "" if mode == "full" else "yes" if same else "NO"))
    return rows, out


def precompiled_vs_source(problems: list[Problem], level: str, repeats: int = 4) -> tuple[list[tuple], dict]:
    """The harness sent precompiled against sent as source: each problem's main job (full suite, run_tests check)
    run straight through sandbox.run, `repeats` times each, interleaved. Child CPU from getrusage(RUSAGE_CHILDREN)
    (not under bwrap, which does not hand it back); parent = building the program text (this process's CPU; the
    first round compiles each problem's test calls, later ones hit the cache, as a group's later completions do;
    both are reported)."""
    rows, out = [], {}
    n = len(problems)

    def child_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def own_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    for variant in ("canonical", "wrong"):
        runs = [[(p.setup_code, extract_code(completion(p, variant)), tuple(grader.call_source(t) for t in p.tests),
                  ("call", "run_tests()"))] for p in problems]
        acc = {pre: {"wall": 0.0, "child": 0.0, "parent": 0.0} for pre in (False, True)}
        grader._code_text.cache_clear()
        grader._calls_text.cache_clear()
        grader._compile.cache_clear()
        cold = 0.0  # the first precompiled round: every problem's test calls compiled afresh
        for round_ in range(repeats):
            for pre in (False, True):
                for r in runs:
                    c0, p0, t0 = child_cpu(), own_cpu(), time.perf_counter()
                    program = grader.harness_program(r, precompile=pre)
                    p1 = own_cpu()
                    res = sandbox.run(program, timeout=20.0, phases=2, isolation=level)
                    acc[pre]["wall"] += time.perf_counter() - t0
                    acc[pre]["child"] += child_cpu() - c0
                    acc[pre]["parent"] += p1 - p0
                    cold += (p1 - p0) if pre and round_ == 0 else 0.0
                    assert res.error is None and not res.timed_out, res.error
        ms = {pre: {k: v / (repeats * n) * 1000 for k, v in d.items()} for pre, d in acc.items()}
        cpu_ok = level != "bwrap"
        o = out[variant] = {f"{'precompiled' if pre else 'source'}_{k}_ms": round(v, 2) if cpu_ok or k != "child"
                            else None for pre, d in ms.items() for k, v in d.items()}
        o["precompiled_parent_first_round_ms"] = round(cold / n * 1000, 2)
        o["wall_ratio"] = _ratio(ms[True]["wall"], ms[False]["wall"])
        o["child_cpu_ratio"] = _ratio(ms[True]["child"], ms[False]["child"]) if cpu_ok else None
        rows.append((variant, f"{ms[False]['wall']:.1f}", f"{ms[True]['wall']:.1f} ({o['wall_ratio']:.2f}x)",
                     "n/a" if not cpu_ok else f"{ms[False]['child']:.1f}",
                     "n/a" if not cpu_ok else f"{ms[True]['child']:.1f} ({o['child_cpu_ratio']:.2f}x)",
                     f"{ms[False]['parent']:.2f}", f"{ms[True]['parent']:.2f} (first {cold / n * 1000:.2f})"))
    return rows, out


def forkserver_vs_fresh(problems: list[Problem], cores: int, rounds: int) -> tuple[list[tuple], dict]:
    """Fork servers against fresh interpreters at level userns (full suite, run_tests hint), `rounds` interleaved
    rounds each; every number of the servers also as a ratio to the fresh path's."""
    rows, out = [], {}
    n = len(problems)
    for variant in VARIANTS:
        b_cpu = in_process(problems, variant)[1]
        acc = {fs: {"cpu1": 0.0, "wall1": 0.0, "wall_n": 0.0} for fs in (False, True)}
        verdicts: dict[bool, list[list]] = {False: [], True: []}  # per round, the 1-worker run's
        for _ in range(rounds):
            for fs in (False, True):
                for workers, key in ((1, "1"), (cores, "n")):
                    sandbox.stop_servers()
                    texts = [completion(p, variant) for p in problems]
                    hints = [grader.mode_hint("run_tests", p) for p in problems]
                    t0, c0 = time.perf_counter(), _cpu()
                    grades = grade_batch(problems, texts, hints, workers=workers, isolation="userns",
                                         full_suite=True, forkserver=fs)
                    wall = time.perf_counter() - t0
                    sandbox.stop_servers()  # reaped: the servers' CPU now counts in _cpu()
                    cpu = _cpu() - c0
                    if key == "1":
                        acc[fs]["cpu1"] += cpu
                        acc[fs]["wall1"] += wall
                    else:
                        acc[fs]["wall_n"] += wall
                    if key == "1":
                        verdicts[fs].append([(g.gt_pass, g.hinted_pass, g.label, g.reward, g.test_modification,
                                              g.gt_pass_rate, g.timed_out) for g in grades])
        m = {fs: {"cpu_ms_per_program": (d["cpu1"] / rounds - b_cpu) / n * 1000,
                  "wall_ms_per_program_1_worker": d["wall1"] / rounds / n * 1000,
                  "programs_per_s": n * rounds / d["wall_n"]} for fs, d in acc.items()}
        # per round, fresh against fork server; a program that ran into the time limit on either side (a machine
        # under load) is counted apart
        differ = timed = 0
        for va, vb in zip(verdicts[False], verdicts[True], strict=True):
            for a, b in zip(va, vb, strict=True):
                timed += a != b and (a[-1] or b[-1])
                differ += a != b and not (a[-1] or b[-1])
        same = differ == 0
        o = out[variant] = {name: {k: round(v, 2) for k, v in m[fs].items()}
                            for fs, name in ((False, "fresh"), (True, "forkserver"))}
        o["in_process_cpu_ms_per_program"] = round(b_cpu / n * 1000, 2)
        o["forkserver_over_fresh"] = {k: _ratio(m[True][k], m[False][k]) for k in m[True]}
        o["same_verdicts"] = same
        o["verdicts_differing"] = differ
        o["verdicts_differing_by_a_timeout"] = timed
        r = o["forkserver_over_fresh"]
        for fs in (False, True):
            cells = [f"{m[fs][k]:.1f}" + (f" ({r[k]:.2f}x)" if fs else "") for k in (
                "cpu_ms_per_program", "wall_ms_per_program_1_worker", "programs_per_s")]
            verdict = "NO" if not same else f"yes ({timed} timeouts)" if timed else "yes"
            rows.append((variant, "fork server" if fs else "fresh", *cells, "" if not fs else verdict))
    return rows, out


def _table(head: tuple, rows: list[tuple], width: int = 15) -> None:
    print("  ".join(f"{h:>{width}}" for h in head))
    for r in rows:
        print("  ".join(f"{x:>{width}.3f}" if isinstance(x, float) else f"{x!s:>{width}}" for x in r))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default=os.path.join("..", "shared", "data", "leetcode",
                                                        "leetcode_test_medhard.jsonl"))
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems")
    ap.add_argument("--levels", default=None, help="comma-separated isolation levels (default: the best one and "
                                                     "'rlimits', i.e. with and without bubblewrap)")
    ap.add_argument("--compare-limit", type=int, default=24, help="problems for early stop vs full suite and "
                    "precompiled vs source (default 24: slow_wrong's full suite takes ~3 s a program)")
    ap.add_argument("--only-compare", action="store_true", help="skip the per-level overhead table")
    ap.add_argument("--only-forkserver", action="store_true", help="only fork servers vs fresh interpreters")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of fork servers vs fresh (default 2; 0: "
                    "only the empty run and the early-stop verdicts)")
    args = ap.parse_args()
    problems = load_problems(args.problems)[:args.limit]
    best = sandbox.isolation_level()
    levels = args.levels.split(",") if args.levels else list(dict.fromkeys([best, "rlimits"]))
    cores = grader.default_workers()
    n = len(problems)

    # warm up: the first sandbox run pays for imports and the bwrap check
    grade_batch(problems[:2], [demo_completions(p)["wrong"] for p in problems[:2]], [None, None], workers=1)
    t0 = time.perf_counter()
    for _ in range(20):
        sandbox.run("pass")
    spawn_ms = (time.perf_counter() - t0) / 20 * 1000
    floor_ms = fresh_interpreter_ms(problems[0].setup_code)

    gc.collect()
    gc.freeze()  # the loaded problems are long-lived: keep the collector from rescanning them during the baseline
    if args.only_forkserver:
        return _forkserver_main(problems, cores, args.rounds, problems[:args.compare_limit])
    base = {} if args.only_compare else {v: in_process(problems, v) for v in VARIANTS}
    rows, summary = [], {"problems": n, "cores": cores, "sandbox_run_pass_ms": round(spawn_ms, 2),
                         "fresh_interpreter_with_setup_imports_ms": round(floor_ms, 2), "levels": {}}
    for level in [] if args.only_compare else levels:
        res: dict = {}
        for variant in VARIANTS:
            wall1, cpu1, bad1, to1 = sandboxed(problems, variant, level, 1)
            wall_n, _, bad_n, to_n = sandboxed(problems, variant, level, cores)
            b_wall, b_cpu = base[variant]
            over_wall = (wall1 - b_wall) / n * 1000
            # bubblewrap does not hand its children's CPU time back to us, so CPU is measurable only without it
            over_cpu = None if level == "bwrap" else round((cpu1 - b_cpu) / n * 1000, 2)
            rows.append((level, variant, n, b_wall, wall1, over_wall, "n/a" if over_cpu is None else over_cpu,
                         wall_n, n / wall_n, bad1 + bad_n, to1 + to_n))
            res[variant] = {"in_process_s": round(b_wall, 3), "wall_1_worker_s": round(wall1, 3),
                            "overhead_ms_per_program": round(over_wall, 2), "overhead_cpu_ms_per_program": over_cpu,
                            "ratio_vs_in_process": round(wall1 / max(b_wall, 1e-9), 2),
                            f"wall_{cores}_workers_s": round(wall_n, 3), "programs_per_s": round(n / wall_n, 1),
                            "unexpected_labels": bad1 + bad_n, "timeouts": to1 + to_n}
        mine = [r for r in rows if r[0] == level]
        res["all"] = {"overhead_ms_per_program": round(sum(r[4] - r[3] for r in mine) / (3 * n) * 1000, 2),
                      "programs_per_s": round(3 * n / sum(r[7] for r in mine), 1)}
        summary["levels"][level] = res

    compare = problems[:args.compare_limit]
    cmp_rows, summary["early_stop_vs_full_suite"] = early_vs_full(compare, best, cores)
    pre_rows, summary["precompiled_vs_source"] = precompiled_vs_source(compare, best)
    summary["compare_problems"] = len(compare)

    print(f"{n} problems x {len(VARIANTS)} variants; isolation {best}. An empty sandbox run takes {spawn_ms:.1f} ms; "
          f"a bare interpreter running only the setup code's imports {floor_ms:.1f} ms (the floor of one fresh "
          f"process per program). Overhead = (1-worker wall - in-process wall) / programs; CPU overhead likewise in "
          f"CPU time (not measurable under bwrap). Timeouts are the 3 s limit under load.")
    if rows:
        _table(("level", "variant", "n", "in-proc s", "1 worker s", "overhead ms", "cpu overhead ms",
                f"{cores} workers s", "programs/s", "bad labels", "timeouts"), rows)
    for level, res in summary["levels"].items():
        print(f"{level}: overhead {res['all']['overhead_ms_per_program']:.1f} ms/program (1 worker), "
              f"{res['all']['programs_per_s']:.1f} programs/s ({cores} workers)")
    print(f"\nEarly stop vs full suite ({len(compare)} problems, isolation {best}, run_tests hint; early numbers as "
          f"(ratio to full); p50/p99/max over Grade.wall_s of the {cores}-worker and 1-worker runs):")
    _table(("variant", "mode", f"programs/s {cores}w", "wall ms/prog 1w", "overhead ms 1w", "p50 ms", "p99 ms",
            "max ms", "timeouts", "bad labels", "same verdicts"), cmp_rows, 17)
    print(f"\nHarness precompiled vs source ({len(compare)} problems' main jobs through sandbox.run, full suite, "
          f"mean of 4 interleaved rounds; per program):")
    _table(("variant", "source wall ms", "precompiled wall ms", "source child cpu", "precompiled child cpu",
            "source parent ms", "precompiled parent"), pre_rows, 21)
    print(json.dumps(summary))
    cmp_bad = any(d[m]["unexpected_labels"] > d[m]["timeouts"] or not d["same_verdicts_1_worker"]
                  for d in summary["early_stop_vs_full_suite"].values() for m in ("full", "early"))
    return 1 if any(r[9] > r[10] for r in rows) or cmp_bad else 0  # a wrong label that no timeout explains


def early_stop_verdicts(problems: list[Problem], cores: int) -> dict:
    """Early stop (the training default), fresh vs fork server, every COMPARE variant: programs whose verdict
    differs (gt_pass, hinted_pass, label, reward, test_modification, gt_pass_rate, timed_out)."""
    out = {}
    for variant in COMPARE:
        texts = [completion(p, variant) for p in problems]
        hints = [grader.mode_hint("run_tests", p) for p in problems]
        got = {fs: [(g.gt_pass, g.hinted_pass, g.label, g.reward, g.test_modification, g.gt_pass_rate, g.timed_out)
                    for g in grade_batch(problems, texts, hints, workers=cores, isolation="userns",
                                         full_suite=False, forkserver=fs)] for fs in (False, True)}
        out[variant] = {"programs": len(problems),
                        "differing": sum(a != b for a, b in zip(got[False], got[True], strict=True))}
    return out


def _forkserver_main(problems: list[Problem], cores: int, rounds: int, compare: list[Problem]) -> int:
    if "userns" not in sandbox.available_levels():
        print("fork servers need the userns level, which does not work here", file=sys.stderr)
        return 2
    empty = {}
    for fs in (False, True, False, True):  # an empty program, interleaved; servers reaped before reading the CPU
        sandbox.stop_servers()
        t0, c0 = time.perf_counter(), _cpu()
        for _ in range(50):
            sandbox.run("pass", isolation="userns", server=fs)
        sandbox.stop_servers()
        e = empty.setdefault(fs, [0.0, 0.0])
        e[0] += (time.perf_counter() - t0) / 100 * 1000
        e[1] += (_cpu() - c0) / 100 * 1000
    rows, out = forkserver_vs_fresh(problems, cores, rounds) if rounds else ([], {})
    early = early_stop_verdicts(compare, cores)
    summary = {"problems": len(problems), "cores": cores, "rounds": rounds,
               "empty_run_ms": {("forkserver" if fs else "fresh"): {"wall": round(w, 2), "cpu": round(c, 2)}
                                for fs, (w, c) in empty.items()}, "forkserver_vs_fresh": out,
               "early_stop_verdicts": early}
    print(f"Fork servers vs fresh interpreters, isolation userns, {len(problems)} problems x {len(VARIANTS)} "
          f"variants, full suite, {rounds} interleaved rounds. An empty run: fresh {empty[False][0]:.1f} ms wall / "
          f"{empty[False][1]:.1f} ms CPU, fork server {empty[True][0]:.1f} / {empty[True][1]:.1f}. CPU ms/program = "
          f"(CPU of this process and every sandbox process, 1 worker) - in-process CPU of the same checks.")
    print("Same verdicts: every program of every round, fresh vs fork server, (gt_pass, hinted_pass, label, reward, "
          "test_modification, gt_pass_rate, timed_out); differences where either side ran into the time limit are "
          "counted apart.")
    _table(("variant", "path", "cpu ms/prog", "wall ms/prog 1w", f"programs/s {cores}w", "same verdicts"), rows, 18)
    print(f"Early stop (the training default), first {len(compare)} problems, {cores} workers, fresh vs fork server: "
          + ", ".join(f"{v} {d['differing']} of {d['programs']} verdicts differ" for v, d in early.items()))
    print(json.dumps(summary))
    return 0 if all(d["same_verdicts"] for d in out.values()) and not any(
        d["differing"] for d in early.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
