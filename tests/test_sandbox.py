"""sandbox.py: one property per test. Isolation properties run at every level that should provide them here."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from projected_grpo import sandbox

LEVEL = sandbox.isolation_level()
AVAILABLE = sandbox.available_levels()  # every level that works here (CI, as root: bwrap, userns and uid)
# Levels this machine can run: those, and rlimits always (explicitly requested, even as root).
LEVELS = AVAILABLE + [lv for lv in ["rlimits"] if lv not in AVAILABLE]
# Levels where the program runs as an unprivileged user (the isolation tests).
UNPRIVILEGED = [lv for lv in LEVELS if lv != "rlimits"]
# The strong levels: each must hide the host and the network (both run here when bwrap and user namespaces work).
STRONG = [lv for lv in AVAILABLE if lv in sandbox.STRONG]
if not STRONG:  # still collect the tests, and report them as skipped
    STRONG = [pytest.param("bwrap", marks=pytest.mark.skip(reason="no strong sandbox level works on this machine"))]
_ROOT = Path(__file__).resolve().parents[1]
DATA = next((d for d in (_ROOT / ".." / "shared" / "data", _ROOT.parents[1] / "shared" / "data") if d.is_dir()),
            _ROOT / ".." / "shared" / "data")

# Helpers written into child programs.
SEND = "import os\ndef send(b):\n    os.write(3, len(b).to_bytes(4, 'big') + b)\n"


def frames(res: sandbox.ExecResult) -> list[bytes]:
    return [f for _, f in res.frames]


def report(program: str, **kw) -> str:
    """Run `program`, which sets `result` (a str); return it (sent over the channel)."""
    res = sandbox.run(SEND + program + "\nsend(b'=' + str(result).encode())\n", timeout=20.0, **kw)
    assert len(res.frames) == 1, (res.error, res.stderr[-500:])
    return res.frames[0][1].decode()[1:]


# ----------------------------------------------------------------------------------------------------------------
# Basic contract

@pytest.mark.parametrize("level", LEVELS)
def test_runs_and_captures_output(level):
    res = sandbox.run("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)", isolation=level,
                      timeout=20.0)
    assert (res.stdout, res.stderr, res.returncode, res.timed_out) == ("out\n", "err\n", 3, False)
    assert res.error == "exit status 3" and res.isolation == level


def test_isolation_level_is_cached_and_known(monkeypatch):
    assert sandbox.isolation_level() in sandbox.LEVELS
    monkeypatch.setattr(sandbox, "_trial", lambda level: pytest.fail("isolation_level ran a second trial"))
    assert sandbox.isolation_level() == LEVEL  # decided once per process
    info = sandbox.isolation_info()  # the one line that says it (logs, config.json, eval.json, reports)
    assert info.startswith(f"sandbox isolation: {LEVEL} (") and len(info.splitlines()) == 1


def test_userns_is_available_where_namespaces_work():
    # CI (root, kernel with user namespaces) must be able to test the namespace level even where bwrap works
    if os.geteuid() == 0 or Path("/proc/sys/user/max_user_namespaces").read_text().strip() != "0":
        assert "userns" in AVAILABLE, sandbox._why_not


def test_frames_arrive_in_order_with_times():
    res = sandbox.run(SEND + "send(b'a')\nsend(b'')\nsend(b'bc')\n", phases=2, timeout=20.0)
    assert frames(res) == [b"a", b"bc"] and len(res.checkpoints) == 1
    assert 0 < res.frames[0][0] <= res.checkpoints[0] <= res.frames[1][0] <= res.wall_s


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="timeout"):
        sandbox.run("pass", timeout=0)
    with pytest.raises(ValueError, match="isolation"):
        sandbox.run("pass", isolation="docker")
    with pytest.raises(ValueError, match="read_files"):
        sandbox.run("pass", read_files=("../x",))


# ----------------------------------------------------------------------------------------------------------------
# Time, memory, processes, output

@pytest.mark.parametrize("level", LEVELS)
def test_timeout_kills_a_loop_that_ignores_signals(level):
    prog = "import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n"
    res = sandbox.run(prog, timeout=0.5, isolation=level)
    assert res.timed_out and res.error == "timeout"
    assert res.wall_s < 5.0  # killed at the budget, not at some later limit


def test_checkpoints_grant_each_phase_its_own_budget():
    # three phases of 1 s each with a 1.6 s budget per phase: passes only if each checkpoint resets the clock
    prog = SEND + "import time\nfor _ in range(3):\n    time.sleep(1.0)\n    send(b'')\nsend(b'end')\n"
    assert frames(sandbox.run(prog, timeout=1.6, phases=3)) == [b"end"]
    # ... and no more than `phases` phases are granted (the last two share one budget: 2 s > 1.6 s)
    assert sandbox.run(prog, timeout=1.6, phases=2).timed_out


@pytest.mark.parametrize("level", LEVELS)
def test_memory_limit(level):
    prog = "try:\n    x = bytearray(3 << 30)\n    result = 'allocated'\nexcept MemoryError:\n    result = 'MemoryError'\n"
    assert report(prog, isolation=level) == "MemoryError"


FORK_BOMB = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n"
             "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\nresult = n\n")


@pytest.mark.parametrize("level", LEVELS)
def test_no_new_process_at_any_level(level):
    # the seccomp filter refuses every new process (fork, vfork, posix_spawn's clone) at every level
    if sandbox.seccomp_filter() is None:
        pytest.skip("no seccomp filter for this architecture")
    prog = FORK_BOMB + ("import subprocess, sys\ntry:\n    subprocess.run([sys.executable, '-c', 'pass'])\n"
                        "    result = (n, 'spawned')\nexcept OSError:\n    result = (n, 'refused')\n")
    assert report(prog, isolation=level) == "(0, 'refused')"


@pytest.mark.parametrize("level", UNPRIVILEGED)
def test_fork_bomb_is_bounded_without_the_filter(level):
    # with forks allowed (the filter missing), the run's own uid and RLIMIT_NPROC still bound it ("bwrap" as root maps
    # to root outside, where RLIMIT_NPROC does not bind: there the filter is the bound)
    if level == "bwrap" and os.geteuid() == 0:
        pytest.skip("bwrap as root: the seccomp filter is the only bound")
    assert int(report(FORK_BOMB, isolation=level, _allow_fork=True)) < sandbox.NPROC


@pytest.mark.parametrize("level", LEVELS)
def test_threads_still_work(level):
    prog = "import threading\nr = []\nt = threading.Thread(target=r.append, args=(7,))\nt.start()\nt.join()\nresult = r\n"
    assert report(prog, isolation=level) == "[7]"


@pytest.mark.parametrize("level", UNPRIVILEGED)
def test_rlimits_cannot_be_raised(level):
    prog = ("import resource\ntry:\n    resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n    result = 'raised'\n"
            "except (ValueError, OSError):\n    result = 'refused'\n")
    assert report(prog, isolation=level) == "refused"


@pytest.mark.parametrize("level", LEVELS)
def test_nothing_survives_the_run(level):
    # forks allowed here, to test what kills the processes a run leaves (the filter forbids making them at all)
    marker = f"pg-sandbox-survivor-{level}-{os.getpid()}"
    prog = ("import os, subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
            f"if os.fork() == 0:\n    os.setsid()\n    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n")
    if level == "rlimits":  # no uid of its own: only the process group is killed, so no setsid escapee here
        prog = prog.split("if os.fork()")[0]
    sandbox.run(prog, isolation=level, timeout=20.0, _allow_fork=True)
    time.sleep(0.2)
    alive = [p for p in os.listdir("/proc") if p.isdigit() and marker.encode() in _cmdline(p)]
    assert alive == []


@pytest.mark.parametrize("level", [lv for lv in UNPRIVILEGED if lv == "uid"])  # where the host's /tmp is visible
def test_a_thread_behind_a_zombie_leader_does_not_survive(level, tmp_path):
    # a forked child leaves the session, starts a thread and ends its main thread with a raw exit syscall: its
    # leader is a zombie while the thread runs on. The sweep of the run's uid must kill it (forks allowed here).
    tmp_path.chmod(0o777)
    marker = tmp_path / "alive"
    prog = (f"import os, threading, time, ctypes\nif os.fork() == 0:\n    os.setsid()\n"
            f"    def worker():\n        for _ in range(100):\n            try:\n"
            f"                open({str(marker)!r}, 'a').write('x')\n            except OSError:\n                pass\n"
            f"            time.sleep(0.05)\n    threading.Thread(target=worker).start()\n    time.sleep(0.2)\n"
            f"    ctypes.CDLL(None).syscall({ {'x86_64': 60, 'aarch64': 93}.get(os.uname().machine, 60)}, 0)\n"
            f"else:\n    time.sleep(0.6)\n")
    sandbox.run(prog, isolation=level, timeout=20.0, _allow_fork=True)
    size = marker.stat().st_size if marker.exists() else 0
    time.sleep(0.5)
    assert (marker.stat().st_size if marker.exists() else 0) == size  # nothing writes after the run


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_huge_output_is_capped_without_blocking():
    res = sandbox.run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * (1 << 20))\n", timeout=20.0)
    assert res.returncode == 0 and res.stdout_truncated and len(res.stdout) == sandbox.MAX_OUTPUT


def test_stdin_is_closed():
    assert report("import sys\nresult = repr(sys.stdin.read())") == "''"


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("PG_SECRET_TOKEN", "hunter2")
    got = report("import os\nresult = sorted(os.environ)")
    assert "PG_SECRET_TOKEN" not in got and "HOME" not in got


def test_working_dir_is_fresh_empty_and_removed(monkeypatch):
    made = []
    real = sandbox.tempfile.mkdtemp
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    got = report("import os\nresult = ','.join(os.listdir('.'))\nopen('left', 'w').write('x')\nos.mkdir('d')\n"
                 "open('d/f', 'w').write('x')\nos.chmod('d', 0)\n")
    assert got == "" and len(made) == 1 and not os.path.exists(made[0])


def test_channel_framing_violation_kills_the_child():
    res = sandbox.run("import os, time\nos.write(3, b'\\xff\\xff\\xff\\xff')\ntime.sleep(30)\n", timeout=20.0)
    assert res.channel_error is not None and res.channel_error.startswith("bad frame") and res.wall_s < 5


def test_checkpoints_are_acked_and_frames_record_it():
    # a program that waits for the ack before writing on proves it; one that writes ahead does not
    prog = SEND + ("send(b'a')\nsend(b'')\nassert os.read(4, 1) == b'a'\nsend(b'b')\n"
                   "os.write(3, b''.join(len(x).to_bytes(4, 'big') + x for x in (b'', b'c')))\n")
    res = sandbox.run(prog, phases=3, timeout=20.0)
    assert frames(res) == [b"a", b"b", b"c"] and len(res.checkpoints) == 2
    assert res.frame_phases == [0, 1, 2]
    assert res.frame_acks == [0, 1, 1]  # "c" came in the same write as its checkpoint: read before the ack


def test_on_frame_stops_the_run_at_once_or_unless_the_phase_ends_in_time():
    seen = []

    def stop_at(payload: bytes, grace: float):
        def hook(t, raw, size, phase):
            seen.append((raw, size, phase))
            return grace if raw == payload else None
        return hook

    # stop at once on "b": the child is killed (no 30 s sleep, nothing after "b" is kept) and that is no error
    prog = SEND + "send(b'a')\nsend(b'b')\nsend(b'c')\nimport time\ntime.sleep(30)\n"
    res = sandbox.run(prog, timeout=20.0, on_frame=stop_at(b"b", 0.0))
    assert res.stopped and frames(res) == [b"a", b"b"] and res.error is None and res.wall_s < 10
    assert seen == [(b"a", 1, 0), (b"b", 1, 0)]
    # with a grace: a phase that ends within it goes on to the end ...
    prog = SEND + "send(b'a')\nsend(b'')\nos.read(4, 1)\nsend(b'b')\n"
    res = sandbox.run(prog, timeout=20.0, phases=2, on_frame=stop_at(b"a", 10.0))
    assert not res.stopped and frames(res) == [b"a", b"b"] and res.error is None
    # ... one that does not is stopped when the grace runs out, long before its budget
    prog = SEND + "send(b'a')\nimport time\ntime.sleep(30)\nsend(b'')\n"
    res = sandbox.run(prog, timeout=20.0, phases=2, on_frame=stop_at(b"a", 0.3))
    assert res.stopped and not res.timed_out and frames(res) == [b"a"] and 0.3 < res.wall_s < 10


def test_an_oversized_frame_keeps_only_its_prefix():
    prog = SEND + "send(b'x' * (4 << 20))\nsend(b'small')\n"
    res = sandbox.run(prog, timeout=20.0, max_frame=1000)
    assert res.channel_error is None and res.frame_sizes == [4 << 20, 5]
    assert len(res.frames[0][1]) == sandbox.FRAME_PREFIX and res.truncated(0) and not res.truncated(1)
    assert res.frames[1][1] == b"small"


def test_too_many_frames_or_bytes_break_the_channel():
    res = sandbox.run(SEND + "for _ in range(1000):\n    send(b'x')\nimport time\ntime.sleep(30)\n", timeout=20.0,
                      max_frames=50)
    assert res.channel_error == "bad frame: more than 50 frames" and len(res.frames) == 50 and res.wall_s < 10
    res = sandbox.run(SEND + "send(b'x' * (1 << 20))\nimport time\ntime.sleep(30)\n", timeout=20.0,
                      max_channel=1 << 16)
    assert res.channel_error is not None and res.channel_error.startswith("bad frame") and res.wall_s < 10


def test_channel_is_not_inherited_by_grandchildren():
    # the bootstrap moves the channel to fd 3 non-inheritable: a spawned process cannot write to it
    prog = ("import subprocess, sys\nsubprocess.run([sys.executable, '-c', \"import os; os.write(3, b'\\\\0\\\\0\\\\0\\\\1x')\"])\n")
    assert sandbox.run(prog, timeout=20.0, _allow_fork=True).frames == []


# ----------------------------------------------------------------------------------------------------------------
# The seal: a sealed run leaves no trace another run could read

TRACES = {  # name -> statement that leaves a trace (or prepares one)
    "create_in_workdir": "open('t', 'w').write('x')",
    "create_in_tmp": "open('/tmp/pg-seal-' + str(os.getpid()), 'w').write('x')",
    "append_devnull": "open('/dev/null', 'a').write('x')",
    "mkdir": "os.mkdir('d')",
    "fifo": "os.mkfifo('f')",
    "unix_socket": "import socket; socket.socket(socket.AF_UNIX).bind('\\0pg-seal')",
    "tcp_socket": "import socket; socket.socket()",
    "sysv_shm": "import ctypes; assert ctypes.CDLL(None, use_errno=True).shmget(0, 4096, 0o1666) >= 0, 'shmget'",
    "posix_mq": "import ctypes; assert ctypes.CDLL('librt.so.1', use_errno=True).mq_open(b'/pgseal', 0o102, 0o666, None) >= 0, 'mq'",
    "chmod_cwd": "os.chmod('.', 0o777)",
    "utime_cwd": "os.utime('.')",
    "exec": "exec_missing()",  # sealed: EPERM; unsealed: only "no such file"
    "set_name": "import ctypes; assert ctypes.CDLL(None, use_errno=True).prctl(15, b'pg-seal', 0, 0, 0) == 0, 'name'",
}


@pytest.mark.parametrize("level", UNPRIVILEGED)
def test_a_sealed_run_cannot_leave_a_trace(level):
    if sandbox.seccomp_filter(True) is None:
        pytest.skip("no seccomp filter for this architecture")
    prog = ("import os\nr = {}\ndef exec_missing():\n    try:\n        os.execv('/nonexistent-pg', ['x'])\n"
            "    except FileNotFoundError:\n        pass\n" + "".join(
        f"try:\n    {stmt}\n    r[{name!r}] = 'done'\nexcept (OSError, AssertionError):\n    r[{name!r}] = 'refused'\n"
        for name, stmt in TRACES.items()) + "r['read'] = len(open('/usr/bin/env', 'rb').read(10))\nresult = r\n")
    sealed, unsealed = eval(report(prog, isolation=level, seal=True)), eval(report(prog, isolation=level))
    assert sealed == {**{name: "refused" for name in TRACES}, "read": 10}, sealed
    assert unsealed["create_in_workdir"] == "done" and unsealed["mkdir"] == "done"  # the same code, unsealed
    assert unsealed["set_name"] == unsealed["exec"] == "done"


@pytest.mark.parametrize("level", UNPRIVILEGED)
def test_no_keyrings(level):
    # the session keyring is inherited from the grading process: with keys allowed, runs could talk through it
    prog = ("import ctypes\nlc = ctypes.CDLL(None, use_errno=True)\n"
            f"r = lc.syscall({ {'x86_64': 248, 'aarch64': 217}.get(os.uname().machine, 248)}, b'user', b'pg', b'x', 1, "
            "ctypes.c_long(-3))\nresult = (r, ctypes.get_errno())\n")
    assert report(prog, isolation=level) == f"(-1, {errno.EPERM})"


# ----------------------------------------------------------------------------------------------------------------
# Files read back

def test_read_back_regular_file_only():
    prog = ("import os\nopen('result.txt', 'w').write('PASS')\nos.symlink('/etc/hostname', 'link.txt')\n"
            "os.mkfifo('fifo.txt')\n")
    res = sandbox.run(prog, read_files=("result.txt", "link.txt", "fifo.txt", "absent.txt"), timeout=20.0)
    assert res.files == {"result.txt": b"PASS"}


# ----------------------------------------------------------------------------------------------------------------
# Isolation (unprivileged levels)

@pytest.mark.parametrize("level", UNPRIVILEGED)
def test_runs_unprivileged(level):
    uid = int(report("import os\nresult = os.getuid()", isolation=level))
    assert uid != 0 and (level not in sandbox.STRONG or uid == sandbox.SANDBOX_UID)


@pytest.mark.parametrize("level", UNPRIVILEGED)
def test_cannot_signal_the_parent(level):
    prog = (f"import os, signal\nr = []\nfor pid in (os.getppid(), 1, {os.getpid()}):\n    try:\n        os.kill(pid, 0)\n"
            "        r.append(pid)\n    except OSError:\n        pass\nresult = r\n")
    got = report(prog, isolation=level)
    assert str(os.getpid()) not in got  # the grading process is out of reach


@pytest.mark.parametrize("level", UNPRIVILEGED)
def test_cannot_write_to_home_or_project(level, tmp_path):
    targets = [os.path.expanduser("~/pg_sandbox_probe"), str(Path(__file__).resolve().parent / "pg_sandbox_probe")]
    prog = f"for t in {targets!r}:\n    try:\n        open(t, 'w').write('x')\n    except OSError:\n        pass\nresult = 1\n"
    report(prog, isolation=level)
    assert not any(os.path.exists(t) for t in targets)


@pytest.mark.parametrize("level", STRONG)
def test_strong_levels_hide_host_files_and_processes(level, tmp_path):
    (tmp_path / "visible").write_text("x")
    tmp_path.chmod(0o755)
    paths = ["/home", os.path.expanduser("~/.bashrc"), str(DATA), str(Path(__file__).resolve()), "/etc/passwd",
             str(tmp_path / "visible"), "/run", "/var/tmp", "/sys/kernel"]
    prog = (f"import os\nresult = [os.path.exists(p) for p in {paths!r}] + "
            "[len([p for p in os.listdir('/proc') if p.isdigit()])]\n")
    *visible, n_pids = eval(report(prog, isolation=level))
    assert visible == [False] * len(paths) and n_pids <= 3  # its own pid namespace: init + the program (+ a transient)


@pytest.mark.parametrize("level", STRONG)
def test_strong_levels_keep_tmp_private_and_the_system_read_only(level):
    # (bwrap run as root maps the sandbox to root outside, the owner of /proc/sys: host-global settings such as
    # kernel.core_pattern must still be out of reach. Opened for writing only, never written.)
    marker = f"pg-private-{level}-{os.getpid()}"
    prog = (f"import os\nr = []\nfor p in ('/tmp/{marker}', '/dev/shm/{marker}', '/usr/{marker}', '/dev/{marker}', "
            "'/proc/sys/kernel/printk_ratelimit', '/proc/sys/kernel/core_pattern'):\n    try:\n"
            "        os.close(os.open(p, os.O_WRONLY | os.O_CREAT))\n        r.append('w')\n    except OSError:\n"
            "        r.append('-')\nresult = r\n")
    assert eval(report(prog, isolation=level)) == ["w", "w", "-", "-", "-", "-"]
    assert not os.path.exists(f"/tmp/{marker}") and not os.path.exists(f"/dev/shm/{marker}")  # private, gone


@pytest.mark.parametrize("level", STRONG)
def test_strong_levels_have_no_network(level):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    prog = (f"import socket\nr = []\nfor addr in (('127.0.0.1', {port}), ('1.1.1.1', 53)):\n    try:\n"
            "        socket.create_connection(addr, timeout=2).close()\n        r.append('connected')\n"
            "    except OSError as e:\n        r.append(type(e).__name__)\nresult = r\n")
    got = report(prog, isolation=level)
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()
    assert "connected" not in got


@pytest.mark.parametrize("level", STRONG)
def test_strong_levels_hide_installed_packages(level):
    site = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})["purelib"]
    got = report(f"import os\nresult = os.listdir({os.path.realpath(site)!r}) if os.path.isdir({site!r}) else []\n",
                 isolation=level)
    assert got == "[]"


def test_userns_drops_every_capability_and_maps_to_a_uid_of_its_own():
    if "userns" not in AVAILABLE:
        pytest.skip("user namespaces do not work here")
    prog = ("st = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
            "result = ([st[k].strip() for k in ('CapEff', 'CapPrm', 'CapBnd', 'CapAmb', 'NoNewPrivs')], "
            "open('/proc/self/uid_map').read().split())\n")
    caps, uid_map = eval(report(prog, isolation="userns"))
    assert caps == ["0000000000000000"] * 4 + ["1"]
    inside, outside, count = map(int, uid_map)
    assert (inside, count) == (sandbox.SANDBOX_UID, 1)
    # as root: a host uid of its own (so RLIMIT_NPROC binds per run); unprivileged: the caller's own uid
    assert outside >= sandbox._UID_BASE if os.geteuid() == 0 else outside == os.geteuid()


# The start of both root scripts below: a mount helper, then a private mount namespace of this process's own.
_PRIVATE_MOUNTS = r"""
import ctypes, json, os, platform, stat, sys, tempfile
lc = ctypes.CDLL(None, use_errno=True)


def mount(src, dst, kind, flags, data=None):
    if lc.mount(src and src.encode(), dst.encode(), kind and kind.encode(), ctypes.c_ulong(flags),
                data and data.encode()):
        raise OSError(ctypes.get_errno(), "mount " + dst)


if lc.unshare(0x20000) != 0:  # CLONE_NEWNS: these mounts stay in this process's namespace
    raise OSError(ctypes.get_errno(), "unshare")
mount("none", "/", None, 0x4000 | 0x40000)  # MS_REC | MS_PRIVATE
"""

# ----------------------------------------------------------------------------------------------------------------
# Mounts below the bound trees (a GPU container mounts driver files into /usr: libcuda.so.*, nvidia-smi)

# Run as root in a mount namespace of its own: puts a writable tmpfs (nosuid, nodev, like a runtime's) on a directory
# inside each tree the "userns" level binds, with a file on it that is itself a mount (a bind from another tmpfs),
# then runs `program` at "userns" and prints the outcome as JSON. argv: mode, scratch dir, program.
# mode "plain": the former non-recursive bind; "fallback": as if the kernel had no mount_setattr; "incomplete": the
# fallback, remounting only the top of each tree.
_SUBMOUNTS = _PRIVATE_MOUNTS + r"""from projected_grpo import sandbox

mode, scratch, program = sys.argv[1:4]
binds = sandbox._system_tree()[1]
needed = {os.path.realpath(p) for p in sys.path if p} | {sandbox._python(), os.getcwd(), tempfile.gettempdir()}
maps = [ln.split(None, 5) for ln in open("/proc/self/maps")]  # every file the interpreter has mapped
needed |= {os.path.realpath(m[5].strip()) for m in maps if len(m) == 6 and m[5].startswith("/")}
subs = []
for d in binds:  # a directory inside d that neither the interpreter nor this script needs
    for name in ["games", "share", "include", "src", "man"] + sorted(os.listdir(d)):
        sub = os.path.join(d, name)
        if os.path.isdir(sub) and not os.path.islink(sub) and not any((n + "/").startswith(sub + "/") for n in needed):
            subs.append(sub)
            break
    else:
        raise SystemExit("no directory to mount on in " + d)
mount("tmpfs", scratch, "tmpfs", 0, "size=64k,mode=0755")
for i, sub in enumerate(subs):
    mount("tmpfs", sub, "tmpfs", 0x2 | 0x4, "size=64k,mode=1777")  # MS_NOSUID | MS_NODEV, writable by anyone
    for path, text in ((sub + "/marker", sub), (sub + "/libfake.so.1", "stub"), (f"{scratch}/driver{i}", "driver")):
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o666)
    mount(f"{scratch}/driver{i}", sub + "/libfake.so.1", None, 0x1000)  # a file mount inside the mount
if mode in ("fallback", "incomplete"):
    sandbox._NR[platform.machine()] = sandbox._NR[platform.machine()][:2] + (-1,)  # mount_setattr: ENOSYS
if mode == "incomplete":
    boot = sandbox._BOOTS["userns"]
    sandbox._BOOTS["userns"] = boot.replace("for mp in _mounts_under([_top + dst]):", "for mp in [_top + dst]:")
    assert sandbox._BOOTS["userns"] != boot
elif mode == "plain":
    boot = sandbox._BOOTS["userns"]
    sandbox._BOOTS["userns"] = boot.replace('0x1000 | 0x4000, what="bind "', '0x1000, what="bind "')
    assert sandbox._BOOTS["userns"] != boot
why = sandbox._trial("userns")
res = None if why else sandbox.run(program.replace("SUBS", repr(subs)), isolation="userns", timeout=20.0)
print(json.dumps({"trial": why, "subs": subs, "frames": [f.decode() for _, f in res.frames] if res else [],
                  "stderr": res.stderr[-500:] if res else "",
                  "after": [[open(s + "/marker").read(), open(s + "/libfake.so.1").read(), sorted(os.listdir(s))]
                            for s in subs]}))
"""


def _with_submounts(mode: str, tmp_path: Path, program: str = "pass") -> dict:
    import subprocess

    if os.geteuid() != 0 or "userns" not in AVAILABLE:
        pytest.skip("needs root (to mount in a namespace of its own) and a working userns level")
    (tmp_path / "scratch").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _SUBMOUNTS, mode, str(tmp_path / "scratch"), SEND + program],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("mode", ["mount_setattr", "fallback"])
def test_userns_shows_mounts_below_its_binds_read_only(mode, tmp_path):
    # The level must work where the bound trees hold mounts of their own (as /usr does in a GPU container), show
    # them, and keep them read-only: the mounts are writable by anyone outside, only the sandbox's remount stops it
    (tmp_path / "visible").write_text("x")
    tmp_path.chmod(0o755)
    hidden = [os.path.expanduser("~/.bashrc"), str(DATA), str(Path(__file__).resolve()), str(tmp_path / "visible")]
    site = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})["purelib"]
    program = ("import errno, json\nout = []\nfor s in SUBS:\n"
               "    r = [open(s + '/marker').read(), open(s + '/libfake.so.1').read()]\n"
               "    for p, fl in ((s + '/new', os.O_WRONLY | os.O_CREAT), (s + '/marker', os.O_WRONLY | os.O_TRUNC),\n"
               "                  (s + '/libfake.so.1', os.O_WRONLY | os.O_APPEND)):\n"
               "        try:\n            os.close(os.open(p, fl, 0o666))\n            r.append('written')\n"
               "        except OSError as e:\n            r.append(errno.errorcode[e.errno])\n    out.append(r)\n"
               f"out.append([p for p in {hidden!r} if os.path.exists(p)])\n"
               f"out.append(os.listdir({os.path.realpath(site)!r}) if os.path.isdir({site!r}) else [])\n"
               "send(json.dumps(out).encode())\n")
    got = _with_submounts(mode, tmp_path, program)
    assert got["trial"] is None, got
    assert len(got["frames"]) == 1, got["stderr"]
    *subs, exposed, site_listing = json.loads(got["frames"][0])
    assert len(subs) == len(got["subs"]) >= 1  # one per bound tree: /usr, /lib* (where not links), the Python
    for sub, seen in zip(got["subs"], subs, strict=True):
        assert seen == [sub, "driver", "EROFS", "EROFS", "EROFS"], (sub, seen)  # visible, never writable
    assert exposed == [] and site_listing == []  # the contract's hidden paths stay hidden
    assert got["after"] == [[s, "driver", ["libfake.so.1", "marker"]] for s in got["subs"]]  # nothing landed


def test_userns_bind_failures_name_the_path_flags_errno_and_the_mounts_below(tmp_path):
    # The cause, kept as a check: in a user namespace the host's mounts are locked, and the kernel refuses (EINVAL) a
    # non-recursive bind of a tree with locked mounts below it. This is how "userns" failed in a GPU container
    # ("bind /usr: Invalid argument"); the trial now says which path, with which flags, and what is mounted below.
    why = _with_submounts("plain", tmp_path)["trial"]
    assert why is not None and "[Errno 22] sandbox setup: bind " in why, why
    assert "(MS_BIND): EINVAL Invalid argument; mounted below " in why, why


def test_userns_refuses_to_run_if_a_mount_below_a_bind_stayed_writable(tmp_path):
    # fail closed: a read-only remount that misses a mount below a bound tree stops the setup
    why = _with_submounts("incomplete", tmp_path)["trial"]
    assert why is not None and "is still writable after the read-only remount" in why, why


# ----------------------------------------------------------------------------------------------------------------
# A /proc covered by mounts (a container's masked and read-only paths; the NVIDIA runtime's /proc/driver/nvidia)

# Run as root in a mount namespace of its own: covers part of /proc the way Docker and the NVIDIA container runtime
# do, then runs `program` at "userns" and prints the outcome as JSON, with this namespace's mounts before and after
# and what the host's own /proc showed before the masks. argv: mode, program.
# mode "root": as is (CAP_SYS_ADMIN); "no-cap": CAP_SYS_ADMIN dropped from the bounding set, so the bootstrap runs
# without it (as an unprivileged user's would); "stuck": as if no mount below /proc could be unmounted.
_MASKED_PROC = _PRIVATE_MOUNTS + r"""mode, program = sys.argv[1:3]
files = ["/proc/keys", "/proc/kcore", "/proc/timer_list", "/proc/sysrq-trigger", "/proc/kmsg",
         "/proc/sys/kernel/ostype"]
real = {"modes": {p: stat.S_IMODE(os.stat(p).st_mode) for p in files if os.path.exists(p)},
        "dirs": {d: sorted(os.listdir(d)) for d in ("/proc/driver", "/proc/acpi") if os.path.isdir(d)}}
# Docker's masked paths: files under /dev/null (/proc/keys twice: stacked), directories under a read-only tmpfs
for f in ("/proc/kcore", "/proc/keys", "/proc/keys", "/proc/timer_list", "/proc/latency_stats", "/proc/sched_debug"):
    if os.path.exists(f):
        mount("/dev/null", f, None, 0x1000)
for d in ("/proc/acpi", "/proc/scsi", "/proc/asound"):
    if os.path.isdir(d):
        mount("tmpfs", d, "tmpfs", 0x1, "size=4k")
# Docker's read-only paths: bound onto themselves, read-only
for p in ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"):
    if os.path.exists(p):
        mount(p, p, None, 0x1000 | 0x4000)
        mount(None, p, None, 0x20 | 0x1000 | 0x1)
# the NVIDIA runtime: a tmpfs on /proc/driver/nvidia holding the container's own GPU files (here under a tmpfs on
# /proc/driver, for a host without the driver), with a file mount inside it; then one more tmpfs hiding them all
mount("tmpfs", "/proc/driver", "tmpfs", 0, "size=64k,mode=0755")
os.mkdir("/proc/driver/nvidia")
mount("tmpfs", "/proc/driver/nvidia", "tmpfs", 0, "size=64k,mode=0755")
for name in ("version", "params"):
    with open("/proc/driver/nvidia/" + name, "w") as f:
        f.write("runtime's " + name)
mount("/proc/driver/nvidia/params", "/proc/driver/nvidia/version", None, 0x1000)
mount("tmpfs", "/proc/driver", "tmpfs", 0x1, "size=4k,mode=0755")
mount("none", "/", None, 0x4000 | 0x100000)  # MS_REC | MS_SHARED, as on most hosts: what is not made private propagates
if mode == "no-cap" and lc.prctl(24, ctypes.c_ulong(21), 0, 0, 0) != 0:  # PR_CAPBSET_DROP CAP_SYS_ADMIN
    raise OSError(ctypes.get_errno(), "drop CAP_SYS_ADMIN")
from projected_grpo import sandbox

if mode == "stuck":
    boot = sandbox._BOOTS["userns"]
    sandbox._BOOTS["userns"] = boot.replace("_lc.umount2(mp.encode(), 2)", "_lc.umount2(b'/nowhere', 2)")
    assert sandbox._BOOTS["userns"] != boot
before = open("/proc/self/mountinfo").read()
why = sandbox._trial("userns")
res = None if why else sandbox.run(program, isolation="userns", timeout=30.0)
print(json.dumps({"trial": why, "frames": [f.decode() for _, f in res.frames] if res else [],
                  "stderr": res.stderr[-500:] if res else "", "real": real,
                  "masks": [ln.split()[4] for ln in before.splitlines() if ln.split()[4].startswith("/proc/")],
                  "unchanged": open("/proc/self/mountinfo").read() == before,
                  "after": [open("/proc/keys").read(), sorted(os.listdir("/proc/driver")),
                            os.statvfs("/proc/sys").f_flag & 1]}))
"""


def _with_masked_proc(mode: str, program: str = "pass") -> dict:
    import subprocess

    if os.geteuid() != 0 or "userns" not in AVAILABLE:
        pytest.skip("needs root (to mount in a namespace of its own) and a working userns level")
    if not os.path.isdir("/proc/driver"):
        pytest.skip("no /proc/driver to cover here")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    mounts = Path("/proc/self/mountinfo").read_text()
    out = subprocess.run([sys.executable, "-c", _MASKED_PROC, mode, SEND + program], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.splitlines()[-1])
    # the masks were there, and every one of them is still there afterwards: the unmounts happen only in the
    # bootstrap's own mount namespace, and nothing of them propagates to the namespace it was started from
    assert {"/proc/keys", "/proc/sys", "/proc/driver", "/proc/driver/nvidia", "/proc/driver/nvidia/version"} <= set(
        got["masks"]), got["masks"]
    assert got["unchanged"] and got["after"] == ["", [], 1], got
    assert Path("/proc/self/mountinfo").read_text() == mounts  # and this process's namespace saw nothing
    return got


def test_userns_uncovers_a_masked_proc_as_root():
    # As root (CAP_SYS_ADMIN), the bootstrap unmounts what covers /proc in a private mount namespace of its own, so the
    # kernel allows a fresh /proc in the new user namespace; the sandbox shows only its own pid namespace
    got = _with_masked_proc("root", "send(repr(sorted(p for p in os.listdir('/proc') if p.isdigit())).encode())\n")
    assert got["trial"] is None, got
    assert got["frames"] == ["['1']"], got["stderr"]


def test_userns_what_a_program_reaches_of_an_uncovered_proc():
    # What the masks hid is the kernel's own again inside the sandbox: readable only where its mode lets uid 65534
    # read it, and nothing under /proc (its own processes aside) accepts a write
    program = r'''
import errno, json
out = {}
for p in ("/proc/keys", "/proc/kcore", "/proc/timer_list", "/proc/sysrq-trigger", "/proc/kmsg",
          "/proc/sys/kernel/ostype"):
    try:
        with open(p, "rb") as f:
            out[p] = ["read", f.read(64).decode(errors="replace")]
    except OSError as e:
        out[p] = [errno.errorcode[e.errno], ""]
out["dirs"] = {d: sorted(os.listdir(d)) for d in ("/proc/driver", "/proc/acpi") if os.path.isdir(d)}
opened, walked = [], 0
for root, dirs, names in os.walk("/proc"):
    if root == "/proc":
        dirs[:] = [d for d in dirs if not d.isdigit() and d not in ("self", "thread-self")]
    for name in names:
        p = os.path.join(root, name)
        if not os.path.islink(p):
            walked += 1
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
                opened.append(p)
            except OSError:
                pass
out["walked"], out["opened"] = walked, opened
try:
    fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY)
    os.write(fd, b"100")
    out["ns_last_pid"] = "written"
except OSError as e:
    out["ns_last_pid"] = errno.errorcode[e.errno]
send(json.dumps(out).encode())
'''
    got = _with_masked_proc("root", program)
    assert got["trial"] is None and len(got["frames"]) == 1, got
    seen, real = json.loads(got["frames"][0]), got["real"]
    for p, mode in real["modes"].items():
        if p in ("/proc/keys", "/proc/sys/kernel/ostype"):
            continue
        # e.g. /proc/kcore (0400, and CAP_SYS_RAWIO), /proc/sysrq-trigger (0200), /proc/timer_list (0400 on recent
        # kernels): root's alone
        assert seen[p][0] == ("read" if mode & 0o004 else "EACCES"), (p, oct(mode), seen[p])
    assert seen["/proc/keys"] == ["read", ""]  # keys are listed only in a user namespace that maps their owner
    assert seen["/proc/sys/kernel/ostype"] == ["read", "Linux\n"]  # /proc/sys: readable...
    assert seen["dirs"] == real["dirs"]  # the kernel's /proc/driver and /proc/acpi, not the masks
    assert seen["walked"] > 100, seen["walked"]
    # ...and nothing there opens for writing but the pid namespace's own cursor (which refuses the write: no
    # capability) and the pressure files (a poll trigger on the opener's own file, open to every user)
    assert [p for p in seen["opened"] if p != "/proc/sys/kernel/ns_last_pid"
            and not p.startswith("/proc/pressure/")] == [], seen["opened"]
    assert seen["ns_last_pid"] == "EPERM"


def test_userns_without_cap_sys_admin_names_what_covers_proc():
    # Without CAP_SYS_ADMIN (an unprivileged user) nothing can be unmounted: the level fails as before, naming the
    # mounts
    why = _with_masked_proc("no-cap")["trial"]
    assert why is not None and "sandbox setup: /proc (MS_NOSUID|MS_NODEV|MS_NOEXEC): EPERM Operation not permitted; " \
                               "mounted below /proc: " in why, why
    assert "/proc/keys" in why and "could not unmount" not in why, why


def test_userns_names_the_mounts_it_could_not_unmount_below_proc():
    why = _with_masked_proc("stuck")["trial"]
    assert why is not None and "EPERM Operation not permitted; mounted below /proc: " in why, why
    assert "; could not unmount " in why and " of them (ENOENT)" in why, why


# ----------------------------------------------------------------------------------------------------------------
# Choosing the level

@pytest.fixture
def fresh_detection(monkeypatch):
    """Detection state reset for one test (restored afterwards)."""
    from loguru import logger

    for name, value in (("_level", None), ("_works", {}), ("_why_not", {}), ("_weak_accepted", False)):
        monkeypatch.setattr(sandbox, name, value)
    messages: list[str] = []
    sink = logger.add(messages.append, level="INFO", format="{level} {message}")
    yield messages
    logger.remove(sink)


def test_without_bwrap_namespaces_are_built_here(monkeypatch, fresh_detection):
    if "userns" not in AVAILABLE:
        pytest.skip("user namespaces do not work here")
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    assert sandbox.isolation_level() == "userns" and sandbox.isolation_level() == "userns"
    assert sandbox.require_isolation() == "userns"  # strong: no flag needed
    assert len(fresh_detection) == 1 and fresh_detection[0].startswith("INFO sandbox isolation: userns (")
    assert os.geteuid() == 0 or "bwrap not found" in fresh_detection[0]  # as root, userns is tried first


def test_a_weak_level_is_refused_unless_accepted(monkeypatch, fresh_detection):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    real = sandbox._trial
    monkeypatch.setattr(sandbox, "_trial", lambda level: "broken here" if level == "userns" else real(level))
    weak = "uid" if os.geteuid() == 0 else "rlimits"
    assert sandbox.isolation_level() == weak
    assert len(fresh_detection) == 1 and fresh_detection[0].startswith(f"WARNING sandbox isolation: {weak} (WEAK")
    for refused in (lambda: sandbox.require_isolation(False), lambda: sandbox.run("pass")):
        with pytest.raises(sandbox.IsolationError, match="--allow-weak-isolation") as e:
            refused()
        assert len(str(e.value).splitlines()) == 1 and "bwrap not found" in str(e.value) and "broken here" in str(e.value)
    assert sandbox.require_isolation(True) == weak  # accepted once, for the whole process
    assert sandbox.run("pass", timeout=20.0).isolation == weak


def test_a_forced_level_must_work_and_a_weak_one_be_accepted(monkeypatch, fresh_detection):
    monkeypatch.setattr(sandbox, "_trial", lambda level: "missing here" if level == "bwrap" else None)
    with pytest.raises(sandbox.IsolationError, match="isolation 'bwrap' does not work here: missing here"):
        sandbox.require_isolation(False, "bwrap")
    with pytest.raises(sandbox.IsolationError, match="'rlimits' is a weak level.*--allow-weak-isolation"):
        sandbox.require_isolation(False, "rlimits")
    assert sandbox.require_isolation(True, "rlimits") == "rlimits" and sandbox.require_isolation(False, "userns") == "userns"


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is about running programs as root")
def test_as_root_refuses_when_nothing_unprivileged_works(monkeypatch, fresh_detection):
    monkeypatch.setattr(sandbox, "_trial", lambda level: f"{level} broken")
    with pytest.raises(sandbox.IsolationError, match="userns: userns broken; bwrap: bwrap broken; .*uid broken"):
        sandbox.isolation_level()


@pytest.mark.parametrize("level", LEVELS)
def test_child_dies_with_the_grading_process(level, tmp_path):
    # a grading process that is SIGKILLed mid-run leaves no sandboxed program behind
    marker = f"pg-orphan-{level}-{os.getpid()}"
    script = tmp_path / "grading.py"
    program = f"import os\nos.execv('/bin/sleep', [{marker!r}, '60'])\n"  # the marker shows as its argv[0]
    script.write_text(f"from projected_grpo import sandbox\nsandbox.run({program!r}, isolation={level!r}, timeout=60)\n")
    import subprocess
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # its working directory outlives it: keep it in tmp_path
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 20
    while not _with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _with_marker(marker), "the sandboxed program never started"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while _with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _with_marker(marker) == []


def _with_marker(marker: str) -> list[str]:
    """Live processes with `marker` in their command line."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


# ----------------------------------------------------------------------------------------------------------------
# Fork servers (run(server=True), userns only): what a program observes and what the parent reports are those of a
# fresh run

SERVED = pytest.mark.skipif("userns" not in AVAILABLE, reason="fork servers need the userns level")
SAME_AS_FRESH = {
    "output_and_exit_status": "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)",
    "uncaught_exception": "raise ValueError('boom')",
    "frames_and_checkpoints": SEND + "send(b'a')\nsend(b'')\nassert os.read(4, 1) == b'a'\nsend(b'b')",
    "killed_by_a_signal": "import signal, os\nsignal.signal(signal.SIGUSR1, signal.SIG_DFL)\n"
                          "os.kill(os.getpid(), signal.SIGSEGV)",
    "atexit_runs": "import atexit\natexit.register(print, 'bye')",
    "result_file": "open('result.txt', 'w').write('PASS')\nimport os\nos.symlink('/etc/passwd', 'link.txt')",
    "flood": "import sys\nsys.stdout.write('x' * (1 << 20))",
    "identity": SEND + "import json\nsend(json.dumps([os.getuid(), os.getgid(), os.getpid(), os.getcwd(),"
                       " sorted(os.listdir('.')), os.path.exists('/proc/1/exe') or 'no-exe', [line for line in"
                       " open('/proc/self/status') if line.startswith(('Cap', 'NoNewPrivs', 'Seccomp:'))]]).encode())",
}


@SERVED
@pytest.mark.parametrize("name", list(SAME_AS_FRESH))
def test_a_served_run_reports_what_a_fresh_run_reports(name):
    kw = dict(isolation="userns", timeout=10.0, phases=2, read_files=("result.txt", "link.txt"))
    fresh = sandbox.run(SAME_AS_FRESH[name], **kw)
    served = sandbox.run(SAME_AS_FRESH[name], server=True, **kw)
    assert served.forkserver and not fresh.forkserver
    keys = ("returncode", "timed_out", "stdout", "stdout_truncated", "channel_error", "files", "error")
    assert {k: getattr(served, k) for k in keys} == {k: getattr(fresh, k) for k in keys}
    assert frames(served) == frames(fresh) and len(served.checkpoints) == len(fresh.checkpoints)
    assert served.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]


@SERVED
def test_a_served_run_times_out_and_its_server_goes_on():
    t0 = time.monotonic()
    res = sandbox.run("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass",
                      isolation="userns", server=True, timeout=0.5)
    assert res.timed_out and res.error == "timeout" and time.monotonic() - t0 < 5
    assert frames(sandbox.run(SEND + "send(b'ok')", isolation="userns", server=True)) == [b"ok"]


def test_servers_only_at_userns():
    with pytest.raises(ValueError, match="server=True needs isolation 'userns'"):
        sandbox.run("pass", isolation="rlimits", server=True)
