"""``make demo`` / ``fedspeech demo``: the whole pipeline on the built-in synthetic corpus.

Today: synthesize the corpus, partition it by voice into clients, extract each client's features
(cached). Federated private training and transcription join as they land.
"""

from __future__ import annotations

import logging
from pathlib import Path

from features.corpora.synthetic import build_synthetic_corpus
from features.manifest import read_manifest
from features.partition import partition_utterances, summary_table, write_partitions
from fedspeech.config import resolve_run_config
from fedspeech.pipeline import FeatureSummary, load_examples

log = logging.getLogger("fedspeech")


def run_demo(out: Path, *, preset: str | None = None, overrides: str = "") -> list[FeatureSummary]:
    """Run the demo in ``out``; returns the per-client feature summaries (also printed)."""
    cfg = resolve_run_config(preset, overrides)
    data = cfg.data
    if data.corpus == "synthetic":
        log.info("step 1/3: synthetic corpus, %d utterances", data.synthetic_utterances)
        manifest, _ = build_synthetic_corpus(
            out / "corpus",
            num_utterances=data.synthetic_utterances,
            seed=data.synthetic_seed,
            augment=data.synthetic_augment,
            sample_rate=cfg.features.sample_rate,
        )
    else:
        manifest = Path(data.corpus)
        log.info("step 1/3: corpus %s", manifest)
    utterances = read_manifest(manifest)

    log.info("step 2/3: %d clients, partitioned by %s", data.num_partitions, data.partition)
    parts = partition_utterances(
        utterances,
        data.num_partitions,
        data.partition,
        seed=data.partition_seed,
        alpha=data.dirichlet_alpha,
    )
    client_manifests = write_partitions(parts, out / "clients")
    print(summary_table(parts))

    log.info(
        "step 3/3: features (%d-dim frames, cached in %s)", cfg.features.frame_dim, out / "cache"
    )
    summaries = []
    for path in client_manifests:
        _, _, summary = load_examples(path, cfg.features, cache_root=out / "cache")
        summaries.append(summary)
        print(summary)
    print(
        f"demo: {sum(s.examples for s in summaries)} examples ready for training in "
        f"{len(summaries)} clients ({sum(s.skipped for s in summaries)} skipped); "
        f"outputs in {out}"
    )
    return summaries
