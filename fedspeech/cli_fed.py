"""``fedspeech simulate``: a federated simulation on this machine through Flower's ``flwr run``.

Resolves the run config (pyproject <- preset <- ``--run-config``), makes its paths absolute (the
Flower processes run elsewhere), builds the synthetic corpus once up front, then runs the app in
``fedspeech.flower_launch`` and prints where the run stands. Plain ``flwr run .`` works too; see
``fedspeech.flower_launch`` for the environment it needs.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fedspeech")

# Ray CPUs per virtual client: with 1, a 2-core machine trains two clients at a time.
DEFAULT_CLIENT_CPUS = 1


@dataclass(frozen=True)
class SimulationOutcome:
    """How a ``simulate`` call ended.

    Attributes:
        run_dir: the run folder (``out-dir``).
        returncode: ``flwr run``'s exit status.
        rounds: the last round the checkpoint holds (0: none).
        finished: the run reached ``num-server-rounds``.
        model_dir: the final model directory, if written.
        history: per-round summaries (``server.rounds.RoundSummary.to_json``).
        tracking_run_id: the tracker's run id.
        seconds: wall time of the launch (SuperLink start to cleanup).
        error: why the server stopped the run early (None: it did not, or did not say).
    """

    run_dir: Path
    returncode: int
    rounds: int
    finished: bool
    model_dir: Path | None
    history: list[dict[str, Any]]
    tracking_run_id: str | None
    seconds: float
    error: str | None = None


def register(sub: Any) -> None:
    """Add the ``simulate`` command to the top-level subparsers."""
    p = sub.add_parser("simulate", help="federated training of virtual clients on this machine")
    p.add_argument("--preset", help="experiments/NAME.toml or a TOML file")
    p.add_argument(
        "--run-config", default="", help='overrides, e.g. "num-server-rounds=5 dp=false"'
    )
    p.add_argument("--num-supernodes", type=int, help="virtual clients (default: num-partitions)")
    p.add_argument("--out", type=Path, help="run folder (default: the run config's out-dir)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the run folder's checkpoint"
    )
    p.add_argument(
        "--client-cpus", type=float, default=DEFAULT_CLIENT_CPUS, help="Ray CPUs per client"
    )
    p.set_defaults(handler=_cmd_simulate)


def simulate(
    *,
    preset: str | None = None,
    overrides: str | dict[str, Any] = "",
    num_supernodes: int | None = None,
    out: Path | None = None,
    resume: bool = False,
    client_cpus: float = DEFAULT_CLIENT_CPUS,
    output: Path | None = None,
) -> SimulationOutcome:
    """Run a local simulation; see ``fedspeech simulate --help``.

    Args:
        preset: preset name or TOML file.
        overrides: run-config overrides (``"k=v ..."`` or a mapping).
        num_supernodes: virtual clients; default the run config's ``num-partitions``.
        out: run folder; default the run config's ``out-dir``.
        resume: continue from the run folder's checkpoint.
        client_cpus: Ray CPUs reserved per virtual client.
        output: file for Flower's streamed logs (None: stdout).

    Raises:
        ConfigError: bad run config.
        FileNotFoundError: ``resume`` without a checkpoint in the run folder.
        server.checkpoint.CheckpointError: ``resume`` and no checkpoint is intact.
        RuntimeError: the SuperLink does not start.
    """
    import time

    from fedspeech.config import ConfigError, resolve_run_config
    from fedspeech.fed_data import corpus_manifest
    from fedspeech.flower_launch import flwr_run, local_superlink, stage_app, write_run_config

    app_dir = _app_dir()
    cfg = resolve_run_config(preset, overrides, cwd=app_dir)
    n = num_supernodes or cfg.data.num_partitions
    if cfg.fed.clients_per_round > n:
        raise ConfigError(
            f"clients-per-round {cfg.fed.clients_per_round} exceeds the {n} simulated clients"
        )
    flat = cfg.to_flat()
    run_dir = (out or Path(cfg.fed.out_dir)).resolve()
    flat.update(
        {
            "num-partitions": n,
            "min-clients": min(cfg.fed.min_clients, n),
            "out-dir": str(run_dir),
            "data-dir": str(Path(cfg.fed.data_dir).resolve()),
            "resume": resume or cfg.fed.resume,
        }
    )
    for key in ("eval-manifest", "init-model"):
        if flat[key]:
            flat[key] = str(Path(flat[key]).resolve())
    if cfg.data.corpus != "synthetic":
        flat["corpus"] = str(Path(cfg.data.corpus).resolve())
    flat["tracking-uri"] = absolute_sqlite_uri(cfg.fed.tracking_uri)
    cfg = type(cfg).from_flat(flat)  # validates the adjusted config
    if cfg.fed.resume:
        from server.checkpoint import load_checkpoint

        # Verified here (sizes and hashes against its manifest) so that a damaged checkpoint is
        # refused with its reason before any Flower process starts.
        if load_checkpoint(run_dir) is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
    # Build the corpus here, once, with progress on the console; the Flower processes then
    # find it finished (the builder's no-op path) instead of queueing on its lock.
    corpus_manifest(cfg, cfg.fed.data_dir)
    if cfg.fed.pretrain_utterances and not cfg.fed.resume:
        if cfg.fed.init_model:
            log.warning("init-model is set: skipping the public pre-training")
        else:
            from fedspeech.pretrain import public_pretrained_model

            flat["init-model"] = str(public_pretrained_model(cfg, cfg.fed.data_dir))
            cfg = type(cfg).from_flat(flat)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = write_run_config(run_dir / "run_config.toml", flat)
    start = time.perf_counter()
    with local_superlink(run_dir / ".flwr") as link:
        rc = flwr_run(
            link,
            stage_app(app_dir, run_dir / ".flwr" / "app"),  # packs in ms, not seconds
            run_config=config_file,
            federation_config={"num-supernodes": n, "client-resources-num-cpus": client_cpus},
            output=output,
        )
    return _outcome(run_dir, rc, time.perf_counter() - start)


def stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, through the launcher's cleanup of Flower and Ray."""
    import signal

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)


def absolute_sqlite_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` relative to the current folder -> an absolute sqlite URI.

    The ServerApp runs from a copy of the app under ``$FLWR_HOME``: a relative database path would
    land there instead of where the user launched the run.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/"):
        return uri
    return prefix + str(Path(uri[len(prefix) :]).resolve())


def _cmd_simulate(args: argparse.Namespace) -> int:
    stop_on_sigterm()
    outcome = simulate(
        preset=args.preset,
        overrides=args.run_config,
        num_supernodes=args.num_supernodes,
        out=args.out,
        resume=args.resume,
        client_cpus=args.client_cpus,
    )
    last = outcome.history[-1] if outcome.history else {}
    print(
        f"simulate: {outcome.rounds} rounds in {outcome.seconds:.0f} s; "
        f"WER {_fmt(last.get('wer'))}, CER {_fmt(last.get('cer'))}, "
        f"epsilon max {_fmt(last.get('epsilon_max'))}"
        + (f", user epsilon {_fmt(last['user_epsilon'])}" if last.get("user_epsilon") else "")
    )
    print(f"run folder: {outcome.run_dir}")
    print(f"tracking run id: {outcome.tracking_run_id}")
    if outcome.model_dir is not None:
        print(f"model: {outcome.model_dir}")
    if not outcome.finished:
        if outcome.error:
            log.error("%s", outcome.error)
        log.error(
            "the run did not finish (flwr run exit status %d); logs in %s",
            outcome.returncode,
            outcome.run_dir / ".flwr",
        )
        return 1
    return 0


def _outcome(run_dir: Path, returncode: int, seconds: float) -> SimulationOutcome:
    from server.checkpoint import RunState, find_checkpoint
    from server.tracking import read_tracking_info

    path = find_checkpoint(run_dir)
    state = RunState()
    if path is not None:
        state = RunState.from_json((path / "state.json").read_text(encoding="utf-8"))
    model_dir = run_dir / "model"
    return SimulationOutcome(
        run_dir=run_dir,
        returncode=returncode,
        rounds=state.round,
        finished=state.finished and (model_dir / "config.json").is_file(),
        model_dir=model_dir if (model_dir / "config.json").is_file() else None,
        history=state.history,
        tracking_run_id=state.tracking_run_id,
        seconds=seconds,
        error=read_tracking_info(run_dir).get("error"),
    )


def _app_dir() -> Path:
    """The repository root (the Flower app ``flwr run`` builds)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "server" / "app.py").is_file():
        raise FileNotFoundError(
            f"{root}: no Flower app here; `fedspeech simulate` runs from a source checkout"
        )
    return root


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
