"""The parse pool's processes end when the daemon ends, however it ends (Linux).

The pool is a forkserver (the daemon's child), workers (the forkserver's
children) and the multiprocessing resource tracker (the daemon's child).
Without help, ``kill -9`` of the daemon leaves all of them running: each
worker holds the write end of its own task pipe and of the forkserver's
"alive" pipe, so none of them ever reads EOF, and the tracker waits for every
holder of its pipe.

Each pool process therefore asks the kernel to SIGKILL it when its parent
dies (``prctl(PR_SET_PDEATHSIG)``): the forkserver when the daemon dies, a
worker when the forkserver dies. The tracker then reads EOF and exits by
itself. Why this and not a thread watching a pipe from the daemon: the kernel
delivers the signal however the parent ends (SIGKILL, OOM killer, a crash in
C code), it costs no thread and no file descriptor, and no inherited copy of a
descriptor can keep a process alive, which is exactly how the pipes failed
here. Two caveats, both handled: the signal follows the parent *thread*, so
the pool is started from the daemon's main thread (see mailpool.ParsePool);
and the parent may already be gone when the child arms it, so the child checks
its parent afterwards. Elsewhere than Linux this is a no-op.

The forkserver arms itself when it imports this module (it is in
``mailpool.PRELOAD``): only a process whose parent is the pid in
``COMMSYNC_POOL_OWNER`` does, so importing it in the daemon changes nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

OWNER_ENV = "COMMSYNC_POOL_OWNER"
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None) -> None:
    """SIGKILL this process when its parent ends; exit now if ``parent`` is already gone."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not armed: the process still ends at the pool's shutdown
    if parent is not None and os.getppid() != parent:
        os._exit(0)  # the parent died before the signal was armed


def _arm_forkserver() -> None:
    owner = os.environ.get(OWNER_ENV, "")
    if owner.isdigit() and int(owner) == os.getppid():
        die_with_parent(int(owner))


_arm_forkserver()
