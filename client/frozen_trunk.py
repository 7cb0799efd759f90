"""Training only the output head: the fixed layers below it run once per utterance, not per round.

With every weight below the output LayerNorm and Linear fixed (``freeze-layers`` = ``num-layers``,
or ``trainable = "head"``; the demo and ``en-public-small`` fine-tuning), the front-end and the
recurrent layers (the *trunk*) map an utterance to the same ``(T, H*dirs)`` frames every round. A
round used to recompute them for every utterance it trained on: 80% of a demo client's message
(3.4 s of 4.2 s, cProfile, docs/benchmarks.md). ``TrunkMemo`` keeps each utterance's trunk output
in memory, keyed by its feature tensor (``fedspeech_client.example_memo`` keeps the same tensors
between rounds) and the digest of the trunk's weights; a round then trains the head on them
(``BiGRUCTC.trunk_given``).

What changes: the trunk runs without dropout (the model's input dropout, before the fixed layers,
is not applied; the dropout between the trunk and the LayerNorm is). DP-SGD is unchanged: the
same Poisson sampling, clipping and noise over the same trained weights, and the trunk is a fixed
function of the node's own data, computed on the node. Feature augmentation (``spec-augment``,
``tempo-augment``) makes each read differ, so training with it takes the full model as before.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from fedspeech.model import BiGRUCTC, convert_model, plain_state_dict, trainable_names, unwrap
from fedspeech_client.batching import LabelledFeatures
from fedspeech_client.train_config import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 512 * 2**20  # kept per process: ~10 demo-sized nodes (50 MB each at H=256)
MAX_CALL_BYTES = 2 * 2**30  # held by one training call: ~9 h of speech at en-public-small's size
_BATCH = 32  # utterances per trunk pass
_HEAD = ("norm.", "head.")


def trains_head_only(model: nn.Module, cfg: TrainConfig) -> bool:
    """Whether ``cfg`` trains no weight below the output LayerNorm and Linear of ``model``."""
    names = trainable_names(unwrap(model).cfg, cfg.trainable, cfg.freeze_layers)
    return all(name.startswith(_HEAD) for name in names)


def fits(model: nn.Module, examples: Sequence[LabelledFeatures]) -> bool:
    """Whether the trunk outputs of ``examples`` (4 bytes x ``output_dim`` a frame: 2 KiB at
    en-public-small's size, 4.3x its features) stay within ``MAX_CALL_BYTES``; a larger call
    (central training on many hours) runs every layer every epoch, as before, rather than hold
    them all."""
    frames = sum(int(ex.feats.shape[0]) for ex in examples)
    return frames * unwrap(model).cfg.output_dim * 4 <= MAX_CALL_BYTES


@dataclass(frozen=True)
class TrunkExample:
    """An utterance as the head sees it: the trunk's ``(T, H*dirs)`` frames and its labels."""

    feats: Tensor
    labels: Tensor


@dataclass(frozen=True)
class _Entry:
    source: weakref.ref[Tensor]  # the feature tensor this was computed from (alive: same input)
    output: Tensor  # (T, H*dirs)


def trunk_digest(model: nn.Module) -> str:
    """SHA-256 of the model's fixed-below-the-head weights (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in plain_state_dict(model).items():
        if not name.startswith(_HEAD):
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


class TrunkMemo:
    """Trunk outputs per (trunk weights, feature tensor), least recently used evicted past
    ``budget_bytes``. Thread-safe; one per process (``MEMO``)."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.RLock()  # the weakref callback may run in any thread
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the trunk outputs held now."""
        return self._nbytes

    def outputs(
        self, model: nn.Module, examples: Sequence[LabelledFeatures], device: torch.device
    ) -> list[TrunkExample]:
        """Every example's trunk output under ``model``'s fixed weights, computing the missing
        ones (no gradient, no dropout, on ``device``; kept on the CPU)."""
        digest = trunk_digest(model)
        found: dict[int, Tensor] = {}
        with self._lock:
            for i, ex in enumerate(examples):
                entry = self._entries.get((digest, id(ex.feats)))
                if entry is not None and entry.source() is ex.feats:
                    self._entries.move_to_end((digest, id(ex.feats)))
                    found[i] = entry.output
            self.hits += len(found)
            self.misses += len(examples) - len(found)
        missing = [i for i in range(len(examples)) if i not in found]
        if missing:
            computed = _run_trunk(model, [examples[i].feats for i in missing], device)
            found.update(zip(missing, computed, strict=True))
            self._keep(digest, [(examples[i].feats, found[i]) for i in missing])
        log.debug("trunk outputs: %d kept, %d computed", len(examples) - len(missing), len(missing))
        return [TrunkExample(found[i], ex.labels) for i, ex in enumerate(examples)]

    def _keep(self, digest: str, pairs: list[tuple[Tensor, Tensor]]) -> None:
        with self._lock:
            for feats, output in pairs:
                key = (digest, id(feats))
                old = self._entries.pop(key, None)
                if old is not None:
                    self._nbytes -= _size(old.output)
                self._entries[key] = _Entry(weakref.ref(feats, self._forget(key)), output)
                self._nbytes += _size(output)
            while self._nbytes > self.budget_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= _size(evicted.output)

    def _forget(self, key: tuple[str, int]) -> Callable[[weakref.ref[Tensor]], None]:
        """A weakref callback dropping ``key`` once its feature tensor is freed (its id may be
        reused by another tensor)."""

        def drop(ref: weakref.ref[Tensor]) -> None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.source is ref:
                    del self._entries[key]
                    self._nbytes -= _size(entry.output)

        return drop


def _size(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _run_trunk(model: nn.Module, feats: list[Tensor], device: torch.device) -> list[Tensor]:
    """``model.trunk`` over ``feats`` (each ``(T, D)``) in length-sorted batches: ``(T, H*dirs)``
    CPU tensors, in the given order. Uses the fused recurrent layer (plain flavour), eval mode."""
    net = convert_model(model, dp=False).to(device).eval()
    net.trunk_given = False
    order = sorted(range(len(feats)), key=lambda i: -feats[i].shape[0])
    out: list[Tensor | None] = [None] * len(feats)
    with torch.no_grad():
        for start in range(0, len(order), _BATCH):
            chunk = order[start : start + _BATCH]
            padded = pad_sequence([feats[i] for i in chunk], batch_first=True).to(device)
            lengths = torch.tensor([feats[i].shape[0] for i in chunk], dtype=torch.int64)
            y = net.trunk(padded, lengths)  # (B, T, H*dirs)
            for row, i in enumerate(chunk):
                out[i] = y[row, : int(lengths[row])].to("cpu", copy=True)
    return [t for t in out if t is not None]


def head_model(model: nn.Module) -> BiGRUCTC:
    """A copy of ``model`` whose ``forward`` reads trunk outputs (``trunk_given``)."""
    head = convert_model(model, dp=False)
    head.trunk_given = True
    return head


MEMO = TrunkMemo()
