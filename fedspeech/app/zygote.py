"""The local engine's forkserver as a fork of this process, so its workers skip torch's import.

``multiprocessing``'s forkserver is a fresh interpreter: it imports torch (~1 s here) and the
``preload`` modules before it forks the first worker, even though the process that asks for it
has torch imported already. ``start_forkserver`` forks this process instead and runs the
standard forkserver loop (``multiprocessing.forkserver.main``) in the child, registered as this
process's forkserver: every ``forkserver`` context (the local engine's ``ProcessPoolExecutor``s)
then forks its workers from it, with torch, and whatever else this process had imported,
already there. The child imports ``preload`` (Opacus: ~1.3 s) while this process goes on.

It is used only where the fork is safe, else the standard forkserver starts as before:
- Linux, CPython 3.11 to 3.13 (3.14 changed the forkserver's protocol), and no forkserver yet;
- this process runs one thread (a lock held by another thread would stay held in the child;
  tqdm's monitor thread, the one a process that showed a progress bar has, is ended first);
- the workers run torch with one thread: GNU OpenMP's pool is not fork-safe, and a worker
  whose parent had used it hangs in its first parallel region (measured here with
  ``torch.set_num_threads(2)``; one thread never enters one);
- this process has not initialized CUDA (a forked child cannot use it).

In the child, the descriptors this process had open (files, sockets, pipes) are pointed at
``/dev/null`` (kept open, so their numbers are not reused under objects that still hold them)
and everything inherited is frozen for the garbage collector, so no finalizer of this process
(a temporary folder's, a socket's) runs there. The child exits, as the standard forkserver does,
when this process has gone, without running this process's exit handlers.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
import threading
from multiprocessing import connection, forkserver, util
from typing import Any

log = logging.getLogger("fedspeech.engine")

# multiprocessing's private parts this module uses (stable from 3.4 to 3.13; see ``usable``)
_SERVER: Any = forkserver._forkserver
_CONNECTION: Any = connection


def usable(threads: int) -> str | None:
    """Why ``start_forkserver`` would not fork here (None: it would)."""
    if sys.platform != "linux" or not (3, 11) <= sys.version_info[:2] < (3, 14):
        return f"{sys.platform}, Python {sys.version_info[0]}.{sys.version_info[1]}"
    if threads != 1:
        return f"{threads} torch threads per worker"
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialized in this process (a forked child cannot use it)"
    if threading.active_count() != 1:
        return f"{threading.active_count()} threads in this process"
    if _SERVER._forkserver_pid is not None:
        return "a forkserver runs already"
    return None


def start_forkserver(preload: tuple[str, ...], threads: int) -> bool:
    """Fork this process into its forkserver, which imports ``preload`` (see the module
    docstring). False: not here (``usable``), and the standard forkserver will start instead."""
    if threads == 1 and _SERVER._forkserver_pid is None:  # only where it may be the last thread
        _stop_tqdm_monitor()
    why_not = usable(threads)
    if why_not is not None:
        log.debug("workers from a fresh forkserver: %s", why_not)
        return False
    # As ``ForkServer.ensure_running`` sets one up, but forked (outside its lock: a lock held
    # at the fork would stay held in the child; this process runs no other thread).
    listener = socket.socket(socket.AF_UNIX)
    address = _CONNECTION.arbitrary_address("AF_UNIX")
    listener.bind(address)
    if not util.is_abstract_socket_namespace(address):
        os.chmod(address, 0o600)
    listener.listen()
    alive_r, alive_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:  # out of memory or processes: the standard forkserver then
        log.warning("cannot fork the workers' forkserver (%s); starting a fresh one", exc)
        for fd in (alive_r, alive_w):
            os.close(fd)
        listener.close()
        return False
    if pid == 0:  # the forkserver: never returns
        os.close(alive_w)  # else it would never see its parent go
        _serve(listener.fileno(), alive_r, preload)
    os.close(alive_r)
    listener.close()
    with _SERVER._lock:
        _SERVER._forkserver_address = address
        _SERVER._forkserver_alive_fd = alive_w
        _SERVER._forkserver_pid = pid
    return True


def _stop_tqdm_monitor() -> None:
    """End tqdm's monitor thread (started by the first progress bar; the next bar starts it
    again), the one thread a process that showed features' progress has besides its own."""
    tqdm: Any = getattr(sys.modules.get("tqdm.std"), "tqdm", None)
    if tqdm is not None and tqdm.monitor is not None:
        tqdm.monitor.exit()  # wakes it and joins it
        tqdm.monitor = None


def _serve(listener_fd: int, alive_r: int, preload: tuple[str, ...]) -> None:
    code = 1
    try:
        gc.freeze()  # what this process had stays uncollected: none of its finalizers run here
        _detach_descriptors(keep={0, 1, 2, listener_fd, alive_r})
        forkserver.main(listener_fd, alive_r, list(preload))  # SystemExit when the parent is gone
    except SystemExit:
        code = 0
    except BaseException:
        sys.excepthook(*sys.exc_info())
    finally:
        os._exit(code)  # not the parent's exit handlers


def _detach_descriptors(keep: set[int]) -> None:
    """Point every open descriptor not in ``keep`` at /dev/null (a pipe's reader then sees its
    end, a socket's peer its close, when this process's parent closes its own)."""
    null = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep and fd != null:
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed already
                os.fstat(fd)
                os.dup2(null, fd)
    os.close(null)
