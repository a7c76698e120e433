"""Run one Python program in a fresh, isolated subprocess -> `ExecResult`. Knows nothing of tests, grades or rewards.

What one `run(program)` does
- Starts a fresh interpreter (the base Python, `python3 -I -S -B -X utf8`: no site-packages, no user site, no env
  vars, no bytecode writes) in its own session and process group, with a scrubbed environment and an empty
  temporary working directory that is removed afterwards.
- A small trusted bootstrap runs first: it moves the *channel* (the write end of a dedicated pipe) to fd
  `CHANNEL_FD` and the *control* pipe (parent -> child) to fd `CONTROL_FD`, isolates itself (see the levels
  below), installs a seccomp filter, sets rlimits (RLIMIT_AS = memory_mb, RLIMIT_CPU = wall budget + 1 s,
  RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE = 0), reads the program from stdin and then replaces stdin
  with /dev/null, and only then executes the program. (No `preexec_fn`: it forces `fork()` of the whole parent,
  which is slow from a large training process and unsafe with threads; no byte of the program is read before the
  limits are in place.)
- The parent reads stdout and stderr concurrently, keeping the first `max_output` bytes of each (the rest is read
  and dropped, so a flood neither blocks the child nor grows memory), and reads the channel as length-prefixed
  frames (4-byte big-endian length + payload), each stamped with its arrival time. An empty frame is a
  *checkpoint*: it ends a phase and grants the next phase a fresh `timeout` (at most `phases` phases); the parent
  answers each checkpoint with one byte on the control pipe (an *ack*) and records, for every frame, how many
  checkpoints preceded it and how many acks had been sent before the bytes that completed it were read. A program
  that waits for the ack before going on proves its next frames were written after the parent saw the checkpoint.
- Memory and time spent on the channel are bounded per run: a frame longer than `max_frame` keeps only its first
  `FRAME_PREFIX` bytes (its true length is recorded); more than `max_frames` frames, or more than `max_channel`
  bytes in all, is a framing violation.
- The caller may pass `on_frame`, called with each frame as it arrives (while the child runs). When it returns a
  number of seconds g, the run *stops* unless the current phase ends (a checkpoint arrives) within g (0: at once):
  the child is killed, the rest of the channel is discarded and `ExecResult.stopped` is set. (The grader stops a
  suite whose outcome is already decided.)
- The child's whole process group is killed with SIGKILL when the phase budget runs out, when the channel breaks
  its framing, when the run stops, and always at the end; `files` named by the caller are then read back from the
  working directory (regular files only, no symlinks, capped) before it is removed.

Isolation levels. The two *strong* levels give the same guarantees (docs/isolation.md says exactly which):
- "bwrap": bubblewrap with new user, pid, network, ipc, uts and cgroup namespaces, `--disable-userns`,
  `--die-with-parent`, `--new-session`, uid/gid 65534 inside, /proc/sys hidden (started by root, bubblewrap maps
  the sandbox to root outside, which owns /proc/sys). Tried first unless root.
- "userns": the same built here from the kernel's primitives (no binary needed): the bootstrap unshares user,
  mount, pid, network, ipc, uts and cgroup namespaces, forks the program as pid 1 of its pid namespace, mounts a
  minimal root (tmpfs) with read-only binds of /usr, /lib..., the Python installation (its site-packages hidden;
  recursive, with every mount below them read-only too: the host's mounts are locked in the new namespace),
  a fresh /proc, a minimal read-only /dev, private 16 MiB tmpfs /tmp and /dev/shm and the working directory at
  /sandbox, `pivot_root`s into it, detaches the host's tree, drops every capability and becomes uid 65534. With
  CAP_SYS_ADMIN (root, a container's root) it first enters a private mount namespace of its own and unmounts there
  whatever covers part of /proc (a container's masked paths, /proc/driver/nvidia), without which the kernel refuses
  the fresh /proc; the host's mounts stay as they are. Run as root, uid 65534 maps to a host uid of its own per run
  (written by this process), so RLIMIT_NPROC binds and every process of the run can be found and killed; run
  unprivileged, it maps to the caller's uid. Tried first as root.
  At both: the home directory, the project, the data set, the host's /tmp and other processes are not visible; there
  is no network; when the namespace's first process dies the kernel kills everything left in it.
Two *weak* levels remain, refused unless the caller accepts them (`require_isolation(allow_weak=True)`, the CLIs'
`--allow-weak-isolation`) or names them explicitly (`run(..., isolation="uid")`):
- "uid" (root without namespaces): the child drops to a uid of its own (unique per concurrent run). It still sees
  the host's world-readable files (the data set), the shared /tmp, the network and the process list.
- "rlimits": rlimits and the process group only; the program runs as the calling user.

At every level the same seccomp filter (x86_64, aarch64) makes fork, vfork and non-thread clones fail (threads work;
no new process can be made), and refuses keyrings, io_uring, ptrace, namespace and mount calls. `seal=True` adds the
*seal*: no file may be opened for writing, created, renamed, removed or have its metadata changed, no socket,
SysV or POSIX IPC object may be made or used, no program executed and no process name set. A sealed run can persist
nothing any other run can read, at any level; the grader seals every run that holds the canonical solution. Every
run is also made non-dumpable (its /proc memory and environment are root's alone).

Fork servers (`run(server=True)`, "userns" only; the grader's default there). A server is an interpreter started
like a "userns" run that keeps its capabilities inside its own user namespace, imports `preload` once and then runs
one job at a time: per job an intermediate enters fresh mount, pid, ipc and network namespaces with fresh tmpfs on
/sandbox, /tmp and /dev/shm and forks the program's process (pid 1 of its pid namespace, a fresh /proc, a session
of its own, only its five pipes open, every capability dropped), which then does what a fresh run's bootstrap does
(non-dumpable, seccomp, rlimits, the program read from its own stdin: no program byte enters the server). The parent
passes the pipes over a socket, kills a run by asking the intermediate, and replaces a server that dies, hangs or
fails (the run raises ServerError, an OSError). A server serves SERVER_JOBS programs, then is replaced; the programs
of one server share its string hash seed (docs/isolation.md, "Fork servers").

What it does not cover
- The program can always find and write to the channel (it runs in the same process as whatever the caller put
  in front of it), so everything that comes back is a claim, never a verdict: callers must decide from values
  the child is never shown.
- Memory is bounded per process (RLIMIT_AS), not per run (no cgroup). The working directory is on the host's temp
  filesystem: a program can write there (files of at most fsize_mb) for as long as its time budget lasts.
- Timing and CPU-load side channels between concurrent runs.
"""

from __future__ import annotations

import atexit
import binascii
import errno
import glob
import json
import math
import os
import platform
import select
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from loguru import logger

CHANNEL_FD = 3  # where the program finds the channel's write end
CONTROL_FD = 4  # where the program finds the control pipe's read end (one ack byte per checkpoint)
SANDBOX_UID = 65534  # uid/gid inside the namespaces ("nobody")
LEVELS = ("bwrap", "userns", "uid", "rlimits")  # strongest first
STRONG = ("bwrap", "userns")  # the levels the grader uses by default
WORKDIR = "/sandbox"  # the working directory's path inside the namespaces
WEAK_FLAG = "--allow-weak-isolation"  # the flag, on every command, that accepts a weak level

# Defaults (keyword arguments of `run`).
MEMORY_MB = 1024
NPROC = 16  # processes + threads (inside bubblewrap its init and the interpreter count as 2)
FSIZE_MB = 10
NOFILE = 64
MAX_OUTPUT = 64 * 1024  # bytes kept of stdout and of stderr each
MAX_FRAME = 16 << 20  # bytes kept of one frame; a longer one keeps FRAME_PREFIX bytes
MAX_FRAMES = 1 << 16  # frames (checkpoints included) per run
MAX_CHANNEL = 64 << 20  # bytes read from the channel per run
FRAME_PREFIX = 256  # bytes kept of a frame over max_frame
MAX_FILE = 64 * 1024  # bytes read back of each requested file
TMPFS_MB = 16  # size of /tmp and /dev/shm inside the namespaces
TMPFS_INODES = 16384  # files (and links) each fork-server job's tmpfs holds: bounds what its teardown costs
SETUP_TIMEOUT = 30.0  # seconds the "userns" bootstrap may take to ask for its uid map
SERVER_JOBS = 64  # programs one fork server runs before it is replaced (and with it its hash seed)
SERVER_REPLY_S = 10.0  # seconds a fork server may take to report a run whose program ended or was killed

COVERS = {  # level -> what it guarantees (one line each; docs/isolation.md has the details)
    "bwrap": "bubblewrap namespaces: read-only /usr and Python only, private /tmp, no network, own pid namespace, "
             "no new processes, rlimits",
    "userns": "kernel namespaces set up in Python (no bwrap): read-only /usr and Python only, private /tmp, no "
              "network, own pid namespace, no new processes, rlimits",
    "uid": "WEAK: an unprivileged uid with rlimits and no new processes, but programs can read this machine's "
           "world-readable files (including the data set and its expected outputs), write the shared /tmp, use "
           "the network and see the process list",
    "rlimits": "WEAK: programs run as YOUR USER with rlimits and no new processes: they can read and write your files "
               "(including the data set), use the network and signal your processes",
}


# on_frame(arrival time, kept payload, true length, checkpoints before it) -> None to go on, or g: stop the run
# unless its current phase ends within g seconds (0: stop now)
FrameHook = Callable[[float, bytes, int, int], float | None]


class ServerError(OSError):
    """A fork server died, hung or failed during a run (it has been replaced); the run has no result."""


class IsolationError(RuntimeError):
    """No strong isolation level works here and the caller did not accept a weak one (one line, names the flag)."""


@dataclass
class ExecResult:
    """What the parent observed of one run. Nothing in it is trusted beyond "the child wrote this"."""

    returncode: int | None  # as subprocess reports it: -N = killed by signal N (see `exit_signal`)
    timed_out: bool  # killed because a phase ran past its budget
    stdout: str  # the first max_output bytes, decoded as UTF-8 with replacement
    stderr: str
    stdout_truncated: bool
    frames: list[tuple[float, bytes]]  # (seconds since start, payload) in arrival order; checkpoints excluded
    checkpoints: list[float] = field(default_factory=list)  # arrival times of the empty frames
    channel_error: str | None = None  # "bad frame: ..." when the channel broke its framing (the child was killed)
    files: dict[str, bytes] = field(default_factory=dict)  # requested files that existed as regular files
    wall_s: float = 0.0
    isolation: str = ""
    frame_sizes: list[int] = field(default_factory=list)  # true length of each frame (payload shorter: truncated)
    frame_phases: list[int] = field(default_factory=list)  # checkpoints received before each frame
    frame_acks: list[int] = field(default_factory=list)  # acks sent before the bytes completing each frame were read
    stopped: bool = False  # on_frame asked to stop and the phase did not end in time: the child was killed
    forkserver: bool = False  # run by a fork server (run(server=True)) rather than a fresh interpreter

    def truncated(self, i: int) -> bool:
        """Whether frame i was longer than max_frame (only its first FRAME_PREFIX bytes were kept)."""
        return len(self.frames[i][1]) < self.frame_sizes[i]

    @property
    def exit_signal(self) -> int | None:
        """The signal that ended the child (bubblewrap reports a signalled child as exit status 128+N)."""
        if self.returncode is None:
            return None
        if self.returncode < 0:
            return -self.returncode
        if self.isolation == "bwrap" and 128 < self.returncode < 128 + 65:
            return self.returncode - 128
        return None

    @property
    def error(self) -> str | None:
        """One short reason the run did not end normally, or None."""
        if self.timed_out:
            return "timeout"
        if self.channel_error:
            return self.channel_error
        if self.stopped:  # killed on the caller's request: not the program's doing
            return None
        sig = self.exit_signal
        if sig is not None:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = "?"
            return f"killed by signal {sig} ({name})"
        if self.returncode:
            return f"exit status {self.returncode}"
        return None


# ----------------------------------------------------------------------------------------------------------------
# Isolation level: detected once per process

_level_lock = threading.Lock()
_level: str | None = None
_why_not: dict[str, str] = {}  # level -> why its trial failed
_works: dict[str, bool] = {}  # level -> whether its trial passed (levels tried so far)
_weak_accepted = False


def isolation_level() -> str:
    """The strongest level that works on this machine: "bwrap" or "userns" ("userns" first as root, see
    `_preference`), else "uid" (root only) or "rlimits". Checked
    once per process with trial runs, and announced in one log line (`isolation_info()`): INFO for a strong level,
    WARNING for a weak one. A weak level is returned here but refused by `run`, `grader.grade_batch` and the CLIs
    until `require_isolation(allow_weak=True)` accepts it. Raises IsolationError as root if not even dropping to an
    unprivileged uid works (programs never run as root unless isolation="rlimits" is passed explicitly)."""
    global _level
    with _level_lock:
        if _level is None:
            for level in _preference():
                if _level_works(level):
                    _level = level
                    break
            else:
                if os.geteuid() == 0:
                    if not _level_works("uid"):
                        raise IsolationError(f"cannot run graded programs unprivileged here: {_why_not_line()}; "
                                             f"dropping to an unprivileged uid failed too: {_why_not['uid']}")
                    _level = "uid"
                else:
                    _level = "rlimits"
            line = isolation_info()
            (logger.info if _level in STRONG else logger.warning)(line)
        return _level


def _preference() -> tuple[str, str]:
    """The strong levels in the order tried. As root, "userns" first: it maps the sandbox to an unprivileged host uid
    of its own, where bubblewrap (not setuid, started by root) maps it to root outside."""
    return ("userns", "bwrap") if os.geteuid() == 0 else ("bwrap", "userns")


def isolation_info() -> str:
    """One line: the level in use, what it covers, and why no stronger level works (for logs, config.json,
    eval.json and reports). Detects the level first if that has not happened yet."""
    level = _level if _level is not None else isolation_level()
    line = f"sandbox isolation: {level} ({COVERS[level]})"
    if level not in STRONG:
        line += f"; no strong level works here: {_why_not_line()}"
    elif level == "userns" and "bwrap" in _why_not:
        line += f"; bwrap unavailable: {_why_not['bwrap']}"
    return line


def is_strong(level: str) -> bool:
    return level in STRONG


def require_isolation(allow_weak: bool = False, level: str | None = None) -> str:
    """The level graded programs will run at: `level` if given (checked to work here), else the detected one. If it is
    weak ("uid", "rlimits"), raises IsolationError (one line naming --allow-weak-isolation) unless `allow_weak`;
    once accepted, the detected weak level stays accepted in this process, so `run` and `grader.grade_batch` use it.
    Call it before any model work (train, eval, grade), with the command's --allow-weak-isolation (and
    --isolation, if it has one)."""
    global _weak_accepted
    if level is not None:
        if level not in LEVELS:
            raise ValueError(f"isolation={level!r}: expected one of {', '.join(LEVELS)}")
        if level not in STRONG and not allow_weak:
            raise IsolationError(f"isolation {level!r} is a weak level ({COVERS[level].removeprefix('WEAK: ')}); "
                                 f"pass {WEAK_FLAG} as well to accept it")
        if not _level_works(level):
            raise IsolationError(f"isolation {level!r} does not work here: {_why_not.get(level, '?')}")
        return level
    level = isolation_level()
    if level in STRONG:
        return level
    if not (allow_weak or _weak_accepted):
        raise IsolationError(
            f"refusing to run untrusted code at the weak isolation level {level!r} ({COVERS[level].removeprefix('WEAK: ')}); "
            f"no strong level works here: {_why_not_line()}. Install bubblewrap or allow user namespaces "
            f"(sysctl user.max_user_namespaces > 0), or pass {WEAK_FLAG} to accept {level!r}")
    _weak_accepted = True
    return level


def available_levels() -> list[str]:
    """Every level that works here, strongest first (runs a trial for each level not tried yet). For tests and
    benchmarks that cover each level; "rlimits" is listed only when not root (as root it would run programs as
    root)."""
    levels = [lv for lv in ("bwrap", "userns") if _level_works(lv)]
    if os.geteuid() == 0:
        levels += ["uid"] if _level_works("uid") else []
    else:
        levels.append("rlimits")
    return levels


def _why_not_line() -> str:
    return "; ".join(f"{lv}: {why}" for lv, why in _why_not.items() if lv in ("bwrap", "userns")) or "none tried"


def _level_works(level: str) -> bool:
    if level not in _works:
        why = _trial(level)
        _works[level] = why is None
        if why is not None:
            _why_not[level] = why
    return _works[level]


def _resolve(isolation: str | None) -> str:
    """The level for a run: the given one, or the detected one if strong or accepted; else IsolationError."""
    if isolation is not None:
        if isolation not in LEVELS:
            raise ValueError(f"isolation={isolation!r}: expected one of {', '.join(LEVELS)}")
        return isolation
    return require_isolation(False)


def _trial(level: str) -> str | None:
    """None if a probe program runs at `level` unprivileged, imports the standard library and reports back on the
    channel; else why not."""
    if level == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap not found on PATH"
    if level == "uid" and os.geteuid() != 0:
        return "needs root"
    if level == "userns":
        try:
            _userns_plan()
        except (OSError, ValueError) as e:
            return f"cannot plan the mounts: {e}"
    probe_dir = tempfile.mkdtemp(prefix="pg-probe-")  # a fresh dir in the host's temp dir: must stay out of sight
    hidden = [os.path.realpath(__file__), os.path.realpath(probe_dir)]
    ok = {
        "bwrap": f"os.getuid() == {SANDBOX_UID} and not any(map(os.path.exists, {hidden!r}))",
        "userns": f"os.getuid() == {SANDBOX_UID} and not any(map(os.path.exists, {hidden!r})) and "
                  "[l for l in open('/proc/self/status') if l.startswith('CapEff:')] == ['CapEff:\\t0000000000000000\\n']",
    }.get(level, "os.getuid() != 0")
    probe = (f"import os, json, collections, datetime, typing\nmsg = b'ok' if {ok} else b'exposed'\n"
             "os.write(3, len(msg).to_bytes(4, 'big') + msg)\n")
    try:
        res = run(probe, timeout=30.0, isolation=level)
    except OSError as e:
        return f"{level} could not start: {e}"
    finally:
        os.rmdir(probe_dir)
    if res.returncode == 0 and [f for _, f in res.frames] == [b"ok"]:
        return None
    detail = (res.stderr.strip().splitlines() or [res.error or "no report"])[-1]
    return f"{level} trial failed: {detail[:300]}"


# ----------------------------------------------------------------------------------------------------------------
# The bootstrap (trusted; runs before any byte of the program is read)

# argv: level (0 bwrap, 1 userns, 2 uid, 3 rlimits), channel fd, control fd, sync fd (-1: none), uid, gid, the
# rlimits, parent pid (-1: bwrap, which has --die-with-parent), seccomp filter (hex, "" = none), and for "userns":
# root mount point, working directory, mount plan, syscall numbers of pivot_root, capset and mount_setattr, tmpfs
# size.
_BOOT_HEAD = """\
import os, sys, fcntl, resource as _r
_a = sys.argv[1:]
_lv, _ch, _ct, _sy, _uid, _gid, _as, _cpu, _np, _fs, _nf, _pp = [int(x) for x in _a[:12]]
_bpf = bytes.fromhex(_a[12])
_hi = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 10) if f >= 0 else -1 for f in (_ch, _ct, _sy)]
for _f in (_ch, _ct, _sy):
    if _f >= 0:
        os.close(_f)
os.dup2(_hi[0], 3, inheritable=False)
os.dup2(_hi[1], 4, inheritable=False)
os.close(_hi[0])
os.close(_hi[1])
_sy = _hi[2]
"""

_BOOT_USERNS = """\
import ctypes, errno as _en
_lc = ctypes.CDLL(None, use_errno=True)
_U = ctypes.c_ulong
_MS = ((0x20, "REMOUNT"), (0x1000, "BIND"), (0x4000, "REC"), (0x40000, "PRIVATE"), (0x1, "RDONLY"), (0x2, "NOSUID"),
       (0x4, "NODEV"), (0x8, "NOEXEC"), (0x400, "NOATIME"), (0x800, "NODIRATIME"), (0x1000000, "STRICTATIME"))


def _ok(res, what):
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, "sandbox setup: %s: %s %s" % (what, _en.errorcode.get(e, "errno"), os.strerror(e)))


def _mount(src, dst, kind, flags, data=None, what=None):
    # mount(2), or OSError naming what (default: dst), the flags and the errno.
    _ok(_lc.mount(None if src is None else src.encode(), dst.encode(), None if kind is None else kind.encode(),
                  _U(flags), None if data is None else data.encode()),
        "%s (%s)" % (what or dst, "|".join("MS_" + n for b, n in _MS if flags & b) or "0"))


def _mounts_under(tops):
    # Mount points at or below the paths tops, as /proc/self/mountinfo names them (octal escapes decoded).
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for ln in f.read().split(b"\\n"):
            p = ln.split(b" ")
            if len(p) > 4:
                q = p[4].split(bytes([92]))
                mp = os.fsdecode(q[0] + b"".join(bytes([int(x[:3], 8)]) + x[3:] for x in q[1:]))
                if any(mp == t or mp.startswith(t + "/") for t in tops):
                    out.append(mp)
    return out


def _with_mounts_below(e, path):
    # e, its message naming the host's mounts below path (the usual reason the kernel refuses to show a tree)
    below = list(dict.fromkeys(m for m in _mounts_under([path]) if m != path))  # (once each, if stacked)
    if not below:
        return e
    return OSError(e.errno, "%s; mounted below %s: %s%s" % (e.strerror, path, ", ".join(below[:3]),
                                                           " and %d more" % (len(below) - 3) if len(below) > 3 else ""))


def _uncover_proc():
    # The kernel mounts a fresh /proc in a user namespace only if a /proc it already shows is fully visible: no mount
    # inherited from the host may cover a path below it (a container's masked paths, /proc/keys, /proc/kcore...; a
    # GPU runtime's /proc/driver/nvidia). With CAP_SYS_ADMIN here (root, a container's root), enter a mount namespace
    # of this process's own, private (no mount or unmount propagates back to the host's), and lazily unmount every
    # mount below /proc there, deepest first; the namespaces made next are copies of it. Returns {mount point: errno}
    # for those that would not go (e.g. locked by an outer user namespace); the /proc mount then fails naming them.
    _ok(_lc.unshare(0x20000), "unshare the mount namespace")
    _mount("none", "/", None, 0x4000 | 0x40000, what="make / private")
    left = {}
    for _ in range(16):  # again while some go: one unmount may uncover a mount it hid, or one stacked below it
        below = [m for m in _mounts_under(["/proc"]) if m != "/proc"]
        left = {}
        for mp in sorted(below, key=lambda m: -m.count("/")):
            if _lc.umount2(mp.encode(), 2) != 0:  # MNT_DETACH
                left[mp] = _en.errorcode.get(ctypes.get_errno(), "errno")
        if len(left) == len(below):
            break
    return left


def _cap_eff(n):
    # Whether capability n is effective (in this process's user namespace).
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("CapEff:"):
                return int(ln.split()[1], 16) >> n & 1
    return 0


_ok(_lc.prctl(1, _U(9), _U(0), _U(0), _U(0)), "die with the grading process")
if os.getppid() != _pp:
    os._exit(1)
if _sy >= 0:
    os.setgroups([])
_stuck = _uncover_proc() if _cap_eff(21) else {}  # CAP_SYS_ADMIN; without it, /proc must already be fully visible
_ok(_lc.unshare(0x10000000 | 0x20000 | 0x20000000 | 0x40000000 | 0x8000000 | 0x4000000 | 0x2000000), "unshare")
if _sy >= 0:  # the grading process writes our uid/gid maps (only it may map a uid other than our own)
    os.write(_sy, b"u")
    os.close(_sy)
    if os.read(4, 1) != b"g":
        os._exit(1)
else:
    for _f, _v in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (_uid, os.geteuid())),
                   ("gid_map", "%d %d 1" % (_gid, os.getegid()))):
        with open("/proc/self/" + _f, "w") as _h:
            _h.write(_v)
_c = os.fork()
if _c:  # stay outside the pid namespace, wait, and end as the program ended
    os.close(3)
    os.close(4)
    _r.setrlimit(_r.RLIMIT_CORE, (0, 0))
    _s = os.waitpid(_c, 0)[1]
    if os.WIFSIGNALED(_s):
        import signal
        signal.signal(os.WTERMSIG(_s), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(_s))
        os._exit(128 + os.WTERMSIG(_s))
    os._exit(os.waitstatus_to_exitcode(_s) & 255)
# pid 1 of the new pid namespace. As the caller (before the uid change, so that directories only the caller may
# traverse are reachable): open the bind sources, mount the new root and enter it. Then everything is relative.
_root, _work, _plan = _a[13], _a[14], [ln.split("\\t") for ln in _a[15].split("\\n") if ln]
_fds = {e[1]: os.open(e[1], os.O_PATH) for e in _plan if e[0] in "bfd"}
_fds[_work] = os.open(_work, os.O_PATH)
_mount("none", "/", None, 0x4000 | 0x40000, what="make / private")
_mount("tmpfs", _root, "tmpfs", 0x2 | 0x4, "size=1m,mode=0755,uid=%d,gid=%d" % (_uid, _gid), "root tmpfs")
os.chdir(_root)
os.setresgid(_gid, _gid, _gid)
os.setresuid(_uid, _uid, _uid)  # capabilities in the new namespaces stay until dropped below


def _bind(src, dst, ro, is_dir):
    path = "." + dst
    if is_dir:
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    # Recursive: the mounts inherited from the host are locked in this user namespace, and the kernel refuses (EINVAL)
    # a plain bind of a tree that has locked mounts below it (e.g. the driver files a GPU container mounts into /usr).
    try:
        _mount("/proc/self/fd/%d" % _fds[src], path, None, 0x1000 | 0x4000, what="bind " + dst)
    except OSError as e:
        raise _with_mounts_below(e, src)
    if ro:
        _read_only(dst)


def _read_only(dst):
    # Make the bind at dst read-only together with every mount below it.
    # mount_setattr(AT_FDCWD, path, AT_RECURSIVE | AT_SYMLINK_NOFOLLOW, {attr_set: MOUNT_ATTR_RDONLY}): sets read-only
    # on the whole tree and clears nothing, so the flags the kernel locks stay as they are
    attr = (ctypes.c_uint64 * 4)(1, 0, 0, 0)
    if _lc.syscall(_U(int(_a[18])), ctypes.c_long(-100), ("." + dst).encode(), _U(0x8000 | 0x100), ctypes.byref(attr),
                   _U(32)) == 0:
        return
    # No mount_setattr (kernels before 5.12, or a filter refusing it): remount each mount of the tree, keeping the
    # flags the kernel locks (nosuid, nodev, noexec, atime) and adding read-only. A mount whose path uid 65534 cannot
    # reach (covered by another mount, or below a directory it may not traverse) is out of the program's reach too.
    for mp in _mounts_under([_top + dst]):
        try:
            f = os.statvfs(mp).f_flag
        except (FileNotFoundError, PermissionError, NotADirectoryError):
            continue
        _mount(None, mp, None, 0x20 | 0x1000 | 0x1 | (f & 0xC0E) | (0 if f & 0x1400 else 0x1000000),
               what="read-only " + mp[len(_top):] + ("" if mp == _top + dst else " (a mount below " + dst + ")"))


def _check_read_only(dsts):
    # Fail closed: every mount at or below dsts that uid 65534 can reach must be read-only.
    for mp in _mounts_under([_top + d for d in dsts]):
        try:
            if os.statvfs(mp).f_flag & 1:
                continue
        except (FileNotFoundError, PermissionError, NotADirectoryError):
            continue
        raise OSError(_en.EROFS, "sandbox setup: %s is still writable after the read-only remount" % mp[len(_top):])


_top = os.getcwd()  # the new root, as /proc/self/mountinfo names it until pivot_root
for _e in _plan:
    if _e[0] in "bf":
        _bind(_e[1], _e[1], True, _e[0] == "b")
    elif _e[0] == "l":
        os.makedirs(os.path.dirname("." + _e[1]), exist_ok=True)
        os.symlink(_e[2], "." + _e[1])
    elif _e[0] == "h":
        _mount("tmpfs", "." + _e[1], "tmpfs", 0x1 | 0x2 | 0x4, "size=4k,mode=0755", "hide " + _e[1])
_check_read_only([_e[1] for _e in _plan if _e[0] in "bf"])
os.makedirs("dev")
_mount("tmpfs", "dev", "tmpfs", 0x2, "size=64k,mode=0755", "/dev")
for _e in _plan:
    if _e[0] == "d":
        _bind(_e[1], _e[1], False, False)
for _n, _t in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
               ("stderr", "/proc/self/fd/2")):
    os.symlink(_t, "dev/" + _n)
for _d in ("dev/shm", "tmp"):
    os.makedirs(_d)
    _mount("tmpfs", _d, "tmpfs", 0x2 | 0x4, "size=%s,mode=1777" % _a[19], "/" + _d)
_mount(None, "dev", None, 0x20 | 0x1 | 0x2, what="read-only /dev")
os.makedirs("proc")
# (refused, EPERM, in a user namespace while mounts inherited from the host cover part of its /proc: a container's
# masked paths, a GPU runtime's /proc/driver/nvidia; uncovered above where this process may unmount them, else the
# error names them)
try:
    _mount("proc", "proc", "proc", 0x2 | 0x4 | 0x8, what="/proc")
except OSError as e:
    e = _with_mounts_below(e, "/proc")
    if _stuck:
        e = OSError(e.errno, "%s; could not unmount %d of them (%s)" % (e.strerror, len(_stuck),
                                                                          ", ".join(sorted(set(_stuck.values())))))
    raise e
os.makedirs("sandbox")
# not recursive: nothing is mounted below a directory made for this run (if something were, fail rather than show it)
_mount("/proc/self/fd/%d" % _fds[_work], "sandbox", None, 0x1000, what="bind the working directory")
for _f in _fds.values():
    os.close(_f)
_mount(None, ".", None, 0x20 | 0x1 | 0x2 | 0x4, what="read-only root")
_ok(_lc.syscall(_U(int(_a[16])), b".", b"."), "pivot_root")
_ok(_lc.umount2(b".", 2), "detach the host's root")
os.chdir("/sandbox")
for _i in range(64):  # drop every capability: bounding set, then effective/permitted/inheritable, then ambient
    if _lc.prctl(24, _U(_i), _U(0), _U(0), _U(0)) != 0:
        break


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


_ok(_lc.syscall(_U(int(_a[17])), ctypes.byref(_CapHeader(0x20080522, 0)), (ctypes.c_uint32 * 6)()), "capset")
_lc.prctl(47, _U(4), _U(0), _U(0), _U(0))
_ok(_lc.prctl(1, _U(9), _U(0), _U(0), _U(0)), "die with the bootstrap")  # the uid change cleared it
del _c, _root, _work, _plan, _fds, _e, _n, _t, _d, _f, _i, _top, _bind, _read_only, _check_read_only, _mounts_under,\
    _with_mounts_below, _mount, _CapHeader, _uncover_proc, _cap_eff, _stuck
"""

_BOOT_UID = """\
# drop to the run's own uid; keep the stdlib importable through fds opened while still allowed
_p = {}
for _d in sys.path:
    try:
        _p[_d] = "/proc/self/fd/%d" % os.open(_d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        pass
os.setgroups([])
os.setresgid(_gid, _gid, _gid)
os.setresuid(_uid, _uid, _uid)
for _m in list(sys.modules.values()):  # packages imported at startup (encodings) search their own __path__
    _l = getattr(_m, "__path__", None)
    if type(_l) is list:
        _l[:] = [next((v + x[len(k):] for k, v in _p.items() if x.startswith(k + "/")), x) for x in _l]
sys.path[:] = list(_p.values())
sys.path_importer_cache.clear()
del _p, _d, _m, _l
"""

_BOOT_DEATH = """\
import ctypes  # die with the grading process (PR_SET_PDEATHSIG; a uid change clears it, so set it after)
ctypes.CDLL(None).prctl(1, ctypes.c_ulong(9))
if os.getppid() != _pp:
    os._exit(1)
"""

_BOOT_TAIL = """\
import ctypes
ctypes.CDLL(None).prctl(4, ctypes.c_ulong(0))  # not dumpable: its /proc files (memory, environ) are root's alone
if _bpf:
    import ctypes

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    _lc = ctypes.CDLL(None, use_errno=True)
    if _lc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0 or _lc.prctl(
            22, ctypes.c_ulong(2), ctypes.byref(_Prog(len(_bpf) // 8, _bpf)), ctypes.c_ulong(0), ctypes.c_ulong(0)):
        raise OSError(ctypes.get_errno(), "seccomp filter refused")
    del _Prog, _lc, ctypes
for _k, _v in ((_r.RLIMIT_AS, _as), (_r.RLIMIT_NPROC, _np), (_r.RLIMIT_FSIZE, _fs), (_r.RLIMIT_NOFILE, _nf),
               (_r.RLIMIT_CORE, 0)):
    _r.setrlimit(_k, (_v, _v))
_r.setrlimit(_r.RLIMIT_CPU, (_cpu, _cpu + 1))
_b = []
while True:
    _x = os.read(0, 1 << 20)
    if not _x:
        break
    _b.append(_x)
_n = os.open(os.devnull, os.O_RDONLY)
os.dup2(_n, 0)
os.close(_n)
_src = b"".join(_b)
sys.argv = [""]
del _a, _k, _v, _b, _x, _n, _r, _hi, _bpf
exec(compile(_src, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""

# The fork server ("userns" level): the bootstrap up to pivot_root, keeping its capabilities in its own user
# namespace (they reach nothing outside it), then this loop. argv[20]: modules to import once. Per job (a message on
# the socket at fd 3 with the run's five pipes: stdin, stdout, stderr, channel, control) it forks an intermediate,
# which enters fresh mount, pid, ipc and network namespaces, mounts fresh tmpfs on /sandbox, /tmp and /dev/shm, forks the
# program's process (pid 1 there), waits for it (or a kill request on the socket), reads the requested files back
# from its /sandbox and hands its report (exit status, files) to the server, which sends it once the intermediate is
# reaped (with it the job's namespaces and tmpfs are gone: their teardown is the job's cost, not the next one's). The
# program's process mounts a fresh /proc, keeps only its five pipes, drops every capability and goes on as a fresh
# bootstrap does (_BOOT_TAIL). No byte of a program ever enters
# the server or the intermediate (the program reads it from its own stdin), so no later program can find one.
_BOOT_SERVER = """\
import json as _js, select as _se, signal as _sg, socket as _so, stat as _st
from binascii import b2a_base64 as _b64
_lc.prctl(4, _U(0), _U(0), _U(0), _U(0))  # not dumpable: its /proc files are out of every program's reach
_ok(_lc.prctl(1, _U(9), _U(0), _U(0), _U(0)), "die with the bootstrap")  # the uid change cleared it
os.close(4)
_sk = _so.socket(fileno=3)
for _m in _a[20].split(","):
    try:
        __import__(_m) if _m else None
    except ImportError:  # (not in this Python: the program will not find it either)
        pass
del _c, _root, _work, _plan, _fds, _e, _n, _t, _d, _f, _top, _bind, _read_only, _check_read_only, _mounts_under,\\
    _with_mounts_below, _uncover_proc, _cap_eff, _stuck


def _serve():
    # Returns only in a program's process: (job, its five pipes).
    while True:
        try:
            msg, fds, _fl, _ad = _so.recv_fds(_sk, 1 << 16, 8)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)  # the grading process closed its end
        if len(fds) != 5:  # a kill request that came after its run ended
            for f in fds:
                os.close(f)
            continue
        job = _js.loads(msg)
        rp, wp = os.pipe()
        i = os.fork()
        if i == 0:
            os.close(rp)
            c = _intermediate(job, fds, wp)
            if c is not None:
                return c
        os.close(wp)
        for f in fds:
            os.close(f)
        rep = []
        while True:  # the intermediate's report, complete when it has closed its end (i.e. when it exits)
            x = os.read(rp, 1 << 16)
            if not x:
                break
            rep.append(x)
        os.close(rp)
        # Reported only once the intermediate is reaped: its namespaces and the job's tmpfs (maybe many files) are torn
        # down as it exits, and that cost is this job's, not the next one's (whose clock starts when this report comes)
        os.waitpid(i, 0)
        try:
            _sk.send(b"".join(rep) or _js.dumps({"seq": job["seq"], "err": "the intermediate died"}).encode())
        except OSError:
            os._exit(0)  # (the grading process is gone, or the report would not go: it replaces this server)


def _intermediate(job, fds, rep):
    try:
        bad = set(job["unsafe"])
        _ok(_lc.prctl(1, _U(9), _U(0), _U(0), _U(0)), "die with the server")
        # fresh mount, ipc, network and pid namespaces (nothing a program without capabilities can leave in a network
        # namespace outlives it, but a fresh run gets its own too)
        _ok(_lc.unshare(0x20000 | 0x40000000 | (0 if "ipcns" in bad else 0x8000000) |
                        (0 if "pidns" in bad else 0x20000000)), "unshare")
        if "tmpfs" not in bad:
            for d, size in (("/sandbox", job["tmpfs"]), ("/tmp", job["tmpfs"]), ("/dev/shm", job["tmpfs"])):
                _mount("tmpfs", d, "tmpfs", 0x2 | 0x4, "size=%d,nr_inodes=%d,mode=%s,uid=%d,gid=%d" % (
                    size, job["inodes"], "0700" if d == "/sandbox" else "1777", _uid, _gid), d)
        os.chdir("/sandbox")  # (the server's working directory is the mount below the fresh one)
        wd = os.open(".", os.O_PATH | os.O_DIRECTORY)
        c = os.fork()
        if c == 0:
            if "pidns" not in bad:
                _mount("proc", "/proc", "proc", 0x2 | 0x4 | 0x8, what="/proc")
            return job, fds
        for f in fds:
            os.close(f)
        pf = os.pidfd_open(c)
        while True:
            ready = _se.select([_sk, pf], [], [])[0]
            if pf in ready:
                break
            m = _sk.recv(16)
            if m == b"k" or not m:
                os.kill(c, 9)
        st = os.waitstatus_to_exitcode(os.waitpid(c, 0)[1])
        got = {}
        for name in job["files"]:
            try:
                f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=wd)
            except OSError:
                continue
            try:
                if _st.S_ISREG(os.fstat(f).st_mode):
                    got[name] = _b64(os.read(f, job["max_file"])).decode()
            finally:
                os.close(f)
        msg = _js.dumps({"seq": job["seq"], "st": st, "files": got}).encode()
    except BaseException as e:
        msg = _js.dumps({"seq": job["seq"], "err": "%s: %s" % (type(e).__name__, e)}).encode()
    try:
        while msg:
            msg = msg[os.write(rep, msg):]
    except BaseException:
        pass
    os._exit(0)


import gc as _gc
_gc.collect()
_gc.freeze()  # (fewer pages copied on write in each fork)
_sk.send(b"ready")
_job, _fds = _serve()
# The program's process (pid 1 of its own pid namespace): its pipes at 0-4, nothing else open.
_sk.detach()  # (its fd 3 is about to be the channel)
_hi = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 10) for f in _fds]
for _i, _f in enumerate(_hi):
    os.dup2(_f, _i, inheritable=_i < 3)
os.closerange(5, 1 << 16)
_ok(_lc.prctl(1, _U(9), _U(0), _U(0), _U(0)), "die with the intermediate")
if "session" not in _job["unsafe"]:
    os.setsid()  # a process group of its own: killpg(0) would otherwise reach its server (groups span pid namespaces)
for _i in range(64):  # drop every capability: bounding set, then effective/permitted/inheritable, then ambient
    if _lc.prctl(24, _U(_i), _U(0), _U(0), _U(0)) != 0:
        break
_ok(_lc.syscall(_U(int(_a[17])), ctypes.byref((ctypes.c_uint32 * 2)(0x20080522, 0)), (ctypes.c_uint32 * 6)()),
    "capset")
_lc.prctl(47, _U(4), _U(0), _U(0), _U(0))
_bpf = bytes.fromhex(_job["bpf"])
_as, _cpu, _np, _fs, _nf = _job["as"], _job["cpu"], _job["nproc"], _job["fsize"], _job["nofile"]
del _job, _fds, _serve, _intermediate, _sk, _js, _se, _sg, _so, _st, _b64, _m, _i, _f
"""

_BOOTS = {
    "bwrap": _BOOT_HEAD + _BOOT_TAIL,
    "userns": _BOOT_HEAD + _BOOT_USERNS + _BOOT_TAIL,
    "uid": _BOOT_HEAD + _BOOT_UID + _BOOT_DEATH + _BOOT_TAIL,
    "rlimits": _BOOT_HEAD + _BOOT_DEATH + _BOOT_TAIL,
}
_BOOT_USERNS_SETUP = _BOOT_USERNS[:_BOOT_USERNS.index("for _i in range(64):  # drop every capability")]
_BOOT_FORKSERVER = _BOOT_HEAD + _BOOT_USERNS_SETUP + _BOOT_SERVER + _BOOT_TAIL


# ----------------------------------------------------------------------------------------------------------------
# Command lines and mount plans

def _python() -> str:
    """The base interpreter (not a venv's launcher): with -I -S it needs nothing but the standard library."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _system_tree() -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """What every namespace level shows: (symlink, target) pairs for /bin, /lib... that are links, directories to
    bind read-only, and directories to hide (site-packages inside a bound tree)."""
    links, binds = [], ["/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            links.append((d, os.readlink(d)))
        elif os.path.isdir(d):
            binds.append(d)
    prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
                os.path.dirname(os.path.dirname(_python()))}
    for p in sorted(prefixes):
        if not any((p + "/").startswith(b + "/") for b in binds):
            binds.append(p)
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    sites = {paths[k] for k in ("purelib", "platlib")}
    for prefix in prefixes | {"/usr", "/usr/local"}:  # distributions keep more (e.g. /usr/lib/python3/dist-packages)
        sites.update(glob.glob(os.path.join(prefix, "lib*", "python3*", "*-packages")))
    hidden = sorted({os.path.realpath(s) for s in sites})
    hidden = [s for s in hidden if os.path.isdir(s) and any((s + "/").startswith(b + "/") for b in binds)]
    return links, binds, hidden


_bwrap_args_cache: list[str] | None = None


def _bwrap_args() -> list[str]:
    """bwrap options shared by every run (everything but the working directory and the command)."""
    global _bwrap_args_cache
    if _bwrap_args_cache is not None:
        return _bwrap_args_cache
    links, binds, hidden = _system_tree()
    args = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--clearenv", "--setenv", "PATH", "/usr/bin:/bin"]
    for d in binds:
        args += ["--ro-bind", d, d]
    for d, target in links:
        args += ["--symlink", target, d]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for site in hidden:  # hide installed packages (torch, this project, ...): the program gets the stdlib only
        args += ["--tmpfs", site]
    mb = str(TMPFS_MB << 20)
    # Run as root, bubblewrap maps the sandbox uid to root outside: without capabilities, but still the owner of
    # /proc/sys, whose host-global settings (kernel.core_pattern...) it could then write. Hide it (read-only tmpfs).
    args += ["--proc", "/proc", "--tmpfs", "/proc/sys", "--remount-ro", "/proc/sys", "--dev", "/dev",
             "--remount-ro", "/dev", "--size", mb, "--tmpfs", "/dev/shm", "--size", mb, "--tmpfs", "/tmp"]
    _bwrap_args_cache = args
    return args


_userns_plan_cache: str | None = None
_NR = {"x86_64": (155, 126, 442), "aarch64": (41, 91, 442)}  # (pivot_root, capset, mount_setattr)


def _userns_plan() -> str:
    """The "userns" mount plan, one entry a line: b<TAB>dir (read-only bind), f<TAB>file (read-only bind),
    d<TAB>device (bind), l<TAB>link<TAB>target, h<TAB>dir (hidden under an empty read-only tmpfs)."""
    global _userns_plan_cache
    if _userns_plan_cache is not None:
        return _userns_plan_cache
    if platform.machine() not in _NR:
        raise ValueError(f"no syscall numbers for {platform.machine()}")
    links, binds, hidden = _system_tree()
    lines = [f"b\t{d}" for d in binds] + [f"l\t{d}\t{t}" for d, t in links]
    if os.path.isfile("/etc/ld.so.cache"):
        lines.append("f\t/etc/ld.so.cache")
    lines += [f"h\t{d}" for d in hidden]
    lines += [f"d\t/dev/{n}" for n in ("null", "zero", "full", "random", "urandom") if os.path.exists(f"/dev/{n}")]
    for line in lines:
        if "\n" in line or line.count("\t") > 2 or not all(p.startswith("/") or p == line[0] for p in line.split("\t")[:2]):
            raise ValueError(f"unusable path in the mount plan: {line!r}")
    _userns_plan_cache = "\n".join(lines)
    return _userns_plan_cache


# ----------------------------------------------------------------------------------------------------------------
# The seccomp filter: threads yes, new processes no; no keyrings, io_uring, ptrace, namespaces or mounts; and, when
# sealed, nothing that can leave a trace another run could read.

_SECCOMP_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # AUDIT_ARCH_*
_SYSCALLS = {  # name -> number, per architecture (x86_64 first, then the generic table that aarch64 uses)
    "x86_64": dict(
        fork=57, vfork=58, clone=56, clone3=435, add_key=248, request_key=249, keyctl=250, io_uring_setup=425,
        io_uring_enter=426, io_uring_register=427, ptrace=101, process_vm_readv=310, process_vm_writev=311,
        unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, chroot=161, bpf=321, perf_event_open=298,
        userfaultfd=323, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        mount_setattr=442, pidfd_getfd=438, open_tree_attr=467,
        socket=41, socketpair=53, shmget=29, shmat=30, shmctl=31, msgget=68, msgsnd=69, msgrcv=70, msgctl=71,
        semget=64, semop=65, semctl=66, semtimedop=220, mq_open=240, mq_unlink=241, mq_timedsend=242,
        mq_notify=244, mq_getsetattr=245, open=2, openat=257, openat2=437, creat=85, mkdir=83, mkdirat=258,
        mknod=133, mknodat=259, rename=82, renameat=264, renameat2=316, link=86, linkat=265, symlink=88,
        symlinkat=266, unlink=87, unlinkat=263, rmdir=84, truncate=76, chmod=90, fchmod=91, fchmodat=268,
        fchmodat2=452, chown=92, fchown=93, lchown=94, fchownat=260, utime=132, utimes=235, futimesat=261,
        utimensat=280, setxattr=188, lsetxattr=189, fsetxattr=190, removexattr=197, lremovexattr=198,
        fremovexattr=199, setxattrat=463, removexattrat=466, file_setattr=469, name_to_handle_at=303,
        open_by_handle_at=304, execve=59, execveat=322, prctl=157),
    "aarch64": dict(
        clone=220, clone3=435, add_key=217, request_key=218, keyctl=219, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, ptrace=117, process_vm_readv=270, process_vm_writev=271, unshare=97, setns=268,
        mount=40, umount2=39, pivot_root=41, chroot=51, bpf=280, perf_event_open=241, userfaultfd=282,
        open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442,
        pidfd_getfd=438, open_tree_attr=467,
        socket=198, socketpair=199, shmget=194, shmat=196, shmctl=195, msgget=186, msgsnd=189, msgrcv=188,
        msgctl=187, semget=190, semop=193, semctl=191, semtimedop=192, mq_open=180, mq_unlink=181,
        mq_timedsend=182, mq_notify=184, mq_getsetattr=185, openat=56, openat2=437, mkdirat=34, mknodat=33,
        renameat=38, renameat2=276, linkat=37, symlinkat=36, unlinkat=35, truncate=45, fchmod=52, fchmodat=53,
        fchmodat2=452, fchown=55, fchownat=54, utimensat=88, setxattr=5, lsetxattr=6, fsetxattr=7, removexattr=14,
        lremovexattr=15, fremovexattr=16, setxattrat=463, removexattrat=466, file_setattr=469,
        name_to_handle_at=264, open_by_handle_at=265, execve=221, execveat=281, prctl=167),
}
_ALWAYS_DENIED = ("add_key", "request_key", "keyctl", "io_uring_setup", "io_uring_enter", "io_uring_register",
                  "ptrace", "process_vm_readv", "process_vm_writev", "unshare", "setns", "mount", "umount2",
                  "pivot_root", "chroot", "bpf", "perf_event_open", "userfaultfd", "open_tree", "move_mount", "fsopen",
                  "fsconfig", "fsmount", "fspick", "mount_setattr", "pidfd_getfd", "open_tree_attr",
                  # SysV IPC: a detached segment, a semaphore set or a message queue is memory no rlimit counts (and
                  # a namespace's limits can be lowered only by a root that the sandbox's user namespace does not map)
                  "shmget", "shmat", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semctl",
                  "semtimedop")
_SEAL_DENIED = ("socket", "socketpair", "mq_open", "mq_unlink", "mq_timedsend", "mq_notify", "mq_getsetattr",
                "creat", "mkdir", "mkdirat", "mknod", "mknodat", "rename", "renameat", "renameat2", "link", "linkat",
                "symlink", "symlinkat", "unlink", "unlinkat", "rmdir", "truncate", "chmod", "fchmod", "fchmodat",
                "fchmodat2", "chown", "fchown", "lchown", "fchownat", "utime", "utimes", "futimesat", "utimensat",
                "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "setxattrat",
                "removexattrat", "file_setattr", "name_to_handle_at", "open_by_handle_at", "execve", "execveat")
# open flags that write or create: O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND | __O_TMPFILE
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000 | 0o20000000
_seccomp_cache: dict[tuple[bool, bool], bytes | None] = {}


def seccomp_filter(seal: bool = False, *, allow_fork: bool = False) -> bytes | None:
    """A seccomp-bpf program (see the module docstring): fork, vfork and clone without CLONE_THREAD fail with EPERM
    (unless `allow_fork`, for tests of the other defences), clone3 with ENOSYS (libc then creates threads with
    clone), the always-denied calls with EPERM; sealed, also every call in _SEAL_DENIED, open/openat with a writing
    flag, prctl(PR_SET_NAME), and openat2 (ENOSYS). Any other ABI (x32, i386) kills the process. None on other architectures."""
    key = (seal, allow_fork)
    if key in _seccomp_cache:
        return _seccomp_cache[key]
    machine = platform.machine()
    if machine not in _SECCOMP_ARCH:
        _seccomp_cache[key] = None
        return None
    arch, nr = _SECCOMP_ARCH[machine], _SYSCALLS[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JGE, JSET, BPF_RET|K
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS  # SECCOMP_RET_ERRNO | errno
    prog: list[tuple[int, str | int, str | int, int]] = [(ld, 0, 0, 4), (jeq, 0, "kill", arch), (ld, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((jge, "kill", 0, 0x40000000))  # x32 syscalls
    denied = list(_ALWAYS_DENIED) + (list(_SEAL_DENIED) if seal else [])
    if not allow_fork:
        denied += [n for n in ("fork", "vfork") if n in nr]
    for name in denied:
        if name in nr:
            prog.append((jeq, "eperm", 0, nr[name]))
    if seal:
        prog.append((jeq, "enosys", 0, nr["openat2"]))
        # prctl(PR_SET_NAME): a process's name is world-readable in /proc, i.e. a message to whoever runs alongside
        prog += [(jeq, 0, 3, nr["prctl"]), (ld, 0, 0, 16), (jeq, "eperm", "allow", 15), (ld, 0, 0, 0)]
        for name, arg in (("open", 1), ("openat", 2)):  # flags: args[arg], low 32 bits (little-endian)
            if name in nr:
                prog += [(jeq, 0, 3, nr[name]), (ld, 0, 0, 16 + 8 * arg), (jset, "eperm", "allow", _WRITE_FLAGS),
                         (ld, 0, 0, 0)]
    if allow_fork:
        prog.append((ret, 0, 0, allow))
    else:
        prog += [(jeq, "enosys", 0, nr["clone3"]), (jeq, 0, "allow", nr["clone"]),
                 (ld, 0, 0, 16),  # clone's flags: args[0], low 32 bits
                 (jset, "allow", "eperm", 0x00010000)]  # CLONE_THREAD
    labels = {"allow": allow, "eperm": eperm, "enosys": enosys, "kill": kill}
    at = {name: len(prog) + i for i, name in enumerate(labels)}
    prog += [(ret, 0, 0, k) for k in labels.values()]
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = at[jt] - i - 1 if isinstance(jt, str) else jt
        jf = at[jf] - i - 1 if isinstance(jf, str) else jf
        assert 0 <= jt < 256 and 0 <= jf < 256, (i, jt, jf)
        out += struct.pack("=HBBI", code, jt, jf, k)
    _seccomp_cache[key] = out
    return out


def seccomp_no_fork() -> bytes | None:
    """The unsealed filter (kept for callers of the former name)."""
    return seccomp_filter(False)


# ----------------------------------------------------------------------------------------------------------------
# Per-run uids for the "uid" level and for "userns" as root: unique per (this process, concurrent run), so nothing
# else runs as them.

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_uid_next = 0
_UID_BASE, _UID_SLOTS = 1 << 30, 1024


def _acquire_uid() -> int:
    """A uid for one run, unique to this process and run. Slots rotate, so a uid comes back only after 1023 other
    runs: processes killed in a run may stay zombies (counted by RLIMIT_NPROC) until the system reaps them."""
    global _uid_next
    with _uid_lock:
        base = _UID_BASE + (os.getpid() % (1 << 20)) * _UID_SLOTS
        for k in range(_UID_SLOTS):
            uid = base + (_uid_next + k) % _UID_SLOTS
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                _uid_next = (_uid_next + k + 1) % _UID_SLOTS
                return uid
    raise RuntimeError(f"more than {_UID_SLOTS} concurrent sandboxed runs in one process")


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _task_alive(pid: str) -> bool:
    """Whether any thread of process `pid` is still running (a zombie leader may have live threads)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            return True
    return False


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` (the run's own), zombie thread-group leaders included (their
    live threads die with them), until no thread of that uid runs."""
    for _ in range(100):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/status", "rb") as f:
                    status = f.read().split(b"\n")
            except (FileNotFoundError, ProcessLookupError):
                continue
            uids = next((ln.split() for ln in status if ln.startswith(b"Uid:")), [])
            if len(uids) > 1 and int(uids[1]) == uid and _task_alive(name):
                found = True
                try:
                    os.kill(int(name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not found:
            return
        time.sleep(0.001)
    raise RuntimeError(f"processes of sandbox uid {uid} keep appearing after 100 kill sweeps")


# ----------------------------------------------------------------------------------------------------------------
# run

def run(program: str, *, timeout: float = 3.0, phases: int = 1, read_files: tuple[str, ...] = (),
        memory_mb: int = MEMORY_MB, nproc: int = NPROC, isolation: str | None = None,
        max_output: int = MAX_OUTPUT, max_frame: int = MAX_FRAME, max_frames: int = MAX_FRAMES,
        max_channel: int = MAX_CHANNEL, seal: bool = False, on_frame: FrameHook | None = None,
        server: bool = False, preload: tuple[str, ...] = (), _allow_fork: bool = False,
        _unsafe: tuple[str, ...] = ()) -> ExecResult:
    """Run `program` (Python source) in a fresh sandboxed interpreter; see the module docstring.

    `timeout` is the wall-clock budget of each phase; the program ends a phase by writing an empty frame on
    fd CHANNEL_FD, and gets at most `phases` phases. `read_files` are names in the working directory to read back
    after the run. `isolation` forces a level (default: the detected one if strong or accepted, else
    IsolationError). `seal` forbids every way of leaving a trace (files, sockets, IPC). `on_frame(t, payload, size,
    phase)` sees each frame (arrival time, kept payload, true length, checkpoints before it) as it arrives while the
    child runs; returning g (seconds) stops the run unless the phase ends within g (see the module docstring).
    `server=True` (level "userns" only) runs it in a fork server's fresh child instead of a fresh interpreter (see
    "Fork servers"); `preload` names the modules that server imports once. `_allow_fork` drops the no-fork rule and
    `_unsafe` drops fork-server defences ("pidns", "tmpfs", "ipcns", "session"), only for tests of them."""
    if not timeout > 0 or not math.isfinite(timeout):
        raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds")
    if phases < 1:
        raise ValueError(f"phases={phases}: expected at least 1")
    for name in read_files:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"read_files entry {name!r}: expected a plain file name inside the working directory")
    level = _resolve(isolation)
    cpu = math.ceil(timeout * phases) + 1
    if server:
        if level != "userns":
            raise ValueError(f"server=True needs isolation 'userns' (got {level!r})")
        return _run_served(program, timeout=timeout, phases=phases, read_files=read_files, memory_mb=memory_mb,
                           nproc=nproc, cpu=cpu, max_output=max_output, max_frame=max_frame, max_frames=max_frames,
                           max_channel=max_channel, bpf=seccomp_filter(seal, allow_fork=_allow_fork),
                           on_frame=on_frame, key=(tuple(preload), tuple(sorted(_unsafe))))
    base = tempfile.mkdtemp(prefix="pg-sandbox-")
    workdir = os.path.join(base, "work")
    uid = -1
    proc: subprocess.Popen | None = None
    fds: list[int] = []
    res: ExecResult | None = None
    start = time.monotonic()
    try:
        os.chmod(base, 0o711)  # traversable, not listable: the namespace bootstrap reaches root/ and work/ through it
        os.mkdir(workdir, 0o700)
        root_mode = os.geteuid() == 0 and level in ("uid", "userns")
        if root_mode:
            uid = _acquire_uid()
            os.chown(workdir, uid, uid)
        ch_r, ch_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        fds += [ch_r, ch_w, ctl_r, ctl_w]
        sync_r = sync_w = -1
        if level == "userns" and root_mode:
            sync_r, sync_w = os.pipe()
            fds += [sync_r, sync_w]
        bpf = seccomp_filter(seal, allow_fork=_allow_fork)
        in_uid, in_gid = (SANDBOX_UID, SANDBOX_UID) if level == "userns" else (uid, uid)
        boot = [_python(), "-I", "-S", "-B", "-X", "utf8", "-c", _BOOTS[level],
                str(LEVELS.index(level)), str(ch_w), str(ctl_r), str(sync_w), str(in_uid), str(in_gid),
                str(memory_mb << 20), str(cpu), str(nproc), str(FSIZE_MB << 20), str(NOFILE),
                str(-1 if level == "bwrap" else os.getpid()),
                # bwrap installs the unsealed filter before it execs the interpreter; the seal (which forbids exec)
                # is stacked on it by the bootstrap
                "" if bpf is None or (level == "bwrap" and not seal) else bpf.hex()]
        passed = [ch_w, ctl_r] + ([sync_w] if sync_w >= 0 else [])
        if level == "bwrap":
            argv = _bwrap_args() + ["--bind", workdir, WORKDIR, "--chdir", WORKDIR]
            base_bpf = seccomp_filter(False, allow_fork=_allow_fork)
            if base_bpf is not None:
                sec_r, sec_w = os.pipe()
                fds += [sec_r, sec_w]
                os.write(sec_w, base_bpf)  # a few hundred bytes: fits in the pipe buffer
                os.close(sec_w)
                fds.remove(sec_w)
                passed.append(sec_r)
                argv += ["--seccomp", str(sec_r)]
            argv += ["--"] + boot
        elif level == "userns":
            root = os.path.join(base, "root")
            os.mkdir(root, 0o755)
            argv = boot + [root, workdir, _userns_plan(), *map(str, _NR[platform.machine()]), str(TMPFS_MB << 20)]
        else:
            argv = boot
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=tuple(passed), start_new_session=True, cwd=workdir, close_fds=True,
                                env={"PATH": "/usr/bin:/bin"})
        for fd in passed:
            os.close(fd)
            fds.remove(fd)
        if sync_r >= 0:
            _map_uid(proc, sync_r, ctl_w, uid)
        res = _communicate(proc, ch_r, ctl_w, program.encode("utf-8", "surrogatepass"), start, timeout, phases,
                           max_output, max_frame, max_frames, max_channel, lambda: _kill(proc, uid), on_frame)
    finally:
        if proc is not None:
            _kill(proc, uid)
            proc.wait()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None and not f.closed:
                    try:
                        f.close()
                    except BrokenPipeError:
                        pass
        for fd in fds:
            os.close(fd)
        files = _read_back(workdir, read_files)
        _remove(base)
        if uid >= 0:
            _release_uid(uid)
    assert res is not None
    res.returncode = proc.returncode
    res.files = files
    res.wall_s = time.monotonic() - start
    res.isolation = level
    return res


def _map_uid(proc: subprocess.Popen, sync_r: int, ctl_w: int, uid: int) -> None:
    """"userns" as root: once the bootstrap has unshared (it writes one byte on the sync pipe), map the sandbox
    uid/gid to the run's own host uid, then let it go on (one byte on the control pipe). If it dies first, the run
    simply reports that."""
    ready, _, _ = select.select([sync_r], [], [], SETUP_TIMEOUT)
    if not ready or os.read(sync_r, 1) != b"u":
        return
    try:
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{proc.pid}/{name}", "w") as f:
                f.write(f"{SANDBOX_UID} {uid} 1\n")
        os.write(ctl_w, b"g")
    except OSError as e:  # it died meanwhile, or the kernel refused: tell it to stop; the run fails and says so
        logger.debug(f"userns uid map for {proc.pid} failed: {e}")
        try:
            os.write(ctl_w, b"x")
        except OSError:
            pass


def _kill(proc: subprocess.Popen, uid: int) -> None:
    """SIGKILL the child's process group and, where the run has a uid of its own, every process of that uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if uid >= 0:
        _kill_uid(uid)


def _communicate(proc: subprocess.Popen | None, ch_r: int, ctl_w: int, data: bytes, start: float, timeout: float,
                 phases: int, max_output: int, max_frame: int, max_frames: int, max_channel: int,
                 kill: Callable[[], None], on_frame: FrameHook | None = None,
                 pipes: tuple[int, int, int] | None = None, exit_fd: int = -1) -> ExecResult:
    """Feed stdin, read stdout/stderr/channel until the child exits, a phase runs out of time or `on_frame` asks to
    stop; ack checkpoints. Without `proc`: `pipes` are (stdin, stdout, stderr) fds (stdin is closed here once fed) and
    `exit_fd` becomes readable when the run has ended (a fork server's socket)."""
    if proc is not None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        pipes = (proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno())
    assert pipes is not None
    sel = selectors.DefaultSelector()
    out = {pipes[1]: bytearray(), pipes[2]: bytearray()}
    dropped = {fd: False for fd in out}
    frames: list[tuple[float, bytes]] = []
    sizes: list[int] = []
    frame_phases: list[int] = []
    frame_acks: list[int] = []
    checkpoints: list[float] = []
    channel_error: str | None = None
    channel_total = 0
    acks = 0
    head = bytearray()  # the length prefix being read
    body = bytearray()  # the kept part of the frame being read
    need = -1  # bytes of the current frame still to come (-1: reading a length prefix)
    size = keep = 0
    timed_out = False
    stopped = False  # on_frame asked to stop: nothing more is read from the channel
    stop_by: float | None = None  # when the run stops unless the current phase ends first
    judging = on_frame is not None  # on_frame is consulted only while the child runs
    deadline = start + timeout
    if proc is None:
        pidfd = exit_fd
    else:
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = -1  # no pidfd (old kernel): poll for the exit below, without reaping
    stdin_fd, pos = pipes[0], 0
    for fd in (*out, ch_r, stdin_fd, ctl_w):
        os.set_blocking(fd, False)
    for fd in out:
        sel.register(fd, selectors.EVENT_READ, "out")
    sel.register(ch_r, selectors.EVENT_READ, "chan")
    sel.register(stdin_fd, selectors.EVENT_WRITE, "stdin")
    if pidfd >= 0:
        sel.register(pidfd, selectors.EVENT_READ, "exit")

    def on_channel(chunk: bytes, t: float) -> str | None:
        """Parse frames out of `chunk`; frames it completes count the acks sent before it was read."""
        nonlocal deadline, channel_total, acks, need, size, keep, stopped, stop_by
        acked = acks
        channel_total += len(chunk)
        if channel_total > max_channel:
            return f"bad frame: channel over {max_channel} bytes"
        i, n = 0, len(chunk)
        while i < n:
            if need < 0:
                take = min(4 - len(head), n - i)
                head.extend(chunk[i:i + take])
                i += take
                if len(head) < 4:
                    break
                size = int.from_bytes(head, "big")
                head.clear()
                if size > max_channel:
                    return f"bad frame: length {size} over {max_channel}"
                need, keep = size, size if size <= max_frame else FRAME_PREFIX
            take = min(need, n - i)
            room = keep - len(body)
            if room > 0:
                body.extend(chunk[i:i + min(take, room)])
            i += take
            need -= take
            if need:
                break
            need = -1
            if len(frames) + len(checkpoints) >= max_frames:
                return f"bad frame: more than {max_frames} frames"
            if size:
                frames.append((t - start, bytes(body)))
                sizes.append(size)
                frame_phases.append(len(checkpoints))
                frame_acks.append(acked)
                grace = None
                if judging:
                    assert on_frame is not None
                    grace = on_frame(t - start, frames[-1][1], size, len(checkpoints))
                if grace is not None and grace <= 0:
                    stopped = True
                    body.clear()
                    return None
                if grace is not None:
                    stop_by = t + grace if stop_by is None else min(stop_by, t + grace)
            else:
                stop_by = None  # the phase ended in time
                checkpoints.append(t - start)
                if len(checkpoints) < phases:
                    deadline = t + timeout
                try:
                    os.write(ctl_w, b"a")
                    acks += 1
                except (BlockingIOError, BrokenPipeError):
                    pass
            body.clear()
        return None

    def read_ready(fd: int, kind: str) -> bool:
        """Read what is there; False at EOF."""
        nonlocal channel_error
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        if kind == "chan":
            if channel_error is None and not stopped:
                channel_error = on_channel(chunk, time.monotonic())
        else:
            keep_out = max_output - len(out[fd])
            out[fd] += chunk[:keep_out]
            dropped[fd] |= len(chunk) > keep_out
        return True

    try:
        exited = False
        while not exited and channel_error is None and not stopped:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if stop_by is not None and now >= stop_by:
                stopped = True
                break
            until = deadline if stop_by is None else min(deadline, stop_by)
            wait = until - now if pidfd >= 0 else min(until - now, 0.002)
            for key, _ in sel.select(wait):
                kind = key.data
                if kind == "exit":
                    exited = True
                elif kind == "stdin":
                    try:
                        pos += os.write(stdin_fd, data[pos:pos + (1 << 16)])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pos = len(data)
                    if pos >= len(data):
                        sel.unregister(stdin_fd)
                        if proc is not None:
                            proc.stdin.close()
                        else:
                            os.close(stdin_fd)
                            stdin_fd = -1
                elif not read_ready(key.fd, kind):
                    sel.unregister(key.fd)
            if pidfd < 0 and not exited and proc is not None:
                exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        # Kill first, then drain: once nothing is left alive to write, every pipe reaches EOF.
        judging = False
        kill()
        for fd in (stdin_fd, pidfd):
            if fd >= 0 and fd in sel.get_map():
                sel.unregister(fd)
        for _ in range(4096):  # bounded, in case a writer survived somewhere
            ready = sel.select(0) if sel.get_map() else []
            if not ready:
                break
            for key, _ in ready:
                if not read_ready(key.fd, key.data):
                    sel.unregister(key.fd)
        if channel_error is None and (head or need >= 0) and not timed_out and not stopped:
            channel_error = f"bad frame: {len(head) + len(body)} trailing bytes of an unfinished frame"
    finally:
        sel.close()
        if pidfd >= 0 and proc is not None:
            os.close(pidfd)
        if proc is None and stdin_fd >= 0:
            os.close(stdin_fd)
    fo, fe = pipes[1], pipes[2]
    return ExecResult(returncode=None, timed_out=timed_out, stdout=out[fo].decode("utf-8", "replace"),
                      stderr=out[fe].decode("utf-8", "replace"), stdout_truncated=dropped[fo], frames=frames,
                      checkpoints=checkpoints, channel_error=channel_error, frame_sizes=sizes,
                      frame_phases=frame_phases, frame_acks=frame_acks, stopped=stopped)


def _read_back(workdir: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """Regular files among `names` in `workdir` (no symlinks, no FIFOs), at most MAX_FILE bytes each."""
    got: dict[str, bytes] = {}
    for name in names:
        try:
            fd = os.open(os.path.join(workdir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.EACCES, errno.ENXIO, errno.ENOTDIR):
                continue
            raise
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                got[name] = os.read(fd, MAX_FILE)
        finally:
            os.close(fd)
    return got


def _remove(base: str) -> None:
    """Remove the run's directory, first making every directory in it ours again if the program locked one."""
    try:
        shutil.rmtree(base)
    except PermissionError:
        for root, dirs, _ in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700, follow_symlinks=False)
        shutil.rmtree(base)


# ----------------------------------------------------------------------------------------------------------------
# Fork servers ("userns" only): one pre-imported interpreter per server, in namespaces of its own, forking a fresh
# child per program, one program at a time (see _BOOT_SERVER). A pool holds idle servers, keyed by what they
# preload; a server is replaced after SERVER_JOBS programs, and at once when it dies, hangs or fails.

class _ForkServer:
    """One fork server: started (from a long-lived thread: its bootstrap dies with the thread that started it),
    ready to take a job, or raises ServerError."""

    def __init__(self, preload: tuple[str, ...]) -> None:
        self.base = tempfile.mkdtemp(prefix="pg-forkserver-")
        self.uid = -1
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.jobs = self.seq = 0
        self.inner = -1  # the server's pid (pid 1 of its namespace), for tests
        fds: list[int] = []
        try:
            os.chmod(self.base, 0o711)
            work, root = os.path.join(self.base, "work"), os.path.join(self.base, "root")
            os.mkdir(work, 0o700)
            os.mkdir(root, 0o755)
            if os.geteuid() == 0:
                self.uid = _acquire_uid()
                os.chown(work, self.uid, self.uid)
            self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fds.append(theirs.detach())
            ctl_r, ctl_w = os.pipe()
            fds += [ctl_r, ctl_w]
            sync_r = sync_w = -1
            if self.uid >= 0:
                sync_r, sync_w = os.pipe()
                fds += [sync_r, sync_w]
            argv = [_python(), "-I", "-S", "-B", "-X", "utf8", "-c", _BOOT_FORKSERVER, str(LEVELS.index("userns")),
                    str(fds[0]), str(ctl_r), str(sync_w), str(SANDBOX_UID), str(SANDBOX_UID), "0", "0", "0", "0", "0",
                    str(os.getpid()), "", root, work, _userns_plan(), *map(str, _NR[platform.machine()]),
                    str(TMPFS_MB << 20), ",".join(preload)]
            passed = (fds[0], ctl_r) + ((sync_w,) if sync_w >= 0 else ())
            with open(os.path.join(self.base, "stderr"), "wb") as err:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                             pass_fds=passed, start_new_session=True, cwd=work, close_fds=True,
                                             env={"PATH": "/usr/bin:/bin"})
            for fd in passed:
                os.close(fd)
                fds.remove(fd)
            if sync_r >= 0:
                _map_uid(self.proc, sync_r, ctl_w, self.uid)
            ready, _, _ = select.select([self.sock], [], [], SETUP_TIMEOUT)
            if not ready or self.sock.recv(16) != b"ready":
                raise ServerError(f"fork server did not start: {self.last_error()}")
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    self.inner = int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                pass
        except BaseException:
            self.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def last_error(self) -> str:
        try:
            with open(os.path.join(self.base, "stderr"), "rb") as f:
                lines = f.read()[-4096:].decode("utf-8", "replace").strip().splitlines()
        except OSError:
            lines = []
        return (lines or ["no output"])[-1][:300]

    def submit(self, header: dict, pipes: list[int]) -> None:
        """Hand the server one job (OSError if it is gone)."""
        assert self.sock is not None
        self.seq += 1
        self.jobs += 1
        socket.send_fds(self.sock, [json.dumps({**header, "seq": self.seq}).encode()], pipes)

    def kill_job(self) -> None:
        """Ask for the running program to be killed (nothing to do once its report is waiting)."""
        assert self.sock is not None
        if not select.select([self.sock], [], [], 0)[0]:
            try:
                self.sock.send(b"k")
            except OSError:
                pass

    def result(self, timeout: float) -> dict:
        """The current job's report: {"st": exit code (negative: signal), "files": {name: base64}}; ServerError if the
        server dies, fails or does not answer within `timeout`."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise ServerError(f"fork server did not report within {timeout:g} s (replaced)")
            try:
                data = self.sock.recv(1 << 20)
            except OSError as e:
                raise ServerError(f"fork server connection failed: {e} (replaced)") from None
            if not data:
                raise ServerError("fork server died during the run (replaced)")
            msg = json.loads(data)
            if msg.get("seq") != self.seq:
                continue
            if "err" in msg:
                raise ServerError(f"fork server failed: {msg['err']} (replaced)")
            return msg

    def close(self, graceful: bool = False) -> None:
        """Stop the server and everything it started (graceful: let it exit on its own first, so its CPU time is
        reaped into this process's children's)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            if graceful:
                try:
                    self.proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    pass
            _kill(self.proc, self.uid)
            self.proc.wait()
            self.proc = None
        if os.path.isdir(self.base):
            _remove(self.base)
        if self.uid >= 0:
            _release_uid(self.uid)
            self.uid = -1


_pool_lock = threading.Lock()
_idle: dict[tuple, list[_ForkServer]] = {}
_live: set[_ForkServer] = set()
_spawner: ThreadPoolExecutor | None = None


def _take_server(key: tuple) -> _ForkServer:
    """An idle server for `key` (preload, unsafe), or a new one started from the spawner threads."""
    global _spawner
    with _pool_lock:
        idle = _idle.get(key, [])
        while idle:
            srv = idle.pop()
            if srv.proc is not None and srv.proc.poll() is None:
                return srv
            _live.discard(srv)
            srv.close()
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=max(2, len(os.sched_getaffinity(0))),
                                          thread_name_prefix="pg-forkserver")
        spawner = _spawner
    srv = spawner.submit(_ForkServer, key[0]).result()
    with _pool_lock:
        _live.add(srv)
    return srv


def _give_back(srv: _ForkServer, key: tuple, healthy: bool) -> None:
    if healthy and srv.jobs < SERVER_JOBS:
        with _pool_lock:
            _idle.setdefault(key, []).append(srv)
        return
    with _pool_lock:
        _live.discard(srv)
    srv.close(graceful=healthy)


def stop_servers() -> None:
    """Stop every idle fork server and reap it (its CPU time then counts in this process's children's)."""
    with _pool_lock:
        servers = [srv for idle in _idle.values() for srv in idle]
        _idle.clear()
        _live.difference_update(servers)
    for srv in servers:
        srv.close(graceful=True)


def server_pids() -> set[int]:
    """Host pids of the live fork servers and their bootstraps (for tests that look for leftover processes)."""
    with _pool_lock:
        return {pid for srv in _live if srv.proc is not None for pid in (srv.proc.pid, srv.inner) if pid > 0}


atexit.register(stop_servers)


def _forget_servers() -> None:
    """In a child forked from this process: the servers are the parent's (drop this copy of their sockets)."""
    global _spawner
    for srv in list(_live) + [srv for idle in _idle.values() for srv in idle]:
        if srv.sock is not None:
            srv.sock.close()
            srv.sock = None
        srv.proc = None
        srv.uid = -1
    _idle.clear()
    _live.clear()
    _spawner = None


os.register_at_fork(after_in_child=_forget_servers)


def _run_served(program: str, *, timeout: float, phases: int, read_files: tuple[str, ...], memory_mb: int,
                nproc: int, cpu: int, max_output: int, max_frame: int, max_frames: int, max_channel: int,
                bpf: bytes | None, on_frame: FrameHook | None, key: tuple) -> ExecResult:
    """`run(server=True)`: the program runs in a fresh child of a fork server of the pool."""
    start = time.monotonic()
    header = {"as": memory_mb << 20, "cpu": cpu, "nproc": nproc + 2, "fsize": FSIZE_MB << 20, "nofile": NOFILE,
              "bpf": "" if bpf is None else bpf.hex(), "files": list(read_files), "max_file": MAX_FILE,
              "tmpfs": TMPFS_MB << 20, "inodes": TMPFS_INODES, "unsafe": list(key[1])}
    fds: list[int] = []
    srv: _ForkServer | None = None
    healthy = False
    try:
        pairs = [os.pipe() for _ in range(5)]  # stdin, stdout, stderr, channel, control
        fds += [fd for pair in pairs for fd in pair]
        theirs = [pairs[0][0], pairs[1][1], pairs[2][1], pairs[3][1], pairs[4][0]]
        for attempt in range(2):  # an idle server may have died meanwhile: nothing ran yet, take another
            srv = _take_server(key)
            try:
                srv.submit(header, theirs)
                break
            except OSError:
                _give_back(srv, key, False)
                srv = None
                if attempt:
                    raise
        assert srv is not None
        for fd in theirs:
            os.close(fd)
            fds.remove(fd)
        ours = (pairs[0][1], pairs[1][0], pairs[2][0])
        fds.remove(ours[0])  # _communicate closes stdin
        res = _communicate(None, pairs[3][0], pairs[4][1], program.encode("utf-8", "surrogatepass"), start,
                           timeout, phases, max_output, max_frame, max_frames, max_channel, srv.kill_job, on_frame,
                           pipes=ours, exit_fd=srv.sock.fileno() if srv.sock is not None else -1)
        reply = srv.result(SERVER_REPLY_S)
        healthy = True
    finally:
        for fd in fds:
            os.close(fd)
        if srv is not None:
            _give_back(srv, key, healthy)
    res.returncode = reply["st"]
    res.files = {name: binascii.a2b_base64(v) for name, v in reply["files"].items()}
    res.wall_s = time.monotonic() - start
    res.isolation = "userns"
    res.forkserver = True
    return res
