"""Central evaluation of the global model: WER/CER on the server's held-out utterances.

Goes through ``fedspeech.evaluate`` (the same audio -> features -> model -> greedy decoding path
a user of the model gets), so the figures match ``fedspeech evaluate`` on the saved model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedspeech.model import BiGRUCTC
from fedspeech.model_config import ModelConfig
from fedspeech.modeldir import LoadedModel
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.manifest import Utterance
from fedspeech_features.text import CharTokenizer

log = logging.getLogger(__name__)


class CentralEvaluator:
    """Score weights on fixed utterances; build once, call every round.

    Args:
        utterances: the evaluation set (empty: every call returns NaN, NaN).
        model_config: the global model's shape.
        feature_config: its features.
        tokenizer: its output symbols.
        device: where the model runs (the run config's ``device``, resolved by the caller);
            the weights it is given may be anywhere (CPU arrays from the aggregation).
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        model_config: ModelConfig,
        feature_config: FeatureConfig,
        tokenizer: CharTokenizer,
        *,
        device: torch.device | None = None,
    ) -> None:
        self.utterances = list(utterances)
        model = BiGRUCTC(model_config).eval().to(device or torch.device("cpu"))
        self.loaded = LoadedModel(model, model_config, feature_config, tokenizer)

    def __call__(self, state_dict: Mapping[str, Tensor]) -> tuple[float, float]:
        """``(WER, CER)`` of the weights; NaN, NaN without utterances."""
        if not self.utterances:
            return math.nan, math.nan
        from fedspeech.evaluate import evaluate_manifest  # lazy: jiwer, decoders

        start = time.perf_counter()
        self.loaded.model.load_state_dict(dict(state_dict), strict=True)
        with torch.inference_mode():
            result = evaluate_manifest(self.loaded, self.utterances, progress=False)
        log.info(
            "central evaluation: WER %.4f, CER %.4f on %d utterances (%d skipped), %.1f s",
            result.wer,
            result.cer,
            result.scored,
            len(result.skipped),
            time.perf_counter() - start,
        )
        return result.wer, result.cer
