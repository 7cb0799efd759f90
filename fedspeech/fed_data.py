"""Federated data layout: one corpus -> held-out speakers (server eval) + N client partitions.

Server and simulated clients derive the same split independently (deterministic in the run config),
so no audio, feature or transcript ever travels: the server reads only the held-out speakers, each
virtual node only its own partition. Layout under the simulation's ``data-dir``::

    synthetic-n<utts>-s<seed>[-aug]-<rate>/  the synthetic corpus (fedspeech_features.corpora.synthetic)
    features/                                feature cache shared by the simulated nodes
    splits/<key>/client_<i>/manifest.tsv     partition i (key: corpus, holdout, method, N, seeds)
    splits/<key>/split.json                  parameters and counts, written last (= complete)

>>> from fedspeech_features.manifest import Utterance
>>> rows = [Utterance(Path(f"{s}{i}.wav"), "a", s, 1.0) for s in "abcdef" for i in range(2)]
>>> heldout, rest = hold_out_speakers(rows, 2, seed=0)
>>> len(heldout), len(rest), len({u.speaker for u in heldout})
(4, 8, 2)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fedspeech.config import RunConfig
from fedspeech_features.errors import FedspeechDataError
from fedspeech_features.files import atomic_write
from fedspeech_features.manifest import Utterance, read_manifest
from fedspeech_features.partition import partition_utterances, write_partitions

log = logging.getLogger(__name__)

_SPLIT_INFO = "split.json"


def corpus_manifest(cfg: RunConfig, data_dir: str | Path) -> Path:
    """The corpus manifest: ``corpus`` itself, or the synthetic corpus built once in ``data_dir``.

    Concurrent callers are safe: the synthetic builder holds a file lock and a finished build
    with the same parameters is a no-op.
    """
    data = cfg.data
    manifest = corpus_manifest_path(cfg, data_dir)
    if data.corpus != "synthetic":
        return manifest
    from fedspeech_features.corpora.synthetic import build_synthetic_corpus  # lazy: espeak, soxr

    built, _ = build_synthetic_corpus(
        manifest.parent,
        num_utterances=data.synthetic_utterances,
        seed=data.synthetic_seed,
        augment=data.synthetic_augment,
        sample_rate=cfg.features.sample_rate,
    )
    return built


def corpus_manifest_path(cfg: RunConfig, data_dir: str | Path) -> Path:
    """Where the corpus manifest is (or will be, for the synthetic corpus); builds nothing."""
    data = cfg.data
    if data.corpus != "synthetic":
        return Path(data.corpus)
    name = f"synthetic-n{data.synthetic_utterances}-s{data.synthetic_seed}"
    name += f"{'-aug' if data.synthetic_augment else ''}-{cfg.features.sample_rate}"
    return Path(data_dir) / name / "manifest.tsv"


def hold_out_speakers(
    utterances: Sequence[Utterance], num_speakers: int, *, seed: int
) -> tuple[list[Utterance], list[Utterance]]:
    """Split off every utterance of ``num_speakers`` seeded-random speakers: (held out, rest).

    Raises:
        FedspeechDataError: the corpus has no more than ``num_speakers`` speakers.
    """
    speakers = sorted({u.speaker for u in utterances})
    if num_speakers == 0:
        return [], list(utterances)
    if num_speakers >= len(speakers):
        raise FedspeechDataError(
            f"cannot hold out {num_speakers} of {len(speakers)} speakers: none left for clients"
        )
    order = np.random.default_rng(seed).permutation(len(speakers))
    chosen = {speakers[int(i)] for i in order[:num_speakers]}
    heldout = [u for u in utterances if u.speaker in chosen]
    return heldout, [u for u in utterances if u.speaker not in chosen]


def heldout_utterances(cfg: RunConfig, data_dir: str | Path) -> list[Utterance]:
    """The server's evaluation utterances: ``eval-manifest``, else the held-out speakers.

    The ``eval-max-utterances`` cap keeps an evenly spaced subset (deterministic).
    """
    fed = cfg.fed
    if fed.eval_manifest:
        rows = read_manifest(fed.eval_manifest)
    else:
        everything = read_manifest(corpus_manifest(cfg, data_dir))
        rows, _ = hold_out_speakers(everything, fed.holdout_speakers, seed=cfg.data.partition_seed)
    if fed.eval_max_utterances and len(rows) > fed.eval_max_utterances:
        picks = np.linspace(0, len(rows) - 1, fed.eval_max_utterances).round().astype(int)
        rows = [rows[int(i)] for i in picks]
    return rows


def client_manifest(
    cfg: RunConfig, data_dir: str | Path, partition_id: int, num_partitions: int
) -> Path:
    """Partition ``partition_id`` of ``num_partitions`` (held-out speakers removed), on disk.

    The first caller writes every partition's manifest under a file lock; the others (virtual
    nodes starting at the same moment, later rounds) find the finished split and only read. A
    finished split costs a caller O(1) file operations, whatever ``num_partitions`` is: its
    ``split.json`` (written last) and its own manifest, without the lock.

    Raises:
        FedspeechDataError: bad partition id, or the corpus cannot be split so.
    """
    if not 0 <= partition_id < num_partitions:
        raise FedspeechDataError(f"partition-id {partition_id} not in [0, {num_partitions})")
    manifest = corpus_manifest(cfg, data_dir)
    params = _split_params(cfg, manifest, num_partitions)
    root = _split_root(cfg, manifest, data_dir, num_partitions)
    target = root / f"client_{partition_id}" / "manifest.tsv"
    if _is_complete(root, params) and target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root):
        if not (_is_complete(root, params) and target.is_file()):
            _write_split(cfg, manifest, root, params, num_partitions)
    return target


def prepared_client_manifest(
    cfg: RunConfig, data_dir: str | Path, partition_id: int, num_partitions: int
) -> Path:
    """A simulated node's partition manifest, as ``client_manifest`` wrote it; prepares nothing.

    What a ClientApp calls: the simulation prepares the corpus and every partition before Flower
    starts (``fedspeech simulate``'s pre-flight), so a node only reads its own manifest, and a
    round costs it a ``stat`` of the corpus manifest and one small JSON read.

    Raises:
        FedspeechDataError: bad partition id, or no finished split for this run config.
    """
    if not 0 <= partition_id < num_partitions:
        raise FedspeechDataError(f"partition-id {partition_id} not in [0, {num_partitions})")
    manifest = corpus_manifest_path(cfg, data_dir)
    missing = (
        f"partition {partition_id}/{num_partitions}: no prepared split under "
        f"{Path(data_dir) / 'splits'} for this run config (`fedspeech simulate` prepares the "
        "corpus and every partition before Flower starts; a real node names its own data "
        "with the `manifest` or `data-dir` node config)"
    )
    if not manifest.is_file():
        raise FedspeechDataError(f"{missing}; the corpus manifest {manifest} does not exist")
    root = _split_root(cfg, manifest, data_dir, num_partitions)
    target = root / f"client_{partition_id}" / "manifest.tsv"
    if not (_is_complete(root, _split_params(cfg, manifest, num_partitions)) and target.is_file()):
        raise FedspeechDataError(missing)
    return target


def feature_cache_dir(data_dir: str | Path) -> Path:
    """Feature cache shared by the simulated nodes (entries are keyed by audio content)."""
    return Path(data_dir) / "features"


def _split_root(cfg: RunConfig, manifest: Path, data_dir: str | Path, num_partitions: int) -> Path:
    """The folder of the split these parameters define (a hash of them)."""
    params = _split_params(cfg, manifest, num_partitions)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(data_dir) / "splits" / key


def _split_params(cfg: RunConfig, manifest: Path, num_partitions: int) -> dict[str, object]:
    stat = manifest.stat()
    return {
        # the corpus file's identity: a rebuilt or edited manifest gets a new split
        "corpus": str(manifest.resolve()),
        "corpus_size": stat.st_size,
        "corpus_mtime_ns": stat.st_mtime_ns,
        "holdout_speakers": cfg.fed.holdout_speakers,
        "num_partitions": num_partitions,
        "partition": cfg.data.partition,
        "partition_seed": cfg.data.partition_seed,
        "dirichlet_alpha": cfg.data.dirichlet_alpha,
    }


def _write_split(
    cfg: RunConfig, manifest: Path, root: Path, params: dict[str, object], num_partitions: int
) -> None:
    everything = read_manifest(manifest)
    heldout, rest = hold_out_speakers(
        everything, cfg.fed.holdout_speakers, seed=cfg.data.partition_seed
    )
    parts = partition_utterances(
        rest,
        num_partitions,
        cfg.data.partition,
        seed=cfg.data.partition_seed,
        alpha=cfg.data.dirichlet_alpha,
    )
    write_partitions(parts, root)
    info = {**params, "heldout": len(heldout), "clients": [len(p) for p in parts]}
    atomic_write(root / _SPLIT_INFO, json.dumps(info, indent=2) + "\n")
    log.info(
        "split %s: %d held-out utterances, clients %s",
        root,
        len(heldout),
        [len(p) for p in parts],
    )


def _is_complete(root: Path, params: dict[str, object]) -> bool:
    """Whether ``root`` holds a finished split with ``params`` (``split.json`` is written last)."""
    try:
        info = json.loads((root / _SPLIT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    clients = info.get("clients")
    return (
        {k: info.get(k) for k in params} == params
        and isinstance(clients, list)
        and len(clients) == params["num_partitions"]
    )


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    with (root / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
