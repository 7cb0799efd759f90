"""Names of the metrics a client's training reply carries: the client writes them, the server reads.

One spelling per quantity, kebab-case as Flower's own ``num-examples`` (the key its strategies
weight by). Local training (``fedspeech_client.train``) reports under the same names, so a value
keeps its name from the optimizer loop to the server's round summary. What the server records per
round in rounds.jsonl and MLflow is a different table (``fedspeech_server.rounds.RoundSummary``
fields, snake_case).
"""

from __future__ import annotations

from typing import Final

NUM_EXAMPLES: Final = "num-examples"  # utterances trained on (the aggregation weight)
TRAIN_LOSS: Final = "train-loss"  # mean per-utterance CTC loss of the last epoch, per label
NUM_STEPS: Final = "num-steps"  # optimizer steps (DP: accountant steps)
SKIPPED_BATCHES: Final = "skipped-batches"  # DP: empty Poisson batches, stepped with noise only
SKIPPED_UTTERANCES: Final = "skipped-utterances"  # unusable utterances (skipped-<kind> per reason)
DECLINED: Final = "declined"  # 1.0: the client did not train (budget), 0.0 otherwise
DECLINE_REASON: Final = "decline-reason"
EPSILON: Final = "epsilon"  # the client's lifetime sample-level epsilon after the round
PARTITION_ID: Final = "partition-id"  # simulated nodes: a stable name in the server's report
RECHARGED: Final = "recharged"  # 1.0: the round was charged before (a re-sent round)
SECONDS: Final = "seconds"  # wall-clock seconds of the client's work (local training: its loop)
CPU_SECONDS: Final = "cpu-seconds"  # CPU seconds its process spent on that work (all its threads)
NOISE_MULTIPLIER: Final = "noise-multiplier"  # DP: the round's noise (given or calibrated)
SAMPLE_RATE: Final = "sample-rate"  # DP: the round's Poisson sampling rate
EPSILON_BUDGET: Final = "epsilon-budget"  # the node's lifetime epsilon budget, when it has one

SKIPPED_KIND_PREFIX: Final = "skipped-"  # + a skip kind (fedspeech_features.dataset.SKIP_KINDS)


def skipped_kind(kind: str) -> str:
    """The key counting the utterances skipped for one reason: ``skipped-<kind>``."""
    return SKIPPED_KIND_PREFIX + kind
