"""Run configuration: one flat kebab-case table (pyproject ``[tool.flwr.app.config]``) -> frozen dataclasses.

Every section dataclass owns a disjoint set of keys; ``RunConfig.from_flat`` rejects unknown keys and
values of the wrong type, so a typo in a preset or ``--run-config`` fails loudly instead of silently
falling back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from fedspeech.model_config import CellType, ModelConfig
from fedspeech.privacy_config import PrivacyConfig
from fedspeech.secagg_config import SecAggConfig
from fedspeech.strict import StrictError, check_keys, field_keys, kebab, parse_dataclass
from fedspeech.train_config import TrainConfig
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.partition import PartitionMethod


class ConfigError(ValueError):
    """A run-config key that is unknown, or a value of the wrong type or range."""


@dataclass(frozen=True)
class DataConfig:
    """Which corpus to use and how it is split into clients."""

    corpus: str = "synthetic"  # "synthetic" or a path to a manifest.tsv
    synthetic_utterances: int = 1200
    synthetic_seed: int = 0
    synthetic_augment: bool = False
    num_partitions: int = 6
    partition: PartitionMethod = "speaker"
    dirichlet_alpha: float = 0.5
    partition_seed: int = 0

    def __post_init__(self) -> None:
        if self.synthetic_utterances < 1:
            raise ConfigError("synthetic-utterances must be >= 1")
        if self.num_partitions < 1:
            raise ConfigError("num-partitions must be >= 1")
        if self.dirichlet_alpha <= 0:
            raise ConfigError("dirichlet-alpha must be > 0")


@dataclass(frozen=True)
class ModelSection:
    """Model size knobs; input width and vocabulary follow from the features and tokenizer."""

    hidden_size: int = 256
    num_layers: int = 3
    bidirectional: bool = True
    rnn_cell: CellType = "gru"
    dropout: float = 0.1
    frontend_dim: int = 0
    adapter_rank: int = 0

    def model_config(self, input_dim: int, vocab_size: int) -> ModelConfig:
        """The full ``ModelConfig`` for features of width ``input_dim``."""
        return ModelConfig(
            input_dim=input_dim,
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            cell=self.rnn_cell,
            dropout=self.dropout,
            frontend_dim=self.frontend_dim,
            adapter_rank=self.adapter_rank,
        )


StrategyName = Literal["fedavg", "fedadam", "fedprox", "fedmedian"]


@dataclass(frozen=True)
class FedConfig:
    """Federation knobs: rounds, sampling, strategy, privacy budget, evaluation, outputs.

    Relative paths (``data-dir``, ``out-dir``, ``eval-manifest``, ``init-model``) resolve against
    the working directory of the Flower processes; ``fedspeech simulate`` passes absolute ones.
    """

    num_server_rounds: int = 3
    fraction_train: float = 1.0  # share of connected nodes sampled per round
    clients_per_round: int = 0  # sample exactly this many nodes per round (0: fraction-train)
    # Poisson sampling: each node joins a round with this probability; user-level DP always
    # samples so (0: q derived from clients-per-round or fraction-train, fedspeech_server.sampling)
    client_sample_rate: float = 0.0
    min_clients: int = 2  # wait for this many nodes; sample at least this many
    strategy: StrategyName = "fedavg"
    server_lr: float = 0.01  # FedAdam's server step size (eta)
    proximal_mu: float = 0.0  # FedProx's proximal weight, sent to clients
    epsilon_budget: float | None = None  # per-client lifetime epsilon; None: no limit
    partition_budgets: str = ""  # simulation: per-partition budgets, "3=0.5,5=2"
    planned_rounds: int = 0  # rounds target-epsilon is spread over; 0: num-server-rounds
    holdout_speakers: int = 2  # corpus speakers kept from every client, for central eval
    eval_manifest: str = ""  # server-side eval manifest; "": the held-out speakers
    eval_max_utterances: int = 0  # cap on central-eval utterances (0: all)
    init_model: str = ""  # model directory to start from (e.g. pre-trained); "": fresh
    pretrain_utterances: int = 0  # simulate: pre-train on this many public synthetic utterances
    pretrain_epochs: int = 10  # epochs of that (non-private) pre-training
    data_dir: str = ".fedspeech/data"  # simulation: corpus, partitions, feature cache
    out_dir: str = ".fedspeech/run"  # run folder: checkpoint, final model, round log
    resume: bool = False  # continue from out-dir's checkpoint
    round_timeout: float = 3600.0  # seconds to wait for a round's replies
    min_successful_clients: int = 1  # accepted updates a round needs, else retry, then stop
    round_retries: int = 1  # re-sends of a round short of min-successful-clients before stopping
    client_threads: int = 1  # torch threads per ClientApp (0: torch's default)
    server_threads: int = 1  # torch threads of the ServerApp (central evaluation; 0: default)
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "fedspeech"
    run_name: str = ""  # "": derived from the out-dir name

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1 or self.min_clients < 1:
            raise ConfigError("num-server-rounds and min-clients must be >= 1")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError("fraction-train must be in (0, 1]")
        if self.strategy not in get_args(StrategyName):
            raise ConfigError(f"strategy must be one of {get_args(StrategyName)}")
        if self.server_lr <= 0 or self.proximal_mu < 0 or self.round_timeout <= 0:
            raise ConfigError("server-lr and round-timeout must be > 0, proximal-mu >= 0")
        if self.epsilon_budget is not None and self.epsilon_budget <= 0:
            raise ConfigError('epsilon-budget must be > 0 (or "" for none)')
        if min(self.planned_rounds, self.holdout_speakers, self.eval_max_utterances) < 0:
            raise ConfigError("planned-rounds, holdout-speakers, eval-max-utterances must be >= 0")
        if self.client_threads < 0 or self.server_threads < 0:
            raise ConfigError("client-threads and server-threads must be >= 0")
        if self.pretrain_utterances < 0 or self.pretrain_epochs < 1:
            raise ConfigError("pretrain-utterances must be >= 0 and pretrain-epochs >= 1")
        if self.clients_per_round < 0:
            raise ConfigError("clients-per-round must be >= 0 (0: sample fraction-train)")
        if not 0 <= self.client_sample_rate <= 1:
            raise ConfigError(
                f"client-sample-rate must be in [0, 1] (0: derived), got {self.client_sample_rate}"
            )
        if self.min_successful_clients < 1 or self.round_retries < 0:
            raise ConfigError("min-successful-clients must be >= 1 and round-retries >= 0")
        _parse_budgets(self.partition_budgets)  # fail at config time, not in round 1

    @property
    def rounds_planned(self) -> int:
        """Rounds a client's target epsilon is spread over."""
        return self.planned_rounds or self.num_server_rounds

    def budget_for_partition(self, partition_id: int | None) -> float | None:
        """The epsilon budget of a simulated partition (``partition-budgets`` or the default)."""
        budgets = _parse_budgets(self.partition_budgets)
        if partition_id is not None and partition_id in budgets:
            return budgets[partition_id]
        return self.epsilon_budget


def _parse_budgets(text: str) -> dict[int, float]:
    """``"3=0.5,5=2"`` -> ``{3: 0.5, 5: 2.0}``; raises ConfigError on anything else."""
    budgets: dict[int, float] = {}
    for item in text.replace(",", " ").split():
        key, _, value = item.partition("=")
        try:
            partition, budget = int(key), float(value)
        except ValueError:
            budget = 0.0
        if budget <= 0:
            raise ConfigError(f"partition-budgets: {item!r} is not PARTITION=EPSILON (> 0)")
        budgets[partition] = budget
    return budgets


@dataclass(frozen=True)
class RunConfig:
    """The whole resolved run configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def __post_init__(self) -> None:
        rank, trainable = self.model.adapter_rank, self.train.trainable
        if rank < 0 or (rank == 0) == (trainable == "adapters"):
            raise ConfigError(
                f"adapter-rank {rank} with trainable = {trainable!r}: low-rank adapters train only "
                'with trainable = "adapters", which needs adapter-rank >= 1 (e.g. 8)'
            )
        if rank and self.model.rnn_cell != "gru":
            raise ConfigError(f"adapter-rank needs rnn-cell = 'gru', got {self.model.rnn_cell!r}")
        if self.train.freeze_layers > self.model.num_layers:
            raise ConfigError(
                f"freeze-layers {self.train.freeze_layers} > num-layers {self.model.num_layers}"
                " (freeze-layers = num-layers already leaves only the output head to train)"
            )
        unit = self.privacy.privacy_unit
        if unit != "sample" and not self.train.dp:
            raise ConfigError(
                f"privacy-unit {unit!r} with dp = false: dp = false is the non-private baseline; "
                'set dp = true (with privacy-unit = "user" the clients then train without DP-SGD)'
            )
        if self.privacy.user_level and self.fed.strategy == "fedmedian":
            raise ConfigError(
                f"privacy-unit {unit!r} needs strategy fedavg, fedprox or fedadam: user-level DP "
                "noises a mean of clipped updates, and a median has no such bound"
            )
        if self.secagg.secure_aggregation:
            self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        fed = self.fed
        if fed.strategy == "fedmedian":
            raise ConfigError(
                "secure-aggregation needs strategy fedavg, fedprox or fedadam: the server sees "
                "only the sum of the updates, and a median cannot be computed from a sum"
            )
        if 0 < fed.clients_per_round < 3:  # a smaller sample is refused at run time
            raise ConfigError(
                "secure-aggregation needs at least 3 clients a round (clients-per-round): with 2, "
                "each client learns the other's update from the sum"
            )
        if fed.clients_per_round > self.secagg.max_clients():
            raise ConfigError(
                f"clients-per-round {fed.clients_per_round} would overflow the secure sum: at most "
                f"{self.secagg.max_clients()} with secagg-quantization-range "
                f"{self.secagg.secagg_quantization_range}"
            )

    @property
    def sample_level_dp(self) -> bool:
        """Clients train with DP-SGD (``dp`` on, unit ``sample`` or ``both``)."""
        return self.train.dp and self.privacy.sample_level

    @property
    def user_level_dp(self) -> bool:
        """The server clips and noises client updates (``dp`` on, unit ``user`` or ``both``)."""
        return self.train.dp and self.privacy.user_level

    @property
    def poisson_sampling(self) -> bool:
        """Rounds draw their clients by Poisson sampling (``fedspeech_server.sampling``): always with
        user-level DP (its accountant assumes it), else when ``client-sample-rate`` is set."""
        return self.user_level_dp or self.fed.client_sample_rate > 0

    @property
    def secure_aggregation(self) -> bool:
        """Rounds run through SecAgg+: the server sees only the sum of the updates."""
        return self.secagg.secure_aggregation

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from a flat kebab-case mapping; unknown keys and wrong types raise ConfigError.

        Each section takes its own keys (``fedspeech.strict`` checks their values); keys that no
        section takes are reported after the sections, with every known key listed.
        """
        try:
            sections: dict[str, Any] = {
                name: parse_dataclass(
                    section_type, flat, what=f"{name} config", key=kebab, ignore_unknown=True
                )
                for name, section_type in _section_types().items()
            }
            check_keys(flat, flat_keys(), what="run-config")
        except StrictError as exc:
            raise ConfigError(str(exc)) from exc
        return cls(**sections)

    def to_flat(self) -> dict[str, Any]:
        """The flat kebab-case form (e.g. for MLflow params or a config.json)."""
        out: dict[str, Any] = {}
        for section in fields(self):
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                # TOML and Flower run configs have no null: an unset optional is "".
                out[kebab(key)] = "" if value is None else value
        return out


def _section_types() -> dict[str, type]:
    return {
        "data": DataConfig,
        "features": FeatureConfig,
        "model": ModelSection,
        "train": TrainConfig,
        "fed": FedConfig,
        "privacy": PrivacyConfig,
        "secagg": SecAggConfig,
    }


def flat_keys() -> set[str]:
    """Every kebab-case key the run config accepts."""
    return {k for t in _section_types().values() for k in field_keys(t, kebab)}


# What ``--resume`` may change in a run's saved configuration: how long it runs, where it is
# tracked, how long it waits, how many threads and which device it uses. Everything else (data,
# model, privacy, sampling, partitions) defines the run: changing it mid-run would train another
# model or break the privacy accounting, so it is refused.
RESUME_CHANGEABLE_KEYS = frozenset(
    {
        "num-server-rounds",
        "tracking-uri",
        "experiment-name",
        "run-name",
        "round-timeout",
        "round-retries",
        "client-threads",
        "server-threads",
        "device",
    }
)
# Read only when a run starts (its first model) or saying that it resumes: ignored on resume.
_IGNORED_ON_RESUME = frozenset({"resume", "init-model", "pretrain-utterances", "pretrain-epochs"})


def check_resume_changes(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """The keys ``requested`` changes against a run's ``saved`` config (changeable ones only).

    Raises:
        ConfigError: a key outside ``RESUME_CHANGEABLE_KEYS`` (and those a resume ignores)
            changes; every such key is named with its old and new value.
    """
    changed = sorted(k for k in requested if saved.get(k) != requested[k])
    unsafe = [k for k in changed if k not in RESUME_CHANGEABLE_KEYS | _IGNORED_ON_RESUME]
    if unsafe:
        details = ", ".join(f"{k} {saved.get(k)!r} -> {requested[k]!r}" for k in unsafe)
        raise ConfigError(
            f"--resume continues the run with its saved configuration and cannot change {details}; "
            f"it may change only {', '.join(sorted(RESUME_CHANGEABLE_KEYS))} "
            "(start a new run in another --run-dir folder to change the rest)"
        )
    return [k for k in changed if k not in _IGNORED_ON_RESUME]


def load_pyproject_config(pyproject: str | Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of a pyproject.toml."""
    with open(pyproject, "rb") as fh:
        data = tomllib.load(fh)
    try:
        table: dict[str, Any] = data["tool"]["flwr"]["app"]["config"]
    except KeyError as exc:
        raise ConfigError(f"{pyproject}: no [tool.flwr.app.config] table") from exc
    return table


# key = value, spaces around "=" allowed; the value is a TOML string (quoted, may hold spaces)
# or one bare word (a TOML number/boolean, else taken as a string).
_OVERRIDE = re.compile(
    r"""\s*(?P<key>[A-Za-z0-9_.-]+)\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|'[^']*'|[^\s"']+)\s*"""
)


# A key whose "=" is followed by nothing, or by the next key=...
_EMPTY_OVERRIDE = re.compile(r"\s*(?P<key>[A-Za-z0-9_.-]+)\s*=(?=\s*$|\s+[A-Za-z0-9_.-]+\s*=)")
_OVERRIDE_START = re.compile(r"[A-Za-z0-9_.-]+\s*=")


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"key=value key2 = 'a b'"``: TOML values, bare words are strings, spaces around
    ``=`` and quoted values with spaces allowed.

    >>> parse_overrides('num-server-rounds = 5 run-name="a b" dp=false corpus=x.tsv')
    {'num-server-rounds': 5, 'run-name': 'a b', 'dp': False, 'corpus': 'x.tsv'}

    Raises:
        ConfigError: text that is not a sequence of key=value pairs (the rest is quoted), or a
            key without a value (``dp= epochs=2`` would otherwise read ``epochs=2`` as dp's).
    """
    out: dict[str, Any] = {}
    position = 0
    while position < len(text.rstrip()):
        match = _OVERRIDE.match(text, position)
        empty = _EMPTY_OVERRIDE.match(text, position)
        if empty is not None and (match is None or _OVERRIDE_START.match(match["value"])):
            key = empty["key"]
            raise ConfigError(
                f'override {key!r} has no value (in {text!r}): give one, or write {key}="" '
                "for an empty string; quote a value that contains '='"
            )
        if match is None:
            rest = text[position:].strip()
            raise ConfigError(
                f"override {rest.split()[0]!r} is not key=value (in {text!r}; quote values "
                'with spaces: run-name="my run")'
            )
        raw = match["value"]
        try:
            out[match["key"]] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[match["key"]] = raw
        position = match.end()
    return out


def presets_dir() -> Path:
    """Where named presets (TOML) live: ``fedspeech/presets/``, shipped in the wheel."""
    return Path(__file__).resolve().parent / "presets"


# Where a resolved run-config value came from, lowest layer first.
ConfigSource = Literal["default", "pyproject", "preset", "command line"]


def project_dir() -> Path:
    """Where the pyproject layer of the run config is read: the source checkout, else the cwd.

    Run from a checkout (an editable install), its ``pyproject.toml`` is the app's; an installed
    wheel has none, and a ``pyproject.toml`` of project ``fedspeech`` in the cwd is used if any.
    """
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def resolve_run_config(
    preset: str | None = None, overrides: str | Mapping[str, Any] = "", *, cwd: Path | None = None
) -> RunConfig:
    """Layer the run config: defaults <- ./pyproject.toml <- preset <- overrides.

    ``preset`` is a TOML file path or the name of ``fedspeech/presets/<name>.toml``; its top level is the
    same flat kebab-case table as ``[tool.flwr.app.config]``. ``cwd``: the folder whose
    ``pyproject.toml`` (of project ``fedspeech``) is the pyproject layer (default: the cwd).
    """
    return resolve_run_config_sources(preset, overrides, cwd=cwd)[0]


def resolve_run_config_sources(
    preset: str | None = None, overrides: str | Mapping[str, Any] = "", *, cwd: Path | None = None
) -> tuple[RunConfig, dict[str, ConfigSource]]:
    """``resolve_run_config`` and, for every key, the layer its value came from.

    A key no layer sets is ``"default"``; ``overrides`` is the ``"command line"`` layer. A
    ``target-epsilon`` set in a layer blanks an earlier layer's ``noise-multiplier`` (and vice
    versa): the blanked key's source is the layer that blanked it.
    """
    layers: list[tuple[ConfigSource, dict[str, Any]]] = []
    pyproject = (cwd or Path.cwd()) / "pyproject.toml"
    if pyproject.is_file():
        project = _load_toml(pyproject)
        if project.get("project", {}).get("name") == "fedspeech":
            layers.append(("pyproject", dict(project["tool"]["flwr"]["app"]["config"])))
    if preset:
        layers.append(("preset", _read_preset(preset)))
    given = parse_overrides(overrides) if isinstance(overrides, str) else dict(overrides)
    layers.append(("command line", given))
    merged: dict[str, Any] = {}
    sources: dict[str, ConfigSource] = {}
    for source, layer in layers:
        # The privacy level is set one way or the other: a target epsilon given in a later layer
        # replaces a noise multiplier from an earlier one (and vice versa).
        for key, other in (
            ("target-epsilon", "noise-multiplier"),
            ("noise-multiplier", "target-epsilon"),
        ):
            if layer.get(key) not in (None, "") and other not in layer:
                merged[other] = ""
                sources[other] = source
        merged.update(layer)
        sources.update(dict.fromkeys(layer, source))
    cfg = RunConfig.from_flat(merged)
    return cfg, {key: sources.get(key, "default") for key in cfg.to_flat()}


def _load_toml(path: Path) -> dict[str, Any]:
    """A TOML file's table; a malformed file is a ConfigError naming it and the line."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _read_preset(preset: str) -> dict[str, Any]:
    path = Path(preset)
    if not path.is_file():
        path = presets_dir() / f"{preset}.toml"
    if not path.is_file():
        names = sorted(p.stem for p in presets_dir().glob("*.toml"))
        raise ConfigError(f"preset {preset!r} not found (a TOML file or one of {names})")
    table = _load_toml(path)
    if isinstance(table.get("recipe"), dict):
        raise ConfigError(
            f"{path} is a recipe (run it with `python experiments/recipes.py {path.stem} MODE`), "
            "not a preset"
        )
    return table
