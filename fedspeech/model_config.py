"""The acoustic model's shape and the names of its options, without torch.

``fedspeech.config`` (and so ``fedspeech --help`` and ``fedspeech config show``) reads them, and
importing torch takes 1-2 s: ``fedspeech.model`` builds the model itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from fedspeech.strict import parse_dataclass

CellType = Literal["gru", "lstm", "rnn"]
DPRNNImpl = Literal["fast", "opacus"]
Trainable = Literal["all", "head", "norm-bias", "adapters"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the acoustic model (stored in a model directory's config.json).

    Attributes:
        input_dim: width of one feature frame (``FeatureConfig.frame_dim``).
        vocab_size: output symbols including the CTC blank (``CharTokenizer.vocab_size``).
        hidden_size: units per direction of each recurrent layer.
        num_layers: stacked recurrent layers.
        bidirectional: read the utterance both ways (a unidirectional model can stream).
        cell: recurrent cell type.
        dropout: dropout on the recurrent stack's input and output (both flavours alike).
        frontend_dim: width of a Linear+GELU front-end before the RNN; 0 means none.
        adapter_rank: rank of the low-rank adapters on the GRU input projections
            (``fedspeech.adapters``); 0 means none.
    """

    input_dim: int
    vocab_size: int = 29
    hidden_size: int = 256
    num_layers: int = 3
    bidirectional: bool = True
    cell: CellType = "gru"
    dropout: float = 0.1
    frontend_dim: int = 0
    adapter_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("input_dim", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (blank + one symbol), got {self.vocab_size}")
        if self.cell not in get_args(CellType):
            raise ValueError(f"cell must be one of {get_args(CellType)}, got {self.cell!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.frontend_dim < 0:
            raise ValueError(
                f"frontend_dim must be >= 0 (0 = no front-end), got {self.frontend_dim}"
            )
        if self.adapter_rank < 0:
            raise ValueError(f"adapter_rank must be >= 0 (0 = none), got {self.adapter_rank}")
        if self.adapter_rank and self.cell != "gru":
            raise ValueError(f"adapters need cell = 'gru', got {self.cell!r}")

    @property
    def output_dim(self) -> int:
        """Width of the recurrent stack's output: hidden_size x directions."""
        return self.hidden_size * (2 if self.bidirectional else 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``adapter_rank`` only when there are adapters, so a model
        without them reads as before in fedspeech versions that predate adapters."""
        out = dataclasses.asdict(self)
        if not self.adapter_rank:
            del out["adapter_rank"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``, strictly (``fedspeech.strict``): an unknown key (a newer or
        foreign config) or a value of the wrong type raises ValueError.

        Untrusted input (a model directory's config.json) goes through
        ``fedspeech.modeldir_checks`` instead, which adds size limits.
        """
        return parse_dataclass(cls, data, what="model config")
