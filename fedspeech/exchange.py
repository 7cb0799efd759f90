"""What a federated round exchanges: only the weights that train (``trainable``, ``freeze-layers``).

Weights outside ``fedspeech.model.trainable_names`` keep the values of the run's starting model
(``init-model``, or the fresh model seeded with ``seed``) from the first round to the last. So the
server sends and aggregates only the trained tensors, and every client rebuilds the fixed ones from
that starting model itself (``fedspeech.pipeline.initial_weights``): with ``trainable = "head"``
an en-public-small round moves 15,901 of 2,961,949 weights each way. A digest of the fixed weights travels
in each round's config (``frozen-digest``): a node whose starting model differs (another file
behind the same ``init-model`` path) stops with a message instead of training another model, and
a server whose fixed weights are no longer the starting model's (a run resumed with another
``trainable``) stops before sending anything.

>>> import torch
>>> digest = frozen_digest({"a": torch.zeros(2), "b": torch.ones(1)}, ["b"])
>>> digest == frozen_digest({"a": torch.zeros(2), "b": torch.zeros(1)}, ["b"])
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping

from torch import Tensor

from fedspeech.config import ConfigError, RunConfig
from fedspeech.model import trainable_names
from fedspeech_features.text import CharTokenizer


def exchanged_names(cfg: RunConfig) -> list[str] | None:
    """The tensors a round of this run sends and receives; None: all of them."""
    model_config = cfg.model.model_config(cfg.features.frame_dim, CharTokenizer().vocab_size)
    names = trainable_names(model_config, cfg.train.trainable, cfg.train.freeze_layers)
    everything = trainable_names(model_config)
    return None if names == everything else names


def frozen_digest(state: Mapping[str, Tensor], exchanged: Collection[str]) -> str:
    """SHA-256 of every tensor of ``state`` outside ``exchanged`` (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name in sorted(set(state) - set(exchanged)):
        value = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        h.update(value.numpy().tobytes())
    return h.hexdigest()


def check_frozen(
    state: Mapping[str, Tensor], exchanged: Collection[str], expected: str, *, where: str
) -> None:
    """Raise ConfigError unless ``state``'s fixed weights have the digest ``expected``."""
    got = frozen_digest(state, exchanged)
    if got != expected:
        raise ConfigError(
            f"{where}: the fixed (non-trained) weights differ from the run's starting model "
            f"(digest {got[:12]} != {expected[:12]}): every party must start from the same "
            "init-model, and trainable / freeze-layers cannot change within a run"
        )


def with_fixed_weights(
    received: Mapping[str, Tensor],
    start: Mapping[str, Tensor],
    exchanged: Collection[str],
    digest: str,
) -> dict[str, Tensor]:
    """A client's full model: the ``received`` trained tensors over the starting model ``start``.

    Raises:
        ConfigError: the received names are not ``exchanged``, or ``start``'s fixed weights are
            not the server's (``digest``).
    """
    got, want = set(received), set(exchanged)
    if got != want:
        raise ConfigError(
            "the server sent other tensors than this run trains: "
            f"missing {sorted(want - got)}, extra {sorted(got - want)}"
        )
    if not digest:
        raise ConfigError(
            f"only {len(exchanged)} tensors train, but the server sent no frozen-digest to check "
            "this node's starting model against (a server of another fedspeech version?)"
        )
    check_frozen(start, exchanged, digest, where="this node's init-model")
    return {**start, **received}
