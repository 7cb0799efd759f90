"""``fedspeech simulate``: a federated simulation on this machine, through Flower's ``flwr run``
(``--engine flower``) or the local engine (``--engine local``, ``fedspeech.app.local_engine``);
``--engine auto``, the default, takes the local engine unless the run needs Ray (``choose_engine``).

Resolves the run config (pyproject <- preset <- ``--run-config``), makes its paths absolute (the
Flower processes run elsewhere), builds the synthetic corpus once up front, then runs the app in
``fedspeech.app.flower_launch`` (or over the local engine's worker pool) and prints where the run
stands. Plain ``flwr run .`` works too; see ``fedspeech.app.flower_launch`` for the environment it
needs.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedspeech.config import RESUME_CHANGEABLE_KEYS, ConfigError, RunConfig

if TYPE_CHECKING:
    from fedspeech.app.local_engine import WorkerPool
    from fedspeech_server.tracker_protocol import EndStatus

log = logging.getLogger("fedspeech")

# Ray CPUs per virtual client: with 1, a 2-core machine trains two clients at a time.
DEFAULT_CLIENT_CPUS = 1
# flower: Flower's simulation runtime (SuperLink, SuperExec, Ray); local: the same apps in this
# process and a pool of worker processes (fedspeech.app.local_engine); auto: ``choose_engine``.
ENGINES = ("auto", "flower", "local")
_REASON_CHARS = 300  # of a failed run's reason on the final line


@dataclass(frozen=True)
class SimulationOutcome:
    """How a ``simulate`` call ended.

    Attributes:
        run_dir: the run folder (``out-dir``).
        returncode: ``flwr run``'s exit status (the local engine: 0, or 1 when the ServerApp
            raised).
        rounds: the last round the checkpoint holds (0: none).
        finished: the run reached ``num-server-rounds``.
        model_dir: the final model directory, if written.
        history: per-round summaries (``fedspeech_server.rounds.RoundSummary.to_json``).
        tracking_run_id: the tracker's run id (None: the run never opened one).
        seconds: wall time of the launch (SuperLink start to cleanup).
        error: why the server stopped the run early (None: it did not, or did not say).
        clients: the per-client table of the last checkpoint (``fedspeech_server.rounds.update_clients``).
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
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)


class SimulationInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a launch; raised after every process was stopped."""

    def __init__(self, outcome: SimulationOutcome) -> None:
        super().__init__(f"interrupted after round {outcome.rounds}")
        self.outcome = outcome


def register(sub: Any) -> None:
    """Add the ``simulate`` command to the top-level subparsers."""
    from fedspeech.app.cli_common import add_renamed, add_run_config_options

    p = sub.add_parser(
        "simulate",
        help="federated training of virtual clients on this machine",
        description="Federated training of virtual clients on this machine. Exit status: 0 when "
        "the run finished all its rounds, 1 when it failed, 2 when it could not start "
        "(configuration or pre-flight problems, named one per line), 130 when interrupted.",
    )
    add_run_config_options(p, example="num-server-rounds=5 dp=false")
    p.add_argument("--num-supernodes", type=int, help="virtual clients (default: num-partitions)")
    add_renamed(
        p,
        "--run-dir",
        "--out",
        type=Path,
        metavar="DIR",
        help="run folder (default: the run config's out-dir)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its checkpoint, with the configuration it was "
        "started with (run_config.toml there); --run-config may then change only "
        + ", ".join(sorted(RESUME_CHANGEABLE_KEYS)),
    )
    p.add_argument(
        "--client-cpus",
        type=_positive_int,
        default=DEFAULT_CLIENT_CPUS,
        help="Ray CPUs per client (a whole number: Flower 1.42 takes no fraction)",
    )
    p.add_argument(
        "--client-gpus",
        type=float,
        default=0.0,
        help="share of a GPU Ray reserves per client (Flower's client-resources-num-gpus; "
        "0.5: two clients per GPU at a time); the run config's device says where clients train",
    )
    add_engine_option(p)
    p.set_defaults(handler=_cmd_simulate)


def simulate(
    *,
    preset: str | None = None,
    overrides: str | dict[str, Any] = "",
    num_supernodes: int | None = None,
    out: Path | None = None,
    resume: bool = False,
    client_cpus: int = DEFAULT_CLIENT_CPUS,
    client_gpus: float = 0.0,
    output: Path | None = None,
    engine: str = "auto",
) -> SimulationOutcome:
    """Run a local simulation; see ``fedspeech simulate --help``.

    A fresh run layers its config (pyproject <- preset <- overrides); ``resume`` continues the
    run in ``out`` from its saved ``run_config.toml``, where the overrides may change only
    ``RESUME_CHANGEABLE_KEYS``. Either way every check that needs no Flower process runs first
    (``fedspeech.app.preflight``). When the launch is interrupted (Ctrl-C, SIGTERM) or the server
    never closed its tracking run, the run is closed as KILLED or FAILED before returning.

    Args:
        preset: preset name or TOML file (a fresh run only).
        overrides: run-config overrides (``"k=v ..."`` or a mapping).
        num_supernodes: virtual clients; default the run config's ``num-partitions``.
        out: run folder; default the run config's ``out-dir``.
        resume: continue the run in the run folder.
        client_cpus: Ray CPUs reserved per virtual client.
        client_gpus: share of a GPU Ray reserves per virtual client (0: none).
        output: file for Flower's streamed logs (None: stdout).
        engine: ``flower`` (Flower's simulation runtime: SuperLink, Ray), ``local`` (the same
            apps in this process and a pool of workers, ``fedspeech.app.local_engine``) or
            ``auto`` (``choose_engine``).

    Raises:
        ConfigError: bad run config, a resume that changes what defines the run, or problems
            found before launch (``PreflightError``, one line each).
        FileNotFoundError: ``resume`` without a run (or a checkpoint) in the run folder.
        fedspeech_server.checkpoint.CheckpointError: ``resume`` and no checkpoint is intact.
        RuntimeError: the SuperLink does not start.
        SimulationInterrupted: interrupted (a ``KeyboardInterrupt``, raised after the cleanup;
            the run is closed as KILLED; ``.outcome`` says where it stood).
    """
    from fedspeech.app.flower_launch import federation_config
    from fedspeech.config import project_dir

    engine = choose_engine(engine, client_gpus)
    project = project_dir()
    if resume:
        cfg, n, run_dir = _resumed_config(project, preset, overrides, out, num_supernodes)
    else:
        cfg, n, run_dir = _fresh_config(project, preset, overrides, out, num_supernodes)
    federation = federation_config(n, client_cpus=client_cpus, client_gpus=client_gpus)
    if engine == "flower":
        return _launch(cfg, n, run_dir, federation, None, output)
    if client_gpus:
        raise ConfigError(
            "--client-gpus reserves Ray GPU shares: the local engine has none (the run "
            "config's device says where clients train); use --engine flower"
        )
    from fedspeech.app.local_engine import PRELOAD, PRELOAD_DP, run_pool

    with run_pool(
        max(1, min(n, available_cpus() // client_cpus)),
        threads=client_cpus,
        log_file=str(output) if output else None,
        preload=PRELOAD_DP if cfg.sample_level_dp else PRELOAD,
    ) as pool:
        return _launch(cfg, n, run_dir, federation, pool, output)


def choose_engine(engine: str, client_gpus: float = 0.0) -> str:
    """The engine a run takes: ``engine`` itself, or for ``auto`` the local engine unless the run
    needs Ray: GPU shares (``client_gpus``) or a Ray cluster (``RAY_ADDRESS`` names one).

    The local engine trains the same model and reports the same epsilon as Flower's runtime
    (``tests/test_federation.py``) and starts in ~2 s instead of ~7 s (docs/benchmarks.md).

    Raises:
        ConfigError: an engine not in ``ENGINES``.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    cluster = os.environ.get("RAY_ADDRESS", "") not in ("", "local")
    if client_gpus or cluster:
        why = "GPU shares (--client-gpus)" if client_gpus else "the Ray cluster in RAY_ADDRESS"
        log.info("engine: Flower's runtime, for %s", why)
        return "flower"
    log.info("engine: local (--engine flower runs Flower's runtime: SuperLink, Ray actors)")
    return "local"


def _launch(
    cfg: RunConfig,
    n: int,
    run_dir: Path,
    federation: dict[str, object],
    pool: WorkerPool | None,
    output: Path | None,
) -> SimulationOutcome:
    """Check, prepare and run the simulation ``simulate`` resolved; see there."""
    import time

    from fedspeech.app.flower_launch import flwr_run, local_superlink, write_app, write_run_config
    from fedspeech.app.interrupts import interrupts_ignored
    from fedspeech.app.preflight import check_run

    check_run(cfg, n).raise_for_problems()
    flat = cfg.to_flat()
    if cfg.fed.pretrain_utterances and not cfg.fed.resume:
        if cfg.fed.init_model:
            log.warning("init-model is set: skipping the public pre-training")
        else:
            from fedspeech.app.pretrain import public_pretrained_model

            flat["init-model"] = str(public_pretrained_model(cfg, cfg.fed.data_dir))
            cfg = type(cfg).from_flat(flat)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = write_run_config(run_dir / "run_config.toml", flat)
    start = time.perf_counter()
    try:
        if pool is not None:
            rc = _run_local(config_file, n, pool, output)
        else:
            with local_superlink(run_dir / ".flwr") as link:
                rc = flwr_run(
                    link,
                    write_app(run_dir / ".flwr" / "app"),
                    run_config=config_file,
                    federation_config=federation,
                    output=output,
                )
    except KeyboardInterrupt as exc:
        with interrupts_ignored():  # stopping is done: record how the run ended first
            _close_tracking(cfg, run_dir, "KILLED", "interrupted (SIGINT or SIGTERM)")
            outcome = _outcome(run_dir, 130, time.perf_counter() - start)
        raise SimulationInterrupted(outcome) from exc
    with interrupts_ignored():  # the launch is over: a late Ctrl-C must not garble its record
        outcome = _outcome(run_dir, rc, time.perf_counter() - start)
        if not outcome.finished:
            reason = outcome.error or f"flwr run exited with status {rc} before the last round"
            _close_tracking(cfg, run_dir, "FAILED", reason)
    return outcome


def _run_local(config_file: Path, n: int, pool: WorkerPool, output: Path | None) -> int:
    """The ServerApp in this process over ``pool``; 0 when it returned, 1 when it raised (the
    server recorded why in the run folder and the tracking run)."""
    import tomllib

    from fedspeech.app.local_engine import run_server

    run_config = tomllib.loads(config_file.read_text(encoding="utf-8"))  # as Flower reads it
    try:
        run_server(run_config, n, pool, log_file=str(output) if output else None)
    except Exception as exc:
        log.error("the ServerApp stopped: %s: %s", type(exc).__name__, exc)
        log.debug("ServerApp traceback", exc_info=True)
        return 1
    return 0


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask; cgroup quotas are not read)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _fresh_config(
    project: Path,
    preset: str | None,
    overrides: str | dict[str, Any],
    out: Path | None,
    num_supernodes: int | None,
) -> tuple[RunConfig, int, Path]:
    """A new run's config: layered, with absolute paths and the simulation's sizes."""
    from fedspeech.config import resolve_run_config

    cfg = resolve_run_config(preset, overrides, cwd=project)
    if cfg.fed.resume:
        raise ConfigError("resume = true in the run config: use `fedspeech simulate --resume`")
    n = num_supernodes or cfg.data.num_partitions
    run_dir = (out or Path(cfg.fed.out_dir)).resolve()
    flat = cfg.to_flat()
    flat.update(
        {
            "num-partitions": n,
            "min-clients": min(cfg.fed.min_clients, n),
            "out-dir": str(run_dir),
            "data-dir": str(Path(cfg.fed.data_dir).resolve()),
        }
    )
    from fedspeech.modeldir import SHIPPED_PREFIX

    for key in ("eval-manifest", "init-model"):
        if flat[key] and not str(flat[key]).startswith(SHIPPED_PREFIX):  # @name: shipped model
            flat[key] = str(Path(flat[key]).resolve())
    if cfg.data.corpus != "synthetic":
        flat["corpus"] = str(Path(cfg.data.corpus).resolve())
    flat["tracking-uri"] = absolute_sqlite_uri(cfg.fed.tracking_uri)
    return RunConfig.from_flat(flat), n, run_dir


def _resumed_config(
    project: Path,
    preset: str | None,
    overrides: str | dict[str, Any],
    out: Path | None,
    num_supernodes: int | None,
) -> tuple[RunConfig, int, Path]:
    """The config of the run being resumed: its saved one, with only safe keys changed."""
    import tomllib

    from fedspeech.config import check_resume_changes, parse_overrides, resolve_run_config
    from fedspeech_server.checkpoint import load_checkpoint

    if preset:
        raise ConfigError(
            "--preset with --resume: a resumed run continues with its saved configuration "
            "(run_config.toml in the run folder); give only --run-config changes"
        )
    requested = parse_overrides(overrides) if isinstance(overrides, str) else dict(overrides)
    if out is None:  # the run folder the overrides or the project name
        out = Path(str(requested.get("out-dir") or resolve_run_config(cwd=project).fed.out_dir))
    run_dir = out.resolve()
    saved_file = run_dir / "run_config.toml"
    if not saved_file.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no run to resume ({saved_file.name} is missing; a run started with "
            f"`fedspeech simulate --run-dir {run_dir}` writes it)"
        )
    try:
        saved = tomllib.loads(saved_file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{saved_file}: not valid TOML ({exc})") from exc
    if "tracking-uri" in requested:
        requested["tracking-uri"] = absolute_sqlite_uri(str(requested["tracking-uri"]))
    n = int(saved["num-partitions"])
    if num_supernodes is not None and num_supernodes != n:
        raise ConfigError(
            f"--num-supernodes {num_supernodes}: the run in {run_dir} has {n} clients, and a "
            "resumed run keeps them"
        )
    flat = {**saved, **requested, "resume": True}
    changed = check_resume_changes(saved, flat)
    if changed:
        log.info("resuming with %s", ", ".join(f"{k} = {flat[k]!r}" for k in changed))
    # Verified here (sizes and hashes against its manifest) so that a damaged checkpoint is
    # refused with its reason before any Flower process starts.
    if load_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
    return RunConfig.from_flat(flat), n, run_dir


def _close_tracking(cfg: RunConfig, run_dir: Path, status: EndStatus, reason: str) -> None:
    """Close the run's tracking run if its server could not (see ``close_unfinished_run``)."""
    from fedspeech_server.tracking import close_unfinished_run

    try:
        close_unfinished_run(cfg, run_dir, status, reason)
    except Exception:  # never hide the run's own outcome behind a tracking problem
        log.exception("could not close the tracking run of %s", run_dir)


def absolute_sqlite_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` relative to the current folder -> an absolute sqlite URI.

    The ServerApp runs from a copy of the app under ``$FLWR_HOME``: a relative database path would
    land there instead of where the user launched the run.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/"):
        return uri
    return prefix + str(Path(uri[len(prefix) :]).resolve())


def _positive_int(text: str) -> int:
    """``--client-cpus``: a whole number >= 1 (Flower's ``client-resources-num-cpus``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of CPUs") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_engine_option(parser: argparse.ArgumentParser) -> None:
    """``--engine`` (``simulate`` and ``demo``)."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="local: the ServerApp and ClientApps in this process and a pool of worker "
        "processes, without Flower's runtime processes (~2 s start-up instead of ~7 s); flower: "
        "Flower's simulation runtime (a local SuperLink, Ray actors; GPU shares, Ray clusters); "
        "auto: flower when --client-gpus or RAY_ADDRESS asks for Ray, local otherwise",
    )


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedspeech.app.interrupts import interrupts_ignored, stop_on_signals

    stop_on_signals()
    try:
        outcome = simulate(
            preset=args.preset,
            overrides=args.run_config,
            num_supernodes=args.num_supernodes,
            out=args.run_dir,
            resume=args.resume,
            client_cpus=args.client_cpus,
            client_gpus=args.client_gpus,
            engine=args.engine,
        )
    except SimulationInterrupted as stop:
        outcome, interrupted = stop.outcome, True
    else:
        interrupted = False
    with interrupts_ignored():  # every process is stopped: report how the run ended
        return report_outcome(outcome, interrupted=interrupted)


def report_outcome(outcome: SimulationOutcome, *, interrupted: bool = False) -> int:
    """Print where the run stands, its privacy per client, and one final line; the exit code.

    0 only when the run finished as asked; 130 when interrupted; 1 otherwise.
    """
    from fedspeech_server.rounds import privacy_summary

    last = outcome.history[-1] if outcome.history else {}
    if outcome.clients and any(c.get("epsilon") is not None for c in outcome.clients.values()):
        if outcome.finished:  # the server printed the table as it finished
            print(f"privacy per client: above, and in {outcome.run_dir / 'report' / 'privacy.tsv'}")
        else:
            print("privacy per client (epsilon spent, budget, rounds declined / charged twice):")
            print(privacy_summary(outcome.clients), end="")
    print(f"run folder: {outcome.run_dir}")
    print(f"tracking run id: {outcome.tracking_run_id or '- (no tracking run was opened)'}")
    if outcome.model_dir is not None:
        print(f"model: {outcome.model_dir}")
    scores = (
        f"WER {_fmt(last.get('wer'))}, CER {_fmt(last.get('cer'))}, "
        f"epsilon max {_fmt(last.get('epsilon_max'))}"
        + (f", user epsilon {_fmt(last['user_epsilon'])}" if last.get("user_epsilon") else "")
    )
    again = (
        f"continue with `fedspeech simulate --run-dir {outcome.run_dir} --resume`"
        if outcome.rounds
        else "no round was completed, so there is nothing to resume: start the run again"
    )
    if outcome.finished:
        print(f"simulate: finished {outcome.rounds} rounds in {outcome.seconds:.0f} s; {scores}")
        return 0
    if interrupted:
        print(f"simulate: interrupted after round {outcome.rounds}; {again}")
        return 130
    reason = " ".join(
        (outcome.error or f"flwr run exited with status {outcome.returncode}").split()
    )
    if len(reason) > _REASON_CHARS:  # one line: the whole text is in tracking.json
        reason = reason[:_REASON_CHARS] + f"... (in full: {outcome.run_dir / 'tracking.json'})"
    print(
        f"simulate: FAILED after round {outcome.rounds}: {reason} (logs in "
        f"{outcome.run_dir / '.flwr'}); {again} once the cause is fixed"
    )
    return 1


def _outcome(run_dir: Path, returncode: int, seconds: float) -> SimulationOutcome:
    from fedspeech_server.checkpoint import RunState, find_checkpoint
    from fedspeech_server.tracking import read_tracking_info

    path = find_checkpoint(run_dir)
    state = RunState()
    if path is not None:
        state = RunState.from_json((path / "state.json").read_text(encoding="utf-8"))
    model_dir = run_dir / "model"
    tracking = read_tracking_info(run_dir)
    return SimulationOutcome(
        run_dir=run_dir,
        returncode=returncode,
        rounds=state.round,
        finished=state.finished and (model_dir / "config.json").is_file(),
        model_dir=model_dir if (model_dir / "config.json").is_file() else None,
        history=state.history,
        tracking_run_id=state.tracking_run_id or tracking.get("run_id"),
        seconds=seconds,
        error=tracking.get("error"),
        clients=state.clients,
    )


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
