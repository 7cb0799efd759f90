"""A client's round without Flower: data location, privacy ledger on disk, budget, training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedspeech.config import ConfigError, RunConfig
from fedspeech.exchange import exchanged_names, frozen_digest
from fedspeech.fed_data import client_manifest, hold_out_speakers, prepared_client_manifest
from fedspeech.model import BiGRUCTC, plain_state_dict
from fedspeech.pipeline import initial_weights
from fedspeech.privacy_ledger import PrivacyLedger
from fedspeech_client.local_round import load_node_examples, round_steps, run_round
from fedspeech_client.node_state import (
    NodeConfig,
    load_ledger,
    newest_ledger,
    resolve_node_data,
    save_ledger,
)
from fedspeech_features.errors import FedspeechDataError
from fedspeech_features.manifest import Utterance, read_manifest, write_manifest
from tests.conftest import TINY_NODE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {**TINY_NODE, "batch-size": 4, "dp-seed": 0}


@dataclass(frozen=True)
class _Utt:
    feats: torch.Tensor
    labels: torch.Tensor


def _examples(n: int) -> list[_Utt]:
    g = torch.Generator().manual_seed(0)
    return [_Utt(torch.randn(10, 6, generator=g), torch.tensor([3, 4])) for _ in range(n)]


def _global(cfg: RunConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return plain_state_dict(BiGRUCTC(cfg.model.model_config(cfg.features.frame_dim, 29)))


def test_round_spends_what_the_accountant_composes() -> None:
    # Prepare
    cfg = RunConfig.from_flat({**TINY, "noise-multiplier": 1.3})
    examples = _examples(10)
    # Execute: two rounds, the ledger carried over
    first = run_round(_global(cfg), examples, cfg, server_round=1, prior=None, budget=None)
    second = run_round(
        _global(cfg), examples, cfg, server_round=2, prior=first.privacy_state, budget=None
    )
    # Assert: epsilon is Opacus's RDP composition of both rounds' (sigma, q, steps)
    q, steps = round_steps(10, 4, 1)
    accountant = RDPAccountant()
    accountant.history = [(1.3, q, steps), (1.3, q, steps)]
    assert second.metrics["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert second.metrics["epsilon"] > first.metrics["epsilon"] > 0
    assert second.metrics["num-examples"] == 10 and second.metrics["declined"] == 0
    assert second.state_dict is not None and second.declined_reason is None
    # the round's wall-clock and CPU time both reach the server (benchmarks' ideal time)
    assert second.metrics["seconds"] > 0 and second.metrics["cpu-seconds"] > 0


@pytest.mark.parametrize("trainable", ["head", "norm-bias", "adapters"])
def test_a_subset_round_receives_and_sends_only_the_trained_tensors(trainable: str) -> None:
    # Prepare: the server's view: the starting model, the exchanged names and the digest
    rank = {"adapter-rank": 2} if trainable == "adapters" else {}
    cfg = RunConfig.from_flat({**TINY, "noise-multiplier": 1.3, "trainable": trainable, **rank})
    start = initial_weights(cfg, cfg.model.model_config(cfg.features.frame_dim, 29))
    exchanged = exchanged_names(cfg)
    assert exchanged is not None and set(exchanged) < set(start)
    assert {"norm.weight", "norm.bias", "head.weight", "head.bias"} <= set(exchanged)
    if trainable == "head":
        assert len(exchanged) == 4
    elif trainable == "adapters":  # the B factors of every layer and direction, nothing else
        adapters = sorted(set(exchanged) - {"norm.weight", "norm.bias", "head.weight", "head.bias"})
        layers = cfg.model.num_layers * 2
        assert len(adapters) == layers and all(k.startswith("adapters.up.") for k in adapters)
        assert sum(k.startswith("adapters.down_") for k in start) == layers  # A: fixed, kept
    else:  # every bias trains too, no weight matrix of the recurrent stack
        assert "rnn.bias_hh_l0" in exchanged and "rnn.weight_ih_l0" not in exchanged
    digest = frozen_digest(start, exchanged)
    sent = {k: start[k] for k in exchanged}
    # Execute
    out = run_round(
        sent, _examples(10), cfg, server_round=1, prior=None, budget=None, frozen_digest=digest
    )
    # Assert: only trained tensors come back, all of them changed; epsilon as for all weights
    assert out.state_dict is not None and sorted(out.state_dict) == sorted(exchanged)
    assert all(not torch.equal(out.state_dict[k], start[k]) for k in exchanged)
    full = RunConfig.from_flat({**TINY, "noise-multiplier": 1.3})
    everything = run_round(
        _global(full), _examples(10), full, server_round=1, prior=None, budget=None
    )
    assert out.metrics["epsilon"] == everything.metrics["epsilon"]
    assert out.privacy_state == everything.privacy_state


def test_a_subset_round_refuses_another_starting_model_or_other_tensors() -> None:
    cfg = RunConfig.from_flat({**TINY, "trainable": "head"})
    start = initial_weights(cfg, cfg.model.model_config(cfg.features.frame_dim, 29))
    exchanged = exchanged_names(cfg)
    assert exchanged is not None
    sent = {k: start[k] for k in exchanged}
    other = {k: v + 1 for k, v in start.items()}  # the server started from another model
    args = {"server_round": 1, "prior": None, "budget": None}
    with pytest.raises(
        ConfigError, match=r"fixed \(non-trained\) weights differ from the run's starting"
    ):
        run_round(sent, _examples(4), cfg, frozen_digest=frozen_digest(other, exchanged), **args)
    with pytest.raises(ConfigError, match="no frozen-digest"):
        run_round(sent, _examples(4), cfg, frozen_digest="", **args)
    with pytest.raises(ConfigError, match=r"missing \[\], extra \['rnn.bias_hh_l0'\]"):
        run_round(
            {**sent, "rnn.bias_hh_l0": start["rnn.bias_hh_l0"]},
            _examples(4),
            cfg,
            frozen_digest=frozen_digest(start, exchanged),
            **args,
        )


def test_the_starting_model_is_read_once_until_its_files_change(tmp_path: Path) -> None:
    # Prepare: a run that starts from a model directory on disk
    from fedspeech.modeldir import save_model_dir
    from fedspeech_client import local_round
    from fedspeech_features.text import CharTokenizer

    base = RunConfig.from_flat({**TINY, "trainable": "head"})
    model_config = base.model.model_config(base.features.frame_dim, 29)
    torch.manual_seed(1)
    save_model_dir(
        tmp_path / "m", BiGRUCTC(model_config), model_config, base.features, CharTokenizer()
    )
    cfg = RunConfig.from_flat({**TINY, "trainable": "head", "init-model": str(tmp_path / "m")})
    # Execute / Assert: the second round gets the same tensors without reading the files
    first = local_round.starting_weights(cfg, model_config)
    assert local_round.starting_weights(cfg, model_config) is first
    # Another model written in its place (new file times): read again, the new weights.
    torch.manual_seed(2)
    replacement = BiGRUCTC(model_config)
    save_model_dir(tmp_path / "m", replacement, model_config, base.features, CharTokenizer())
    again = local_round.starting_weights(cfg, model_config)
    assert again is not first
    assert torch.equal(again["head.weight"], plain_state_dict(replacement)["head.weight"])
    assert not torch.equal(again["head.weight"], first["head.weight"])


def test_client_declines_when_the_next_round_would_exceed_its_budget() -> None:
    # Prepare: a budget between one round's and two rounds' epsilon
    cfg = RunConfig.from_flat({**TINY, "noise-multiplier": 1.3})
    examples = _examples(10)
    first = run_round(_global(cfg), examples, cfg, server_round=1, prior=None, budget=None)
    assert first.privacy_state is not None
    budget = first.metrics["epsilon"] * 1.05
    # Execute
    second = run_round(
        _global(cfg), examples, cfg, server_round=2, prior=first.privacy_state, budget=budget
    )
    # Assert: no weights, nothing spent, a reason
    assert second.state_dict is None and second.metrics["declined"] == 1
    assert second.metrics["cpu-seconds"] >= 0 and second.metrics["seconds"] > 0
    assert second.privacy_state == first.privacy_state
    assert "budget" in (second.declined_reason or "")


def test_target_epsilon_is_spread_over_the_planned_rounds() -> None:
    # Prepare
    cfg = RunConfig.from_flat(
        {**TINY, "target-epsilon": 4.0, "noise-multiplier": "", "planned-rounds": 2}
    )
    examples = _examples(8)
    # Execute
    state = None
    for rnd in (1, 2):
        outcome = run_round(_global(cfg), examples, cfg, server_round=rnd, prior=state, budget=None)
        state = outcome.privacy_state
    third = run_round(_global(cfg), examples, cfg, server_round=3, prior=state, budget=None)
    # Assert: both planned rounds together stay within the target; a third is declined
    assert state is not None and 3.9 < state.epsilon() <= 4.0
    assert third.state_dict is None and "planned rounds" in (third.declined_reason or "")


def test_real_node_keeps_its_ledger_beside_its_data(tmp_path: Path) -> None:
    # Prepare
    cfg = RunConfig()
    node = resolve_node_data({"manifest": str(tmp_path / "site" / "manifest.tsv")}, cfg)
    state = PrivacyLedger(1e-5, ((1.0, 0.1, 5),))
    # Execute
    save_ledger(node.ledger_file, state)
    # Assert: one file per node, whatever the accountant
    assert node.ledger_file.parent.parent == tmp_path / "site"
    assert node.ledger_file.name == "ledger.json"
    prv = resolve_node_data({"manifest": str(tmp_path / "site" / "manifest.tsv")},
                            RunConfig.from_flat({"accountant": "prv"}))  # fmt: skip
    assert prv.ledger_file == node.ledger_file
    assert load_ledger(node.ledger_file, 1e-5) == state
    assert newest_ledger(None, PrivacyLedger(1e-5), state) == state
    node.ledger_file.write_text("{broken")
    with pytest.raises(ValueError, match="damaged privacy ledger"):
        load_ledger(node.ledger_file, 1e-5)


def test_per_accountant_ledgers_are_merged_once_and_never_lose_spend(tmp_path: Path) -> None:
    # Prepare: a node folder as earlier versions left it, one ledger file per accountant
    folder = tmp_path / ".fedspeech-privacy"
    folder.mkdir()
    (folder / "ledger-rdp.json").write_text('{"mechanism": "rdp", "history": [[1.0, 0.1, 5]]}')
    (folder / "ledger-prv.json").write_text('{"mechanism": "prv", "history": [[2.0, 0.2, 3]]}')
    path = folder / "ledger.json"
    # Execute: read twice (the second read must not merge again)
    first = load_ledger(path, 1e-5)
    second = load_ledger(path, 1e-5)
    # Assert: both histories, once; the old files kept aside
    assert first == second
    assert first is not None and sorted(first.history) == [(1.0, 0.1, 5), (2.0, 0.2, 3)]
    assert sorted(p.name for p in folder.iterdir()) == [
        "ledger-prv.json.migrated", "ledger-rdp.json.migrated", "ledger.json",
    ]  # fmt: skip


def test_a_migration_interrupted_before_the_renames_counts_each_file_once(tmp_path: Path) -> None:
    # Prepare: the merged ledger was saved, but the old file was not yet renamed (a crash)
    old = tmp_path / "ledger-rdp.json"
    old.write_text('{"mechanism": "rdp", "history": [[1.0, 0.1, 5]]}')
    merged = PrivacyLedger(1e-5, ((1.0, 0.1, 5),))
    save_ledger(tmp_path / "ledger.json", merged, merged=("ledger-rdp.json",))
    # Execute
    ledger = load_ledger(tmp_path / "ledger.json", 1e-5)
    # Assert
    assert ledger == merged and not old.exists()


def test_an_unreadable_old_ledger_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "ledger-prv.json").write_text("not json")
    with pytest.raises(ValueError, match=r"ledger-prv\.json: damaged privacy ledger"):
        load_ledger(tmp_path / "ledger.json", 1e-5)
    assert (tmp_path / "ledger-prv.json").exists()


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        (
            {"manifest": "/d/m.tsv", "epsilon-bugdet": 3},
            "unknown node-config key\\(s\\) 'epsilon-bugdet'",
        ),
        ({"manifest": 5}, "node-config manifest must be str, got 5"),
        ({"data-dir": "/d", "threads": "two"}, "node-config threads must be int"),
        ({"data-dir": "/d", "epsilon-budget": True}, "epsilon-budget must be float"),
        ({"data-dir": "/d", "epsilon-budget": -1.0}, "epsilon-budget must be > 0"),
    ],
)
def test_node_config_refuses_unknown_keys_and_wrong_types(
    node_config: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        resolve_node_data(node_config, RunConfig())
    if "unknown" in message:  # the known keys are listed
        assert "epsilon-budget" in str(caught.value) and "manifest" in str(caught.value)


def test_node_config_accepts_what_flower_and_users_pass() -> None:
    parsed = NodeConfig.parse({"data-dir": "/d", "epsilon-budget": 3, "threads": 2})
    assert parsed == NodeConfig(data_dir="/d", epsilon_budget=3.0, threads=2)
    node = resolve_node_data({"partition-id": 1, "num-partitions": 4}, RunConfig())
    assert node.partition == (1, 4) and node.threads == 1


def test_simulated_node_ledger_lives_in_the_run_folder() -> None:
    cfg = RunConfig.from_flat({"out-dir": "/runs/a", "partition-budgets": "2=0.5"})
    node = resolve_node_data({"partition-id": 2, "num-partitions": 4}, cfg)
    assert node.ledger_file.parent == Path("/runs/a/client-state")
    assert node.epsilon_budget == 0.5 and node.partition == (2, 4)
    with pytest.raises(ConfigError, match="partition-id"):
        resolve_node_data({}, cfg)


def test_holdout_and_partitions_are_disjoint_and_deterministic(tmp_path: Path) -> None:
    # Prepare: a manifest of 8 speakers x 3 utterances (the split reads no audio)
    rows = [
        Utterance(tmp_path / f"{s}{i}.wav", "hello", f"spk{s}", 1.0)
        for s in range(8)
        for i in range(3)
    ]
    write_manifest(tmp_path / "corpus.tsv", rows)
    cfg = RunConfig.from_flat({"corpus": str(tmp_path / "corpus.tsv"), "holdout-speakers": 2})
    # Execute
    parts = [read_manifest(client_manifest(cfg, tmp_path / "data", i, 3)) for i in range(3)]
    again = read_manifest(client_manifest(cfg, tmp_path / "data", 1, 3))
    heldout, _ = hold_out_speakers(read_manifest(tmp_path / "corpus.tsv"), 2, seed=0)
    # Assert
    client_speakers = [{u.speaker for u in p} for p in parts]
    held = {u.speaker for u in heldout}
    assert len(held) == 2 and all(not (s & held) for s in client_speakers)
    assert sum(len(p) for p in parts) == 18 and again == parts[1]


def test_a_simulated_node_reads_only_a_prepared_partition_and_builds_nothing(
    tmp_path: Path,
) -> None:
    # Prepare: the synthetic corpus (the default) was never built: nothing was prepared
    data = tmp_path / "data"
    cfg = RunConfig.from_flat({"data-dir": str(data), "synthetic-utterances": 12})
    node = resolve_node_data({"partition-id": 1, "num-partitions": 2}, cfg)
    # Execute / Assert: the node fails, naming its partition, and builds no corpus
    with pytest.raises(FedspeechDataError, match=r"partition 1/2: no prepared split"):
        load_node_examples(node, cfg)
    assert not data.exists()


def test_the_prepared_partition_is_the_one_the_simulation_wrote(tmp_path: Path) -> None:
    # Prepare: a corpus manifest of 6 speakers (the split reads no audio)
    rows = [
        Utterance(tmp_path / f"{s}{i}.wav", "hi", f"spk{s}", 1.0)
        for s in range(6)
        for i in range(2)
    ]
    write_manifest(tmp_path / "corpus.tsv", rows)
    cfg = RunConfig.from_flat({"corpus": str(tmp_path / "corpus.tsv"), "holdout-speakers": 1})
    with pytest.raises(FedspeechDataError, match="no prepared split"):
        prepared_client_manifest(cfg, tmp_path / "data", 0, 2)
    # Execute: the simulation's side prepares every partition, the node's side looks one up
    written = client_manifest(cfg, tmp_path / "data", 0, 2)
    found = prepared_client_manifest(cfg, tmp_path / "data", 1, 2)
    # Assert
    assert found == written.parent.parent / "client_1" / "manifest.tsv"
    assert len(read_manifest(found)) == 4
    with pytest.raises(FedspeechDataError, match="not in"):
        prepared_client_manifest(cfg, tmp_path / "data", 2, 2)
