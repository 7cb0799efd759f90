"""One federated round on a client: load its data, check its privacy budget, train, report.

``(global weights, node data, run config, ledger) -> RoundOutcome``; no Flower here (the
ClientApp in ``fedspeech_client.app`` only translates messages). A client whose next round would spend more
than its epsilon budget declines: it trains nothing, spends nothing and says why.

Reply metric keys (stable, named in ``fedspeech.metric_keys``; Flower's strategies weight by
``num-examples``): ``train-loss``, ``num-examples``, ``num-steps``, ``skipped-batches``,
``seconds``, ``declined`` (0/1) and, with DP, ``epsilon`` (the client's total so far),
``noise-multiplier``, ``sample-rate``. The data pass adds ``skipped-utterances`` and its split by
reason (``data_metrics``): counts only, never which utterance. The ClientApp adds ``recharged``
(1: this round of this run had been charged before, by an attempt that was cut off) and, when the
node has one, ``epsilon-budget``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

import fedspeech.metric_keys as mk
from fedspeech.config import RunConfig
from fedspeech.exchange import exchanged_names, with_fixed_weights
from fedspeech.model import BiGRUCTC, load_plain_state_dict
from fedspeech.model_config import ModelConfig
from fedspeech.modeldir import resolve_model
from fedspeech.pipeline import initial_weights, load_examples
from fedspeech.privacy_ledger import PrivacyBudgetError, PrivacyLedger, calibrate_noise_multiplier
from fedspeech_client.batching import LabelledFeatures
from fedspeech_client.example_memo import MEMO, Loaded
from fedspeech_client.node_state import NodeData
from fedspeech_client.train import train_local
from fedspeech_features.dataset import SKIP_KINDS, Example
from fedspeech_features.errors import FedspeechDataError, SkipReport
from fedspeech_features.text import CharTokenizer

log = logging.getLogger(__name__)

# Seeds of different rounds and nodes must differ (dropout, shuffling, and DP noise when
# dp-seed is fixed in tests): offset them by round and partition.
_ROUND_SEED_STRIDE = 100_003

# Local training's metrics that go into the reply as they are (TrainResult uses the reply's names).
_TRAIN_KEYS = (mk.TRAIN_LOSS, mk.NUM_EXAMPLES, mk.NUM_STEPS, mk.SKIPPED_BATCHES)


@dataclass(frozen=True)
class RoundOutcome:
    """What a client sends back (weights, metrics) and keeps (its ledger).

    Attributes:
        state_dict: trained weights (plain names); None when the client declined.
        metrics: reply metrics (see the module docstring).
        privacy_state: the ledger after this round (unchanged when declined); None without DP.
        declined_reason: why the client did not train, else None.
    """

    state_dict: dict[str, Tensor] | None
    metrics: dict[str, float]
    privacy_state: PrivacyLedger | None
    declined_reason: str | None = None


def load_node_examples(node: NodeData, cfg: RunConfig) -> tuple[list[Example], dict[str, float]]:
    """The node's training examples: from memory while its files are unchanged
    (``fedspeech_client.example_memo``), else from the node's feature cache.

    Unusable utterances are skipped, each named with its reason in the node's log.

    Returns:
        The examples and ``data_metrics`` of the pass (how many were skipped, by reason).

    Raises:
        FedspeechDataError: no usable utterance.
    """
    manifest = node.manifest
    if manifest is None:
        assert node.partition is not None
        from fedspeech.fed_data import prepared_client_manifest

        manifest = prepared_client_manifest(cfg, cfg.fed.data_dir, *node.partition)

    def load() -> Loaded:
        examples, report, summary = load_examples(manifest, cfg.features, cache_root=node.cache_dir)
        log.info("%s: %s", node.label, summary)
        return examples, report

    (examples, report), kept = MEMO.get(Path(manifest), cfg.features, node.cache_dir, load)
    if kept:
        log.info("%s: %d examples, kept in memory since the last round", node.label, len(examples))
    if not examples:
        raise FedspeechDataError(
            f"{manifest}: no usable utterances ({len(report.skipped)} skipped)"
        )
    return examples, data_metrics(report)


def data_metrics(report: SkipReport) -> dict[str, float]:
    """Reply metrics of a feature pass: ``skipped-utterances`` and ``skipped-<kind>`` per reason.

    Every kind is always present (0 when none), so all clients report the same metric names.
    """
    counts = report.counts()
    metrics = {mk.SKIPPED_UTTERANCES: float(len(report.skipped))}
    metrics.update({mk.skipped_kind(kind): float(counts.get(kind, 0)) for kind in SKIP_KINDS})
    return metrics


def run_round(
    global_state: Mapping[str, Tensor],
    examples: Sequence[LabelledFeatures],
    cfg: RunConfig,
    *,
    server_round: int,
    prior: PrivacyLedger | None,
    budget: float | None,
    seed_offset: int = 0,
    proximal_mu: float = 0.0,
    frozen_digest: str = "",
) -> RoundOutcome:
    """Train the global model on ``examples`` for one round, unless the budget forbids it.

    DP-SGD runs when the run's privacy unit includes samples (``cfg.sample_level_dp``); with
    ``privacy-unit = "user"`` the client trains without it (the server clips and noises its
    update instead) and reports no epsilon.

    Args:
        global_state: the global model's weights (plain names).
        examples: this client's utterances.
        cfg: the run config (model shape, training and privacy settings, planned rounds).
        server_round: the round number (seeds).
        prior: this client's ledger so far, whichever accountant recorded it (None: fresh).
        budget: lifetime epsilon budget, under the run's accountant at the smaller of the
            ledger's delta and ``cfg.train.delta`` (None: no limit).
        seed_offset: distinguishes clients' seeds (e.g. the partition id).
        proximal_mu: FedProx's proximal weight, as the server sent it (0: plain local training).
        frozen_digest: when only some weights train (``fedspeech.exchange``), ``global_state``
            holds just those; the rest come from the run's starting model, whose fixed weights
            must have this digest (the server's ``frozen-digest``). The outcome then holds only
            the trained tensors too.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    train = cfg.train
    seed = train.seed + _ROUND_SEED_STRIDE * server_round + seed_offset
    dp_seed = None if train.dp_seed is None else train.dp_seed + 2 * (seed - train.seed)
    train = dataclasses.replace(train, seed=seed, dp_seed=dp_seed, dp=cfg.sample_level_dp)
    if train.dp:
        prior = (prior or PrivacyLedger(train.delta)).at_delta(train.delta)
        noise, reason = _plan_noise(cfg, len(examples), prior, budget)
        if reason is not None:
            log.warning("declining round %d: %s", server_round, reason)
            metrics = {mk.DECLINED: 1.0, mk.NUM_EXAMPLES: float(len(examples))}
            metrics[mk.EPSILON] = prior.epsilon(train.accountant)
            metrics |= _timings(start, cpu_start)
            return RoundOutcome(None, metrics, prior, reason)
        train = dataclasses.replace(train, noise_multiplier=noise, target_epsilon=None)

    tokenizer = CharTokenizer()
    model_config = cfg.model.model_config(cfg.features.frame_dim, tokenizer.vocab_size)
    exchanged = exchanged_names(cfg)
    if exchanged is not None:
        start_state = starting_weights(cfg, model_config)
        global_state = with_fixed_weights(global_state, start_state, exchanged, frozen_digest)
    model = BiGRUCTC(model_config)
    load_plain_state_dict(model, global_state)
    result = train_local(
        model,
        examples,
        train,
        privacy_state=prior,
        proximal_mu=proximal_mu,
        frame_block=cfg.features.time_block,
    )
    # Named keys only: what leaves the node is chosen here, not by whatever training reports.
    metrics = {k: result.metrics[k] for k in _TRAIN_KEYS}
    metrics |= _timings(start, cpu_start)  # the whole round, not only training
    metrics[mk.DECLINED] = 0.0
    if result.epsilon is not None:
        metrics[mk.EPSILON] = result.epsilon
        metrics[mk.NOISE_MULTIPLIER] = float(result.noise_multiplier or 0.0)
        metrics[mk.SAMPLE_RATE] = float(result.sample_rate or 0.0)
    update = result.state_dict
    if exchanged is not None:  # the fixed weights never leave the node
        update = {k: update[k] for k in exchanged}
    return RoundOutcome(update, metrics, result.privacy_state)


# The run's starting weights, kept between rounds: (key, init-model's file signature, weights).
_START: list[tuple[tuple[object, ...], object, dict[str, Tensor]]] = []


def starting_weights(cfg: RunConfig, model_config: ModelConfig) -> dict[str, Tensor]:
    """``initial_weights`` of the run, kept in the process while ``init-model``'s files stay the
    same (``_files_signature``; reading and checking en-public-small took 25-50 ms a round).
    Callers must not change the tensors."""
    source = resolve_model(cfg.fed.init_model) if cfg.fed.init_model else None
    key = (str(source), model_config, cfg.features, None if source else cfg.train.seed)
    signature = _files_signature(source) if source else None
    if _START and _START[0][:2] == (key, signature):
        return _START[0][2]
    state = initial_weights(cfg, model_config)
    _START[:] = [(key, signature, state)]
    return state


def _files_signature(directory: Path) -> tuple[tuple[str, int, int, int], ...]:
    """Name, inode, size and modification time of each file: a directory written again (a new
    file each time, ``save_model_dir``) differs even within one clock tick."""
    try:
        stats = [(p.name, p.stat()) for p in sorted(directory.iterdir())]
    except OSError:
        return ()  # initial_weights says what is wrong with it
    return tuple((name, st.st_ino, st.st_size, st.st_mtime_ns) for name, st in stats)


def round_steps(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """``(Poisson sample rate, DP steps)`` of one round, as Opacus's DP loader takes them."""
    steps_per_epoch = math.ceil(num_examples / batch_size)
    return 1.0 / steps_per_epoch, epochs * steps_per_epoch


def _plan_noise(
    cfg: RunConfig, num_examples: int, prior: PrivacyLedger, budget: float | None
) -> tuple[float, str | None]:
    """This round's noise multiplier, and the reason to decline (None: go ahead)."""
    train = cfg.train
    sample_rate, steps = round_steps(num_examples, train.batch_size, train.epochs)
    noise = train.noise_multiplier
    if train.target_epsilon is not None:
        # Spread the target over every planned round: all of them together spend at most it.
        planned = cfg.fed.rounds_planned * steps
        if prior.num_steps + steps > planned:
            return 0.0, (
                f"the {cfg.fed.rounds_planned} planned rounds ({planned} steps) are used up "
                f"({prior.num_steps} recorded)"
            )
        try:
            noise = calibrate_noise_multiplier(
                target_epsilon=train.target_epsilon,
                sample_rate=sample_rate,
                steps=planned - prior.num_steps,
                prior=prior,
                accountant=train.accountant,
            )
        except PrivacyBudgetError as exc:
            return 0.0, f"target epsilon {train.target_epsilon} cannot be met: {exc}"
    assert noise is not None
    if budget is not None and prior.would_exceed(
        budget, train.accountant, noise, sample_rate, steps
    ):
        spent = prior.epsilon(train.accountant)
        return noise, (
            f"{steps} more steps (noise {noise:.3g}, q {sample_rate:.3g}) would exceed the epsilon "
            f"budget {budget:g} (spent {spent:.3f})"
        )
    return noise, None


def _timings(start: float, cpu_start: float) -> dict[str, float]:
    """The round's wall-clock and CPU seconds since ``start`` / ``cpu_start`` (``time.perf_counter``
    / ``time.process_time``). CPU seconds do not grow when other processes share the cores, so a
    benchmark's ideal time can be read from them too (``benchmarks/fed_overhead.py``)."""
    return {
        mk.SECONDS: time.perf_counter() - start,
        mk.CPU_SECONDS: time.process_time() - cpu_start,
    }
