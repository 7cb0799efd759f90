"""Flower ClientApp: translates a train message into ``fedspeech_client.local_round.run_round`` and back.

In: ``arrays`` (global weights, ArrayRecord) and ``config`` (``server-round``; FedProx adds
``proximal-mu``). Out: ``arrays`` (new weights; absent when the client declines), ``metrics``
(MetricRecord, see ``fedspeech_client.local_round``) and, when declining, ``decline`` (ConfigRecord with the
``reason``).
Only weights and these numbers leave the node: never audio, features or transcripts
(``tests/test_reliability.py`` inspects a real reply). ``FEDSPEECH_FAULT`` in the node's
environment injects faults for reliability tests (``fedspeech_client.faults``; off when unset).
With ``secure-aggregation`` the weights leave the node only masked: ``fedspeech_client.secagg`` wraps this
handler in Flower's SecAgg+ client mod (the reply's weights become a masked update).

The node config is checked on the first message (``fedspeech_client.node_state.NodeConfig``: an unknown
key or a wrong type fails the message with an error naming the key, which the server reports).
The privacy ledger is kept in ``context.state`` (across rounds of a run) and in one JSON file per
node (see ``fedspeech_client.node_state``: across runs and restarts, whatever the accountant); the longer
history of the two wins.

Importing this module is cheap on purpose (torch, Opacus and the pipeline load on the first
message): Flower's simulation imports the ClientApp in its driver before it starts Ray, while the
ServerApp starts in another thread of the same process; a heavy import here delayed Ray's start,
and with it round 1, by ~2-4 s (benchmarks/fed_overhead.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.clientapp import ClientApp

import fedspeech.metric_keys as mk
from fedspeech_client.secagg import secure_aggregation_mod
from fedspeech_client.vce_poll import patch_simulation_engine

if TYPE_CHECKING:
    from fedspeech.privacy_ledger import PrivacyLedger

log = logging.getLogger("fedspeech.client")

app = ClientApp()

# In Flower's simulation process (which loads this module before its engine starts): poll the
# messages in flight, not every virtual node (fedspeech_client.vce_poll). Elsewhere a no-op.
patch_simulation_engine()

_LEDGER_KEY = "fedspeech.privacy"  # context.state record holding the ledger JSON


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    """Run one round of local training (or decline it) and reply."""
    import torch  # lazy, like the rest: see the module docstring

    from fedspeech.config import RunConfig
    from fedspeech.logs import show_progress
    from fedspeech_client.faults import active_faults, apply_faults
    from fedspeech_client.local_round import load_node_examples, run_round
    from fedspeech_client.node_state import (
        last_charged,
        load_ledger,
        newest_ledger,
        resolve_node_data,
        save_ledger,
    )

    show_progress()
    cfg = RunConfig.from_flat(context.run_config)
    # Imports here, not inside the round's own ``seconds``: Opacus (~1.3 s), and torch._dynamo,
    # which a process's first torch.optim optimizer imports (0.45-0.7 s)
    import torch._dynamo

    if cfg.sample_level_dp:
        import fedspeech_client.dp_sgd  # noqa: F401
    node = resolve_node_data(context.node_config, cfg)
    if node.threads:
        torch.set_num_threads(node.threads)
    config = msg.content.config_records["config"]
    server_round = int(str(config.get("server-round", 0)))
    proximal_mu = float(str(config.get("proximal-mu", 0.0)))  # only FedProx sends it
    run_key = str(config.get("run-key", ""))  # the same across a run's resumes
    charged_before = last_charged(node.ledger_file)
    ledger_in_state = _state_ledger(context, cfg.train.delta)
    prior = newest_ledger(ledger_in_state, load_ledger(node.ledger_file, cfg.train.delta))

    examples, data_metrics = load_node_examples(node, cfg)
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    outcome = run_round(
        global_state,
        examples,
        cfg,
        server_round=server_round,
        prior=prior,
        budget=node.epsilon_budget,
        seed_offset=node.partition[0] if node.partition else context.node_id % 1_000_003,
        proximal_mu=proximal_mu,
        frozen_digest=str(config.get("frozen-digest", "")),
    )
    spent = outcome.privacy_state is not None and outcome.privacy_state.num_steps > (
        prior.num_steps if prior is not None else 0
    )
    # A round of this run charged before: its first attempt was cut off (an interruption) and
    # the server sends it again. The new attempt spends again; say so.
    recharged = bool(spent and run_key and charged_before == (run_key, server_round))
    if recharged:
        log.warning(
            "%s: round %d of this run was already charged once (an attempt cut off by an "
            "interruption); training it again charges it a second time",
            node.label,
            server_round,
        )
    if outcome.privacy_state is not None and outcome.privacy_state != ledger_in_state:
        # Ledger first, reply second: a reply lost after this still counts as spent.
        charge = (run_key, server_round) if spent and run_key else None
        save_ledger(node.ledger_file, outcome.privacy_state, charged=charge)
        context.state[_LEDGER_KEY] = ConfigRecord({"ledger": outcome.privacy_state.to_json()})

    update = outcome.state_dict
    faults = active_faults(node.partition[0] if node.partition else None, server_round)
    if faults:  # testing aid only: see fedspeech_client.faults
        update = apply_faults(faults, update)

    metrics: dict[str, MetricRecordValues] = {**outcome.metrics, **data_metrics}
    metrics[mk.RECHARGED] = float(recharged)
    if node.epsilon_budget is not None:  # for the server's privacy summary
        metrics[mk.EPSILON_BUDGET] = node.epsilon_budget
    if node.partition is not None:  # lets the server's report name simulated clients stably
        metrics[mk.PARTITION_ID] = float(node.partition[0])
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if update is not None:
        content["arrays"] = ArrayRecord(update)
    else:
        content["decline"] = ConfigRecord({"reason": outcome.declined_reason or "declined"})
    log.info(
        "%s round %d: %s",
        node.label,
        server_round,
        "declined" if outcome.state_dict is None else _fmt(outcome.metrics),
    )
    return Message(content=content, reply_to=msg)


def _state_ledger(context: Context, delta: float) -> PrivacyLedger | None:
    from fedspeech.privacy_ledger import PrivacyLedger

    record = context.state.get(_LEDGER_KEY)
    if not isinstance(record, ConfigRecord) or "ledger" not in record:
        return None
    return PrivacyLedger.from_json(str(record["ledger"]), delta=delta)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
