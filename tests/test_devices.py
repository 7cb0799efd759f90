"""The ``device`` run-config key (and ``--device``): resolution, errors, and every path honouring it.

Training (plain and DP-SGD), evaluation (``fedspeech evaluate``, the server's central evaluation)
and transcription run on the resolved device and hand back CPU weights; a device this machine
lacks stops a command before it reads any data; the simulation's GPU share per client reaches
Flower's federation config. Device-dependent tests run on ``tests.conftest.DEVICES`` (``cpu``
always, ``cuda`` only where ``torch.cuda.is_available()``).
"""

from __future__ import annotations

import logging
import math
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

import fedspeech_client.dp_sgd
import fedspeech_client.train
from fedspeech.app.cli import main
from fedspeech.config import (
    ConfigError,
    RunConfig,
    check_resume_changes,
    resolve_run_config,
    resolve_run_config_sources,
)
from fedspeech.devices import DeviceError, resolve_device
from fedspeech.modeldir import load_model_dir
from fedspeech.transcribe import Transcriber
from fedspeech_client.train import TrainConfig, train_local
from fedspeech_features.manifest import read_manifest
from fedspeech_features.text import CharTokenizer
from tests.conftest import DEVICES, tiny_model
from tests.test_modeldir import FEATURES, make_model_dir
from tests.test_modeldir import tiny_model as tiny_feature_model

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning:opacus.privacy_engine"),
]
CUDA = torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(CUDA, reason="checks the error of a machine without CUDA")
UNAVAILABLE = r"device 'cuda' requested but torch\.cuda\.is_available\(\) is False"
SR = 16_000


@dataclass(frozen=True)
class _Utt:
    feats: torch.Tensor
    labels: torch.Tensor


def _examples(n: int = 8) -> list[_Utt]:
    g = torch.Generator().manual_seed(0)
    return [
        _Utt(torch.randn(int(torch.randint(5, 12, (1,), generator=g)), 6, generator=g),
             torch.randint(1, 29, (2,), generator=g))
        for _ in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def audio_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 1.5 s noise-and-tone recordings with references (the tiny model's words are junk)."""
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    t = np.arange(int(1.5 * SR)) / SR
    rows = []
    for i, freq in enumerate((220.0, 330.0)):
        wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"u{i}.wav", wave.astype(np.float32), SR, subtype="PCM_16")
        rows.append(f"u{i}.wav\thello world\ts{i}\t1.5")
    manifest = folder / "manifest.tsv"
    manifest.write_text("path\ttranscript\tspeaker\tduration_s\n" + "\n".join(rows) + "\n")
    return manifest


# ---------------------------------------------------------------- resolution and errors


def test_auto_is_cuda_when_available_else_cpu() -> None:
    expected = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    assert resolve_device("auto") == resolve_device() == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert RunConfig().train.device == "auto"  # the default


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error_naming_the_key(name: str) -> None:
    with pytest.raises(DeviceError) as caught:
        resolve_device(name)
    message = str(caught.value)
    assert message.startswith(f"device {name!r} requested but torch.cuda.is_available() is False")
    assert '"auto"' in message and '"cpu"' in message  # what to set instead
    with pytest.raises(DeviceError, match=r"^--device 'cuda' requested"):
        resolve_device("cuda", key="--device")


@pytest.mark.skipif(not CUDA, reason="no CUDA device: torch.cuda.is_available() is False")
def test_a_cuda_index_beyond_the_visible_devices_is_refused() -> None:
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    with pytest.raises(DeviceError, match=f"only {count} CUDA device"):
        resolve_device(f"cuda:{count}")


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda0", "mps", ""])
def test_a_misspelt_device_is_rejected_listing_the_valid_values(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat({"device": value})
    assert f"device {value!r} is not one of auto, cpu, cuda, cuda:N" in str(caught.value)
    with pytest.raises(DeviceError, match="auto, cpu, cuda, cuda:N"):
        resolve_device(value)


def test_a_misspelt_device_flag_is_a_usage_error(
    audio_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model_dir(tmp_path / "model")
    for command in (["transcribe", str(audio_manifest.parent / "u0.wav")],
                    ["evaluate", "--manifest", str(audio_manifest)]):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            main([command[0], "--model", str(model), *command[1:], "--device", "gpu"])
        err = capsys.readouterr().err
        assert stop.value.code == 2
        assert "--device 'gpu' is not one of auto, cpu, cuda, cuda:N" in err


# ---------------------------------------------------------------- the run-config key


def test_the_device_key_round_trips_from_the_pyproject_run_config(tmp_path: Path) -> None:
    # Prepare: the checkout's table, and a project whose table sets another device
    root = Path(__file__).resolve().parents[1]
    table = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "fedspeech"\n\n[tool.flwr.app.config]\ndevice = "cpu"\n'
    )
    # Execute
    default = RunConfig.from_flat(table)
    cfg, sources = resolve_run_config_sources(cwd=tmp_path)
    override = resolve_run_config(overrides='device="cuda:1"', cwd=tmp_path)
    # Assert: parsed, named by source, and back to the same flat value
    assert table["device"] == "auto" and default.train.device == "auto"
    assert cfg.train.device == "cpu" and sources["device"] == "pyproject"
    assert cfg.to_flat()["device"] == "cpu" and RunConfig.from_flat(cfg.to_flat()) == cfg
    assert override.train.device == "cuda:1"  # spelling only: a CPU server may parse it


def test_the_flower_app_declares_the_device_key_and_a_resume_may_change_it(
    tmp_path: Path,
) -> None:
    from fedspeech.app.flower_launch import write_app

    app = write_app(tmp_path / "app")
    table = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table["device"] == "auto"  # flwr run accepts --run-config device=... for this app
    # A checkpoint from before the key existed resumes, and a resume may move to another device
    saved = {k: v for k, v in RunConfig().to_flat().items() if k != "device"}
    assert check_resume_changes(saved, {**saved, "device": "cpu"}) == ["device"]


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("dp", [False, True])
@pytest.mark.parametrize("name", ["auto", *DEVICES])
def test_training_runs_on_the_device_and_returns_cpu_weights(
    name: str, dp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: spies on where the model, its gradients and the DP noise live
    expected = resolve_device(name)
    seen: dict[str, Any] = {}

    class SpyEngine(fedspeech_client.dp_sgd.PrivacyEngine):
        def make_private(self, **kwargs: Any) -> Any:
            out = super().make_private(**kwargs)
            seen.update(net=out[0], optimizer=out[1], noise=kwargs["noise_generator"])
            return out

    plain_epoch = fedspeech_client.train.run_plain_epoch

    def spy_epoch(net: torch.nn.Module, *args: Any) -> Any:
        seen.update(net=net)
        return plain_epoch(net, *args)

    monkeypatch.setattr(fedspeech_client.dp_sgd, "PrivacyEngine", SpyEngine)
    monkeypatch.setattr(fedspeech_client.train, "run_plain_epoch", spy_epoch)
    cfg = TrainConfig(batch_size=4, lr=0.05, dp=dp, dp_seed=1, device=name)
    model = tiny_model()
    # Execute
    result = train_local(model, _examples(), cfg)
    # Assert: trained on the device (DP: per-sample gradients, noised gradients and the noise
    # generator too); the weights that leave are CPU tensors, and they moved
    assert {p.device for p in seen["net"].parameters()} == {expected}
    if dp:
        assert seen["noise"].device == expected
        assert all(
            p.grad is not None and p.grad.device == expected for p in seen["optimizer"].params
        )
    assert {t.device for t in result.state_dict.values()} == {torch.device("cpu")}
    start = dict(model.state_dict())
    assert any(not torch.equal(start[k], v) for k, v in result.state_dict.items())


@needs_no_cuda
def test_training_with_device_cuda_without_cuda_stops_with_the_clear_error(tmp_path: Path) -> None:
    from fedspeech.app.pretrain import pretrain
    from fedspeech_client.central import train_central
    from fedspeech_client.epochs import train_epochs

    cuda = RunConfig.from_flat({"device": "cuda", "dp": False})
    missing = tmp_path / "missing.tsv"  # read after the device check, so never read here
    with pytest.raises(DeviceError, match=UNAVAILABLE):
        train_local(tiny_model(), _examples(), cuda.train)
    with pytest.raises(DeviceError, match=UNAVAILABLE):
        next(train_epochs(tiny_model(), _examples(), cuda.train, 1))
    with pytest.raises(DeviceError, match=UNAVAILABLE):
        train_central(missing, cuda, tmp_path / "model")
    with pytest.raises(DeviceError, match=UNAVAILABLE):
        pretrain([missing], {}, cuda, tmp_path / "pretrain", epochs=1)
    assert not (tmp_path / "model").exists() and not (tmp_path / "pretrain").exists()


@needs_no_cuda
def test_the_cli_and_the_simulation_preflight_refuse_cuda_without_cuda(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedspeech.app.preflight import check_run

    # Execute: `fedspeech train` (exit 2 before reading the manifest) and the pre-flight
    rc = main(
        ["train", "--manifest", str(tmp_path / "missing.tsv"), "--model-dir",
         str(tmp_path / "model"), "--run-config", 'device="cuda"']
    )  # fmt: skip
    cfg = RunConfig.from_flat({"device": "cuda", "corpus": str(tmp_path / "missing.tsv")})
    problems = check_run(cfg, 2).problems
    # Assert
    assert rc == 2
    assert any(
        r.levelno == logging.ERROR and r.getMessage().startswith("device 'cuda' requested")
        for r in caplog.records
    )
    assert any(p.startswith("device 'cuda' requested but torch.cuda") for p in problems)


# ---------------------------------------------------------------- evaluation and transcription


def test_transcribe_and_evaluate_run_with_device_auto(
    audio_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model_dir(tmp_path / "model")
    wav = audio_manifest.parent / "u0.wav"
    # Execute: the default (auto) and the explicit flag
    assert main(["transcribe", "--model", str(model), str(wav)]) == 0
    default = capsys.readouterr().out
    assert main(["transcribe", "--model", str(model), str(wav), "--device", "auto"]) == 0
    auto = capsys.readouterr().out
    rc = main(["evaluate", "--model", str(model), "--manifest", str(audio_manifest),
               "--device", "auto", "--format", "json"])  # fmt: skip
    # Assert
    assert default == auto and auto.startswith(f"{wav}\t")
    assert rc == 0 and '"scored": 2' in capsys.readouterr().out


@needs_no_cuda
def test_transcribe_with_device_cuda_without_cuda_exits_2(
    audio_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model_dir(tmp_path / "model")
    wav = audio_manifest.parent / "u0.wav"
    assert main(["transcribe", "--model", str(model), str(wav), "--device", "cuda"]) == 2
    assert "--device 'cuda' requested but torch.cuda.is_available() is False" in caplog.text


@pytest.mark.parametrize("name", ["auto", *DEVICES])
def test_transcriber_and_evaluation_run_the_model_on_the_device(
    name: str, audio_manifest: Path, tmp_path: Path
) -> None:
    from fedspeech.evaluate import evaluate_manifest

    device = resolve_device(name)
    loaded = load_model_dir(make_model_dir(tmp_path / "model"))
    # Execute
    transcriber = Transcriber(loaded, device=device)
    hypothesis = transcriber.transcribe_wave(
        sf.read(audio_manifest.parent / "u1.wav", dtype="float32")[0]
    )
    result = evaluate_manifest(load_model_dir(tmp_path / "model"), audio_manifest, device=device)
    # Assert: the model was moved there and ran; the decoded output came back
    assert {p.device for p in loaded.model.parameters()} == {device}
    assert isinstance(hypothesis.text, str) and transcriber.stats.model_s > 0
    assert result.scored == 2 and not math.isnan(result.cer)


@pytest.mark.parametrize("name", ["auto", *DEVICES])
def test_central_evaluation_runs_on_the_device_from_cpu_weights(
    name: str, audio_manifest: Path
) -> None:
    from fedspeech_server.evaluation import CentralEvaluator

    device = resolve_device(name)
    model = tiny_feature_model()
    evaluator = CentralEvaluator(
        read_manifest(audio_manifest), model.cfg, FEATURES, CharTokenizer(), device=device
    )
    wer, cer = evaluator(model.state_dict())  # CPU tensors, as aggregated weights are
    assert {p.device for p in evaluator.loaded.model.parameters()} == {device}
    assert wer >= 0 and cer >= 0  # scored: NaN when nothing was


@needs_no_cuda
def test_the_server_refuses_cuda_without_cuda_before_opening_a_tracking_run(
    tmp_path: Path,
) -> None:
    from fedspeech_server.run import FederatedRun

    opened: list[Any] = []

    def tracker_factory(*args: Any) -> Any:
        opened.append(args)
        raise AssertionError("no tracking run may be opened")

    cfg = RunConfig.from_flat({"device": "cuda", "out-dir": str(tmp_path / "run")})
    with pytest.raises(DeviceError, match=UNAVAILABLE):
        FederatedRun.open(cfg, tracker_factory=tracker_factory)
    assert opened == []


# ---------------------------------------------------------------- simulation GPU resources


def _flower_parses(federation: str) -> Any:
    """What ``flwr run --federation-config TEXT`` makes of the text (flwr.cli.run's own steps)."""
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    parsed = parse_config_args([federation])
    return simulation_config_from_json({k.replace("-", "_"): v for k, v in parsed.items()})


def test_client_gpus_reach_the_federation_config() -> None:
    from fedspeech.app.flower_launch import federation_arg, federation_config

    config = federation_config(3, client_cpus=2, client_gpus=0.5)
    proto = _flower_parses(federation_arg(config))
    assert config["client-resources-num-gpus"] == 0.5
    assert proto.num_supernodes == 3 and proto.client_resources_num_cpus == 2
    assert proto.client_resources_num_gpus == pytest.approx(0.5)
    assert _flower_parses(federation_arg(federation_config(3))).client_resources_num_gpus == 0
    assert federation_config(3, client_gpus=2)["client-resources-num-gpus"] == 2.0
    for bad in (-0.5, 1.5, math.nan, math.inf):
        with pytest.raises(ConfigError, match="client GPUs"):
            federation_config(3, client_gpus=bad)


def test_simulate_passes_client_gpus_to_flwr_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedspeech.app.flower_launch as launch
    import fedspeech.app.preflight as preflight
    from fedspeech.app.cli import _build_parser
    from fedspeech.app.simulate import simulate

    # Prepare: no Flower process; the launch records what it is given
    given: dict[str, Any] = {}

    @contextmanager
    def no_superlink(flwr_home: Path) -> Any:
        yield None

    def fake_flwr_run(link: Any, app_dir: Path, **kwargs: Any) -> int:
        given.update(kwargs)
        return 1

    monkeypatch.setattr(launch, "local_superlink", no_superlink)
    monkeypatch.setattr(launch, "flwr_run", fake_flwr_run)
    monkeypatch.setattr(preflight, "check_run", lambda cfg, n: preflight.Preflight())
    overrides = {"data-dir": str(tmp_path / "data"), "tracking-uri": "sqlite:///unused.db"}
    # Execute
    simulate(overrides=overrides, out=tmp_path / "run", num_supernodes=3, client_gpus=0.25)
    args = _build_parser().parse_args(["simulate", "--client-gpus", "0.25"])
    # Assert
    assert given["federation_config"]["client-resources-num-gpus"] == 0.25
    assert given["federation_config"]["num-supernodes"] == 3
    assert args.client_gpus == 0.25 and _build_parser().parse_args(["simulate"]).client_gpus == 0
