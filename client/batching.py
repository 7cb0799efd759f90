"""Feature tensors -> padded, length-sorted batches for CTC training (DP Poisson or bucketed).

Items are ``(feats (T, D), labels (L,))`` tuples so that Opacus's ``DPDataLoader`` can read their
structure; ``collate_ctc`` sorts every batch by decreasing length, which the DP model requires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, Sampler

Augment = Callable[[Tensor], Tensor]


class LabelledFeatures(Protocol):
    """What training needs from an example (``fedspeech_features.dataset.Example`` fits)."""

    @property
    def feats(self) -> Tensor:
        """``(T, D)`` float32 feature frames."""
        ...

    @property
    def labels(self) -> Tensor:
        """``(L,)`` int64 tokenizer ids, no blanks."""
        ...


class CTCBatch(NamedTuple):
    """A padded batch, sorted by decreasing ``feat_lens``."""

    feats: Tensor  # (B, T, D) float
    feat_lens: Tensor  # (B,) int64
    labels: Tensor  # (B, L) int64, padded with 0 (blank: never a target)
    label_lens: Tensor  # (B,) int64

    @property
    def size(self) -> int:
        """Number of utterances in the batch."""
        return int(self.feats.shape[0])

    def to(self, device: torch.device) -> CTCBatch:
        """The batch on ``device``."""
        return CTCBatch(*(t.to(device) for t in self))


class FeatureDataset(Dataset[tuple[Tensor, Tensor]]):
    """Map-style dataset over examples, optionally augmenting the features on every read.

    Args:
        examples: objects with ``feats`` ``(T, D)`` and ``labels`` ``(L,)``.
        augment: ``(T, D) -> (T, D)`` transform applied at read time (e.g. SpecAugment).
    """

    def __init__(self, examples: Sequence[LabelledFeatures], augment: Augment | None = None):
        self.examples = examples
        self.augment = augment

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        ex = self.examples[index]
        feats = ex.feats if self.augment is None else self.augment(ex.feats)  # (T, D)
        return feats, ex.labels

    def lengths(self) -> list[int]:
        """Frame counts, for bucketing."""
        return [int(ex.feats.shape[0]) for ex in self.examples]


def collate_ctc(items: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad ``(feats, labels)`` items, sorted by decreasing frame count, into a plain tuple.

    A plain tuple rather than ``CTCBatch``: Opacus rebuilds empty Poisson batches with
    ``type(batch)(list_of_tensors)``, which a NamedTuple's constructor rejects.
    """
    order = sorted(range(len(items)), key=lambda i: -int(items[i][0].shape[0]))
    feats = [items[i][0] for i in order]
    labels = [items[i][1] for i in order]
    return (
        pad_sequence(feats, batch_first=True),  # (B, T_max, D)
        torch.tensor([f.shape[0] for f in feats], dtype=torch.int64),  # (B,)
        pad_sequence(labels, batch_first=True).to(torch.int64),  # (B, L_max)
        torch.tensor([y.shape[0] for y in labels], dtype=torch.int64),  # (B,)
    )


def as_ctc_batch(batch: object) -> CTCBatch | None:
    """The batch a data loader yielded as a ``CTCBatch``, or None when it holds no utterance.

    Opacus's ``DPDataLoader`` bypasses the collate function for empty Poisson batches: it returns
    an empty copy of the first batch's structure, or, when the very first batch is empty, a list of
    zero-size tensors shaped like one dataset item.

    Raises:
        TypeError: anything else (a bug: a batch must never be silently dropped).
    """
    if not isinstance(batch, (list, tuple)) or not all(isinstance(t, Tensor) for t in batch):
        raise TypeError(f"unexpected batch structure {type(batch).__name__}")
    if all(t.ndim > 0 and t.shape[0] == 0 for t in batch):
        return None
    if len(batch) != len(CTCBatch._fields):
        raise TypeError(f"expected {len(CTCBatch._fields)} tensors, got {len(batch)}")
    return CTCBatch(*batch)


class LengthBucketSampler(Sampler[list[int]]):
    """Shuffled batches of similar length for non-private training (less padding, faster).

    Each epoch: shuffle, cut into pools of ``pool_batches`` batches, sort each pool by length,
    cut it into batches (of ``batch_size`` utterances, and at most ``max_frames`` padded frames if
    given), then shuffle the batch order.

    Args:
        lengths: frame count per example.
        batch_size: utterances per batch.
        generator: source of randomness (seeded by the caller).
        max_frames: cap on ``batch utterances x longest utterance``; None for no cap.
        pool_batches: batches per sorting pool; larger pools pad less but shuffle less.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        generator: torch.Generator,
        max_frames: int | None = None,
        pool_batches: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.max_frames = max_frames
        self.pool_batches = pool_batches

    def _batches(self) -> list[list[int]]:
        perm = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        pool_size = self.batch_size * self.pool_batches
        batches: list[list[int]] = []
        for start in range(0, len(perm), pool_size):
            pool = sorted(perm[start : start + pool_size], key=lambda i: self.lengths[i])
            current: list[int] = []
            for i in pool:
                # The pool is sorted ascending, so utterance i is the batch's longest so far.
                too_many_frames = (
                    self.max_frames is not None
                    and self.lengths[i] * (len(current) + 1) > self.max_frames
                )
                if current and (len(current) == self.batch_size or too_many_frames):
                    batches.append(current)
                    current = []
                current.append(i)
            if current:
                batches.append(current)
        order = torch.randperm(len(batches), generator=self.generator).tolist()
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        if self.max_frames is None:
            full, rest = divmod(len(self.lengths), self.batch_size * self.pool_batches)
            return full * self.pool_batches + -(-rest // self.batch_size)
        # With a frame cap the count depends on the shuffle; this is the count for one draw.
        state = self.generator.get_state()
        n = len(self._batches())
        self.generator.set_state(state)
        return n


def ctc_loss(log_probs: Tensor, batch: CTCBatch) -> Tensor:
    """Mean over utterances of the CTC loss divided by label length (``reduction='mean'``).

    A mean of per-utterance terms is what Opacus's ``loss_reduction='mean'`` assumes when it turns
    the batch gradient into per-sample gradients. ``zero_infinity`` zeroes utterances that have no
    alignment (more labels than frames) instead of poisoning the batch.

    Args:
        log_probs: ``(B, T, V)`` model output.
        batch: the labels and lengths.
    """
    return nn.functional.ctc_loss(
        log_probs.transpose(0, 1),  # (T, B, V): CTC wants time first
        batch.labels,
        batch.feat_lens,
        batch.label_lens,
        blank=0,
        reduction="mean",
        zero_infinity=True,
    )
