"""Flower's simulation engine, polling the messages in flight instead of every virtual node.

Flower 1.42's simulation engine hands messages to the ClientApp actors from one thread,
``add_messages_to_queue`` in ``flwr/server/superlink/fleet/vce/vce_api.py``: every 0.1 s it asks
the link state for each of the N registered nodes in turn whether a message waits for it
(``get_message_ins(node_id, limit=1)``), and each such call scans every message in the store
under the state's lock. A pass costs O(N x messages): with 10,000 virtual clients and a cohort
of 10, the steady round took 2.1x as long as with 10 clients (``benchmarks/scale.py``), the
thread competing with the actors for the CPU.

``polled_by_message`` is the same loop over only the nodes that have an undelivered message
(one scan of the store per pass, O(messages)); each of those nodes still gets its messages
through ``get_message_ins(node_id, limit=1)``, so delivery, expiry checks and order per node are
Flower's own. The fix is contribute-ready for Flower (``docs/benchmarks.md``, "Scale").

``patch_simulation_engine()`` installs it, only in the process that runs Flower's simulation
engine (``vce_api`` already imported: Flower loads the ClientApp there once before it starts its
threads) and only on Flower 1.42, whose link-state internals it reads; elsewhere (Ray actors,
SuperNodes) it does nothing and imports nothing.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Container, Mapping
from queue import Queue
from typing import Any

log = logging.getLogger(__name__)

VCE_MODULE = "flwr.server.superlink.fleet.vce.vce_api"
FLOWER_VERSIONS = ("1.42.",)  # whose InMemoryLinkState has ``lock`` and ``message_ins_store``
_POLL_S = 0.1  # Flower's


def pending_nodes(state: Any, nodes: Container[int]) -> list[int]:
    """The nodes among ``nodes`` with an undelivered message in ``state``, each once, in the
    order their first such message was stored (O(messages), whatever the number of nodes)."""
    with state.lock:
        waiting = dict.fromkeys(
            m.metadata.dst_node_id
            for m in state.message_ins_store.values()
            if m.metadata.delivered_at == ""
        )
    return [n for n in waiting if n in nodes]


def polled_by_message(
    state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int], f_stop: threading.Event
) -> None:
    """Flower's ``add_messages_to_queue``, asking only the nodes that have a message waiting."""
    while not f_stop.is_set():
        for node_id in pending_nodes(state, nodes_mapping):
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(_POLL_S)


def patch_simulation_engine() -> bool:
    """Install ``polled_by_message`` in Flower's running simulation engine; whether it did."""
    vce: Any = sys.modules.get(VCE_MODULE)
    if vce is None or hasattr(vce.add_messages_to_queue, "__wrapped__"):  # none, or done
        return False
    from flwr import __version__ as flower_version

    original: Callable[..., None] = vce.add_messages_to_queue
    if not flower_version.startswith(FLOWER_VERSIONS):
        log.debug("Flower %s: simulation engine left as it is", flower_version)
        return False

    def add_messages_to_queue(
        state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int], f_stop: threading.Event
    ) -> None:
        if hasattr(state, "lock") and hasattr(state, "message_ins_store"):
            polled_by_message(state, queue, nodes_mapping, f_stop)
        else:  # another link state: Flower's loop
            original(state, queue, nodes_mapping, f_stop)

    add_messages_to_queue.__wrapped__ = original  # type: ignore[attr-defined]
    vce.add_messages_to_queue = add_messages_to_queue
    log.debug("simulation engine: messages polled by message, not by node")
    return True
