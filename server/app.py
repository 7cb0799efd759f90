"""Flower ServerApp: runs the rounds of a ``fedspeech_server.run.FederatedRun`` over Flower's Grid.

A thin adapter. ``FederatedRun.run_rounds`` drives the rounds (retries of short rounds, and the
stop with ``RoundFailedError`` after them, included); this module answers its ``SendRound``: the
strategy samples nodes (Poisson sampling under user-level DP, ``fedspeech_server.sampling``) and
builds the train messages (global weights + ``server-round`` + the run's ``run-key``), the Grid
sends them and collects replies until ``round-timeout``, and the strategy screens the replies
(``fedspeech_server.screening``) and aggregates the accepted ones (with user-level DP it clips and
noises them, ``fedspeech_server.user_dp``; ``finish_round`` charges the round to the run's ledger).

With ``secure-aggregation`` the same train messages go through Flower's SecAgg+ workflow
(``fedspeech_server.secagg``: four exchanges with the sampled nodes instead of one) and the strategy
aggregates the unmasked mean it yields (``aggregate_secure``): the server never holds a single
client's update.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from fedspeech.config import RunConfig
from fedspeech.exchange import check_frozen, exchanged_names, frozen_digest
from fedspeech.launch import mark_server_done
from fedspeech.logs import show_progress
from fedspeech.pipeline import initial_weights
from fedspeech_server.rounds import ClientReport
from fedspeech_server.run import FederatedRun, RoundAttempt, RoundFailedError, SendRound
from fedspeech_server.sampling import PoissonSampler
from fedspeech_server.screening import missing_reports
from fedspeech_server.secagg import run_secure_round
from fedspeech_server.strategy import (
    ScreeningStrategy,
    export_state,
    import_state,
    make_strategy,
)
from fedspeech_server.user_dp import UserLevelDP

__all__ = ["RoundFailedError", "app", "main"]

log = logging.getLogger("fedspeech.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federated training the run config describes.

    Raises:
        RoundFailedError: a round stayed below ``min-successful-clients``.
    """
    show_progress()
    # MLflow's own use of SQLAlchemy warns of deprecations on every run (nothing of ours):
    # it filled the run's log, which users read for the run's progress.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow\.")
    cfg = RunConfig.from_flat(context.run_config)
    if cfg.fed.server_threads:
        # One thread by default: the 24-utterance central evaluation of a small model took 0.07 s
        # on 1 thread but 3 s on 2 while another process kept one of this 2-core machine's cores
        # busy (intra-op threads wait for each other at every op, and a busy core stalls them).
        torch.set_num_threads(cfg.fed.server_threads)
    run = FederatedRun.open(cfg)
    try:
        run.run_rounds(_flower_rounds(run, cfg, grid))
    except RoundFailedError:
        raise  # already reported by FederatedRun.abort
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        run.tracker.fail(f"{type(exc).__name__}: {exc}", "KILLED" if interrupted else "FAILED")
        raise
    model_dir = run.finish()
    log.info("done: %d rounds; final model directory %s", run.state.round, model_dir.resolve())
    mark_server_done()  # under `fedspeech simulate`: its launcher may stop Flower now


def _flower_rounds(run: FederatedRun, cfg: RunConfig, grid: Grid) -> SendRound:
    """The run's ``SendRound`` over ``grid``, with the strategy the run config names (its
    server-optimizer state restored from the run's checkpoint)."""
    user_dp = None
    if cfg.user_level_dp:
        # A resumed run continues with the clipping norm its checkpoint holds (adaptive clipping).
        user_dp = UserLevelDP(cfg.privacy, clip_norm=run.user_state.clip_norm)
    sampler = PoissonSampler(cfg.fed, seed=cfg.train.dp_seed) if cfg.poisson_sampling else None
    strategy = make_strategy(
        cfg.fed,
        user_dp=user_dp,
        secure=cfg.secure_aggregation,
        sampler=sampler,
        cohort_seed=cfg.train.dp_seed,
    )
    config = {"run-key": run.state.run_key}
    exchanged = exchanged_names(cfg)  # None: every tensor trains and travels
    if exchanged is not None:
        config["frozen-digest"] = frozen_digest(initial_weights(cfg, run.model_config), exchanged)
        # Before the server optimizer's state: a run resumed with another ``trainable`` stops here.
        check_frozen(
            run.global_state, exchanged, config["frozen-digest"], where="the server's model"
        )
        log.info(
            "rounds exchange %d trained tensors (trainable=%s)", len(exchanged), cfg.train.trainable
        )

    import_state(strategy, run.strategy_arrays)

    def send(server_round: int, weights: Mapping[str, Tensor]) -> RoundAttempt:
        sent = dict(weights)
        if exchanged is not None:
            check_frozen(weights, exchanged, config["frozen-digest"], where="the server's model")
            sent = {k: weights[k] for k in exchanged}
        new_arrays, reports = _train_once(
            strategy, server_round, ArrayRecord(sent), grid, cfg, config=config
        )
        return RoundAttempt(
            reports=reports,
            needed=strategy.successes_needed(),
            new_state=None
            if new_arrays is None
            else {**weights, **new_arrays.to_torch_state_dict()},
            user_dp=strategy.last_user_dp,
            clients_sampled=strategy.last_sampled,
            strategy_arrays=export_state(strategy),
            exchanged_weights=sum(v.numel() for v in sent.values()),
        )

    return send


def _train_once(
    strategy: ScreeningStrategy,
    server_round: int,
    arrays: ArrayRecord,
    grid: Grid,
    cfg: RunConfig,
    *,
    config: Mapping[str, str],
) -> tuple[ArrayRecord | None, list[ClientReport]]:
    """Send one round's train messages with ``config``: the run's ``run-key`` (a client charged
    for a round before can tell, ``fedspeech_client.app``) and, when only some weights train,
    the digest of the fixed ones (``fedspeech.exchange``).

    Returns:
        The aggregate (None: too few accepted) and one report per sampled client.
    """
    messages: list[Message] = list(
        strategy.configure_train(server_round, arrays, ConfigRecord(dict(config)), grid)
    )
    if not messages:  # an empty Poisson draw (or one left out): noise only with user-level DP
        new_arrays, _ = strategy.aggregate_train(server_round, [])
        reports = list(strategy.last_reports)
    elif cfg.secure_aggregation:
        floats = [k for k, v in arrays.items() if v.numpy().dtype.kind == "f"]
        secure = run_secure_round(
            grid, messages, cfg, server_round=server_round, float_names=floats
        )
        new_arrays, _ = strategy.aggregate_secure(server_round, secure)
        reports = list(strategy.last_reports)
    else:
        replies = list(grid.send_and_receive(messages, timeout=cfg.fed.round_timeout))
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        reports = [*strategy.last_reports, *missing_reports(messages, replies)]
    return new_arrays, reports
