"""Fault injection for reliability tests: a ClientApp that crashes, hangs or sends a bad update.

A testing aid, off unless the node's own environment sets ``FEDSPEECH_FAULT`` (the server cannot
turn it on: it is not part of the run config). The value lists faults, separated by commas::

    FEDSPEECH_FAULT="0:raise,1:hang=30,2:nan@2,*:shape"

Each item is ``TARGET:KIND[@ROUND]``: ``TARGET`` is a simulated node's partition id or ``*``
(this node, whichever it is: for real SuperNodes, which have no partition id); ``@ROUND`` limits
the fault to one server round. Kinds, applied after local training (the privacy ledger is saved
first, as in a real crash after training):

* ``raise``: the ClientApp raises (Flower replies with an error message);
* ``hang=SECONDS``: the ClientApp sleeps that long before replying (past ``round-timeout``);
* ``nan`` / ``inf``: the first weight of the update becomes NaN / +Inf;
* ``shape``: the first tensor of the update loses its last row.

``FEDSPEECH_FAULT_MARKER=PATH`` (node-local too, optional) makes a fault announce itself before it
is acted out: one line ``PID KIND`` (PID: the ClientApp's process) is appended to ``PATH``. A test
then knows that the fault fired and where the node stands, e.g. that a node hanging in a secure
aggregation round has shared its keys and not sent its masked update, and can kill it there
(``tests/test_secagg_deployment.py``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

log = logging.getLogger("fedspeech.client")

FAULT_ENV = "FEDSPEECH_FAULT"
MARKER_ENV = "FEDSPEECH_FAULT_MARKER"
KINDS = ("raise", "hang", "nan", "inf", "shape")


class InjectedFault(RuntimeError):
    """The crash a ``raise`` fault asks for."""


@dataclass(frozen=True)
class Fault:
    """One injected fault (see the module docstring)."""

    target: int | None  # partition id; None: any node
    kind: str
    seconds: float = 0.0  # hang only
    round: int | None = None  # None: every round


def parse_faults(spec: str) -> list[Fault]:
    """Parse a ``FEDSPEECH_FAULT`` value.

    Raises:
        ValueError: an item that is not ``TARGET:KIND[=SECONDS][@ROUND]``.
    """
    faults = []
    for item in spec.replace(" ", "").split(","):
        if not item:
            continue
        try:
            target, _, rest = item.partition(":")
            rest, _, rnd = rest.partition("@")
            kind, _, seconds = rest.partition("=")
            if kind not in KINDS or (kind == "hang") != bool(seconds):
                raise ValueError(kind)
            fault = Fault(
                target=None if target == "*" else int(target),
                kind=kind,
                seconds=float(seconds) if seconds else 0.0,
                round=int(rnd) if rnd else None,
            )
        except ValueError as exc:
            raise ValueError(
                f"{FAULT_ENV}: {item!r} is not TARGET:KIND[@ROUND] with KIND one of "
                f"raise, hang=SECONDS, nan, inf, shape"
            ) from exc
        faults.append(fault)
    return faults


def active_faults(partition_id: int | None, server_round: int) -> list[Fault]:
    """The faults ``FEDSPEECH_FAULT`` sets for this node and round (none when unset)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return []
    return [
        f
        for f in parse_faults(spec)
        if (f.target is None or f.target == partition_id)
        and (f.round is None or f.round == server_round)
    ]


def apply_faults(
    faults: list[Fault], state_dict: Mapping[str, Tensor] | None
) -> dict[str, Tensor] | None:
    """Act out ``faults`` on the trained weights; returns the (possibly corrupted) update.

    Raises:
        InjectedFault: a ``raise`` fault.
    """
    out = None if state_dict is None else {k: v.clone() for k, v in state_dict.items()}
    for fault in faults:
        log.warning("injected fault (%s): %s", FAULT_ENV, fault)
        _announce(fault)
        if fault.kind == "raise":
            raise InjectedFault(f"injected fault ({FAULT_ENV}): the ClientApp crashes")
        if fault.kind == "hang":
            time.sleep(fault.seconds)
        elif out:
            first = next(iter(out))
            if fault.kind == "shape":
                out[first] = out[first][:-1]
            else:
                flat = out[first].view(-1)
                flat[0] = math.nan if fault.kind == "nan" else math.inf
    return out


def _announce(fault: Fault) -> None:
    """Append ``PID KIND`` to ``$FEDSPEECH_FAULT_MARKER`` (if set), flushed to disk."""
    path = os.environ.get(MARKER_ENV, "")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {fault.kind}\n")
        fh.flush()
        os.fsync(fh.fileno())


__all__ = [
    "FAULT_ENV",
    "MARKER_ENV",
    "Fault",
    "InjectedFault",
    "active_faults",
    "apply_faults",
    "parse_faults",
]
