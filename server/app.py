"""Flower ServerApp: runs the rounds of a ``fedspeech_server.run.FederatedRun`` over Flower's Grid.

Per round: the strategy samples nodes (Poisson sampling under user-level DP, ``fedspeech_server.sampling``)
and builds the train messages (global weights + ``server-round``), the Grid sends them and
collects replies until ``round-timeout``, the strategy screens the replies and aggregates the
accepted ones, and ``FederatedRun.finish_round`` evaluates, checkpoints, tracks and logs (with
user-level DP the strategy clips and noises the accepted updates, ``fedspeech_server.user_dp``, and
``finish_round`` charges the round to the run's ledger). A round with fewer accepted updates than
it needs (``min-successful-clients``; with Poisson sampling at most the number drawn) changes
nothing: it is sent again (at most ``round-retries`` times, and only when some client failed or
was rejected: clients out of privacy budget decline again), then the run stops with a
``RoundFailedError`` that names every client's reason; the checkpoint keeps the last complete
round. Everything but the message traffic lives in plain modules (``fedspeech_server.run``).

With ``secure-aggregation`` the same train messages go through Flower's SecAgg+ workflow
(``fedspeech_server.secagg``: four exchanges with the sampled nodes instead of one) and the strategy
aggregates the unmasked mean it yields (``aggregate_secure``): the server never holds a single
client's update.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedspeech.config import RunConfig
from fedspeech.logs import show_progress
from fedspeech_server.rounds import ClientReport, retry_may_help, shortfall
from fedspeech_server.run import FederatedRun
from fedspeech_server.sampling import PoissonSampler
from fedspeech_server.secagg import run_secure_round
from fedspeech_server.strategy import export_state, import_state, make_strategy, missing_reports
from fedspeech_server.user_dp import UserDPRelease, UserLevelDP

log = logging.getLogger("fedspeech.server")

app = ServerApp()


class RoundFailedError(RuntimeError):
    """A round had too few accepted client updates, also after its retries: the run stops."""


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
        _run_rounds(run, cfg, grid)
    except RoundFailedError:
        raise  # already reported by FederatedRun.abort
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        run.tracker.fail(f"{type(exc).__name__}: {exc}", "KILLED" if interrupted else "FAILED")
        raise
    model_dir = run.finish()
    log.info("done: %d rounds; final model directory %s", run.state.round, model_dir.resolve())


def _run_rounds(run: FederatedRun, cfg: RunConfig, grid: Grid) -> None:
    user_dp = None
    if cfg.user_level_dp:
        # A resumed run continues with the clipping norm its checkpoint holds (adaptive clipping).
        user_dp = UserLevelDP(cfg.privacy, clip_norm=run.user_state.clip_norm)
    sampler = PoissonSampler(cfg.fed, seed=cfg.train.dp_seed) if cfg.poisson_sampling else None
    strategy = make_strategy(
        cfg.fed, user_dp=user_dp, secure=cfg.secure_aggregation, sampler=sampler
    )
    import_state(strategy, run.strategy_arrays)
    arrays = ArrayRecord(run.global_state)
    for server_round in run.pending_rounds:
        started = time.perf_counter()
        log.info("round %d/%d", server_round, cfg.fed.num_server_rounds)
        for attempt in range(cfg.fed.round_retries + 1):
            new_arrays, reports, release = _train_once(
                strategy, server_round, arrays, grid, cfg, run_key=run.state.run_key
            )
            problem = shortfall(reports, strategy.successes_needed())  # type: ignore[attr-defined]
            if problem is None:
                break
            if attempt == cfg.fed.round_retries or not retry_may_help(reports):
                run.abort(server_round, problem)
                raise RoundFailedError(f"round {server_round}: {problem}")
            log.warning(
                "round %d, attempt %d of %d: %s; sending the round again",
                server_round,
                attempt + 1,
                cfg.fed.round_retries + 1,
                problem,
            )
        if new_arrays is not None:
            arrays = new_arrays
        run.finish_round(
            server_round,
            arrays.to_torch_state_dict(),
            reports,
            started=started,
            train_seconds=time.perf_counter() - started,
            strategy_arrays=export_state(strategy),
            retries=attempt,
            user_dp=release,
            clients_sampled=strategy.last_sampled,  # type: ignore[attr-defined]
        )


def _train_once(
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    grid: Grid,
    cfg: RunConfig,
    *,
    run_key: str,
) -> tuple[ArrayRecord | None, list[ClientReport], UserDPRelease | None]:
    """Send one round's train messages (with the run's ``run-key``: a client charged for a
    round before can tell, ``fedspeech_client.app``).

    Returns:
        The aggregate (None: too few accepted), one report per sampled client, and the
        user-level DP record of the aggregate (None without user-level DP or without an
        aggregate).
    """
    messages: list[Message] = list(
        strategy.configure_train(server_round, arrays, ConfigRecord({"run-key": run_key}), grid)
    )
    if not messages:  # an empty Poisson draw (or one left out): noise only with user-level DP
        new_arrays, _ = strategy.aggregate_train(server_round, [])
        reports = list(strategy.last_reports)  # type: ignore[attr-defined]
    elif cfg.secure_aggregation:
        floats = [k for k, v in arrays.items() if v.numpy().dtype.kind == "f"]
        secure = run_secure_round(
            grid, messages, cfg, server_round=server_round, float_names=floats
        )
        new_arrays, _ = strategy.aggregate_secure(server_round, secure)  # type: ignore[attr-defined]
        reports = list(strategy.last_reports)  # type: ignore[attr-defined]
    else:
        replies = list(grid.send_and_receive(messages, timeout=cfg.fed.round_timeout))
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        reports = [*strategy.last_reports, *missing_reports(messages, replies)]  # type: ignore[attr-defined]
    release: UserDPRelease | None = getattr(strategy, "last_user_dp", None)
    return new_arrays, reports, release
