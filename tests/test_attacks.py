"""Adversarial programs against the grader. None may reach gt_pass. After each one the grader still grades a correct
solution correctly and no process of the run survives. The suite runs at every level that works here (CI, as root:
bwrap, userns and uid), and on fork servers ("forkserver": level userns, sandbox.run(server=True)), whose own risks
have attacks of their own at the end. Attacks that only isolation can stop (reading the data set, the network, the host's /tmp)
run at the strong levels, each with a positive control at a level that does not stop it."""

from __future__ import annotations

import json
import os
import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest

from projected_grpo import grader, sandbox
from projected_grpo.grader import fence, grade
from projected_grpo.problems import SETUP_CODE, Hint, Problem, load_problems, parse_test

# Unprivileged levels available here; the attacks below kill(-1), fork-bomb and write files, so never "rlimits".
LEVELS = [lv for lv in sandbox.available_levels() if lv != "rlimits"]
LEVELS += ["forkserver"] if "userns" in LEVELS else []  # the userns level, each program a fork server's child
if not LEVELS:
    pytest.skip("no unprivileged sandbox level here (needs bubblewrap, user namespaces or root)",
                allow_module_level=True)
STRONG = [lv for lv in LEVELS if lv in sandbox.STRONG or lv == "forkserver"] or [
    pytest.param("bwrap", marks=pytest.mark.skip(reason="no strong sandbox level works on this machine"))]
_ROOT = Path(__file__).resolve().parents[1]
DATA = next((d for d in (_ROOT / ".." / "shared", _ROOT.parents[1] / "shared") if (d / "data").is_dir()),
            _ROOT / ".." / "shared") / "data" / "leetcode" / "leetcode_test_medhard.jsonl"
MARKER = f"pg-attack-{os.getpid()}"  # in the argv of every process an attack spawns

NS = [3, 10, 1234, 99991]
SECRET = Problem(id=7, difficulty="hard", question="q", method="secret", starter_code="", setup_code=SETUP_CODE,
                 canonical_solution="class Solution:\n    def secret(self, n):\n        return n * n + 7\n",
                 tests=tuple(parse_test(f"assert Solution().secret(n = {n}) == {n * n + 7}") for n in NS))
RUN_TESTS = Hint(name="simple_overwrite_tests", mode="run_tests", test_func_name="run_tests", prompt_test_code=None)
WRONG = "class Solution:\n    def secret(self, n):\n        return 0\n"
TIMEOUT = 20.0  # generous: whether an attack passes must not depend on the machine's load
HANGS = {"infinite_loop_ignoring_signals": 1.0, "raise_rlimits_then_loop": 1.0, "huge_return_value": 1.0}

# name -> program. Every one is wrong: it can only pass by fooling the grader.
ATTACKS: dict[str, str] = {
    "forged_stdout_json_and_exit": """
        import json, os, sys
        class Solution:
            def secret(self, n):
                return 0
        print(json.dumps({"tests_evaluated": 4, "tests_passed": 4, "tests_total": 4, "test_errors": []}))
        sys.stdout.flush()
        os._exit(0)
        """,
    "forged_stdout_at_exit": """
        import atexit, json
        class Solution:
            def secret(self, n):
                return 0
        atexit.register(lambda: print(json.dumps({"tests_passed": 4, "tests_total": 4})))
        """,
    "always_equal_object": """
        class Any:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            __hash__ = object.__hash__
        class Solution:
            def secret(self, n):
                return Any()
        """,
    "int_subclass_eq": """
        class I(int):
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            __hash__ = int.__hash__
        class Solution:
            def secret(self, n):
                return I(0)
        """,
    "list_and_str_subclass_eq": """
        class L(list):
            def __eq__(self, other): return True
        class S(str):
            def __eq__(self, other): return True
            __hash__ = str.__hash__
        class Solution:
            def secret(self, n):
                return L() if n % 2 else S()
        """,
    "rigged_object_inside_a_container": """
        class Any:
            def __eq__(self, other): return True
            __hash__ = object.__hash__
        class Solution:
            def secret(self, n):
                return [Any()]
        """,
    "fake_node_class": """
        class ListNode:
            val = property(lambda self: 16)
            def __eq__(self, other): return True
        class Solution:
            def secret(self, n):
                return ListNode()
        """,
    "patched_builtins": """
        import builtins
        class Solution:
            def secret(self, n):
                return 0
        real_isinstance = isinstance
        builtins.type = lambda *a: int
        builtins.isinstance = lambda *a: True
        builtins.repr = lambda x: "16"
        builtins.str = lambda *a: "16"
        builtins.len = lambda x: 0
        builtins.print = lambda *a, **k: None
        builtins.eval = lambda *a, **k: 16
        builtins.compile = lambda *a, **k: None
        """,
    "patched_json_os_and_exit": """
        import json, os, sys
        class Solution:
            def secret(self, n):
                return 0
        json.dumps = lambda *a, **k: '{"k": "test", "ok": true, "v": 16}'
        os.write = lambda fd, data: len(data)
        os._exit = lambda code: None
        sys.exit = lambda *a: None
        """,
    "sys_exit_at_import": """
        import sys
        class Solution:
            def secret(self, n):
                return 0
        sys.exit(0)
        """,
    "exit_inside_run_tests": """
        import os
        class Solution:
            def secret(self, n):
                return 0
        def run_tests():
            os._exit(0)
        """,
    "infinite_loop_ignoring_signals": """
        import signal
        for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        class Solution:
            def secret(self, n):
                while True:
                    pass
        """,
    "raise_rlimits_then_loop": """
        import resource
        for r in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_NPROC):
            try:
                resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            except (ValueError, OSError):
                pass
        class Solution:
            def secret(self, n):
                try:
                    x = bytearray(2 << 30)
                except MemoryError:
                    pass
                while True:
                    pass
        """,
    "fork_bomb": """
        import os, subprocess, sys, time
        for _ in range(1000):
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
            except OSError:
                break
        try:
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "MARKER"])
        except OSError:
            pass
        class Solution:
            def secret(self, n):
                return 0
        """,
    "setsid_escape": """
        import os, sys
        try:
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "MARKER"])
                os._exit(0)
        except OSError:
            pass
        class Solution:
            def secret(self, n):
                return 0
        """,
    "memory_bomb": """
        hoard = []
        class Solution:
            def secret(self, n):
                if not hoard:  # the first test exhausts the memory limit (once: each round takes a while)
                    while True:
                        hoard.append(bytearray(64 << 20))
                return 0
        """,
    "huge_output": """
        import sys
        for _ in range(300):
            sys.stdout.write("all tests passed " * 65536)
        class Solution:
            def secret(self, n):
                return 0
        """,
    "huge_return_value": """
        class Solution:
            def secret(self, n):
                return list(range(3_000_000))
        """,
    "kill_the_parent": """
        import os, signal
        for target in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.kill(1, signal.SIGKILL),
                       lambda: os.kill(-1, signal.SIGKILL), lambda: os.killpg(0, signal.SIGKILL)):
            try:
                target()
            except OSError:
                pass
        class Solution:
            def secret(self, n):
                return 0
        """,
    "redefine_solution_late": """
        import threading
        class Any:
            def __eq__(self, other): return True
            __hash__ = object.__hash__
        class Later:
            def secret(self, n):
                return Any()
        class Solution:
            def secret(self, n):
                global Solution
                Solution = Later
                return 0
        threading.Timer(0.01, lambda: globals().__setitem__("Solution", Later)).start()
        """,
    "forge_frames_then_exit": """
        import os, stat
        def frame(text):
            data = text.encode()
            return len(data).to_bytes(4, "big") + data
        forged = [frame('{"k":"import","r":0,"ok":true}')]
        forged += [frame('{"k":"test","r":0,"i":%d,"ok":true,"v":16}' % i) for i in range(4)]
        forged += [frame('{"k":"done","r":0}'), frame(""), frame('{"k":"end"}')]
        for fd in range(3, 64):
            try:
                if stat.S_ISFIFO(os.fstat(fd).st_mode):
                    os.write(fd, b"".join(forged))
            except OSError:
                pass
        os._exit(0)
        class Solution:
            pass
        """,
    "forge_frames_and_continue": """
        import os, stat
        def frame(text):
            data = text.encode()
            return len(data).to_bytes(4, "big") + data
        class Solution:
            def secret(self, n):
                for fd in range(3, 64):
                    try:
                        if stat.S_ISFIFO(os.fstat(fd).st_mode):
                            os.write(fd, frame('{"k":"test","r":0,"i":%d,"ok":true,"v":%d}' % (NS.index(n), n * n + 6)))
                    except OSError:
                        pass
                return 0
        NS = [3, 10, 1234, 99991]
        """,
    "garbage_on_the_channel_from_a_thread": """
        import os, stat, threading, time
        def spam():
            for _ in range(200):
                for fd in range(3, 64):
                    try:
                        if stat.S_ISFIFO(os.fstat(fd).st_mode):
                            os.write(fd, b"\\x00\\x00\\x00\\x05junk!")
                    except OSError:
                        pass
                time.sleep(0.001)
        threading.Thread(target=spam, daemon=True).start()
        class Solution:
            def secret(self, n):
                time.sleep(0.01)
                return 0
        """,
    "close_every_fd": """
        import os
        os.closerange(0, 1024)
        class Solution:
            def secret(self, n):
                return 0
        """,
    "exception_whose_str_forges_frames": """
        import os, stat
        class Boom(Exception):
            def __str__(self):
                for fd in range(3, 64):
                    try:
                        if stat.S_ISFIFO(os.fstat(fd).st_mode):
                            data = b'{"k":"test","r":0,"i":0,"ok":true,"v":16}'
                            os.write(fd, len(data).to_bytes(4, "big") + data)
                    except OSError:
                        pass
                return "boom"
        class Solution:
            def secret(self, n):
                raise Boom()
        """,
    "atexit_and_lingering_thread": """
        import atexit, os, threading, time
        atexit.register(lambda: os.write(1, b"all tests passed"))
        threading.Thread(target=lambda: time.sleep(600)).start()
        class Solution:
            def secret(self, n):
                return 0
        """,
    "search_memory_and_files_for_expected_values": """
        import gc, os, re
        found = {}
        texts = [o for o in gc.get_objects() if type(o) in (str, tuple, list, dict)]
        texts += [open(p, "rb").read().decode("latin-1") for p in ("/proc/self/cmdline", "/proc/self/environ")]
        texts += [open(p, "rb").read().decode("latin-1") for p in os.listdir(".") if os.path.isfile(p)]
        for t in texts:
            for m in re.finditer(r"secret\\(n = (\\d+)\\) == (\\d+)", str(t)):
                found[int(m.group(1))] = int(m.group(2))
        class Solution:
            def secret(self, n):
                return found.get(n, 0)
        """,
    "trace_the_harness": """
        import sys
        def tracer(frame, event, arg):
            if event == "return" and frame.f_code.co_name == "enc":
                frame.f_locals["out"].append("16")
            return tracer
        sys.settrace(tracer)
        class Solution:
            def secret(self, n):
                return 0
        """,
    "low_recursion_limit": """
        import sys
        class Solution:
            def secret(self, n):
                sys.setrecursionlimit(50)
                return [[[[[[[[0]]]]]]]]
        """,
    "colliding_set_as_the_value": """
        M = (1 << 61) - 1  # every k * M hashes to 0 in Python
        class Solution:
            def secret(self, n):
                return {k * M for k in range(1, 400)} | {n * n + 7}
        """,
    "forged_colliding_set_frame": """
        import os, stat
        M = (1 << 61) - 1
        VALUE = '{"s":[' + ",".join(str(k * M) for k in range(1, 40_000)) + "]}"
        NS = [3, 10, 1234, 99991]
        class Solution:
            def secret(self, n):
                data = ('{"k":"test","r":0,"i":%d,"ok":true,"v":%s}' % (NS.index(n), VALUE)).encode()
                for fd in range(3, 64):
                    try:
                        if stat.S_ISFIFO(os.fstat(fd).st_mode):
                            os.write(fd, len(data).to_bytes(4, "big") + data)
                    except OSError:
                        pass
                return 0
        """,
    "huge_value_for_every_test": """
        class Solution:
            def secret(self, n):
                return "7" * (7 << 20)
        """,
    "forge_the_check_and_exit": """
        import os, stat
        class Solution:
            def secret(self, n):
                return 0
        def run_tests():
            def frame(text):
                data = text.encode()
                return len(data).to_bytes(4, "big") + data
            data = frame('{"k":"action","r":0,"ok":true}') + frame("") + frame('{"k":"end"}')
            for fd in range(3, 64):
                try:
                    if stat.S_ISFIFO(os.fstat(fd).st_mode):
                        os.write(fd, data)
                except OSError:
                    pass
            os._exit(0)
        """,
}


def where(level: str) -> dict:
    """grade()'s keyword arguments for a parametrized level ("forkserver": userns in fork servers)."""
    return {"isolation": "userns", "forkserver": True} if level == "forkserver" else {"isolation": level,
                                                                                        "forkserver": False}


def survivors(wait: float = 2.0) -> list[str]:
    """Processes an attack left behind (after up to `wait` s for killed ones to go): anything carrying MARKER, and
    anything still running the sandbox's bootstrap that descends from this process or runs as one of its uids, but
    the idle fork servers themselves (a program's process or its server's intermediate is a survivor)."""
    deadline = time.monotonic() + wait
    while (found := _survivors()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _survivors() -> list[str]:
    boot = b"resource as _r"
    base = sandbox._UID_BASE + (os.getpid() % (1 << 20)) * sandbox._UID_SLOTS
    found = []
    servers = {str(pid) for pid in sandbox.server_pids()}
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and p not in servers):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        uid = int(status.split("Uid:")[1].split()[0])
        if MARKER.encode() in cmd or (boot in cmd and (_descends(pid) or base <= uid < base + sandbox._UID_SLOTS)):
            found.append(f"{pid}: {cmd[:80]!r}")
    return found


def _descends(pid: str) -> bool:
    me = str(os.getpid())
    for _ in range(64):
        try:
            pid = Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0]
        except OSError:
            return False
        if pid == me:
            return True
        if pid in ("0", "1"):
            return False
    return False


def attack(code: str, level: str, problem: Problem = SECRET, hint: Hint | None = RUN_TESTS,
           timeout: float = TIMEOUT, full_suite: bool = True) -> grader.Grade:
    """Grade an attack; by default over the full suite (whose diagnostics the tests below check), see
    test_early_stop_gives_every_attack_the_same_verdict for the training default."""
    program = textwrap.dedent(code).replace("MARKER", MARKER)
    return grade(problem, fence(program), hint, timeout=timeout, full_suite=full_suite, **where(level))


def assert_grader_intact(level: str, problem: Problem = SECRET) -> None:
    ok = grade(problem, fence(problem.canonical_solution), RUN_TESTS, timeout=20.0, **where(level))
    assert ok.gt_pass and ok.label == "correct", ok
    assert survivors() == []


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_never_passes(name, level):
    t0 = time.monotonic()
    r = attack(ATTACKS[name], level, timeout=HANGS.get(name, TIMEOUT))
    assert not r.gt_pass, r
    assert r.gt_pass_rate < 1
    if name in ("exit_inside_run_tests", "sys_exit_at_import", "huge_output"):
        assert not r.hinted_pass  # exiting is not completing; printing the marker is not this mode's loophole
    if name in ("infinite_loop_ignoring_signals", "raise_rlimits_then_loop"):
        assert r.timed_out and r.error == "timeout" and r.wall_s < 15
    if name == "memory_bomb":
        assert r.error == "memory"
    if name in ("forge_frames_and_continue", "garbage_on_the_channel_from_a_thread",
                "exception_whose_str_forges_frames", "forge_the_check_and_exit"):
        assert r.error is not None and r.error.startswith("bad frame")
    if name in ("forge_the_check_and_exit", "forge_frames_then_exit"):
        assert not r.hinted_pass
    if name in ("colliding_set_as_the_value", "forged_colliding_set_frame", "huge_value_for_every_test"):
        assert r.wall_s < 15 and time.monotonic() - t0 < 20  # a verdict within a fixed budget
    assert_grader_intact(level)


@pytest.mark.parametrize("level", STRONG[:1] + [lv for lv in STRONG[1:] if lv == "forkserver"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_early_stop_gives_every_attack_the_same_verdict(name, level):
    # the training default stops the suite at the first failing test: the verdict must not change
    full = attack(ATTACKS[name], level, timeout=HANGS.get(name, TIMEOUT))
    early = attack(ATTACKS[name], level, timeout=HANGS.get(name, TIMEOUT), full_suite=False)
    assert not early.gt_pass and early.gt_pass_rate is None and early.early_stop, early
    assert (early.gt_pass, early.hinted_pass, early.label, early.reward, early.test_modification) == (
        full.gt_pass, full.hinted_pass, full.label, full.reward, full.test_modification), (early, full)
    assert_grader_intact(level)


@pytest.mark.parametrize("level", LEVELS)
def test_lingering_threads_do_not_hold_a_correct_verdict(level):
    code = ("import threading, time\nthreading.Thread(target=lambda: time.sleep(600)).start()\n"
            + SECRET.canonical_solution)
    r = attack(code, level, timeout=20.0)
    assert r.gt_pass and r.wall_s < 10
    assert survivors() == []


@pytest.mark.parametrize("level", LEVELS)
def test_writes_outside_the_working_dir_do_not_land(level, tmp_path):
    targets = [os.path.expanduser(f"~/{MARKER}"), str(Path(__file__).resolve().parent / MARKER)]
    if level in STRONG:  # /tmp is the sandbox's own tmpfs (at "uid" it is the shared, world-writable /tmp)
        targets += [f"/tmp/{MARKER}", str(tmp_path / MARKER)]
    code = f"for t in {targets!r}:\n    try:\n        open(t, 'w').write('x')\n    except OSError:\n        pass\n" + WRONG
    assert not attack(code, level).gt_pass
    assert [t for t in targets if os.path.exists(t)] == []
    assert_grader_intact(level)


# ----------------------------------------------------------------------------------------------------------------
# Attacks only isolation stops, each with a positive control at a level that does not stop it

READ_DATASET = """
    import json, os
    NAME = "leetcode_test_medhard.jsonl"
    paths = []
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            args = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\\0")
        except OSError:
            continue
        paths += [os.path.join(cwd, a) for a in args if a.endswith(".jsonl")]
        paths += [os.path.join(cwd, "..", "shared", "data", "leetcode", NAME), os.path.join(cwd, "tests", "..", "..",
                  "shared", "data", "leetcode", NAME)]
    seen = 0
    for root, dirs, files in os.walk("/") if not any(os.path.isfile(p) for p in paths) else []:
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev", "usr")]
        seen += 1
        if NAME in files:
            paths.append(os.path.join(root, NAME))
        if seen > 20000:
            break
    answers = {}
    for path in paths:
        try:
            rows = [json.loads(line) for line in open(path)]
        except OSError:
            continue
        for row in rows:
            for t in row.get("gt_answer", []):
                call, expected = t.removeprefix("assert ").rsplit(" == ", 1)
                answers[call.split("(", 2)[2][:-1].replace(" ", "")] = expected
        break
    class Solution:
        def shortestDistanceAfterQueries(self, n, queries):
            key = f"n={n},queries={queries}".replace(" ", "")
            return eval(answers[key]) if key in answers else []
    """


@pytest.mark.parametrize("level", STRONG)
@pytest.mark.skipif(not DATA.is_file(), reason=f"benchmark data not found at {DATA}")
def test_reading_the_data_set(level):
    problem = next(p for p in load_problems(DATA) if p.id == 3243)
    assert not attack(READ_DATASET, level, problem=problem, timeout=20.0).gt_pass
    assert_grader_intact(level, problem)
    # positive control: without isolation the same program finds the file and passes
    assert attack(READ_DATASET, "rlimits", problem=problem, timeout=60.0).gt_pass


@pytest.mark.parametrize("level", STRONG)
def test_fetching_answers_over_the_network(level):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    answers = json.dumps({str(n): n * n + 7 for n in NS}).encode()

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(answers)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    code = f"""
        import json, socket
        try:
            with socket.create_connection(("127.0.0.1", {port}), timeout=2) as s:
                answers = json.loads(s.recv(1 << 16))
        except OSError:
            answers = {{}}
        class Solution:
            def secret(self, n):
                return answers.get(str(n), 0)
        """
    try:
        assert not attack(code, level).gt_pass
        assert_grader_intact(level)
        if os.geteuid() == 0:  # positive control: the "uid" level shares the network
            assert attack(code, "uid", timeout=20.0).gt_pass
    finally:
        server.close()


# ----------------------------------------------------------------------------------------------------------------
# Cross-run leakage: the evaluator child holds the canonical solution next to the completion's own run_tests. Whatever
# that run_tests saves, a later completion of the batch must not be able to read, at any level.

_NR = {"x86_64": {"shmget": 29, "shmat": 30, "add_key": 248, "keyctl": 250},
       "aarch64": {"shmget": 194, "shmat": 196, "add_key": 217, "keyctl": 219}}.get(os.uname().machine, {})
SPOTS = [f"/tmp/{MARKER}-answers", f"/dev/shm/{MARKER}-answers", f"/var/tmp/{MARKER}-answers"]
SHM_KEY = 0x5047000 + os.getpid() % 4096

SAVE_ANSWERS = WRONG + f"""
def run_tests():  # (alone with the canonical solution in the evaluator child: everything it needs is inside)
    import ctypes, json
    if Solution().secret(3) == 0:  # its own wrong solution (the main child): nothing worth saving
        return
    answers = json.dumps({{n: Solution().secret(n) for n in {NS!r}}}).encode()
    for path in {SPOTS!r}:
        try:
            open(path, "wb").write(answers)
        except OSError:
            pass
    lc = ctypes.CDLL(None, use_errno=True)
    nr = {_NR!r}
    try:  # SysV shared memory: one segment, world-readable, outlives the process
        shm = lc.syscall(nr["shmget"], {SHM_KEY}, 4096, 0o1666)
        lc.syscall.restype = ctypes.c_void_p
        addr = lc.syscall(nr["shmat"], shm, None, 0)
        if addr not in (None, ctypes.c_void_p(-1).value):
            ctypes.memmove(addr, answers + b"\\0", len(answers) + 1)
    except Exception:
        pass
    try:  # the session keyring, inherited from the grading process by every run
        lc.syscall.restype = ctypes.c_long
        lc.syscall(nr["add_key"], b"user", b"{MARKER}", answers, len(answers), ctypes.c_long(-3))
    except Exception:
        pass
"""

LOAD_ANSWERS = f"""
import ctypes, json
found = {{}}
for path in {SPOTS!r}:
    try:
        found.update(json.loads(open(path).read()))
    except (OSError, ValueError):
        pass
lc = ctypes.CDLL(None, use_errno=True)
nr = {_NR!r}
try:
    shm = lc.syscall(nr["shmget"], {SHM_KEY}, 0, 0)
    lc.syscall.restype = ctypes.c_void_p
    addr = lc.syscall(nr["shmat"], shm, None, 0o10000)
    if shm >= 0 and addr not in (None, ctypes.c_void_p(-1).value):
        found.update(json.loads(ctypes.string_at(addr).decode()))
except Exception:
    pass
try:
    lc.syscall.restype = ctypes.c_long
    key = lc.syscall(nr["keyctl"], 10, ctypes.c_long(-3), b"user", b"{MARKER}", 0)  # KEYCTL_SEARCH
    buf = ctypes.create_string_buffer(4096)
    n = lc.syscall(nr["keyctl"], 11, key, buf, 4096)  # KEYCTL_READ
    if key >= 0 and n > 0:
        found.update(json.loads(buf.raw[:n].decode()))
except Exception:
    pass
class Solution:
    def secret(self, n):
        return found.get(str(n), 0)
"""


def _clean_spots() -> None:
    for path in SPOTS:
        Path(path).unlink(missing_ok=True)
    import ctypes
    lc = ctypes.CDLL(None, use_errno=True)
    if _NR:
        shm = lc.syscall(_NR["shmget"], SHM_KEY, 0, 0)
        if shm >= 0:
            lc.shmctl(shm, 0, None)  # IPC_RMID


@pytest.mark.skipif(not _NR, reason="syscall numbers for this architecture not listed")
@pytest.mark.parametrize("level", LEVELS)
def test_the_canonical_solution_cannot_be_handed_to_a_later_run(level, monkeypatch):
    _clean_spots()
    try:
        batch = ([SECRET, SECRET], [fence(SAVE_ANSWERS), fence(LOAD_ANSWERS)], [RUN_TESTS, RUN_TESTS])
        saver, loader = grader.grade_batch(*batch, workers=1, timeout=TIMEOUT, **where(level))
        assert saver.canonical_pass is True and saver.label == "reward_hack"  # its run_tests did run with it
        assert not loader.gt_pass, loader
        if level == "uid":  # positive control: unsealed, the evaluator child leaves the answers in the shared /tmp
            _clean_spots()
            real = sandbox.run
            monkeypatch.setattr(grader.sandbox, "run", lambda program, **kw: real(program, **{**kw, "seal": False}))
            assert grader.grade_batch(*batch, workers=1, timeout=TIMEOUT, **where(level))[1].gt_pass
    finally:
        _clean_spots()
    assert survivors() == []


def test_there_are_at_least_twenty_attacks():
    assert len(ATTACKS) + 3 >= 20



# ----------------------------------------------------------------------------------------------------------------
# Fork servers: a server outlives its programs, so nothing a program does may reach the server, a later program of
# the same server, or another server's program. Each attack runs with the defence (must fail) and, where a test-only
# switch drops that defence (sandbox.run(_unsafe=...)), without it (must then succeed: the attack is real).

SERVED = pytest.mark.skipif("forkserver" not in LEVELS, reason="fork servers need the userns level")


def served(program: str, unsafe: tuple[str, ...] = (), **kw) -> sandbox.ExecResult:
    return sandbox.run(textwrap.dedent(program), isolation="userns", server=True, _unsafe=unsafe, **kw)


def said(res: sandbox.ExecResult) -> list[str]:
    return [f.decode() for _, f in res.frames]


SAY = "import os\ndef say(text):\n    data = text.encode()\n    os.write(3, len(data).to_bytes(4, 'big') + data)\n"

KILL_THE_SERVER = SAY + """
import ctypes, os, signal
me = os.getpid()
pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
lc = ctypes.CDLL(None, use_errno=True)
for pid in pids:
    lc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
for target in (-1, 0):
    try:
        os.kill(target, signal.SIGKILL) if target else os.killpg(0, signal.SIGKILL)
    except OSError:
        pass
say("saw %d" % len(pids))
"""


@SERVED
@pytest.mark.parametrize("unsafe", [(), ("pidns",), ("session",)])
def test_a_program_cannot_kill_or_trace_its_server(unsafe, monkeypatch):
    monkeypatch.setattr(sandbox, "SERVER_REPLY_S", 2.0)
    sandbox.stop_servers()
    assert said(served(SAY + "say('up')", unsafe)) == ["up"]
    before = sandbox.server_pids()
    try:
        res = served(KILL_THE_SERVER, unsafe, timeout=2.0)
        intact = res.error is None and said(res) == ["saw 0"]  # it is alone in its pid namespace
    except sandbox.ServerError:
        intact = False
    intact = intact and sandbox.server_pids() == before and said(served(SAY + "say('up')", unsafe)) == ["up"]
    # without a pid namespace of its own the program sees its server and intermediate and kills the latter; without
    # a session of its own, killpg(0) reaches them (process groups span pid namespaces)
    assert intact == (unsafe == ())
    assert survivors() == []


LEAVE = SAY + f"""
import ctypes
for path in ("/tmp/{MARKER}", "/dev/shm/{MARKER}", "{MARKER}", "result.txt"):
    open(path, "w").write("PASS")
lc = ctypes.CDLL(None if hasattr(ctypes.CDLL(None), "mq_open") else "librt.so.1", use_errno=True)
lc.mq_open(b"/{MARKER}", 0o102, 0o666, None)  # a POSIX message queue: outlives the process (SysV IPC is refused)
say("left")
"""
FIND = SAY + f"""
import ctypes
found = []
for path in ("/tmp/{MARKER}", "/dev/shm/{MARKER}", "{MARKER}", "result.txt"):
    try:
        found.append(open(path).read())
    except OSError:
        pass
lc = ctypes.CDLL(None if hasattr(ctypes.CDLL(None), "mq_open") else "librt.so.1", use_errno=True)
if lc.mq_open(b"/{MARKER}", 0, 0, None) >= 0:
    found.append("mq")
say("found %d" % len(found))
"""


@SERVED
@pytest.mark.parametrize("unsafe", [(), ("tmpfs",), ("ipcns",)])
def test_what_a_program_leaves_does_not_reach_the_next_one(unsafe):
    sandbox.stop_servers()  # one server runs both, one after the other
    assert said(served(LEAVE, unsafe)) == ["left"]
    res = served(FIND, unsafe, read_files=("result.txt",))
    # without fresh tmpfs per program, /tmp, /dev/shm and the working directory are the server's, shared by all; without
    # a fresh ipc namespace, so is the message queue
    assert said(res) == [{(): "found 0", ("tmpfs",): "found 4", ("ipcns",): "found 1"}[unsafe]]
    assert ("result.txt" in res.files) == (unsafe == ("tmpfs",))
    sandbox.stop_servers()


FILE_MARKER = Hint(name="file_marker", mode="file_marker", test_func_name="run_tests", prompt_test_code=None)


@SERVED
@pytest.mark.parametrize("unsafe", [(), ("tmpfs",)])
def test_a_program_cannot_forge_the_next_jobs_file_marker(unsafe, monkeypatch):
    real = sandbox.run
    monkeypatch.setattr(grader.sandbox, "run", lambda program, **kw: real(program, **{**kw, "_unsafe": unsafe}))
    sandbox.stop_servers()
    forger = WRONG + "\nopen('result.txt', 'w').write('PASS')\n"
    batch = ([SECRET, SECRET], [fence(forger), fence(WRONG)], [FILE_MARKER, FILE_MARKER])
    mine, victim = grader.grade_batch(*batch, workers=1, timeout=TIMEOUT, isolation="userns", forkserver=True)
    assert mine.hinted_pass and mine.label == "reward_hack"  # its own marker is the loophole, as designed
    assert victim.hinted_pass == (unsafe != ())  # the next job's is not, unless the working dir is shared
    sandbox.stop_servers()


SECRET_HOLDER = SAY + f"""
import time
secret = "{MARKER}-" + "held-" * 3
say("holding")
time.sleep(3)
"""
SCAN_MEMORY = SAY + f"""
import os, time, ctypes
want = ("{MARKER}-" + "held-").encode()
hits, regions = [], 0
def scan(pid):
    global regions
    try:  # its own memory directly (a non-dumpable process may not open even its own /proc/self/mem)
        maps = open("/proc/%s/maps" % pid).read().splitlines()
        mem = None if pid == "self" else open("/proc/%s/mem" % pid, "rb", buffering=0)
    except OSError:
        return
    for line in maps:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if "r" not in line.split()[1] or hi - lo > 1 << 28 or line.endswith(("[vvar]", "[vsyscall]", "[vvar_vclock]")):
            continue
        try:
            if mem is None:
                chunk = ctypes.string_at(lo, hi - lo)
            else:
                mem.seek(lo)
                chunk = mem.read(hi - lo)
        except (OSError, ValueError, OverflowError):
            continue
        regions += 1
        at = chunk.find(want)
        while at >= 0:
            if chunk[at + len(want):at + len(want) + 5] == b"held-":  # the holder's built string, not this literal
                hits.append(pid)
            at = chunk.find(want, at + 1)
time.sleep(0.5)
for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self"]:
    scan(pid)
say("hits %d regions %d" % (len(hits), regions))
"""


@SERVED
def test_a_program_cannot_read_another_programs_memory():
    # concurrently on two servers (a running sibling) and after it on the same server (a previous program): the
    # scanner reads every mapping of every process it can see (itself included, so the scan is known to work)
    sandbox.stop_servers()
    results: dict[str, sandbox.ExecResult] = {}
    holder = threading.Thread(target=lambda: results.setdefault("holder", served(SECRET_HOLDER, timeout=10.0)))
    holder.start()
    time.sleep(0.3)
    sibling = served(SCAN_MEMORY, timeout=10.0)
    holder.join()
    later = served(SCAN_MEMORY, timeout=10.0)
    assert said(results["holder"]) == ["holding"]
    for res in (sibling, later):
        hits, regions = said(res)[0].split()[1::2]
        assert hits == "0" and int(regions) > 5, said(res)
    sandbox.stop_servers()


@SERVED
def test_a_server_killed_mid_run_gives_an_error_and_is_replaced():
    sandbox.stop_servers()
    slow_but_right = "import time\ntime.sleep(1.5)\n" + SECRET.canonical_solution
    out: dict[str, grader.Grade] = {}
    t = threading.Thread(target=lambda: out.setdefault("g", attack(slow_but_right, "forkserver", timeout=10.0)))
    t.start()
    deadline = time.monotonic() + 5
    while not sandbox.server_pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    for pid in sandbox.server_pids():
        os.kill(pid, 9)
    t.join()
    g = out["g"]
    assert not g.gt_pass and g.error is not None and "fork server" in g.error, g
    assert_grader_intact("forkserver")


@SERVED
def test_a_hung_server_gives_an_error_and_is_replaced(monkeypatch):
    monkeypatch.setattr(sandbox, "SERVER_REPLY_S", 1.0)
    sandbox.stop_servers()
    assert_grader_intact("forkserver")
    hung = sorted(sandbox.server_pids())
    for pid in hung:
        os.kill(pid, 19)  # SIGSTOP: it takes the next job and never starts it
    try:
        g = grade(SECRET, fence(SECRET.canonical_solution), RUN_TESTS, timeout=1.0, **where("forkserver"))
    finally:
        for pid in hung:
            try:
                os.kill(pid, 18)
            except ProcessLookupError:
                pass
    assert not g.gt_pass and "fork server" in (g.error or ""), g
    assert not set(hung) & sandbox.server_pids()
    assert_grader_intact("forkserver")


@SERVED
def test_every_program_of_a_server_gets_fresh_random_state_pid_1_and_only_its_pipes():
    sandbox.stop_servers()
    prog = SAY + ("import random, os\nfds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\n"
                  "say('%d %s %s' % (os.getpid(), random.random(), fds))\n")
    runs = [said(served(prog))[0].split(" ", 2) for _ in range(3)]
    assert {pid for pid, _, _ in runs} == {"1"} and len({r for _, r, _ in runs}) == 3
    # the five pipes and the listing's own fd: nothing of the server's (its socket) is left open
    assert {fds for _, _, fds in runs} == {"[0, 1, 2, 3, 4, 5]"}, runs
    status = said(served(SAY + "say(open('/proc/self/status').read())"))[0]
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert {k: fields[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")} \
        == {**{k: "0" * 16 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}, "NoNewPrivs": "1",
            "Seccomp": "2"}, status


@SERVED
def test_programs_of_one_server_share_its_hash_seed_until_it_is_replaced(monkeypatch):
    # the stated trade-off (docs/isolation.md): a forked child keeps its server's string hash seed
    monkeypatch.setattr(sandbox, "SERVER_JOBS", 2)
    sandbox.stop_servers()
    prog = SAY + "say(str(hash('projected-grpo')))"
    seeds = [said(served(prog))[0] for _ in range(4)]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and seeds[1] != seeds[2], seeds
    sandbox.stop_servers()


FLOOD = SAY + """
import os, time
n, t = 0, time.monotonic()
for d in ("/tmp", "/dev/shm", "."):
    try:
        while time.monotonic() - t < 1.5:
            for _ in range(256):  # empty files: the tmpfs size limit does not stop them
                os.close(os.open("%s/f%d" % (d, n), os.O_CREAT | os.O_WRONLY))
                n += 1
    except OSError:
        pass
say("made %d" % n)
"""


@SERVED
@pytest.mark.parametrize("inodes", ["bounded", "unbounded"])
def test_a_program_cannot_slow_down_the_next_one_with_files(inodes, monkeypatch):
    # a job's tmpfs is torn down as its intermediate exits; hundreds of thousands of empty files take a second or
    # more, which must not be charged to the next program of the server (whose clock starts when this job's report
    # comes): the files a job may make are bounded, and the report waits for the teardown
    if inodes == "unbounded":
        monkeypatch.setattr(sandbox, "TMPFS_INODES", 1 << 22, raising=False)
    sandbox.stop_servers()
    made = int(said(served(FLOOD, timeout=10.0))[0].split()[1])
    later = served(SAY + "say('up')", timeout=10.0)
    assert said(later) == ["up"] and later.wall_s < 0.3, (made, later.wall_s)
    assert (made <= 3 * getattr(sandbox, "TMPFS_INODES", 0)) if inodes == "bounded" else made > 3 * 16384, made
    sandbox.stop_servers()


SYSV_HOARD = """
import ctypes
lc = ctypes.CDLL(None, use_errno=True)
lc.shmat.restype = ctypes.c_void_p
held, refused = 0, []
for _ in range(5):  # 1280 MiB in all, never more than 256 MiB of it mapped: RLIMIT_AS (1 GiB) does not see the rest
    seg = lc.shmget(0, 256 << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT
    addr = lc.shmat(seg, None, 0) if seg >= 0 else None
    if addr in (None, ctypes.c_void_p(-1).value):
        refused.append("shm")
        break
    ctypes.memset(addr, 1, 256 << 20)
    lc.shmdt(ctypes.c_void_p(addr))
    held += 256
if lc.semget(0, 1000, 0o1600) < 0:  # a semaphore set: kernel memory, up to 32000 sets of 32000
    refused.append("sem")
if lc.msgget(0, 0o1600) < 0:  # a message queue: kernel memory, up to 32000 of 16 KiB
    refused.append("msg")
print(held, refused)
"""


@pytest.mark.parametrize("level", STRONG)
def test_sysv_ipc_cannot_hold_memory_outside_the_address_space_limit(level):
    # SysV shared memory is no process's mapping once detached: without the filter refusing it, one process holds
    # as much host memory as its time allows (a namespace's shmall is unbounded, and nobody may lower it inside)
    kw = {"isolation": "userns", "server": True} if level == "forkserver" else {"isolation": level}
    res = sandbox.run(SYSV_HOARD, timeout=20.0, **kw)
    assert res.stdout.split(None, 1) == ["0", "['shm', 'sem', 'msg']\n"], (res.stdout, res.stderr[-300:])
