"""Client side of secure aggregation: Flower's ``secaggplus_mod`` around the training handler.

``secure_aggregation_mod`` is a ClientApp mod. A train message that carries SecAgg+ settings
(``secaggplus_configs``, sent by ``fedspeech_server.secagg``) goes through Flower's ``secaggplus_mod``: it
answers the key-setup, key-sharing and unmasking stages itself, and in the masked-input stage it
calls the normal training handler (``fedspeech_client.app``), whose reply ``masked_input`` turns into what
the mod masks. A plain train message goes straight to the handler, unless the run config asks for
secure aggregation: then the client refuses to send its weights in the clear.

``masked_input`` makes, from the global weights the server sent and the client's reply:

* the update ``delta = trained - global`` of every floating-point tensor, in sorted-name order
  (the server unmasks in the same order; names never travel in the masked vector);
* with user-level DP (``privacy-unit`` ``user`` or ``both``) the update clipped to an L2 norm just
  below the round's ``user-clip-norm`` (sent by the server), so that even after quantization one
  client moves the sum by at most that norm; its weight is 1 and, for adaptive clipping, a
  one-element indicator ``r 1[||delta|| <= C]`` is appended (r: ``secagg-clipping-range``), whose
  secure sum is r times the unclipped count;
* otherwise its weight is ``num-examples`` (capped at ``secagg-max-weight``), so the unmasked
  result is FedAvg's weighted mean;
* a client that declined (privacy budget) contributes zeros with weight 0; a non-finite update
  is never masked: the client raises, i.e. drops out of the round (the sum cannot be screened).

The reply keeps the client's metrics in the clear (``fitres.metrics``: loss, epsilon,
``num-examples``, ...), as without secure aggregation; only the weights are masked.

Testing aid: ``FEDSPEECH_SECAGG_DUMP=DIR`` in a node's own environment (never in the run config:
the server cannot turn it on) saves what the node is about to mask, in the clear, to
``DIR/node-<node id>-round-<round>.npz`` (``dump_plain_input``), so that a test can compare the
server's unmasked aggregate with plain FedAvg of the very same inputs. It writes the node's update
unprotected to the node's disk: never set it outside tests.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Context, Message, RecordDict

import fedspeech.metric_keys as mk

if TYPE_CHECKING:
    from fedspeech.config import RunConfig

log = logging.getLogger("fedspeech.client")

# Flower's record names (flwr.common.secure_aggregation.secaggplus_constants), spelled out here
# so that importing this module stays cheap (the crypto loads with the first SecAgg message).
SECAGG_CONFIGS = "secaggplus_configs"
CLIP_NORM_KEY = "user-clip-norm"  # the round's user-level clipping norm, sent by the server
INDICATOR = "unclipped"  # name of the appended indicator (adaptive clipping)
DUMP_ENV = "FEDSPEECH_SECAGG_DUMP"  # testing aid (see the module docstring)

Handler = Callable[[Message, Context], Message]


class SecureAggregationRequired(RuntimeError):
    """A plain train message in a run whose config asks for secure aggregation."""


class NonFiniteUpdate(RuntimeError):
    """The trained update has NaN/Inf values: masking it would corrupt the secure sum."""


def secure_aggregation_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """ClientApp mod: SecAgg+ for train messages that ask for it (see the module docstring).

    Raises:
        SecureAggregationRequired: the run config sets ``secure-aggregation`` but the message
            does not carry the protocol (a server bug must not send weights in the clear).
    """
    if SECAGG_CONFIGS not in msg.content.config_records:
        if context.run_config.get("secure-aggregation") is True:
            raise SecureAggregationRequired(
                "this run requires secure aggregation (secure-aggregation = true) but the train "
                "message does not carry SecAgg+ settings; refusing to send weights in the clear"
            )
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod  # lazy: key agreement, Shamir shares, AES

    return secaggplus_mod(msg, context, _masked_input_handler(call_next))


def _masked_input_handler(call_next: Handler) -> Handler:
    def handler(msg: Message, context: Context) -> Message:
        from fedspeech.config import RunConfig

        reply = call_next(msg, context)
        cfg = RunConfig.from_flat(context.run_config)
        content = masked_input(msg.content, reply.content, cfg)
        dump_dir = os.environ.get(DUMP_ENV, "")
        if dump_dir:  # testing aid, off unless the node's own environment sets it
            dump_plain_input(Path(dump_dir), context.node_id, msg.content, content)
        return Message(content, reply_to=msg)

    return handler


def masked_input(sent: RecordDict, reply: RecordDict, cfg: RunConfig) -> RecordDict:
    """The reply in the form ``secaggplus_mod`` masks (Flower's legacy ``fitres.*`` records).

    Args:
        sent: the train message's content (``arrays``: the global weights; ``config``).
        reply: the training handler's reply content (``arrays`` unless declined; ``metrics``).
        cfg: the run config (``fedspeech.config.RunConfig``).

    Raises:
        NonFiniteUpdate: the trained weights hold NaN/Inf.
        ValueError: the trained weights do not match the global ones.
    """
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    base = float_arrays({k: v.numpy() for k, v in sent.array_records["arrays"].items()})
    metrics = {k: float(v) for k, v in reply.metric_records["metrics"].items()}  # type: ignore[arg-type]
    user_level = cfg.user_level_dp
    config = sent.config_records["config"]
    if user_level and CLIP_NORM_KEY not in config:
        raise ValueError(f"user-level DP with secure aggregation, but no {CLIP_NORM_KEY} was sent")
    clip_norm = float(str(config.get(CLIP_NORM_KEY, 0.0)))
    declined = "arrays" not in reply.array_records
    unclipped = 0.0
    if declined:
        deltas = [np.zeros_like(base[k]) for k in sorted(base)]
        weight = 0
    else:
        trained = {k: v.numpy() for k, v in reply.array_records["arrays"].items()}
        deltas = update_vector(base, trained)
        if user_level:
            bound = quantization_safe_norm(
                clip_norm,
                sum(d.size for d in deltas),
                cfg.secagg.secagg_clipping_range,
                cfg.secagg.secagg_quantization_range,
            )
            norm = math.sqrt(sum(float(np.sum(np.square(d))) for d in deltas))
            unclipped = 1.0 if norm <= clip_norm else 0.0
            scale = min(1.0, bound / norm) if norm > 0 else 1.0
            deltas = [d * scale for d in deltas]
            weight = 1
        else:
            weight = _capped_weight(metrics.get(mk.NUM_EXAMPLES, 0.0), cfg.secagg.secagg_max_weight)
        _warn_if_saturated(deltas, cfg.secagg.secagg_clipping_range)
    if user_level and cfg.privacy.adaptive_clipping:  # scaled to r: quantization clips at r
        deltas.append(np.array([unclipped * cfg.secagg.secagg_clipping_range]))
    fit_metrics: dict[str, bool | bytes | float | int | str] = dict(metrics)
    decline = reply.config_records.get("decline")
    if decline is not None:
        fit_metrics[mk.DECLINE_REASON] = str(decline.get("reason", ""))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(deltas), weight, fit_metrics)
    return fitres_to_recorddict(fitres, keep_input=False)


def dump_plain_input(directory: Path, node_id: int, sent: RecordDict, content: RecordDict) -> Path:
    """Save the input ``secaggplus_mod`` is about to mask, in the clear (testing aid only).

    Args:
        directory: where to write ``node-<node_id>-round-<round>.npz`` (created if missing).
        node_id: this node's id (the server's reports name a deployed node ``node-<id>``).
        sent: the train message's content (``arrays``: the global weights; ``config``).
        content: ``masked_input``'s result.

    The file holds ``names`` (the float tensors, in the order of the vector), ``global/<name>``
    (the global weights as sent, float64), ``input/<i>`` (the vector's arrays, before
    quantization) and ``weight`` (the aggregation weight). Written to a temporary name first, so
    a reader never sees half a file.
    """
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    fitres = recorddict_to_fitres(content, keep_input=True)
    base = float_arrays({k: v.numpy() for k, v in sent.array_records["arrays"].items()})
    names = sorted(base)
    arrays: dict[str, np.ndarray] = {
        "names": np.array(names),
        "weight": np.array(fitres.num_examples),
    }
    arrays.update({f"global/{k}": base[k] for k in names})
    vectors = parameters_to_ndarrays(fitres.parameters)
    arrays.update({f"input/{i:04d}": v for i, v in enumerate(vectors)})
    server_round = int(str(sent.config_records["config"].get("server-round", 0)))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"node-{node_id}-round-{server_round}.npz"
    partial = directory / f".{path.name}.partial"
    with open(partial, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    os.replace(partial, path)
    log.warning(
        "%s is set: saved this node's secure-aggregation input in the clear to %s", DUMP_ENV, path
    )
    return path


def float_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The floating-point arrays of ``arrays`` (the ones that are averaged), in float64."""
    return {
        k: np.asarray(v, np.float64) for k, v in arrays.items() if np.asarray(v).dtype.kind == "f"
    }


def update_vector(
    base: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """``trained - base`` per float tensor, in sorted-name order (what the server unmasks).

    Raises:
        ValueError: missing tensors or other shapes.
        NonFiniteUpdate: NaN/Inf values.
    """
    deltas = []
    for key in sorted(base):
        if key not in trained or np.shape(trained[key]) != base[key].shape:
            raise ValueError(f"{key}: the trained weights do not match the global model")
        delta = np.asarray(trained[key], np.float64) - base[key]
        if not np.isfinite(delta).all():
            raise NonFiniteUpdate(f"{key}: non-finite update; not joining the secure sum")
        deltas.append(delta)
    return deltas


def quantization_safe_norm(
    clip_norm: float, size: int, clipping_range: float, levels: int
) -> float:
    """An L2 bound that stays within ``clip_norm`` after SecAgg+'s stochastic quantization.

    Quantization moves every coordinate by less than one step ``2 r / levels``, so a vector of
    ``size`` coordinates by less than ``sqrt(size) 2 r / levels`` in L2 norm.

    >>> round(quantization_safe_norm(1.0, 10_000, 8.0, 2**22), 6)
    0.999619

    Raises:
        ValueError: the quantization error alone reaches ``clip_norm``.
    """
    margin = math.sqrt(size) * 2 * clipping_range / levels
    if margin >= clip_norm:
        raise ValueError(
            f"user-clip-norm {clip_norm} is below the quantization error {margin:.3g} of an update "
            "of this size: lower secagg-clipping-range or raise secagg-quantization-range"
        )
    return clip_norm - margin


def _capped_weight(num_examples: float, max_weight: float) -> int:
    weight = int(num_examples)
    if weight > max_weight:
        log.warning(
            "num-examples %d exceeds secagg-max-weight %g: the update weighs %d in the secure mean",
            weight,
            max_weight,
            int(max_weight),
        )
        return int(max_weight)
    return weight


def _warn_if_saturated(deltas: list[np.ndarray], clipping_range: float) -> None:
    clipped = sum(int(np.count_nonzero(np.abs(d) > clipping_range)) for d in deltas)
    if clipped:
        log.warning(
            "%d update coordinates exceed secagg-clipping-range %g and are clipped to it",
            clipped,
            clipping_range,
        )


__all__ = [
    "CLIP_NORM_KEY",
    "DUMP_ENV",
    "SECAGG_CONFIGS",
    "NonFiniteUpdate",
    "SecureAggregationRequired",
    "dump_plain_input",
    "float_arrays",
    "masked_input",
    "quantization_safe_norm",
    "secure_aggregation_mod",
    "update_vector",
]
