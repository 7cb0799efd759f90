"""Benchmark: what SecAgg+ adds to a round, per client and at the server, for real model sizes.

    python benchmarks/secagg_cost.py [--clients 10] [--models tiny fed-smoke default]

One training round, plain and through SecAgg+ (``fedspeech_server.secagg`` +
``fedspeech_client.secagg``, Flower's ``SecAggPlusWorkflow`` / ``secaggplus_mod``), in one
process: the ServerApp's round code talks to
``--clients`` ClientApps through ``benchmarks.inprocess.InProcessGrid`` (no Flower processes, no
network, clients run one after the other), and each ClientApp "trains" by adding noise to the
weights, so what is timed is the protocol: key agreement, Shamir shares, quantization, masks and
their removal. Per model size it prints the BiGRU's parameters, each client's seconds (mean, and
the masked-input stage alone), the server's seconds per round (everything but the clients), and
the bytes each client sends and receives, plain and with SecAgg+ (ratio secure / plain).
A deployment adds three network round trips per round on top (four exchanges instead of one).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

import fedspeech.metric_keys as mk
from benchmarks.inprocess import InProcessGrid
from fedspeech.config import RunConfig
from fedspeech.model import BiGRUCTC
from fedspeech_client.secagg import secure_aggregation_mod
from fedspeech_features.text import CharTokenizer
from fedspeech_server.secagg import payload_bytes, run_secure_round
from fedspeech_server.strategy import make_strategy

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden-size": 16, "num-layers": 1, "n-mfcc": 13},  # benchmarks/scale.py
    "fed-smoke": {"hidden-size": 64, "num-layers": 2},  # fedspeech/presets/fed-smoke.toml
    "default": {},  # 3-layer BiGRU-256, the run config's default
}

app = ClientApp()


@app.train(mods=[secure_aggregation_mod])
def _train(msg: Message, context: Context) -> Message:
    """Stand-in training: the global weights plus a little noise."""
    rng = np.random.default_rng(context.node_id)
    arrays = {
        k: Array((v.numpy() + rng.normal(0, 1e-3, v.numpy().shape)).astype(np.float32))
        for k, v in msg.content.array_records["arrays"].items()
    }
    metrics = MetricRecord({mk.NUM_EXAMPLES: 50, mk.DECLINED: 0, mk.TRAIN_LOSS: 1.0})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


def measure(name: str, clients: int) -> dict[str, float]:
    """One plain and one secure round with the ``name`` model; returns the figures."""
    flat = {**RunConfig().to_flat(), **MODELS[name], "min-clients": clients}
    cfg = RunConfig.from_flat(flat)
    model = BiGRUCTC(cfg.model.model_config(cfg.features.frame_dim, CharTokenizer().vocab_size))
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    params = sum(v.size for v in weights.values())
    out: dict[str, float] = {"params": float(params)}
    for secure in (False, True):
        run_config = {**flat, "secure-aggregation": secure}
        contexts = {
            100 + i: Context(100 + i, 100 + i, {}, RecordDict(), run_config) for i in range(clients)
        }
        grid = InProcessGrid(app, contexts)
        strategy: Any = make_strategy(cfg.fed, secure=secure)
        arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
        start = time.perf_counter()
        messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        if secure:
            floats = [k for k, v in weights.items() if v.dtype.kind == "f"]
            result = run_secure_round(
                grid, messages, RunConfig.from_flat(run_config), server_round=1, float_names=floats
            )
            new, _ = strategy.aggregate_secure(1, result)
            sent, received = sum(result.bytes_sent.values()), sum(result.bytes_received.values())
        else:
            replies = list(grid.send_and_receive(messages))
            new, _ = strategy.aggregate_train(1, replies)
            sent = sum(payload_bytes(m.content) for m in messages)
            received = sum(payload_bytes(m.content) for m in replies)
        wall = time.perf_counter() - start
        assert new is not None, "the round did not aggregate"
        client_s = sum(d.seconds for d in grid.deliveries)
        masking = sum(d.seconds for d in grid.deliveries if d.stage == "collect_masked_vectors")
        key = "secure" if secure else "plain"
        out[f"{key}_client_s"] = client_s / clients
        out[f"{key}_masked_input_s"] = masking / clients
        out[f"{key}_server_s"] = wall - client_s
        out[f"{key}_down_bytes"] = sent / clients
        out[f"{key}_up_bytes"] = received / clients
    return out


def main() -> None:
    """Measure every model size and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as in a ServerApp
    mib = 1024**2
    print(f"{args.clients} clients, one round each way, in one process (no network)")
    header = "model        params   client s plain/secure (masking)   server s plain/secure"
    print(header + "   up MiB/client plain/secure   down MiB/client plain/secure")
    for name in args.models:
        m = measure(name, args.clients)
        print(
            f"{name:<10} {m['params'] / 1e6:7.3f}M   {m['plain_client_s']:7.3f} / "
            f"{m['secure_client_s']:6.3f} ({m['secure_masked_input_s']:.3f})"
            f"           {m['plain_server_s']:6.3f} / {m['secure_server_s']:6.3f}"
            f"         {m['plain_up_bytes'] / mib:6.2f} / {m['secure_up_bytes'] / mib:6.2f} "
            f"(x{m['secure_up_bytes'] / m['plain_up_bytes']:.2f})"
            f"           {m['plain_down_bytes'] / mib:6.2f} / {m['secure_down_bytes'] / mib:6.2f}"
        )


if __name__ == "__main__":
    main()
