"""The experiment recipes: row configs, row summaries and the generated results page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import recipes, report
from fedspeech.config import resolve_run_config

TASKS = ("digits", "sentences-silo", "sentences-device", "an4")


@pytest.fixture
def public_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for the public models ``recipes.py TASK pretrain`` leaves in the work dir."""
    monkeypatch.setattr(recipes, "WORK", tmp_path)
    for task in ("digits", "sentences-silo"):
        model = tmp_path / task / "pretrain" / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}", encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", recipes.MODES)
def test_every_recipe_row_is_a_valid_run_config(task: str, mode: str, public_model: Path) -> None:
    if task not in recipes.PUBLIC and mode == "pretrain":  # starts from a shipped model
        with pytest.raises(SystemExit, match="starts from a shipped public model"):
            recipes.pretrain(task, "")
        return
    # Execute: what the row would run (a typo in a recipe key or a bad value raises here)
    flat = recipes.recipe_config(task, mode, 8.0 if mode == "fed-dp" else None)
    cfg = resolve_run_config(None, flat, cwd=recipes.ROOT)
    # Assert: DP exactly in the DP rows, calibrated to the row's epsilon
    assert cfg.train.dp is (mode == "fed-dp")
    if mode == "fed-dp":
        assert cfg.train.target_epsilon == 8.0
        assert cfg.train.noise_multiplier is None
    if flat.get("init-model", "").startswith("@"):
        assert flat["init-model"] == "@en-public-small"
    elif flat.get("init-model"):
        assert Path(flat["init-model"]).parent.parent.parent == public_model


def test_fed_dp_layers_epsilon_budget_and_overrides_last(public_model: Path) -> None:
    # Execute
    flat = recipes.recipe_config("sentences-device", "fed-dp", 3.0, "lr=0.02 epochs=2")
    # Assert: the recipe's budget follows the target; --run-config wins over the recipe
    assert flat["target-epsilon"] == 3.0
    assert flat["epsilon-budget"] == 3.0
    assert (flat["lr"], flat["epochs"]) == (0.02, 2)
    # sentences-device shares sentences-silo's public model
    assert flat["init-model"] == str(public_model / "sentences-silo" / "pretrain" / "model")
    with pytest.raises(SystemExit, match="needs --epsilon"):
        recipes.recipe_config("digits", "fed-dp", None)


def test_a_missing_public_model_names_the_command_that_makes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recipes, "WORK", tmp_path)
    with pytest.raises(SystemExit, match=r"recipes\.py sentences-silo pretrain"):
        recipes.recipe_config("sentences-device", "fed", None)


def _fold(name: str, wer: float, epsilon: float | None) -> recipes.FoldResult:
    return recipes.FoldResult(name, wer, wer / 2, wer / 3, wer / 4, epsilon, 4, 60.0, "m")


def test_summary_means_folds_and_gives_the_command_that_reproduces_the_row() -> None:
    folds = [_fold("a", 0.4, 7.5), _fold("b", 0.2, 8.0)]
    flat = {"target-epsilon": 8.0, "delta": 1e-5}
    # Execute
    summary = recipes.summarize("digits", "tune", "fed-dp", flat, folds, "lr=0.01", ["a", "b"])
    # Assert
    assert summary["command"] == (
        'python experiments/recipes.py digits fed-dp --epsilon 8 --folds a,b --run-config "lr=0.01" '
        "--row tune"
    )
    assert summary["wer"] == pytest.approx(0.3)
    assert summary["cer"] == pytest.approx(0.15)
    assert summary["epsilon"] == 8.0  # the most any client spent
    assert (summary["delta"], summary["privacy_unit"]) == (1e-5, "sample")
    assert summary["seconds"] == 120.0
    assert summary["rounds"] == 4
    on_local = recipes.summarize("digits", "fed-dp", "fed-dp", flat, folds, "", [], "local")
    assert (
        on_local["command"]
        == "python experiments/recipes.py digits fed-dp --epsilon 8 --engine local"
    )


def test_user_level_rows_report_the_user_delta_and_unit() -> None:
    flat = {"privacy-unit": "user", "user-delta": 1e-3, "delta": 1e-5}
    summary = recipes.summarize("d", "fed-user", "fed", flat, [_fold("a", 0.5, 4.0)], "", [])
    assert (summary["privacy_unit"], summary["delta"]) == ("user", 1e-3)
    plain = recipes.summarize("d", "fed", "fed", {}, [_fold("a", 0.5, None)], "", [])
    assert (plain["privacy_unit"], plain["delta"], plain["epsilon"]) == (None, None, None)
    assert plain["command"] == "python experiments/recipes.py d fed"


def test_report_regenerates_tables_and_plot_and_keeps_the_prose(tmp_path: Path) -> None:
    # Prepare: two rows of one task, and a page with hand-written text around the markers
    results, docs = tmp_path / "results", tmp_path / "docs"
    (results / "digits").mkdir(parents=True)
    docs.mkdir()
    folds = [_fold("a", 0.4, 8.0), _fold("b", 0.2, 8.0)]
    rows = {
        "fed": recipes.summarize("digits", "fed", "fed", {}, folds, "", []),
        "fed-dp-eps8": recipes.summarize(
            "digits", "fed-dp-eps8", "fed-dp", {"target-epsilon": 8.0}, folds, "", []
        ),
        "fed-user": recipes.summarize(
            "digits", "fed-user", "fed", {"privacy-unit": "user"}, folds, "", []
        ),
    }
    rows["fed"]["epsilon"] = None
    for name, row in rows.items():
        (results / "digits" / f"{name}.json").write_text(json.dumps(row), encoding="utf-8")
    (docs / "results.md").write_text(
        f"# R\n\nintro\n\n{report.BEGIN}\nstale\n{report.END}\n\n## Notes\nkept\n", encoding="utf-8"
    )
    # Execute
    page = report.write_report(results, docs).read_text(encoding="utf-8")
    # Assert
    assert "intro" in page and "## Notes\nkept" in page and "stale" not in page
    fed_line = next(line for line in page.splitlines() if line.startswith("| fed |"))
    assert "| 30.0% | 15.0% |" in fed_line and "| - |" in fed_line
    dp_line = next(line for line in page.splitlines() if line.startswith("| fed-dp-eps8 |"))
    assert "8.00 (1e-05)" in dp_line and "--epsilon 8" in dp_line
    user_line = next(line for line in page.splitlines() if line.startswith("| fed-user |"))
    assert "8.00 (1e-05) per user" in user_line
    assert page.index("| fed |") < page.index("| fed-dp-eps8 |")  # table order
    assert "| digits |" not in page and "| a | b |" in page  # per-fold table for 2 folds
    assert (docs / report.PLOT).stat().st_size > 10_000


def test_public_model_recipe_keeps_private_and_benchmark_speakers_out(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from experiments import public_model
    from fedspeech_features.manifest import read_manifest

    monkeypatch.setenv("FEDSPEECH_SHARED_DATA", str(shared_data))
    # Execute: the full recipe's manifests, and a learning-curve run's on half of every corpus
    train, dev, evals = public_model.prepare(tmp_path / "full")
    half, _, _ = public_model.prepare(tmp_path / "half", fraction=0.5)
    # Assert: training audio is only the three public corpora, never a dev/eval/private speaker
    rows = [r for m in train for r in read_manifest(m)]
    assert {r.path.relative_to(shared_data.resolve()).parts[0] for r in rows} == {
        "librispeech_samples", "kathleen", "ljspeech_mini"
    }  # fmt: skip
    assert not any("/test-other/" in str(r.path) for r in rows)
    held = [r for m in [*dev.values(), *evals.values()] for r in read_manifest(m)]
    assert {r.path for r in rows}.isdisjoint(r.path for r in held)
    # ... and --fraction keeps half of each corpus, a subset of the full one
    for full_manifest, half_manifest in zip(train, half, strict=True):
        full_rows, half_rows = read_manifest(full_manifest), read_manifest(half_manifest)
        assert len(half_rows) == round(len(full_rows) / 2)
        assert {r.path for r in half_rows} <= {r.path for r in full_rows}


def test_an4_folds_keep_the_official_split_and_tune_on_training_speakers(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedspeech_features.manifest import read_manifest

    monkeypatch.setenv("FEDSPEECH_SHARED_DATA", str(shared_data))
    # Execute
    (test,) = recipes.an4_folds(tmp_path, [])
    (dev,) = recipes.an4_folds(tmp_path, ["dev"])
    # Assert: 948 training / 130 test utterances of 74 / 10 speakers, as the official split
    train_rows, test_rows = read_manifest(test.train), read_manifest(test.evaluate)
    speakers = {r.speaker for r in train_rows}
    assert (len(train_rows), len(speakers)) == (948, 74)
    assert (len(test_rows), len({r.speaker for r in test_rows})) == (130, 10)
    assert speakers.isdisjoint(r.speaker for r in test_rows)
    assert all("/train/" in str(r.path) for r in train_rows)
    # ... and the dev fold holds 8 training speakers out, never a test speaker
    dev_train, dev_eval = read_manifest(dev.train), read_manifest(dev.evaluate)
    held = {r.speaker for r in dev_eval}
    assert len(held) == recipes.AN4_DEV_SPEAKERS and held <= speakers
    assert {r.path for r in dev_train} | {r.path for r in dev_eval} == {r.path for r in train_rows}
    assert held.isdisjoint(r.speaker for r in dev_train)
