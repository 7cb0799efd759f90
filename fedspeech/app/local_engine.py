"""``fedspeech simulate --engine local``: the same ServerApp and ClientApp without Flower's runtime.

Flower's simulation runtime (``--engine flower``) is a chain of processes: a
SuperLink, a SuperExec, the simulation process with the ServerApp, Ray's GCS and raylet, and one
Ray actor per CPU that imports torch and Opacus on its first message. On a small run that chain
is most of the wall time (docs/benchmarks.md, "Federation overhead"). This engine runs the
ServerApp (``fedspeech_server.app.app``) in the calling process over ``PoolGrid``, a Flower
``Grid`` that hands each message to ``fedspeech_client.app.app`` in a pool of worker processes.

What stays as in Flower's runtime:
- the apps, the strategy and every message are Flower's (``flwr.serverapp.Grid`` is the interface
  the ServerApp talks to; the messages travel pickled, as Ray sends them);
- each virtual node has its own ``Context`` (``partition-id``/``num-partitions`` in its node
  config, its ``state`` kept across rounds, the run config Flower would pass);
- a ClientApp exception becomes an error reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``), a
  message not answered within ``round-timeout`` is missing, and the run goes on;
- at most ``workers`` ClientApps run at once (Ray's ``client-resources-num-cpus`` rule).

What differs: a worker serves many nodes and keeps its imports (Flower's Ray actors do too); the
workers are forked from a forkserver that imports the client (and Opacus, for DP-SGD) once,
while the server starts (a fork of this process, which has torch already, where that is safe:
``fedspeech.app.zygote``); a worker that dies (killed, out of memory) fails the one message
it held, which is reported like a crashed ClientApp, and only that worker is started again for
the next ones.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app import Error as FlowerError
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedspeech.app.interrupts import raise_if_interrupted
from fedspeech.app.zygote import start_forkserver
from fedspeech.logs import OUR_LOGGERS

log = logging.getLogger("fedspeech.engine")

# What a worker needs for its first message, imported once by the forkserver: torch and the
# client ~1.2 s here; DP-SGD adds Opacus, ~1.3 s. ``torch._dynamo``: the first torch.optim
# optimizer a process builds imports it (``torch._compile._disable_dynamo``), 0.45-0.7 s here,
# which every worker's first message paid again (tests/test_zygote.py checks none is left).
PRELOAD = (
    *("torch", "torch._dynamo"),
    *("fedspeech_client.app", "fedspeech_client.local_round", "fedspeech.fast_gru"),
)
PRELOAD_DP = (*PRELOAD, "fedspeech_client.dp_sgd")
_NODE_DIED = ErrorCode.UNKNOWN  # the worker process ended without a reply (Ray: an actor died)
_WORKER_SCOPE = ExitStack()  # a worker's log routing for the run it serves now
_worker_setup: RunSetup | None = None  # in a worker: the run it serves now
# Within ``kept_workers``: the pools kept, by (workers, threads).
_kept: dict[tuple[int, int], WorkerPool] | None = None


@dataclass(frozen=True)
class RunSetup:
    """What a worker takes from the run it serves: the environment of its ``simulate`` call
    (not the forkserver's) and where its log records go (None: the console)."""

    environ: Mapping[str, str]
    log_file: str | None

    @classmethod
    def here(cls, log_file: str | None) -> RunSetup:
        """This process's environment now, and ``log_file``."""
        return cls(dict(os.environ), log_file)


def handle_message(message: Message, context: Context, setup: RunSetup) -> tuple[Message, Context]:
    """Run ``fedspeech_client.app.app`` on one message in a worker: the reply and the context.

    An exception becomes an error reply naming it, as in Flower's runtime.
    """
    from fedspeech_client.app import app

    _serve_run(setup)
    try:
        reply = app(message, context)
    except Exception as exc:
        log.exception("node %d: the ClientApp raised", context.node_id)
        reason = f"{type(exc)}:<'{exc}'>"
        reply = Message(
            FlowerError(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
        )
    return reply, context


def _init_worker(threads: int) -> None:
    """A new worker: ``threads`` torch threads (as Ray gives an actor its CPUs), and a thread
    lock for tqdm's bars.

    tqdm's default lock holds a named semaphore, which a worker killed mid-message (an
    interrupted run) leaves to multiprocessing's resource tracker: "There appear to be 2 leaked
    semaphore objects" at the end of the run. Each worker would make its own anyway (they are
    forked from the forkserver, not from each other), so no lock across processes is lost.
    """
    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    tqdm.set_lock(threading.RLock())


def _serve_run(setup: RunSetup) -> None:
    """Take on ``setup`` in a worker, when it is another run's than the last message's."""
    global _worker_setup
    if setup == _worker_setup:
        return
    os.environ.clear()
    os.environ.update(setup.environ)
    _WORKER_SCOPE.close()  # the last run's log routing
    if setup.log_file:
        _WORKER_SCOPE.enter_context(logs_to(setup.log_file, everything=True))
    _worker_setup = setup


@contextmanager
def logs_to(path: str | None, *, everything: bool = False) -> Iterator[None]:
    """Send fedspeech's and Flower's log records to ``path``, appended, instead of the console
    (as Flower's runtime sends its processes' output to ``flwr run``'s log); ``everything``: the
    root logger's too (a worker process). Restored afterwards; ``None``: logging is left alone."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    names = [*OUR_LOGGERS, "flwr"] + ([""] if everything else [])
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg, lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    for logger in loggers:
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        handler.close()


def _warm(preload: tuple[str, ...]) -> int:
    """Import what the first message needs (a no-op after the forkserver's preload)."""
    for name in preload:
        __import__(name)
    return os.getpid()


class WorkerPool:
    """``workers`` processes that run ClientApp messages, one message each at a time.

    Each worker is a one-process executor of its own: when a worker dies (killed, out of
    memory) only the message it held fails, and only that worker is replaced.

    Args:
        workers: ClientApps that run at once.
        threads: torch threads per worker.
        log_file: where the workers' log records go (None: the console).
        preload: modules every worker imports before its first message (``PRELOAD_DP``: with
            DP-SGD's).
    """

    def __init__(
        self,
        workers: int,
        *,
        threads: int = 1,
        log_file: str | None = None,
        preload: tuple[str, ...] = PRELOAD,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.preload = preload
        self.threads = threads
        self.setup = RunSetup.here(log_file)  # sent with each message
        self.served_by: dict[int, int] = {}  # node -> the slot that ran its last message
        self._slots: list[ProcessPoolExecutor | None] = [None] * workers
        self._lock = threading.Lock()
        # Per started worker, its warm-up: done when the worker can take a message (a worker
        # started again after a death appends one).
        self.warmed: list[Future[int]] = []

    def start(self) -> None:
        """Start the workers and their imports in the background (``submit`` waits for them).

        Where it is safe, their forkserver is a fork of this process (``fedspeech.app.zygote``):
        torch is imported already there.
        """
        start_forkserver(self.preload, threads=self.threads)

        def start_all() -> None:
            for slot in range(self.workers):
                self._executor(slot)

        threading.Thread(target=start_all, name="fedspeech-pool-start", daemon=True).start()

    def _executor(self, slot: int) -> ProcessPoolExecutor:
        with self._lock:
            executor = self._slots[slot]
            if executor is None:
                methods = multiprocessing.get_all_start_methods()
                ctx = multiprocessing.get_context(
                    "forkserver" if "forkserver" in methods else "spawn"
                )
                if ctx.get_start_method() == "forkserver":
                    # A forkserver already running (an earlier run of this process) keeps its
                    # preload; the workers' _warm imports what it lacks.
                    ctx.set_forkserver_preload(list(self.preload))
                executor = ProcessPoolExecutor(
                    1, mp_context=ctx, initializer=_init_worker, initargs=(self.threads,)
                )
                # Its process starts now, not at the first message.
                self.warmed.append(executor.submit(_warm, self.preload))
                self._slots[slot] = executor
            return executor

    def submit(
        self, slot: int, message: Message, context: Context
    ) -> Future[tuple[Message, Context]]:
        """Run ``handle_message(message, context, self.setup)`` on worker ``slot`` (idle: the
        caller's bookkeeping; a broken worker is replaced first)."""
        try:
            return self._executor(slot).submit(handle_message, message, context, self.setup)
        except BrokenProcessPool:  # it died since its last message
            self.replace(slot)
            return self._executor(slot).submit(handle_message, message, context, self.setup)

    def replace(self, slot: int) -> None:
        """Stop worker ``slot`` (killed if still running a message); the next use starts anew."""
        with self._lock:
            executor, self._slots[slot] = self._slots[slot], None
        if executor is not None:
            _stop(executor, kill=True)

    def close(self, *, kill: bool = False) -> None:
        """Stop every worker; ``kill``: at once, abandoning the messages they run (an
        interrupted run), else after them."""
        with self._lock:
            executors, self._slots = self._slots, [None] * self.workers
        for executor in executors:
            if executor is not None:
                _stop(executor, kill=kill)


@contextmanager
def kept_workers() -> Iterator[None]:
    """Keep the local engine's workers from one ``simulate`` run to the next, in this block.

    A run then finds its workers started, with their imports done and the examples of the nodes
    they served in memory (``fedspeech_client.example_memo``): for a sweep of runs in one
    process, such as ``experiments/recipes.py``. Runs with as many workers and torch threads
    share a pool. The workers stop when the block is left (at once, when it is left by an
    exception).
    """
    global _kept
    if _kept is not None:  # nested: the outer block keeps them
        yield
        return
    _kept, failed = {}, True
    try:
        yield
        failed = False
    finally:
        pools, _kept = _kept, None
        for pool in pools.values():
            pool.close(kill=failed)


@contextmanager
def run_pool(
    workers: int, *, threads: int, log_file: str | None, preload: tuple[str, ...]
) -> Iterator[WorkerPool]:
    """A started pool for one run: a kept one (``kept_workers``) or a new one, stopped after
    the run; on an exception (an interrupt) stopped at once, a kept one too."""
    key = (workers, threads)
    pool = _kept.get(key) if _kept is not None else None
    if pool is None:
        pool = WorkerPool(workers, threads=threads, log_file=log_file, preload=preload)
        pool.start()  # its workers import torch (and Opacus) while the server starts
        if _kept is not None:
            _kept[key] = pool
    else:
        pool.setup = RunSetup.here(log_file)
    failed = True
    try:
        yield pool
        failed = False
    finally:
        if failed and _kept is not None:
            _kept.pop(key, None)
        if failed or _kept is None:
            pool.close(kill=failed)


def _stop(executor: ProcessPoolExecutor, *, kill: bool) -> None:
    """Shut ``executor`` down; ``kill``: without waiting for the message its process runs."""
    if kill:
        # ProcessPoolExecutor cannot cancel a running call: end its process (private but
        # long-stable attribute; a missing one only leaves the process to finish its message).
        for process in list(getattr(executor, "_processes", {}).values()):
            process.kill()
    executor.shutdown(wait=not kill, cancel_futures=True)


class DirectGrid(Grid):
    """A Flower ``Grid`` without a SuperLink: the nodes are ``contexts``, and a subclass's
    ``send_and_receive`` delivers and collects in one call (``push_messages`` and
    ``pull_messages`` are not supported; Flower's strategies and SecAgg+ workflow use only
    ``send_and_receive`` and ``get_node_ids``).

    Args:
        contexts: node id -> that node's Context (kept here between messages).
    """

    def __init__(self, contexts: Mapping[int, Context]) -> None:
        self.contexts = dict(contexts)

    def set_run(self, run: Run) -> None:
        """Unused: there is no SuperLink."""

    @property
    def run(self) -> Run:
        """Unused: there is no SuperLink."""
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Deprecated in Flower (the ``Message`` constructor replaces it)."""
        raise NotImplementedError("build messages with flwr.app.Message")

    def get_node_ids(self) -> Iterable[int]:
        """The nodes of the federation."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Unsupported: ``send_and_receive`` delivers and collects in one call."""
        raise NotImplementedError(f"{type(self).__name__} delivers through send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Unsupported: see ``push_messages``."""
        raise NotImplementedError(f"{type(self).__name__} delivers through send_and_receive")


class PoolGrid(DirectGrid):
    """A ``DirectGrid`` whose messages are run by ``pool``.

    Args:
        contexts: node id -> that node's Context (kept here between messages).
        pool: the worker processes.
    """

    def __init__(self, contexts: Mapping[int, Context], pool: WorkerPool) -> None:
        super().__init__(contexts)
        self.pool = pool

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver every message to its node's ClientApp; the replies that came within ``timeout``.

        Messages wait for a free worker in the order given, except that a worker takes first
        a message for a node it served last (it still has the node's examples in memory:
        ``fedspeech_client.example_memo``). A node that does not exist, or
        whose worker died, answers with an error reply; a message still running or waiting at
        the timeout gets none (its worker is stopped), as a node that does not answer in Flower.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        deliverable: list[Message] = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's Grids do
            node = message.metadata.dst_node_id
            if node in self.contexts:
                deliverable.append(message)
            else:
                replies.append(_error(message, _NODE_DIED, f"no node {node} in this federation"))
        waiting = _AffinityQueue(deliverable, self.pool.served_by)
        free = list(range(self.pool.workers))
        running: dict[Future[tuple[Message, Context]], tuple[int, Message]] = {}
        while waiting or running:
            while waiting and free:
                slot = free.pop()
                message = waiting.take(slot)
                node = message.metadata.dst_node_id
                future = self.pool.submit(slot, message, self.contexts[node])
                self.pool.served_by[node] = slot
                running[future] = (slot, message)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = wait(running, timeout=left, return_when=FIRST_COMPLETED)
            raise_if_interrupted()
            if not done:  # the round's timeout: the rest are missing replies
                log.warning(
                    "%d message(s) unanswered after %.0f s: their workers are restarted",
                    len(running) + len(waiting),
                    timeout,
                )
                for slot, _ in running.values():
                    self.pool.replace(slot)
                break
            for future in done:
                slot, message = running.pop(future)
                free.append(slot)
                replies.append(self._reply(future, message, slot))
        return replies

    def _reply(
        self, future: Future[tuple[Message, Context]], message: Message, slot: int
    ) -> Message:
        node = message.metadata.dst_node_id
        try:
            reply, context = future.result()
        except BrokenProcessPool as exc:
            self.pool.replace(slot)
            log.error("node %d: its worker process died (%s); the message failed", node, exc)
            return _error(message, _NODE_DIED, f"the ClientApp's worker process died: {exc}")
        self.contexts[node] = context
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply


class _AffinityQueue:
    """Messages in the order given; ``take(slot)`` gives first the oldest one whose node
    ``served_by`` says worker ``slot`` ran last, else the oldest one."""

    def __init__(self, messages: Iterable[Message], served_by: Mapping[int, int]) -> None:
        self._all: deque[Message] = deque(messages)
        self._by_slot: dict[int, deque[Message]] = {}
        for message in self._all:
            slot = served_by.get(message.metadata.dst_node_id)
            if slot is not None:
                self._by_slot.setdefault(slot, deque()).append(message)
        self._taken: set[int] = set()  # id() of the messages taken (each is in two queues)
        self._left = len(self._all)

    def __len__(self) -> int:
        return self._left

    def take(self, slot: int) -> Message:
        """The next message for worker ``slot``. Raises IndexError when none is left."""
        for queue in (self._by_slot.get(slot), self._all):
            while queue:
                message = queue.popleft()
                if id(message) not in self._taken:
                    self._taken.add(id(message))
                    self._left -= 1
                    return message
        raise IndexError("no message left")


def _error(message: Message, code: int, reason: str) -> Message:
    return Message(FlowerError(code=code, reason=reason), reply_to=message)


def node_contexts(run_config: Mapping[str, Any], num_nodes: int) -> dict[int, Context]:
    """One Context per virtual node, as Flower's simulation registers them (run id 1)."""
    return {
        node_id: Context(
            run_id=1,
            node_id=node_id,
            node_config={"partition-id": partition, "num-partitions": num_nodes},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for partition, node_id in enumerate(range(1, num_nodes + 1))
    }


@contextmanager
def server_identity() -> Iterator[None]:
    """What Flower sets in a ServerApp process (messages read it); restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_server(
    run_config: Mapping[str, Any],
    num_nodes: int,
    pool: WorkerPool,
    *,
    log_file: str | None = None,
) -> None:
    """Run ``fedspeech_server.app.app`` over ``num_nodes`` virtual nodes served by ``pool``.

    Raises:
        What the ServerApp raises (``RoundFailedError``: a round had too few clients).
    """
    from fedspeech_server.app import app

    grid = PoolGrid(node_contexts(run_config, num_nodes), pool)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    with logs_to(log_file), flower_lines_once(), server_identity():
        app(grid, context)


@contextmanager
def flower_lines_once() -> Iterator[None]:
    """Flower's records printed once, in this process's format: Flower prints them with its own
    handler and passes them on to the root logger, whose handlers (the ``fedspeech`` command's)
    print them again. Where the root logger has none, Flower's handler stays. Restored
    afterwards."""
    flwr = logging.getLogger("flwr")
    saved = flwr.handlers[:]
    if flwr.propagate and logging.getLogger().handlers:
        flwr.handlers = []
    try:
        yield
    finally:
        flwr.handlers = saved
