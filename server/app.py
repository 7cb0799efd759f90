"""Flower ServerApp: runs the rounds of a ``server.run.FederatedRun`` over Flower's Grid.

Per round: the strategy samples nodes and builds the train messages (global weights +
``server-round``), the Grid sends them and collects replies until ``round-timeout``, the strategy
aggregates the clients that trained, and ``FederatedRun.finish_round`` evaluates, checkpoints,
tracks and logs. Everything but the message traffic lives in plain modules (``server.run``).
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedspeech.config import RunConfig
from fedspeech.logs import show_progress
from server.run import FederatedRun
from server.strategy import export_state, import_state, make_strategy, missing_reports

log = logging.getLogger("fedspeech.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federated training the run config describes."""
    show_progress()
    cfg = RunConfig.from_flat(context.run_config)
    if cfg.fed.server_threads:
        # One thread by default: the 24-utterance central evaluation of a small model took 0.07 s
        # on 1 thread but 3 s on 2 while another process kept one of this 2-core machine's cores
        # busy (intra-op threads wait for each other at every op, and a busy core stalls them).
        torch.set_num_threads(cfg.fed.server_threads)
    run = FederatedRun.open(cfg)
    strategy = make_strategy(cfg.fed)
    import_state(strategy, run.strategy_arrays)
    arrays = ArrayRecord(run.global_state)
    for server_round in run.pending_rounds:
        started = time.perf_counter()
        log.info("round %d/%d", server_round, cfg.fed.num_server_rounds)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages, timeout=cfg.fed.round_timeout))
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        reports = [*strategy.last_reports, *missing_reports(messages, replies)]  # type: ignore[attr-defined]
        train_seconds = time.perf_counter() - started
        if new_arrays is not None:
            arrays = new_arrays
        run.finish_round(
            server_round,
            arrays.to_torch_state_dict(),
            reports,
            started=started,
            train_seconds=train_seconds,
            strategy_arrays=export_state(strategy),
        )
    model_dir = run.finish()
    log.info("done: %d rounds; final model directory %s", run.state.round, model_dir.resolve())
