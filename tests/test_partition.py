"""Partitioning a corpus into federated clients: coverage, disjointness, balance, skew, seeds."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedspeech_features.manifest import Utterance, read_manifest
from fedspeech_features.partition import (
    PARTITION_METHODS,
    PartitionError,
    partition_dirichlet,
    partition_utterances,
    summary_table,
    write_partitions,
)


def _corpus(counts: dict[str, int]) -> list[Utterance]:
    """Utterances of speakers with the given counts (1 s each), interleaved like a real manifest."""
    utts = []
    for spk, n in counts.items():
        for i in range(n):
            utts.append(Utterance(Path(f"/data/{spk}/{i}.wav"), f"utt {i}", spk, 1.0 + i % 3))
    return sorted(utts, key=lambda u: (u.path.stem, u.speaker))


def _assert_exact_cover(corpus: list[Utterance], parts: list[list[Utterance]]) -> None:
    flat = [u for part in parts for u in part]
    assert Counter(flat) == Counter(corpus), "every utterance exactly once"
    assert all(parts), "no empty client"


UNEVEN = {f"s{i:02d}": n for i, n in enumerate([40, 35, 30, 12, 10, 9, 8, 5, 3, 2, 1, 1])}


# ----------------------------------------------------------------------------- by speaker
def test_by_speaker_keeps_speakers_disjoint_and_balances_counts() -> None:
    corpus = _corpus(UNEVEN)  # 156 utterances
    parts = partition_utterances(corpus, 4, "speaker", seed=3)
    _assert_exact_cover(corpus, parts)
    speaker_sets = [{u.speaker for u in part} for part in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not speaker_sets[i] & speaker_sets[j]
    sizes = sorted(len(p) for p in parts)
    assert sizes == [38, 39, 39, 40]  # 156 / 4 = 39 (one speaker alone holds 40)
    # within a client the input order is kept
    for part in parts:
        assert part == sorted(part, key=corpus.index)


def test_by_speaker_is_deterministic_and_rejects_too_few_speakers() -> None:
    corpus = _corpus({f"s{i}": 5 for i in range(8)})  # all ties: the seed decides
    a = partition_utterances(corpus, 3, "speaker", seed=1)
    assert a == partition_utterances(corpus, 3, "speaker", seed=1)
    assert any(partition_utterances(corpus, 3, "speaker", seed=s) != a for s in range(2, 6)), (
        "the seed should matter when speakers tie"
    )
    with pytest.raises(PartitionError, match="3 speakers into 4 clients"):
        partition_utterances(_corpus({"a": 9, "b": 9, "c": 9}), 4, "speaker")


def test_by_speaker_on_real_fsdd(shared_data: Path) -> None:
    corpus = read_manifest(shared_data / "fsdd" / "manifest.tsv")
    parts = partition_utterances(corpus, 3, "speaker", seed=0)
    _assert_exact_cover(corpus, parts)
    assert [len(p) for p in parts] == [1000, 1000, 1000]
    assert all(len({u.speaker for u in p}) == 2 for p in parts)


# ----------------------------------------------------------------------------- iid
def test_iid_even_sizes_deterministic_and_mixed() -> None:
    corpus = _corpus(UNEVEN)
    parts = partition_utterances(corpus, 5, "iid", seed=7)
    _assert_exact_cover(corpus, parts)
    assert sorted(len(p) for p in parts) == [31, 31, 31, 31, 32]
    assert parts == partition_utterances(corpus, 5, "iid", seed=7)
    assert parts != partition_utterances(corpus, 5, "iid", seed=8)
    # shuffled, not chunked in order: the biggest speaker is spread over every client
    assert all(any(u.speaker == "s00" for u in p) for p in parts)


# ----------------------------------------------------------------------------- dirichlet
def _top_share(parts: list[list[Utterance]]) -> float:
    """Mean over speakers of the fraction of its utterances on its main client."""
    shares = []
    speakers = {u.speaker for p in parts for u in p}
    for spk in speakers:
        per_client = [sum(u.speaker == spk for u in p) for p in parts]
        shares.append(max(per_client) / sum(per_client))
    return sum(shares) / len(shares)


def test_dirichlet_skew_follows_alpha() -> None:
    corpus = _corpus({f"s{i:02d}": 40 for i in range(20)})
    skewed = partition_utterances(corpus, 4, "dirichlet", alpha=0.05, seed=0)
    middle = partition_utterances(corpus, 4, "dirichlet", alpha=0.5, seed=0)
    mixed = partition_utterances(corpus, 4, "dirichlet", alpha=100.0, seed=0)
    for parts in (skewed, middle, mixed):
        _assert_exact_cover(corpus, parts)
    # measured here: 0.89, 0.57, 0.28 (IID would give ~0.25+)
    assert _top_share(skewed) > 0.8  # each speaker mostly on one client
    assert 0.4 < _top_share(middle) < 0.8
    assert _top_share(mixed) < 0.35  # close to the IID 1/4 spread
    assert skewed == partition_utterances(corpus, 4, "dirichlet", alpha=0.05, seed=0)
    assert skewed != partition_utterances(corpus, 4, "dirichlet", alpha=0.05, seed=1)


def test_dirichlet_never_leaves_a_client_empty(caplog: pytest.LogCaptureFixture) -> None:
    # One speaker and tiny alpha: nearly every draw puts everything on one client
    corpus = _corpus({"only": 10})
    with caplog.at_level(logging.WARNING, logger="fedspeech"):
        parts = partition_dirichlet(corpus, 5, alpha=0.001, seed=0)
    _assert_exact_cover(corpus, parts)
    assert "stayed empty" in caplog.text
    with pytest.raises(PartitionError, match="alpha"):
        partition_dirichlet(corpus, 2, alpha=0.0)


# ----------------------------------------------------------------------------- all methods
@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 30), min_size=1, max_size=15),
    num_clients=st.integers(1, 8),
    method=st.sampled_from(PARTITION_METHODS),
    seed=st.integers(0, 2**16),
)
def test_every_method_covers_each_utterance_once(
    counts: list[int], num_clients: int, method: str, seed: int
) -> None:
    corpus = _corpus({f"s{i}": n for i, n in enumerate(counts)})
    enough = len(counts) >= num_clients if method == "speaker" else len(corpus) >= num_clients
    if not enough:
        with pytest.raises(PartitionError):
            partition_utterances(corpus, num_clients, method, seed=seed)  # type: ignore[arg-type]
        return
    parts = partition_utterances(corpus, num_clients, method, seed=seed, alpha=0.3)  # type: ignore[arg-type]
    assert len(parts) == num_clients
    _assert_exact_cover(corpus, parts)
    if method == "speaker":
        sizes = [len(p) for p in parts]
        # greedy largest-first bound: the gap is at most one speaker's utterances
        assert max(sizes) - min(sizes) <= max(counts)
        assert sum(len({u.speaker for u in p}) for p in parts) == len(counts)  # disjoint
    assert parts == partition_utterances(corpus, num_clients, method, seed=seed, alpha=0.3)  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    corpus = _corpus({"a": 3, "b": 3})
    with pytest.raises(PartitionError, match="unknown partition method"):
        partition_utterances(corpus, 2, "random")  # type: ignore[arg-type]
    with pytest.raises(PartitionError, match=">= 1"):
        partition_utterances(corpus, 0, "iid")
    with pytest.raises(PartitionError, match="6 utterances into 7 clients"):
        partition_utterances(corpus, 7, "iid")


# ----------------------------------------------------------------------------- output
def test_write_partitions_round_trip_with_real_audio(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = read_manifest(shared_data / "librispeech_samples" / "manifest.tsv")[:40]
    parts = partition_utterances(corpus, 3, "iid", seed=0)
    (tmp_path / "clients" / "client_7").mkdir(parents=True)
    (tmp_path / "clients" / "client_7" / "manifest.tsv").write_text("stale")

    with caplog.at_level(logging.WARNING, logger="fedspeech"):
        paths = write_partitions(parts, tmp_path / "clients")

    assert paths == [tmp_path / "clients" / f"client_{i}" / "manifest.tsv" for i in range(3)]
    for path, part in zip(paths, parts, strict=True):
        back = read_manifest(path)
        assert [u.path for u in back] == [u.path for u in part]  # points at the real audio
        assert all(u.path.is_file() for u in back)
        assert [(u.transcript, u.speaker) for u in back] == [
            (u.transcript, u.speaker) for u in part
        ]
    assert "client_7" in caplog.text  # a stale manifest is reported, not silently kept


def test_summary_table_lists_clients_and_totals() -> None:
    corpus = _corpus({"a": 4, "b": 2, "c": 6})  # durations 1, 2, 3 s cycling
    parts = partition_utterances(corpus, 2, "speaker", seed=0)
    table = summary_table(parts)
    lines = table.splitlines()
    assert lines[0].split() == ["client", "utterances", "minutes", "speakers"]
    total = lines[-1].split()
    total_minutes = sum(u.duration_s for u in corpus) / 60
    assert total == ["total", "12", f"{total_minutes:.1f}", "3"]
    client_rows = [line.split() for line in lines if line.startswith("client_")]
    assert [int(r[1]) for r in client_rows] == [len(p) for p in parts]
    assert sum(int(r[3]) for r in client_rows) == 3
