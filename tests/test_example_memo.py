"""A node's examples stay in memory between rounds only while its files are unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedspeech.config import RunConfig
from fedspeech.pipeline import load_examples
from fedspeech_client.example_memo import ExampleMemo, Loaded
from fedspeech_client.local_round import load_node_examples
from fedspeech_client.node_state import resolve_node_data
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.manifest import Utterance, write_manifest


def _wav(path: Path, seconds: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32), 16_000)
    return path


def _node(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A node folder: a manifest of two good utterances and a missing file."""
    wavs = [_wav(tmp_path / f"u{i}.wav", 1.0, seed=i) for i in range(2)]
    rows = [Utterance(w, "hello there", "spk", 1.0) for w in wavs]
    rows.append(Utterance(tmp_path / "late.wav", "hello", "spk", 1.0))  # not there yet
    write_manifest(tmp_path / "manifest.tsv", rows)
    return tmp_path / "manifest.tsv", wavs


def _bump(path: Path) -> None:
    """A new modification time, as an edit gives (the content need not differ)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


@pytest.fixture()
def memo(monkeypatch: pytest.MonkeyPatch) -> ExampleMemo:
    memo = ExampleMemo()
    monkeypatch.setattr("fedspeech_client.local_round.MEMO", memo)
    return memo


def test_a_node_reads_its_files_once_and_again_when_any_changes(
    tmp_path: Path, memo: ExampleMemo
) -> None:
    # Prepare: a real node's data
    manifest, wavs = _node(tmp_path)
    cfg = RunConfig.from_flat({})
    node = resolve_node_data({"manifest": str(manifest)}, cfg)
    # Execute: round 1 reads, round 2 is unchanged
    first, metrics = load_node_examples(node, cfg)
    second, again = load_node_examples(node, cfg)
    # Assert: the same examples and skip counts, read once
    assert (memo.misses, memo.hits) == (1, 1)
    assert second is first and again == metrics and metrics["skipped-utterances"] == 1.0
    # Execute / Assert: an edited audio file, a file that appears, an edited manifest: read again
    _wav(wavs[0], 0.5, seed=7)
    _bump(wavs[0])
    third, _ = load_node_examples(node, cfg)
    assert memo.misses == 2 and third[0].feats.shape[0] < first[0].feats.shape[0]
    _wav(tmp_path / "late.wav", 1.0, seed=3)
    fourth, metrics = load_node_examples(node, cfg)
    assert memo.misses == 3 and len(fourth) == 3 and metrics["skipped-utterances"] == 0.0
    write_manifest(manifest, [Utterance(wavs[1], "hello there", "spk", 1.0)])
    _bump(manifest)
    fifth, _ = load_node_examples(node, cfg)
    assert memo.misses == 4 and [e.path for e in fifth] == [wavs[1]]
    assert load_node_examples(node, cfg)[0] is fifth and memo.hits == 2


def test_other_feature_settings_are_another_entry(tmp_path: Path, memo: ExampleMemo) -> None:
    manifest, _ = _node(tmp_path)
    node_cfgs = [RunConfig.from_flat({}), RunConfig.from_flat({"n-mfcc": 20})]
    nodes = [resolve_node_data({"manifest": str(manifest)}, cfg) for cfg in node_cfgs]
    dims = {
        load_node_examples(n, c)[0][0].feats.shape[1] for n, c in zip(nodes, node_cfgs, strict=True)
    }
    assert memo.misses == 2 and memo.hits == 0 and len(dims) == 2


def test_entries_past_the_budget_are_evicted_oldest_first(tmp_path: Path) -> None:
    # Prepare: three nodes' folders; a budget that holds two nodes' tensors
    nodes = []
    for name in "abc":
        (tmp_path / name).mkdir()
        nodes.append(_node(tmp_path / name)[0])
    cfg = FeatureConfig()
    probe = ExampleMemo()
    probe.get(nodes[0], cfg, None, lambda: _load(nodes[0]))
    memo = ExampleMemo(budget_bytes=2 * probe.nbytes)
    # Execute: a, b, then a again (a is now the newest), then c
    for manifest in (nodes[0], nodes[1], nodes[0], nodes[2]):
        memo.get(manifest, cfg, None, lambda m=manifest: _load(m))
    # Assert: b was the oldest, so it went; a and c stay
    assert (memo.misses, memo.hits) == (3, 1) and memo.nbytes <= memo.budget_bytes
    assert memo.get(nodes[1], cfg, None, lambda: _load(nodes[1]))[1] is False
    assert memo.get(nodes[2], cfg, None, lambda: _load(nodes[2]))[1] is True


def _load(manifest: Path) -> Loaded:
    examples, report, _ = load_examples(manifest, FeatureConfig())
    return examples, report
