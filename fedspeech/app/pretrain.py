"""Public pre-training: a starting model that costs the clients no privacy.

DP-SGD from random weights on a few hundred utterances per client learns next to nothing at a
useful epsilon (docs/results.md). Weights trained on *public* data are free to use: the server
trains them before round 1 and sends them as round 1's global model. With ``pretrain-utterances``
> 0, ``fedspeech simulate`` builds a synthetic corpus with other sentences and voices than the
clients' (seed ``synthetic-seed + PUBLIC_SEED_OFFSET``), trains the run's model on it without DP
for ``pretrain-epochs``, and uses the result as ``init-model``. The model is cached in
``data-dir`` by everything that determines it, so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

from fedspeech.config import RunConfig

log = logging.getLogger("fedspeech")

PUBLIC_SEED_OFFSET = 1000  # the public corpus's seed: never one a client corpus uses by default


def public_pretrained_model(cfg: RunConfig, data_dir: str | Path) -> Path:
    """The model directory pre-trained on the public synthetic corpus (built once, then reused).

    Raises:
        ConfigError: ``pretrain-utterances`` is 0 (nothing to pre-train).
    """
    from fedspeech.config import ConfigError
    from fedspeech_client.central import train_central
    from fedspeech_features.corpora.synthetic import build_synthetic_corpus

    fed = cfg.fed
    if fed.pretrain_utterances < 1:
        raise ConfigError("pretrain-utterances must be >= 1 to pre-train")
    seed = cfg.data.synthetic_seed + PUBLIC_SEED_OFFSET
    train = replace(
        cfg.train, dp=False, epochs=fed.pretrain_epochs, noise_multiplier=None, target_epsilon=None
    )
    recipe = {
        "utterances": fed.pretrain_utterances,
        "seed": seed,
        "features": cfg.features.__dict__,
        "model": cfg.model.__dict__,
        "train": train.__dict__,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    model_dir = Path(data_dir) / f"pretrained-{key}"
    if (model_dir / "config.json").is_file():
        log.info("public pre-trained model: %s (cached)", model_dir)
        return model_dir
    manifest, _ = build_synthetic_corpus(
        Path(data_dir) / f"public-n{fed.pretrain_utterances}-s{seed}-{cfg.features.sample_rate}",
        num_utterances=fed.pretrain_utterances,
        seed=seed,
        sample_rate=cfg.features.sample_rate,
    )
    log.info(
        "public pre-training: %d synthetic utterances, %d epochs, no DP (costs no privacy)",
        fed.pretrain_utterances,
        fed.pretrain_epochs,
    )
    central = replace(cfg, train=train, fed=replace(fed, init_model=""))
    train_central(manifest, central, model_dir)
    return model_dir
