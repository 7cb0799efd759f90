"""SecAgg+ across real Flower processes on 127.0.0.1, with a SuperNode killed mid-protocol
(issue 19; slow: `make test-all`).

One SuperLink (insecure, loopback only), three SuperNodes with their own data folders, and
``flwr run`` of the checkout with ``secure-aggregation = true`` for one round. One SuperNode is
killed (SIGKILL to its process group: the SuperNode, its SuperExec and the ClientApp) after the
key-sharing stage and before it sends its masked vector. Deterministically so: its environment
sets ``FEDSPEECH_FAULT="*:hang=3600@1"`` and ``FEDSPEECH_FAULT_MARKER`` (``fedspeech_client.faults``),
so its ClientApp, called by ``secaggplus_mod`` only in the collect-masked-vectors stage (after
setup and share-keys), announces itself in the marker file after local training and then hangs;
the test sees the marker and kills the node there.

With 3 shares per key and a reconstruction threshold of 2 the two survivors hold enough shares to
remove the dead node's pairwise masks, so the round completes with their sum. The survivors save
what they masked, in the clear (``FEDSPEECH_SECAGG_DUMP``, node-local, ``fedspeech_client.secagg``);
the test checks that the server's model after the round is the global model plus plain FedAvg of
those two inputs, within the quantization error (``_tolerance``).

The collect-masked-vectors stage ends ~60 s after the kill, not at ``round-timeout``: the
SuperLink declares the node offline once its heartbeat lapses (Flower 1.42: 30 s interval x
patience 2) and answers the pending message itself with a NODE_UNAVAILABLE error reply. About
125 s in all here (2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedspeech.app.flower_launch import write_run_config
from fedspeech.config import RunConfig
from fedspeech.fed_data import client_manifest, corpus_manifest
from fedspeech.secagg_config import SecAggConfig
from fedspeech_client.faults import FAULT_ENV, MARKER_ENV
from fedspeech_client.secagg import DUMP_ENV
from tests.conftest import TINY_SIMULATION
from tests.loopback import CONNECTION, LoopbackFlower, loopback_flower

ROOT = Path(__file__).resolve().parents[1]
NODES = ("node0", "node1", "node2")
VICTIM = "node2"
MAX_WEIGHT = 64.0  # secagg-max-weight: above every node's num-examples (asserted)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[LoopbackFlower]:
    with loopback_flower(tmp_path) as flower:
        yield flower


@pytest.mark.slow  # real SuperLink + 3 SuperNodes + a wait for the SuperLink to drop the dead node
@pytest.mark.timeout(900)  # its own waits (marker 420 s, `flwr run` 600 s) report a hang first
def test_secagg_round_completes_with_two_survivors_after_a_supernode_is_killed_mid_protocol(
    tmp_path: Path, federation: LoopbackFlower
) -> None:
    # Prepare: a tiny synthetic corpus split into three node data folders; the victim hangs in
    # round 1's masked-input stage and says so in a marker file; every node dumps its plain input
    data = tmp_path / "data"
    cfg = RunConfig.from_flat({**TINY_SIMULATION, "data-dir": str(data), "num-partitions": 3})
    corpus_manifest(cfg, data)
    manifests = [client_manifest(cfg, data, i, 3) for i in range(3)]
    marker = tmp_path / "victim.marker"
    dumps = {name: tmp_path / "dumps" / name for name in NODES}
    federation.start_superlink()
    for name, manifest in zip(NODES, manifests, strict=True):
        env = {DUMP_ENV: str(dumps[name])}
        if name == VICTIM:
            env |= {FAULT_ENV: "*:hang=3600@1", MARKER_ENV: str(marker)}
        federation.start_supernode(name, f'manifest="{manifest}"', env=env)
    flat = {
        **TINY_SIMULATION,
        **{"data-dir": str(data), "num-partitions": 3, "out-dir": str(tmp_path / "run")},
        **{"num-server-rounds": 1, "min-clients": 3, "min-successful-clients": 2},
        **{"round-retries": 0, "round-timeout": 300.0},
        # 3 shares of each key, 2 reconstruct it: the survivors can unmask without the victim
        **{"secure-aggregation": True, "secagg-num-shares": 3},
        "secagg-reconstruction-threshold": 2,
        # weights are quantized relative to the cap: a cap near the nodes' ~30 examples
        # (default 1000) makes the tolerance ~15x tighter (_tolerance)
        "secagg-max-weight": MAX_WEIGHT,
        "tracking-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    run_config = write_run_config(tmp_path / "run_config.toml", flat)
    started = time.perf_counter()
    run = federation.start(
        "flwr-run",
        ["flwr", "run", str(ROOT), CONNECTION, "--stream", "--run-config", str(run_config)],
    )

    # Execute: wait for the victim's ClientApp to announce its fault, then SIGKILL the
    # victim's process group (SuperNode, SuperExec, ClientApp: Flower starts them in the group)
    clientapp_pid = _wait_for_marker(marker, run, federation, timeout=420)
    victim = federation.procs[VICTIM]
    assert os.getpgid(clientapp_pid) == victim.pid, (
        f"the hanging ClientApp (pid {clientapp_pid}) is not in {VICTIM}'s process group"
    )
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    killed_at = time.perf_counter() - started
    try:
        run.wait(timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("`flwr run` did not finish within 600 s\n" + federation.tails())
    wall = time.perf_counter() - started

    # Assert: the run finished its round with the two survivors; the victim failed in the
    # collect-masked-vectors stage (after setup and share-keys), before sending a masked vector
    assert run.returncode == 0, f"flwr run exited with {run.returncode}\n" + federation.tails()
    run_log = (federation.logs / "flwr-run.log").read_text(errors="replace")
    assert "Secure aggregation completed" in run_log, federation.tails()
    history = json.loads((tmp_path / "run" / "report" / "history.json").read_text())
    assert [h["round"] for h in history] == [1], history
    assert (history[0]["clients_ok"], history[0]["clients_failed"]) == (2, 1), history
    lines = (tmp_path / "run" / "report" / "clients.tsv").read_text().splitlines()
    rows = [dict(zip(lines[0].split("\t"), line.split("\t"), strict=True)) for line in lines[1:]]
    (failed,) = [row for row in rows if row["rounds_failed"] == "1"]
    assert "collect_masked_vectors" in failed["last_reason"], rows
    # the true cause (the SuperLink's error reply for the node, not a timeout)
    assert "Node Unavailable" in failed["last_reason"], rows
    assert not any(dumps[VICTIM].glob("*.npz")), "the victim masked an update before the kill"
    inputs = [PlainInput.load(dumps[name]) for name in NODES if name != VICTIM]
    assert sorted(row["client"] for row in rows if row["rounds_ok"] == "1") == sorted(
        f"node-{i.node_id}" for i in inputs
    ), rows
    assert failed["client"] not in {f"node-{i.node_id}" for i in inputs}

    # Assert: the model after the round = the global model + FedAvg of the survivors' inputs
    names = inputs[0].names
    assert all(i.names == names and len(i.vector) == len(names) for i in inputs)
    for name in names:  # both received the same global model
        np.testing.assert_array_equal(inputs[0].base[name], inputs[1].base[name])
    weights = [i.weight for i in inputs]
    examples = {row["client"]: float(row["num_examples"]) for row in rows if row["num_examples"]}
    assert weights == [examples[f"node-{i.node_id}"] for i in inputs], (weights, rows)
    assert all(0 < w < MAX_WEIGHT for w in weights), "a weight was capped: not FedAvg's"
    secagg = RunConfig.from_flat(flat).secagg  # the run's quantization settings
    r = secagg.secagg_clipping_range
    assert max(float(np.abs(v).max()) for i in inputs for v in i.vector) < r, (
        "an input coordinate reached secagg-clipping-range: SecAgg+ clips it, FedAvg does not"
    )
    from safetensors.numpy import load_file

    final = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    tol_q = _tolerance(weights, secagg)
    worst, largest, apart = 0.0, 0.0, [0.0] * len(inputs)
    for k, name in enumerate(names):
        base = inputs[0].base[name]
        fedavg = sum(w * i.vector[k] for w, i in zip(weights, inputs, strict=True)) / sum(weights)
        got = final[name].astype(np.float64)
        assert final[name].dtype == np.float32
        # float32 storage of the new global model: half a unit in the last place, <= 2^-24 |x|
        atol = tol_q + np.abs(got) * 2.0**-24
        np.testing.assert_array_less(
            np.abs(got - base - fedavg), atol, err_msg=f"{name}: secure aggregate != FedAvg"
        )
        worst = max(worst, float(np.abs(got - base - fedavg).max()))
        largest = max(largest, float(np.abs(fedavg).max()))
        for j, i in enumerate(inputs):
            apart[j] = max(apart[j], float(np.abs(got - base - i.vector[k]).max()))
    # Assert: the check can tell: the update is far above the tolerance, and it is the mean of the
    # two inputs, not one of them (each is further from it than the tolerance)
    assert largest > 100 * tol_q, f"updates too small to test anything: {largest:.3g}"
    assert min(apart) > 10 * tol_q, f"the aggregate is (nearly) one survivor's input: {apart}"
    print(
        f"\nSecAgg+ deployment, 3 nodes, 1 killed after share-keys at {killed_at:.0f} s: "
        f"`flwr run` {wall:.0f} s; |secure - FedAvg| max {worst:.2e} "
        f"(tolerance {tol_q:.2e}; largest update coordinate {largest:.2e})"
    )


def _tolerance(weights: Sequence[float], sa: SecAggConfig) -> float:
    """Largest error of SecAgg+'s unmasked weighted mean of ``m`` inputs against FedAvg.

    Flower's ``secaggplus_mod`` scales input ``x_i`` by its quantized weight
    ``a_i = round(w_i / W * L) / L`` (W: ``secagg-max-weight``, L: ``secagg-quantization-range``)
    and rounds ``a_i x_i`` stochastically to a grid of step ``2 r / L`` (r:
    ``secagg-clipping-range``): an error below one step per input. The server divides the sum
    by ``sum a_i``. So per coordinate

        |secure - FedAvg| < (m 2r/L + sum_i |a_i - w_i/W| |x_i - FedAvg|) / sum_i a_i
                          <= (m 2r/L + m (1/2L) 2r) / sum_i a_i = 3 m r / (L sum_i a_i),

    using |a_i - w_i/W| <= 1/(2L) and |x_i|, |FedAvg| < r (asserted: nothing clipped).
    """
    levels, r = sa.secagg_quantization_range, sa.secagg_clipping_range
    ratios = [round(w / sa.secagg_max_weight * levels) / levels for w in weights]
    return 3 * len(weights) * r / (levels * sum(ratios))


def _wait_for_marker(
    marker: Path, run: subprocess.Popen[bytes], federation: LoopbackFlower, timeout: float
) -> int:
    """The pid of the ClientApp that wrote ``PID hang`` to ``marker`` (it now hangs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = marker.read_text() if marker.exists() else ""
        if text.endswith("\n"):
            pid, kind = text.splitlines()[0].split()
            assert kind == "hang", text
            return int(pid)
        if run.poll() is not None:
            pytest.fail(
                f"`flwr run` exited ({run.returncode}) before the victim reached its fault\n"
                + federation.tails()
            )
        assert federation.procs[VICTIM].poll() is None, "victim died\n" + federation.tails()
        time.sleep(0.2)
    pytest.fail(f"no fault marker after {timeout:.0f} s\n" + federation.tails())


@dataclass(frozen=True)
class PlainInput:
    """What one node masked, saved in the clear (``fedspeech_client.secagg.dump_plain_input``)."""

    node_id: int
    names: list[str]  # the float tensors, in the vector's order
    base: dict[str, np.ndarray]  # the global weights the node received
    vector: list[np.ndarray]  # trained - global, per tensor
    weight: float  # num-examples

    @classmethod
    def load(cls, directory: Path) -> PlainInput:
        (path,) = directory.glob("node-*-round-1.npz")
        with np.load(path) as npz:
            names = [str(n) for n in npz["names"]]
            keys = sorted(k for k in npz.files if k.startswith("input/"))
            return cls(
                node_id=int(path.name.split("-")[1]),
                names=names,
                base={n: npz[f"global/{n}"] for n in names},
                vector=[npz[k] for k in keys],
                weight=float(npz["weight"]),
            )


# ------------------------------------------------------------------- the testing aids (fast)


def test_a_fault_announces_itself_in_the_marker_file_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from fedspeech_client.faults import apply_faults, parse_faults

    marker = tmp_path / "marker"
    weights = {"a": torch.zeros(2)}
    monkeypatch.delenv(MARKER_ENV, raising=False)
    apply_faults(parse_faults("*:nan"), weights)
    assert not marker.exists()
    monkeypatch.setenv(MARKER_ENV, str(marker))
    apply_faults(parse_faults("*:nan,*:hang=0.01"), weights)
    assert marker.read_text() == f"{os.getpid()} nan\n{os.getpid()} hang\n"


def test_the_plain_input_dump_holds_exactly_what_is_masked(tmp_path: Path) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    from fedspeech_client.secagg import dump_plain_input, masked_input

    rng = np.random.default_rng(0)
    sent_weights = {"w": rng.normal(size=(3, 2)).astype(np.float32), "n": np.array([4])}
    trained = {"w": sent_weights["w"] + 0.01, "n": np.array([5])}
    sent = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in sent_weights.items()}),
            "config": ConfigRecord({"server-round": 3}),
        }
    )
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in trained.items()}),
            "metrics": MetricRecord({"num-examples": 17, "declined": 0}),
        }
    )
    content = masked_input(sent, reply, RunConfig.from_flat({"secure-aggregation": True}))
    path = dump_plain_input(tmp_path / "dump", 42, sent, content)
    assert path == tmp_path / "dump" / "node-42-round-3.npz"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left
    fitres = recorddict_to_fitres(content, keep_input=True)
    with np.load(path) as npz:
        assert [str(n) for n in npz["names"]] == ["w"]  # float tensors only
        np.testing.assert_array_equal(npz["global/w"], sent_weights["w"].astype(np.float64))
        (masked,) = parameters_to_ndarrays(fitres.parameters)
        np.testing.assert_array_equal(npz["input/0000"], masked)
        assert float(npz["weight"]) == fitres.num_examples == 17
