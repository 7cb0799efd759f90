"""Pre-flight: every check of a federated run that needs no Flower process, before one starts.

A run that cannot work (a ``device`` this machine lacks, a missing corpus or evaluation manifest,
an ``init-model`` that is not a model directory or has another shape, more held-out speakers or
partitions than the corpus has speakers, a sample larger than the federation) used to fail
20-30 s later inside Flower, with a long traceback. ``check_run`` finds all of that in seconds
and reports one message per problem, naming the key; it also warns about the privacy the plan
spends (``privacy_plan``) before any is spent. It builds what the run would build first anyway
(the synthetic corpus, the client split), so the Flower processes find them ready.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from fedspeech.config import ConfigError, RunConfig
from fedspeech.privacy_ledger import PrivacyLedger, epsilon_of
from fedspeech_features.errors import FedspeechDataError
from fedspeech_features.manifest import read_manifest

log = logging.getLogger("fedspeech")


class PreflightError(ConfigError):
    """The run cannot start; the message has one line per problem."""


@dataclass(frozen=True)
class Preflight:
    """What ``check_run`` found: problems (the run must not start) and warnings."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def raise_for_problems(self) -> None:
        """Log the warnings; raise ``PreflightError`` listing every problem, if any."""
        for warning in self.warnings:
            log.warning("%s", warning)
        if self.problems:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            raise PreflightError(
                f"the run cannot start ({len(self.problems)} problem(s), found before launching "
                f"Flower):\n{lines}"
            )


def check_run(cfg: RunConfig, num_clients: int) -> Preflight:
    """Check ``cfg`` (absolute paths, as the launcher passes them) for ``num_clients`` clients.

    Paths and sizes first; the data checks (which build the synthetic corpus and write the
    client split, as the first client would) only when the corpus itself is usable.
    """
    problems: list[str] = []
    fed = cfg.fed
    _check_device(cfg, problems)
    if cfg.data.corpus != "synthetic":
        _check_manifest("corpus", cfg.data.corpus, problems)
    if fed.eval_manifest:
        _check_manifest("eval-manifest", fed.eval_manifest, problems)
    if fed.init_model and not fed.resume:
        _check_init_model(cfg, problems)
    problems += _sample_problems(cfg, num_clients)
    if any(p.startswith("corpus") for p in problems):
        return Preflight(problems)
    sizes = _split(cfg, num_clients, problems)
    warnings = privacy_plan(cfg, sizes, num_clients) if sizes else []
    return Preflight(problems, warnings)


def _check_device(cfg: RunConfig, problems: list[str]) -> None:
    """A simulation's clients and server run on this machine: its ``device`` must be here."""
    from fedspeech.devices import DeviceError, resolve_device  # lazy: torch

    try:
        resolve_device(cfg.train.device)
    except DeviceError as exc:
        problems.append(str(exc))


def _check_manifest(key: str, path: str, problems: list[str]) -> None:
    if not Path(path).is_file():
        problems.append(f"{key}: {path}: no such file")
        return
    try:
        rows = read_manifest(path)
    except FedspeechDataError as exc:
        problems.append(f"{key}: {exc}")
        return
    if not rows:
        problems.append(f"{key}: {path}: no usable rows")


def _check_init_model(cfg: RunConfig, problems: list[str]) -> None:
    from fedspeech.modeldir import ModelDirError, resolve_model
    from fedspeech.pipeline import initial_weights  # lazy: torch
    from fedspeech_features.text import CharTokenizer

    try:
        path = resolve_model(cfg.fed.init_model)
    except ModelDirError as exc:
        problems.append(f"init-model: {exc}")
        return
    if not (path / "config.json").is_file():
        problems.append(f"init-model: {path}: not a model directory (no config.json in it)")
        return
    model_config = cfg.model.model_config(cfg.features.frame_dim, CharTokenizer().vocab_size)
    try:
        initial_weights(cfg, model_config)
    except (ConfigError, ValueError, OSError) as exc:
        problems.append(f"init-model: {exc}")


def _sample_problems(cfg: RunConfig, n: int) -> list[str]:
    fed, problems = cfg.fed, []
    if fed.clients_per_round > n:
        problems.append(f"clients-per-round {fed.clients_per_round} exceeds the {n} clients")
    if not cfg.poisson_sampling:
        sampled = fed.clients_per_round or max(int(n * fed.fraction_train), fed.min_clients)
        if fed.min_successful_clients > min(sampled, n):
            problems.append(
                f"min-successful-clients {fed.min_successful_clients} exceeds the "
                f"{min(sampled, n)} clients sampled a round: no round could complete"
            )
    return problems


def _split(cfg: RunConfig, n: int, problems: list[str]) -> list[int]:
    """Examples per client of the split the run will use (written now); [] on a problem."""
    from fedspeech.fed_data import client_manifest, corpus_manifest  # lazy: corpus builders

    fed = cfg.fed
    try:
        corpus = corpus_manifest(cfg, fed.data_dir)
        speakers = {u.speaker for u in read_manifest(corpus)}
    except FedspeechDataError as exc:
        problems.append(f"corpus: {exc}")
        return []
    if fed.holdout_speakers >= len(speakers):
        problems.append(
            f"holdout-speakers {fed.holdout_speakers}: the corpus has {len(speakers)} speaker(s), "
            "none would be left for the clients"
        )
        return []
    left = len(speakers) - fed.holdout_speakers
    if cfg.data.partition == "speaker" and n > left:
        problems.append(
            f'num-partitions {n}: partition "speaker" needs a speaker per client, and '
            f"{left} are left after holdout-speakers {fed.holdout_speakers} (use fewer clients "
            'or partition "iid" / "dirichlet")'
        )
        return []
    try:
        first = client_manifest(cfg, fed.data_dir, 0, n)
    except FedspeechDataError as exc:
        problems.append(f"num-partitions {n}: {exc}")
        return []
    info = json.loads((first.parent.parent / "split.json").read_text(encoding="utf-8"))
    return [int(c) for c in info["clients"]]


def privacy_plan(cfg: RunConfig, sizes: list[int], n: int) -> list[str]:
    """Warnings about the privacy the planned rounds spend, before any is spent.

    Sample level: the largest epsilon a client reaches if it is sampled every round (Opacus's
    accountant over its planned DP-SGD steps, from its number of examples), against its budget.
    User level: the run's epsilon after ``num-server-rounds``.
    """
    train, fed, rounds = cfg.train, cfg.fed, cfg.fed.num_server_rounds
    warnings: list[str] = []
    if cfg.sample_level_dp:
        budgets = [fed.budget_for_partition(i) for i in range(n)]
        if train.target_epsilon is not None:
            if rounds > fed.rounds_planned:
                warnings.append(
                    f"num-server-rounds {rounds} > planned-rounds {fed.rounds_planned}: a client "
                    f"sampled every round spends its target-epsilon {train.target_epsilon:g} in "
                    f"{fed.rounds_planned} rounds and declines after that"
                )
            if all(b is None for b in budgets):
                log.info(
                    "privacy plan: each client spends at most target-epsilon %g (delta %g) over "
                    "%d planned rounds; no epsilon-budget is set",
                    train.target_epsilon,
                    train.delta,
                    fed.rounds_planned,
                )
        else:
            assert train.noise_multiplier is not None
            worst, worst_round = _worst_client(cfg, sizes, budgets)
            if all(b is None for b in budgets):
                warnings.append(
                    f"no epsilon-budget is set: a client sampled every round reaches epsilon "
                    f"{worst:.2f} (delta {train.delta:g}) after {rounds} rounds at "
                    f"noise-multiplier {train.noise_multiplier:g}; set epsilon-budget (or "
                    "target-epsilon) to cap it"
                )
            elif worst_round is not None:
                warnings.append(
                    f"the planned {rounds} rounds exceed a client's epsilon-budget: a client "
                    f"sampled every round would reach {worst:.2f}, so it declines from round "
                    f"{worst_round} on"
                )
    if cfg.user_level_dp:
        q = fed.client_sample_rate or (
            min(1.0, fed.clients_per_round / n) if fed.clients_per_round else fed.fraction_train
        )
        eps = PrivacyLedger(cfg.privacy.user_delta).record(
            cfg.privacy.user_noise_multiplier, q, rounds
        )
        log.info(
            "privacy plan: user-level epsilon %.3f (delta %g) after %d rounds (z %g, q %.4g)",
            eps.epsilon(),
            cfg.privacy.user_delta,
            rounds,
            cfg.privacy.user_noise_multiplier,
            q,
        )
    return warnings


def _worst_client(
    cfg: RunConfig, sizes: list[int], budgets: list[float | None]
) -> tuple[float, int | None]:
    """(largest epsilon after all rounds, first round some client would decline in or None)."""
    train, rounds = cfg.train, cfg.fed.num_server_rounds
    assert train.noise_multiplier is not None
    worst, first_decline = 0.0, None
    for size, budget in zip(sizes, budgets, strict=True):
        per_epoch = math.ceil(size / train.batch_size)  # Opacus: q = 1 / ceil(N / B)
        q, steps = 1.0 / per_epoch, train.epochs * per_epoch
        eps = epsilon_of([(train.noise_multiplier, q, steps * rounds)], train.delta, "rdp")
        worst = max(worst, eps)
        if budget is not None and eps > budget:
            declines = next(
                r
                for r in range(1, rounds + 1)
                if epsilon_of([(train.noise_multiplier, q, steps * r)], train.delta, "rdp") > budget
            )
            first_decline = declines if first_decline is None else min(first_decline, declines)
    return worst, first_decline
