"""Imported first by the experiment runner's forkserver (and nowhere else): the forkserver dies with the runner, and
the jobs it forked (PDEATHSIG on the forkserver) die with it."""

import ctypes
import signal

try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except OSError:
    pass
