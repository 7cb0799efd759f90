"""The pyproject run config and the config dataclasses are one source of truth."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedspeech.config import (
    ConfigError,
    RunConfig,
    flat_keys,
    load_pyproject_config,
    parse_overrides,
    project_dir,
    resolve_run_config,
    resolve_run_config_sources,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_keys_equal_dataclass_fields() -> None:
    # Prepare
    table = load_pyproject_config(PYPROJECT)
    # Assert: no key without a field, no field without a key
    assert set(table) == flat_keys()


def test_pyproject_values_equal_dataclass_defaults() -> None:
    # Execute
    from_pyproject = RunConfig.from_flat(load_pyproject_config(PYPROJECT))
    # Assert: running without pyproject (installed package) behaves like running in the repo
    assert from_pyproject == RunConfig()


def test_unknown_key_is_rejected_with_the_known_keys_listed() -> None:
    with pytest.raises(ConfigError, match=r"unknown run-config keys \['n-mfc'\].*n-mfcc"):
        RunConfig.from_flat({"n-mfc": 13})


@pytest.mark.parametrize(
    ("key", "value"),
    [("n-mfcc", "13"), ("cmvn", 1), ("partition", "random"), ("win-ms", True)],
)
def test_wrong_type_or_choice_is_rejected(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flat({key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-partitions", 0), ("tempo-augment", 1.5), ("tempo-augment", -0.1), ("tempo-max", 0.9),
        ("ema-decay", 1.0), ("ema-decay", -0.5),
    ],
)  # fmt: skip
def test_out_of_range_value_is_rejected(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{key} must be"):
        RunConfig.from_flat({key: value})


@pytest.mark.parametrize(
    "keys",
    [{"trainable": "adapters"}, {"adapter-rank": 4}, {"adapter-rank": 4, "trainable": "head"}],
)
def test_adapters_need_both_their_rank_and_trainable_adapters(keys: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match='trainable = "adapters", which needs adapter-rank'):
        RunConfig.from_flat(keys)
    assert RunConfig.from_flat({"adapter-rank": 4, "trainable": "adapters"}).model.adapter_rank == 4


def test_overrides_parse_toml_values_and_round_trip() -> None:
    # Execute
    overrides = parse_overrides('n-mfcc=13 cmvn=false win-ms=20 partition="iid" corpus=a/b.tsv')
    cfg = RunConfig.from_flat(overrides)
    # Assert
    assert cfg.features.n_mfcc == 13 and cfg.features.cmvn is False
    assert cfg.features.win_ms == 20.0 and isinstance(cfg.features.win_ms, float)
    assert cfg.data.partition == "iid" and cfg.data.corpus == "a/b.tsv"
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_malformed_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides("n-mfcc")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("noise-multiplier= planned-rounds=5", "noise-multiplier"),
        ("dp =", "dp"),
        ("a=1 lr= ", "lr"),
    ],
)
def test_a_key_without_a_value_is_refused_not_fed_the_next_pair(text: str, key: str) -> None:
    # Before: "noise-multiplier= planned-rounds=5" set noise-multiplier to "planned-rounds=5"
    with pytest.raises(ConfigError, match=f"override '{key}' has no value"):
        parse_overrides(text)


def test_an_empty_value_and_an_equals_sign_in_a_value_are_still_read() -> None:
    assert parse_overrides('noise-multiplier="" planned-rounds=5') == {
        "noise-multiplier": "",
        "planned-rounds": 5,
    }
    assert parse_overrides('corpus=a=b.tsv run-name = "x=y"') == {
        "corpus": "a=b.tsv",
        "run-name": "x=y",
    }


def test_a_later_target_epsilon_replaces_an_earlier_noise_multiplier() -> None:
    # Execute: pyproject sets noise-multiplier; the override asks for a target epsilon instead
    cfg = resolve_run_config(None, "target-epsilon=8", cwd=PYPROJECT.parent)
    # Assert
    assert (cfg.train.target_epsilon, cfg.train.noise_multiplier) == (8.0, None)
    with pytest.raises(ConfigError, match="exactly one"):  # both in one layer is ambiguous
        resolve_run_config(None, "target-epsilon=8 noise-multiplier=0.7", cwd=PYPROJECT.parent)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="smoke"):
        resolve_run_config("no-such-preset")


def test_a_recipe_file_is_not_taken_for_a_preset() -> None:
    with pytest.raises(ConfigError, match="is a recipe"):
        resolve_run_config(str(PYPROJECT.parent / "experiments" / "digits.toml"))


def test_each_value_names_the_layer_it_came_from(tmp_path: Path) -> None:
    # Prepare: a preset asking for a noise multiplier, in a folder without a pyproject.toml
    preset = tmp_path / "mine.toml"
    preset.write_text("noise-multiplier = 0.9\nnum-partitions = 4\n")
    # Execute
    cfg, sources = resolve_run_config_sources(str(preset), "num-server-rounds=7", cwd=tmp_path)
    # Assert: every key has a source; the preset's noise multiplier blanks target-epsilon
    assert set(sources) == flat_keys()
    assert cfg == resolve_run_config(str(preset), "num-server-rounds=7", cwd=tmp_path)
    assert (sources["num-server-rounds"], sources["num-partitions"]) == ("command line", "preset")
    assert (sources["noise-multiplier"], sources["target-epsilon"]) == ("preset", "preset")
    assert cfg.train.noise_multiplier == 0.9 and cfg.train.target_epsilon is None
    assert sources["n-mfcc"] == "default" and cfg.features.n_mfcc == RunConfig().features.n_mfcc


def test_the_pyproject_layer_is_named_and_a_later_target_epsilon_is_the_override() -> None:
    # Execute
    _, sources = resolve_run_config_sources(None, "target-epsilon=8", cwd=PYPROJECT.parent)
    # Assert
    assert sources["n-mfcc"] == "pyproject"
    assert sources["target-epsilon"] == sources["noise-multiplier"] == "command line"


def test_project_dir_is_this_checkout() -> None:
    assert project_dir() == PYPROJECT.parent
