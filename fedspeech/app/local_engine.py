"""``fedspeech simulate --engine local``: the same ServerApp and ClientApp without Flower's runtime.

Flower's simulation runtime (``--engine flower``, the default) is a chain of processes: a
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
workers are forked from a forkserver that imports torch, Opacus and the client once, while the
server starts; a worker that dies (killed, out of memory) fails the messages it held, which are
reported like a crashed ClientApp, and the pool is rebuilt for the next ones.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app import Error as FlowerError
from flwr.serverapp import Grid
from flwr.supercore.run import Run

log = logging.getLogger("fedspeech.engine")

# What a worker needs for its first message, imported once by the forkserver (~2.4 s here).
_PRELOAD = ("torch", "opacus", "fedspeech_client.app", "fedspeech_client.local_round")
_CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode
_NODE_DIED = 0  # ErrorCode.UNKNOWN: the worker process ended without a reply


def handle_message(message: Message, context: Context) -> tuple[Message, Context]:
    """Run ``fedspeech_client.app.app`` on one message in a worker: the reply and the context.

    An exception becomes an error reply naming it, as in Flower's runtime.
    """
    from fedspeech_client.app import app

    try:
        reply = app(message, context)
    except Exception as exc:
        log.exception("node %d: the ClientApp raised", context.node_id)
        reason = f"{type(exc)}:<'{exc}'>"
        reply = Message(
            FlowerError(code=_CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
        )
    return reply, context


def _init_worker(environ: Mapping[str, str], threads: int, log_file: str | None) -> None:
    """A new worker: the environment of the ``simulate`` call (not the forkserver's), ``threads``
    torch threads (as Ray gives an actor its CPUs), and its log records in ``log_file``."""
    os.environ.clear()
    os.environ.update(environ)
    import torch

    torch.set_num_threads(threads)
    if log_file:
        _log_to(log_file)


def _log_to(path: str) -> logging.Handler:
    """Send fedspeech's records to ``path`` (appended) instead of the console."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fedspeech")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return handler


def _warm() -> int:
    """Import what the first message needs (a no-op after the forkserver's preload)."""
    for name in _PRELOAD:
        __import__(name)
    return os.getpid()


class WorkerPool:
    """``workers`` processes that run ClientApp messages; restarted when one dies.

    Args:
        workers: ClientApps that run at once.
        threads: torch threads per worker.
        log_file: where the workers' log records go (None: the console).
    """

    def __init__(self, workers: int, *, threads: int = 1, log_file: str | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self._initargs = (threads, log_file)
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the workers and their imports in the background (``submit`` waits for them)."""
        threading.Thread(target=self._pool, name="fedspeech-pool-start", daemon=True).start()

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                methods = multiprocessing.get_all_start_methods()
                ctx = multiprocessing.get_context(
                    "forkserver" if "forkserver" in methods else "spawn"
                )
                if ctx.get_start_method() == "forkserver":
                    ctx.set_forkserver_preload(list(_PRELOAD))
                executor = ProcessPoolExecutor(
                    self.workers, mp_context=ctx, initializer=_init_worker,
                    initargs=(dict(os.environ), *self._initargs),
                )  # fmt: skip
                for _ in range(self.workers):  # one process each, started now
                    executor.submit(_warm)
                self._executor = executor
            return self._executor

    def submit(self, message: Message, context: Context) -> Future[tuple[Message, Context]]:
        """Queue ``handle_message(message, context)``."""
        executor = self._pool()
        try:
            return executor.submit(handle_message, message, context)
        except BrokenProcessPool:  # a worker died since the last round: start afresh
            self.discard_broken()
            return self._pool().submit(handle_message, message, context)

    def discard_broken(self) -> None:
        """Drop the executor if a worker died (the next ``submit`` starts new ones)."""
        with self._lock:
            executor = self._executor
            if executor is not None and getattr(executor, "_broken", False):
                executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    def close(self) -> None:
        """Stop the workers (a message still running is abandoned)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None


class PoolGrid(Grid):
    """A Flower ``Grid`` whose nodes are ``contexts``, their messages run by ``pool``.

    Args:
        contexts: node id -> that node's Context (kept here between messages).
        pool: the worker processes.
    """

    def __init__(self, contexts: Mapping[int, Context], pool: WorkerPool) -> None:
        self.contexts = dict(contexts)
        self.pool = pool
        self.failures = 0  # messages lost with a worker process that died

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
        raise NotImplementedError("PoolGrid delivers through send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Unsupported: see ``push_messages``."""
        raise NotImplementedError("PoolGrid delivers through send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver every message to its node's ClientApp; the replies that came within ``timeout``.

        A node that does not exist, or whose worker died, answers with an error reply.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending: dict[Future[tuple[Message, Context]], Message] = {}
        replies: list[Message] = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's Grids do
            node = message.metadata.dst_node_id
            if node not in self.contexts:
                replies.append(_error(message, _NODE_DIED, f"no node {node} in this federation"))
                continue
            pending[self.pool.submit(message, self.contexts[node])] = message
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            if not done:  # the round's timeout: the rest are missing replies, as in Flower
                for future in pending:
                    future.cancel()
                log.warning("%d message(s) unanswered after %.0f s", len(pending), timeout)
                break
            for future in done:
                replies.append(self._reply(future, pending.pop(future)))
        return replies

    def _reply(self, future: Future[tuple[Message, Context]], message: Message) -> Message:
        node = message.metadata.dst_node_id
        try:
            reply, context = future.result()
        except BrokenProcessPool as exc:
            self.failures += 1
            self.pool.discard_broken()
            log.error("node %d: its worker process died (%s); the message failed", node, exc)
            return _error(message, _NODE_DIED, f"the ClientApp's worker process died: {exc}")
        self.contexts[node] = context
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply


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
) -> PoolGrid:
    """Run ``fedspeech_server.app.app`` over ``num_nodes`` virtual nodes served by ``pool``.

    Returns:
        The grid (its ``failures``: messages lost with a worker that died).

    Raises:
        What the ServerApp raises (``RoundFailedError``: a round had too few clients).
    """
    from fedspeech_server.app import app

    grid = PoolGrid(node_contexts(run_config, num_nodes), pool)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    logger = logging.getLogger("fedspeech")
    saved = logger.propagate, logger.level
    handler = _log_to(log_file) if log_file else None
    try:
        with server_identity():
            app(grid, context)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
            logger.propagate, logger.level = saved
    return grid
