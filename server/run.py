"""A federated run on the server side, without Flower: open or resume, per-round work, finish.

``FederatedRun.open`` starts fresh (new weights or ``init-model``, a cleared run folder, a new
tracking run) or, with ``resume``, continues from the run folder's checkpoint (next round = last
finished + 1, the same tracking run; rounds the checkpoint holds but the tracker never got, from a
crash between the two, are logged then, so every round is reported exactly once). After each
round ``finish_round`` evaluates the global model centrally, writes the checkpoint, reports to
the tracker and logs one progress line; ``finish`` writes the final model directory and the
per-client report; ``abort`` closes a run that cannot go on (the checkpoint keeps the last
complete round, and no final model is written).

``run_rounds`` drives the pending rounds through a ``SendRound`` (the Flower adapter,
``fedspeech_server.app``: one sending of a round's messages, screened and aggregated). A round with
fewer accepted updates than it needs changes nothing: it is sent again (at most ``round-retries``
times, and only when some client failed or was rejected: clients out of privacy budget decline
again), then the run stops (``abort``) with a ``RoundFailedError`` that names every client's
reason. Run folder (``out-dir``)::

    checkpoint/{model/, state.json}  latest global model and run state (resume reads it)
    model/                           the final model directory (fedspeech transcribe --model)
    client-state/                    simulated clients' privacy ledgers
    report/{clients.tsv, privacy.tsv, history.json}
    eval_manifest.tsv                the central evaluation set
    params.json, rounds.jsonl, tracking.json   (LocalTracker)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedspeech import __version__
from fedspeech.config import RunConfig, check_resume_changes
from fedspeech.devices import resolve_device
from fedspeech.fed_data import heldout_utterances
from fedspeech.model import without_adapters
from fedspeech.model_config import ModelConfig
from fedspeech.modeldir import resolve_model, save_model_dir
from fedspeech.pipeline import initial_weights
from fedspeech_features.files import remove_paths
from fedspeech_features.manifest import write_manifest
from fedspeech_features.text import CharTokenizer
from fedspeech_server.checkpoint import CHECKPOINT_DIR, RunState, load_checkpoint, save_checkpoint
from fedspeech_server.evaluation import CentralEvaluator
from fedspeech_server.rounds import (
    ClientReport,
    RoundSummary,
    clients_tsv,
    privacy_summary,
    retry_may_help,
    shortfall,
    summarize_round,
    update_clients,
    update_norm,
    with_evaluation,
)
from fedspeech_server.tracking import Tracker, open_tracker, read_rounds
from fedspeech_server.user_dp import UserDPRelease, UserDPState

log = logging.getLogger("fedspeech.server")

TrackerFactory = Callable[[RunConfig, Path, str | None], Tracker]


class RoundFailedError(RuntimeError):
    """A round had too few accepted client updates, also after its retries: the run stops."""


@dataclass(frozen=True)
class RoundAttempt:
    """What one sending of a round's train messages produced (``SendRound``'s answer).

    Attributes:
        reports: one per sampled client (``fedspeech_server.screening``).
        needed: accepted updates the round needs (``min-successful-clients``; with Poisson
            sampling at most the number drawn).
        new_state: the aggregated global weights; None: nothing was aggregated.
        user_dp: the user-level DP release of the aggregate (None without user-level DP or
            without an aggregate).
        clients_sampled: clients the attempt sampled (with Poisson sampling, the draw).
        strategy_arrays: the server optimizer's state after the attempt (for the checkpoint).
        exchanged_weights: weights sent to each client, and accepted back from each (replies
            must have the sent names and shapes); fewer than the model's when only some train.
    """

    reports: Sequence[ClientReport]
    needed: int
    new_state: Mapping[str, Tensor] | None = None
    user_dp: UserDPRelease | None = None
    clients_sampled: int | None = None
    strategy_arrays: Mapping[str, np.ndarray] | None = None
    exchanged_weights: int | None = None


SendRound = Callable[[int, Mapping[str, Tensor]], RoundAttempt]
"""Send round ``server_round`` of the given global weights once; screen and aggregate the replies."""

# What a fresh run clears from a reused run folder (only this tool's own outputs).
_RUN_OUTPUTS = (
    CHECKPOINT_DIR, "model", "client-state", "report", "eval_manifest.tsv",
    "params.json", "rounds.jsonl", "tracking.json",
)  # fmt: skip


class FederatedRun:
    """Server-side state of one run; see the module docstring. Build with ``open``."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        state: RunState,
        global_state: dict[str, Tensor],
        strategy_arrays: dict[str, np.ndarray],
        tracker: Tracker,
        evaluator: CentralEvaluator,
        model_config: ModelConfig,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.fed.out_dir)
        self.state = state
        self.global_state = global_state
        self.strategy_arrays = strategy_arrays
        self.tracker = tracker
        self.evaluator = evaluator
        self.model_config = model_config
        self.tokenizer = CharTokenizer()

    @classmethod
    def open(
        cls, cfg: RunConfig, *, tracker_factory: TrackerFactory = open_tracker
    ) -> FederatedRun:
        """Start or (``cfg.fed.resume``) resume the run in ``cfg.fed.out_dir``.

        Raises:
            FileNotFoundError: resume asked for but the run folder has no checkpoint.
            DeviceError: the run config's ``device`` is not on this machine (central evaluation).
            ConfigError: ``init-model`` has another shape than the run config's model, or a
                resume changes a setting that defines the run (``check_resume_changes``).
        """
        run_dir = Path(cfg.fed.out_dir)
        tokenizer = CharTokenizer()
        model_config = cfg.model.model_config(cfg.features.frame_dim, tokenizer.vocab_size)
        device = resolve_device(cfg.train.device)  # central evaluation; before any tracking run
        if cfg.fed.resume:
            checkpoint = load_checkpoint(run_dir)
            if checkpoint is None:
                raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
            _check_changes(checkpoint.state.run_config, cfg.to_flat())
            done = checkpoint.state.round >= cfg.fed.num_server_rounds
            state = replace(
                checkpoint.state,
                finished=done,
                run_config=cfg.to_flat(),
                run_key=checkpoint.state.run_key or uuid.uuid4().hex,  # older checkpoints: none
            )
            global_state, arrays = checkpoint.state_dict, checkpoint.strategy_arrays
            tracker = tracker_factory(cfg, run_dir, state.tracking_run_id)
            log.info(
                "resuming %s after round %d (tracking run %s)",
                run_dir,
                state.round,
                state.tracking_run_id,
            )
            _log_untracked_rounds(tracker, run_dir, state.history)
        else:
            _clear_previous_run(run_dir)
            global_state, arrays = initial_weights(cfg, model_config), {}
            tracker = tracker_factory(cfg, run_dir, None)
            tracker.log_params(cfg.to_flat())
            # tracking_run_id: set with round 1's checkpoint (the tracker may still be opening)
            state = RunState(run_config=cfg.to_flat(), run_key=uuid.uuid4().hex)
        try:
            utterances = heldout_utterances(cfg, cfg.fed.data_dir)
        except BaseException as exc:  # the tracking run exists: it must not stay RUNNING
            tracker.fail(f"{type(exc).__name__}: {exc}")
            raise
        if utterances:
            write_manifest(run_dir / "eval_manifest.tsv", utterances)
        else:
            log.warning("no central evaluation set: set eval-manifest or holdout-speakers > 0")
        evaluator = CentralEvaluator(
            utterances, model_config, cfg.features, tokenizer, device=device
        )
        return cls(
            cfg,
            state=state,
            global_state=global_state,
            strategy_arrays=arrays,
            tracker=tracker,
            evaluator=evaluator,
            model_config=model_config,
        )

    @property
    def user_state(self) -> UserDPState:
        """The user-level privacy spent so far (an empty ledger without user-level DP)."""
        return UserDPState.from_dict(self.state.user_privacy, delta=self.cfg.privacy.user_delta)

    @property
    def pending_rounds(self) -> range:
        """The rounds still to run (empty when the checkpoint is already at the last one)."""
        return range(self.state.round + 1, self.cfg.fed.num_server_rounds + 1)

    def run_rounds(self, send: SendRound) -> None:
        """Run the pending rounds: send each (again while it falls short and retries are left),
        then ``finish_round`` it.

        Raises:
            RoundFailedError: a round stayed short of the updates it needs (the run is aborted).
        """
        if self.state.round == 0:
            self.evaluate_start()
        weights: Mapping[str, Tensor] = self.global_state
        for server_round in self.pending_rounds:
            started = time.perf_counter()
            log.info("round %d/%d", server_round, self.cfg.fed.num_server_rounds)
            attempt, retries = self._send_until_enough(server_round, weights, send)
            if attempt.new_state is not None:
                weights = attempt.new_state
            self.finish_round(
                server_round,
                weights,
                attempt.reports,
                started=started,
                train_seconds=time.perf_counter() - started,
                strategy_arrays=attempt.strategy_arrays,
                retries=retries,
                user_dp=attempt.user_dp,
                clients_sampled=attempt.clients_sampled,
                exchanged_weights=attempt.exchanged_weights,
            )

    def evaluate_start(self) -> tuple[float, float] | None:
        """Round 0: the starting model's WER and CER on the evaluation set, tracked at step 0.

        What the federation gains is then always on record next to where it began (rounds.jsonl
        row ``round`` 0, MLflow step 0). Only the server's evaluation set and the starting weights
        (fresh or ``init-model``) are involved: no client data, no privacy cost. None (nothing
        tracked) without an evaluation set.
        """
        if not self.evaluator.utterances:
            return None
        start = time.perf_counter()
        wer, cer = self.evaluator(self.global_state)
        seconds = time.perf_counter() - start
        self.tracker.log_round(0, {"wer": wer, "cer": cer, "eval_seconds": seconds})
        log.info("round 0 (the starting model): WER %.2f%%, CER %.2f%%", 100 * wer, 100 * cer)
        return wer, cer

    def _send_until_enough(
        self, server_round: int, weights: Mapping[str, Tensor], send: SendRound
    ) -> tuple[RoundAttempt, int]:
        """The first attempt of ``server_round`` with enough accepted updates, and its number of
        retries; a short round is sent again at most ``round-retries`` times, and only while a
        retry may help (``retry_may_help``), else the run is aborted.

        Raises:
            RoundFailedError: the round is still short.
        """
        retries = self.cfg.fed.round_retries
        tries = 0
        while True:
            attempt = send(server_round, weights)
            problem = shortfall(attempt.reports, attempt.needed)
            if problem is None:
                return attempt, tries
            if tries == retries or not retry_may_help(attempt.reports):
                self.abort(server_round, problem)
                raise RoundFailedError(f"round {server_round}: {problem}")
            log.warning(
                "round %d, attempt %d of %d: %s; sending the round again",
                server_round,
                tries + 1,
                retries + 1,
                problem,
            )
            tries += 1

    def finish_round(
        self,
        server_round: int,
        new_state: Mapping[str, Tensor],
        reports: Sequence[ClientReport],
        *,
        started: float,
        train_seconds: float,
        strategy_arrays: Mapping[str, np.ndarray] | None = None,
        retries: int = 0,
        user_dp: UserDPRelease | None = None,
        clients_sampled: int | None = None,
        exchanged_weights: int | None = None,
    ) -> RoundSummary:
        """Evaluate, checkpoint, track and log a finished round; ``started``: its perf_counter.

        ``retries``: how often the round was re-sent before enough clients trained.
        ``clients_sampled``: clients the (last) attempt sampled (default: one per report).
        ``user_dp``: the round's user-level DP release, charged to the ledger that is saved in
        the same checkpoint as the round (so a round is charged exactly once, also across
        ``--resume``).
        """
        new_state = {k: v.detach().to("cpu", torch.float32) for k, v in new_state.items()}
        summary = replace(
            summarize_round(server_round, reports, train_seconds),
            retries=retries,
            clients_sampled=len(reports) if clients_sampled is None else clients_sampled,
            exchanged_weights=exchanged_weights,
        )
        user_state = self.user_state
        if user_dp is not None:
            user_state = user_state.record(server_round, user_dp)
            summary = replace(
                summary,
                user_clip_norm=user_dp.clip_norm,
                user_noise_std=user_dp.noise_std,
                user_sample_rate=user_dp.sample_rate,
                user_unclipped_share=user_dp.unclipped_share,
            )
        if self.cfg.user_level_dp:
            summary = replace(summary, user_epsilon=user_state.epsilon())
        eval_start = time.perf_counter()
        wer, cer = self.evaluator(new_state)
        eval_seconds = time.perf_counter() - eval_start
        norm = update_norm(self.global_state, new_state)
        summary = with_evaluation(
            summary, wer=wer, cer=cer, update_norm=norm, eval_seconds=eval_seconds
        )
        clients = {k: dict(v) for k, v in self.state.clients.items()}
        update_clients(clients, server_round, reports)
        summary = replace(summary, round_seconds=time.perf_counter() - started)
        self.state = replace(
            self.state,
            round=server_round,
            history=[*self.state.history, summary.to_json()],
            clients=clients,
            finished=server_round >= self.cfg.fed.num_server_rounds,
            tracking_run_id=self.tracker.run_id,
            user_privacy=user_state.to_dict()
            if user_state.ledger.history
            else self.state.user_privacy,
        )
        self.global_state = new_state
        self.strategy_arrays = dict(strategy_arrays or {})
        save_checkpoint(
            self.run_dir,
            new_state,
            self.state,
            model_config=self.model_config,
            feature_config=self.cfg.features,
            tokenizer=self.tokenizer,
            provenance=self.provenance(),
            strategy_arrays=self.strategy_arrays,
        )
        self.tracker.log_round(server_round, summary.metrics())
        for r in reports:
            if r.status != "ok":
                log.warning("round %d: %s %s: %s", server_round, r.client, r.status, r.reason)
        log.info("%s", summary.line())
        return summary

    def abort(self, server_round: int, reason: str) -> None:
        """Close a run that cannot complete ``server_round``: log, tell the tracker, keep state.

        The checkpoint (last complete round) stays as it is: ``--resume`` continues from there.
        """
        message = (
            f"run stopped in round {server_round}: {reason}. The global model was not updated; "
            f"the last complete round ({self.state.round}) is in {self.run_dir / CHECKPOINT_DIR} "
            "(continue with --resume)"
        )
        log.error("%s", message)
        self.tracker.fail(message)

    def finish(self) -> Path:
        """Write the final model directory and reports; close the tracking run."""
        weights, model_config = without_adapters(self.global_state, self.model_config)
        model_dir = save_model_dir(
            self.run_dir / "model",
            weights,
            model_config,
            self.cfg.features,
            self.tokenizer,
            self.provenance(),
        )
        report = self.run_dir / "report"
        report.mkdir(parents=True, exist_ok=True)
        (report / "clients.tsv").write_text(clients_tsv(self.state.clients), encoding="utf-8")
        summary = privacy_summary(self.state.clients)
        (report / "privacy.tsv").write_text(summary, encoding="utf-8")
        if self.cfg.sample_level_dp:
            log.info("privacy per client (report/privacy.tsv):\n%s", summary.rstrip())
        history = json.dumps(self.state.history, indent=2, allow_nan=False)
        (report / "history.json").write_text(history + "\n", encoding="utf-8")
        if self.cfg.fed.init_model:  # the starting model's card (shipped models have one)
            card = resolve_model(self.cfg.fed.init_model) / "card.md"
            if card.is_file():
                shutil.copyfile(card, report / "init_model_card.md")
        self.tracker.log_artifacts(report)
        self.tracker.finish(model_dir)
        log.info("final model: %s (tracking run %s)", model_dir, self.tracker.run_id)
        return model_dir

    def provenance(self) -> dict[str, Any]:
        """Training record stored in the model directories' config.json."""
        train, privacy = self.cfg.train, self.cfg.privacy
        sample, user = self.cfg.sample_level_dp, self.cfg.user_level_dp
        epsilons = [c["epsilon"] for c in self.state.clients.values() if c.get("epsilon")]
        # Under user-level DP nothing computed from single clients' replies is published with
        # the model (docs/privacy.md, "What is released"): no client count, no client epsilon.
        per_client = not user
        return {
            "mode": "federated",
            "data": self.cfg.data.corpus,
            "rounds": self.state.round,
            "strategy": self.cfg.fed.strategy,
            "clients": len(self.state.clients) if per_client else None,
            "dp": train.dp,
            "privacy_unit": privacy.privacy_unit if train.dp else None,
            # sample level: the worst client's total
            "epsilon": max(epsilons) if epsilons and per_client else None,
            "delta": train.delta if sample else None,
            "noise_multiplier": train.noise_multiplier if sample else None,
            "target_epsilon": train.target_epsilon if sample else None,
            "max_grad_norm": train.max_grad_norm if sample else None,
            "accountant": train.accountant if sample else None,
            "user_epsilon": self.user_state.epsilon() if user else None,
            "client_sample_rate": self.cfg.fed.client_sample_rate if user else None,
            "user_delta": privacy.user_delta if user else None,
            "user_noise_multiplier": privacy.user_noise_multiplier if user else None,
            "user_clip_norm": privacy.user_clip_norm if user else None,
            "adaptive_clipping": privacy.adaptive_clipping if user else None,
            "secure_aggregation": self.cfg.secure_aggregation,
            "tracking_run_id": self.state.tracking_run_id,
            "run_config": self.cfg.to_flat(),
            "fedspeech_version": __version__,
        }


def _clear_previous_run(run_dir: Path) -> None:
    found = [name for name in _RUN_OUTPUTS if (run_dir / name).exists()]
    found += [p.name for p in run_dir.glob(f".{CHECKPOINT_DIR}.*")]
    if found:
        log.warning("fresh run in %s: replacing the previous run's %s", run_dir, sorted(found))
    remove_paths(run_dir, found)


def _log_untracked_rounds(
    tracker: Tracker, run_dir: Path, history: Sequence[Mapping[str, Any]]
) -> None:
    """Report the checkpointed rounds that ``rounds.jsonl`` lacks (a crash after the checkpoint)."""
    tracked = {row.get("round") for row in read_rounds(run_dir)}
    for row in history:
        if row.get("round") in tracked:
            continue
        metrics = {
            k: float(v)
            for k, v in row.items()
            if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        log.warning("round %s was checkpointed but not tracked; tracking it now", row.get("round"))
        tracker.log_round(int(row["round"]), metrics)


def _check_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuse a resume that changes what defines the run; log what it may change."""
    changed = check_resume_changes(before, now)
    if changed:
        log.warning(
            "resumed with changed settings: %s",
            ", ".join(f"{k} {before.get(k)!r} -> {now[k]!r}" for k in changed),
        )
