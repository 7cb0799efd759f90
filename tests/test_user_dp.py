"""User-level DP at the server (``fedspeech_server.user_dp``): clipping bound, noise calibration, accounting
across rounds and a resume, adaptive clipping, and the config rules of ``privacy-unit``.

The accounting test drives the real ServerApp round loop (``fedspeech_server.app.main``) with a fake Grid;
the federated simulation with ``privacy-unit = "both"`` is in tests/test_federation.py.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from fedspeech.config import ConfigError, RunConfig
from fedspeech.model import BiGRUCTC, plain_state_dict
from fedspeech.privacy_config import PrivacyConfig
from fedspeech.privacy_ledger import PrivacyLedger
from fedspeech_client.local_round import run_round
from fedspeech_features.manifest import write_manifest
from fedspeech_features.text import CharTokenizer
from fedspeech_server.app import main as server_main
from fedspeech_server.sampling import Cohort
from fedspeech_server.tracking import read_rounds
from fedspeech_server.user_dp import (
    UserDPRelease,
    UserDPState,
    UserLevelDP,
    clip_update,
    flat_norm,
    update_noise_multiplier,
)
from tests.conftest import TINY_NODE

pytestmark = pytest.mark.usefixtures("one_thread", "flower_server_identity")

USER_DELTA = 1e-5


def _random_updates(
    rng: np.random.Generator, n: int, norms: np.ndarray | None = None
) -> list[dict[str, np.ndarray]]:
    """``n`` updates of a two-tensor model; each of L2 norm ``norms[i]`` (default: 0.01..100)."""
    norms = np.exp(rng.uniform(np.log(0.01), np.log(100.0), n)) if norms is None else norms
    out = []
    for norm in norms:
        flat = rng.normal(size=7)
        flat *= norm / np.linalg.norm(flat)
        out.append({"w": flat[:6].reshape(2, 3), "b": flat[6:]})
    return out


def _zeros() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 3), np.float32), "b": np.zeros(1, np.float32)}


# ---------------------------------------------------------------- (a) clipping bound


def test_every_clipped_update_is_within_the_bound_and_one_client_moves_the_mean_by_c_over_m() -> (
    None
):
    # Prepare: 12 updates with norms from 0.01 to 100, clipping norm 0.5, 16 clients sampled
    rng = np.random.default_rng(0)
    clip, sampled = 0.5, 16
    cohort = Cohort(tuple(range(12)), population=20, sample_rate=0.8)  # expected q N = 16
    updates = _random_updates(rng, 12)
    cfg = PrivacyConfig(privacy_unit="user", user_noise_multiplier=1.1, user_clip_norm=clip)
    # Assert: every clipped delta has norm <= C; small ones are untouched
    for update in updates:
        clipped, norm = clip_update(update, clip)
        assert flat_norm(clipped) <= clip * (1 + 1e-12)
        if norm <= clip:
            assert all(np.array_equal(clipped[k], update[k]) for k in update)
    # Execute: the aggregate with every client, and with each one left out (same noise draw)
    everyone, _ = UserLevelDP(cfg, rng=np.random.default_rng(7)).release(
        _zeros(), updates, cohort=cohort
    )
    changes = []
    for i in range(len(updates)):
        without, _ = UserLevelDP(cfg, rng=np.random.default_rng(7)).release(
            _zeros(), updates[:i] + updates[i + 1 :], cohort=cohort
        )
        diff = {k: everyone[k].astype(np.float64) - without[k] for k in everyone}
        changes.append(flat_norm(diff))
    # Assert: removing one client changes the aggregate by at most C / m (float32 rounding aside)
    assert max(changes) <= clip / sampled * (1 + 1e-5)
    assert max(changes) == pytest.approx(clip / sampled, rel=1e-5)  # a clipped one attains it


def test_non_float_arrays_are_kept_and_dtypes_preserved() -> None:
    base = {"w": np.zeros((2, 3), np.float32), "steps": np.array([3], np.int64)}
    update = {"w": np.ones((2, 3), np.float32), "steps": np.array([9], np.int64)}
    cfg = PrivacyConfig(privacy_unit="user")
    new, _ = UserLevelDP(cfg, rng=np.random.default_rng(0)).release(
        base, [update], cohort=Cohort((1,), 1, 1.0)
    )
    assert new["w"].dtype == np.float32 and new["steps"].tolist() == [3]


# ---------------------------------------------------------------- (b) noise calibration


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_noise_std_on_the_mean_is_z_c_over_m(adaptive: bool) -> None:
    # Prepare: zero updates (only noise moves the model), z 1.3, C 0.7, 8 sampled
    z, clip, sampled = 1.3, 0.7, 8
    cfg = PrivacyConfig(
        privacy_unit="user",
        user_noise_multiplier=z,
        user_clip_norm=clip,
        adaptive_clipping=adaptive,
        user_clip_count_stddev=2.0 if adaptive else None,
    )
    template = {"w": np.zeros((50, 100), np.float32)}
    mechanism = UserLevelDP(cfg, rng=np.random.default_rng(1))
    # Execute: 20 releases x 5000 coordinates = 100,000 draws
    draws, releases = [], []
    for _ in range(20):
        mechanism.clip_norm = clip  # adaptive clipping would move it
        new, release = mechanism.release(
            template, [template, template, template], cohort=Cohort((1, 2, 3), sampled, 1.0)
        )
        draws.append(new["w"].astype(np.float64).ravel())
        releases.append(release)
    values = np.concatenate(draws)
    # Assert: std z_u C / m within 1% (the sample std's standard error is 0.22% here), mean ~ 0
    z_u = update_noise_multiplier(z, 2.0) if adaptive else z
    expected = z_u * clip / sampled
    assert values.std() == pytest.approx(expected, rel=0.01)
    assert abs(values.mean()) < 4 * expected / math.sqrt(values.size)
    assert all(r.noise_std == pytest.approx(expected) for r in releases)
    if adaptive:  # the count's noise is paid for with more update noise: z_u > z
        assert z_u == pytest.approx((z**-2 - 4.0**-2) ** -0.5) and z_u > z
        assert all(r.noise_multiplier == z for r in releases)  # the accountant charges z


# ---------------------------------------------------------------- (d) adaptive clipping


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clipping_moves_the_norm_to_the_target_quantile(quantile: float) -> None:
    # Prepare: 100 clients a round, update norms log-normal (median 1), C starting at 0.05
    rng = np.random.default_rng(2)
    cfg = PrivacyConfig(
        privacy_unit="user",
        user_clip_norm=0.05,
        adaptive_clipping=True,
        user_clip_quantile=quantile,
    )
    mechanism = UserLevelDP(cfg, rng=np.random.default_rng(3))
    target = math.exp(0.5 * float(np.quantile(rng.standard_normal(1_000_000), quantile)))
    # Execute: 300 rounds
    trace = []
    for _ in range(300):
        updates = _random_updates(rng, 100, np.exp(0.5 * rng.standard_normal(100)))
        _, release = mechanism.release(
            _zeros(), updates, cohort=Cohort(tuple(range(100)), 100, 1.0)
        )
        trace.append(release.clip_norm)
        assert release.unclipped_share is not None
    # Assert: it climbed from 0.05 and settled within 15% of the norms' target quantile
    settled = float(np.mean(trace[-100:]))
    assert trace[0] == 0.05 and trace[10] > 0.05
    assert settled == pytest.approx(target, rel=0.15), (settled, target)


# ---------------------------------------------------------------- ledger


def _release(z: float = 1.0, q: float = 0.5, clip: float = 1.0) -> UserDPRelease:
    return UserDPRelease(z, z, q, clip, clip, 2, 4, 2.0, z * clip / 2)


def test_state_charges_a_round_once_and_round_trips() -> None:
    empty = UserDPState(PrivacyLedger(USER_DELTA))
    state = empty.record(1, _release()).record(2, _release())
    assert state.ledger.history == ((1.0, 0.5, 2),) and state.ledger.num_steps == 2
    with pytest.raises(ValueError, match="already accounted"):
        state.record(2, _release())
    state = state.record(3, _release(q=0.25))
    assert state.ledger.history == ((1.0, 0.5, 2), (1.0, 0.25, 1))
    restored = json.loads(json.dumps(state.to_dict()))
    assert UserDPState.from_dict(restored, delta=USER_DELTA) == state
    assert UserDPState.from_dict({}, delta=USER_DELTA) == empty
    assert empty.epsilon() == 0.0


def test_a_checkpoint_of_the_earlier_format_keeps_its_spend() -> None:
    legacy = {"accountant": "rdp", "history": [[1.2, 0.5, 4]], "last_round": 4, "clip_norm": 0.3}
    state = UserDPState.from_dict(legacy, delta=USER_DELTA)
    assert state.ledger == PrivacyLedger(USER_DELTA, ((1.2, 0.5, 4),))
    assert (state.last_round, state.clip_norm) == (4, 0.3)


# ---------------------------------------------------------------- (c) accounting in the server


class _FakeGrid:
    """Nodes 1..n that answer every train message with the sent weights + 0.01 (num-examples 10)."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            sent = msg.content.array_records["arrays"]
            arrays = ArrayRecord({k: Array(v.numpy() + np.float32(0.01)) for k, v in sent.items()})
            metrics = MetricRecord({"num-examples": 10.0, "train-loss": 1.0, "declined": 0.0})
            replies.append(
                Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
            )
        return replies


def _server_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    eval_manifest = tmp_path / "eval.tsv"
    write_manifest(eval_manifest, [])  # no central evaluation: accounting is the point here
    return RunConfig.from_flat(
        {
            **TINY_NODE,
            "server-threads": 1,
            "eval-manifest": str(eval_manifest),
            "out-dir": str(tmp_path / "run"),
            "data-dir": str(tmp_path / "data"),
            "tracking-uri": "",
            **overrides,
        }
    ).to_flat()


def _context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def _rdp(z: float, q: float, rounds: int) -> float:
    accountant = RDPAccountant()
    accountant.history = [(z, q, rounds)]
    return float(accountant.get_epsilon(delta=USER_DELTA))


def test_user_epsilon_is_the_rdp_accountant_over_rounds_and_keeps_growing_across_a_resume(
    tmp_path: Path,
) -> None:
    # Prepare: 4 nodes, each joins a round with q = 0.5 (from fraction-train), z = 1.2, adaptive
    z = 1.2
    settings = {
        **{"privacy-unit": "user", "user-noise-multiplier": z, "user-delta": USER_DELTA},
        **{"adaptive-clipping": True, "user-clip-norm": 0.01, "fraction-train": 0.5},
        **{"min-clients": 2, "dp-seed": 3},
    }
    flat = _server_config(tmp_path, **settings, **{"num-server-rounds": 2})
    run_dir = tmp_path / "run"
    # Execute: 2 rounds, then resume to 4, then "resume" again with nothing left to run
    server_main(_FakeGrid(4), _context(flat))  # type: ignore[arg-type]
    after_two = json.loads((run_dir / "checkpoint" / "state.json").read_text())["user_privacy"]
    resumed = {**flat, "num-server-rounds": 4, "resume": True}
    server_main(_FakeGrid(4), _context(resumed))  # type: ignore[arg-type]
    server_main(_FakeGrid(4), _context(resumed))  # type: ignore[arg-type]
    # Assert: round r's user epsilon is Opacus's RDP epsilon of r steps at (z, q = 0.5)
    rows = read_rounds(run_dir)
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    epsilons = [row["user_epsilon"] for row in rows]
    for r, eps in enumerate(epsilons, start=1):
        assert eps == pytest.approx(_rdp(z, 0.5, r), rel=1e-12)
    assert all(b > a for a, b in pairwise(epsilons))
    assert all(row["user_sample_rate"] == 0.5 for row in rows)
    # Assert: the ledger in the checkpoint charged each round once; C carried across the resume
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert after_two["ledger"] == {"delta": USER_DELTA, "history": [[z, 0.5, 2]]}
    assert after_two["last_round"] == 2
    assert state["user_privacy"]["ledger"]["history"] == [[z, 0.5, 4]]
    assert state["user_privacy"]["last_round"] == 4
    assert rows[2]["user_clip_norm"] == pytest.approx(after_two["clip_norm"])
    assert rows[1]["user_clip_norm"] != rows[0]["user_clip_norm"]  # adaptive: it moved
    # Assert: the final model records the user-level guarantee
    provenance = json.loads((run_dir / "model" / "config.json").read_text())["provenance"]
    assert provenance["privacy_unit"] == "user" and provenance["noise_multiplier"] is None
    assert provenance["user_epsilon"] == pytest.approx(epsilons[-1])
    assert provenance["clients"] is None and provenance["epsilon"] is None  # per-client values


class _DroppingGrid(_FakeGrid):
    """Like ``_FakeGrid``, but nodes whose id is a multiple of 7 never reply (dropouts)."""

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        kept = [m for m in messages if m.metadata.dst_node_id % 7]
        return super().send_and_receive(kept, timeout=timeout)


@pytest.mark.slow  # about 2.5 min: 2000 rounds through the ServerApp, checkpoints included
@pytest.mark.timeout(900)
def test_poisson_cohorts_are_binomial_and_user_epsilon_is_exact_over_2000_rounds(
    tmp_path: Path,
) -> None:
    # Prepare: N = 100 nodes, q = 0.1, z = 1.1, fixed clipping; 14 nodes never reply
    n, q, z, clip = 100, 0.1, 1.1, 0.5
    settings = {
        **{"privacy-unit": "user", "user-noise-multiplier": z, "user-delta": USER_DELTA},
        **{"user-clip-norm": clip, "client-sample-rate": q, "min-clients": n, "dp-seed": 0},
    }
    flat = _server_config(tmp_path, **settings, **{"num-server-rounds": 1000})
    run_dir = tmp_path / "run"
    # Execute: 1000 rounds, then a resume to 2000
    server_main(_DroppingGrid(n), _context(flat))  # type: ignore[arg-type]
    resumed = {**flat, "num-server-rounds": 2000, "resume": True}
    server_main(_DroppingGrid(n), _context(resumed))  # type: ignore[arg-type]
    # Assert: cohort sizes are Binomial(100, 0.1): mean 10, variance 9, within 5%
    rows = read_rounds(run_dir)
    assert [row["round"] for row in rows] == list(range(1, 2001))
    sizes = np.array([row["clients_sampled"] for row in rows], dtype=np.float64)
    assert sizes.mean() == pytest.approx(n * q, rel=0.05)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.05)
    assert sum(row["clients_failed"] for row in rows) > 0  # dropouts happened
    # Assert: dropouts change neither the denominator (q N) nor the noise std (z C / (q N))
    assert {row["user_noise_std"] for row in rows} == {z * clip / (q * n)}
    assert {row["user_sample_rate"] for row in rows} == {q}
    # Assert: user epsilon after r rounds is Opacus's RDPAccountant(z, q, r), across the resume
    for r in (1, 2, 999, 1000, 1001, 1002, *range(100, 2001, 100)):
        assert rows[r - 1]["user_epsilon"] == pytest.approx(_rdp(z, q, r), rel=0, abs=1e-9)
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["user_privacy"]["ledger"]["history"] == [[z, q, 2000]]
    print(
        f"\n2000 rounds, N {n}, q {q}: cohort mean {sizes.mean():.4f} (10), variance "
        f"{sizes.var():.4f} (9); user epsilon after 2000 rounds {rows[-1]['user_epsilon']:.6f}"
    )


def test_a_dropped_client_changes_neither_the_denominator_nor_the_noise() -> None:
    # Prepare: a cohort of 3 drawn out of 10 at q = 0.3 (expected 3), one client drops out
    cfg = PrivacyConfig(privacy_unit="user", user_noise_multiplier=1.5, user_clip_norm=0.2)
    cohort = Cohort((1, 2, 3), population=10, sample_rate=0.3)
    updates = _random_updates(np.random.default_rng(4), 3)
    # Execute: the same noise draw with all three and with the third missing
    full, full_release = UserLevelDP(cfg, rng=np.random.default_rng(9)).release(
        _zeros(), updates, cohort=cohort
    )
    dropped, dropped_release = UserLevelDP(cfg, rng=np.random.default_rng(9)).release(
        _zeros(), updates[:2], cohort=cohort
    )
    # Assert: same noise std and denominator; the aggregates differ by the clipped update / qN
    assert full_release.noise_std == dropped_release.noise_std == 1.5 * 0.2 / 3.0
    assert full_release.expected == dropped_release.expected == pytest.approx(3.0)
    clipped, _ = clip_update(updates[2], 0.2)
    for key in full:
        diff = full[key].astype(np.float64) - dropped[key].astype(np.float64)
        np.testing.assert_allclose(diff, clipped[key] / 3.0, atol=1e-6)


def test_an_empty_draw_releases_noise_only_and_is_charged(tmp_path: Path) -> None:
    # Prepare: q so small that no node of 3 is ever drawn
    overrides = {"privacy-unit": "user", "client-sample-rate": 1e-9, "num-server-rounds": 2}
    overrides.update({"min-clients": 3, "user-noise-multiplier": 2.0, "user-clip-norm": 1.0})
    flat = _server_config(tmp_path, **overrides)
    # Execute
    server_main(_FakeGrid(3), _context(flat))  # type: ignore[arg-type]
    # Assert: both rounds drew nobody, moved the model by noise, and were charged
    rows = read_rounds(tmp_path / "run")
    assert [(r["clients_sampled"], r["clients_ok"]) for r in rows] == [(0, 0), (0, 0)]
    assert all(r["update_norm"] > 0 for r in rows)
    assert rows[1]["user_epsilon"] == pytest.approx(_rdp(2.0, 1e-9, 2), rel=1e-12)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_every_allowed_strategy_steps_on_the_private_aggregate(
    tmp_path: Path, strategy: str
) -> None:
    # Prepare: 2 clients, both sampled (q = 1); negligible noise (z 1e-6) and C above the
    # updates' norm, so the private mean is the plain mean update (+0.01 on every weight)
    overrides = {"privacy-unit": "user", "strategy": strategy, "num-server-rounds": 1}
    overrides.update({"user-noise-multiplier": 1e-6, "user-clip-norm": 4.0, "min-clients": 2})
    flat = _server_config(tmp_path, **overrides)
    # Execute
    server_main(_FakeGrid(2), _context(flat))  # type: ignore[arg-type]
    # Assert: the global model moved by that mean update (FedAdam: by its server step on it)
    (row,) = read_rounds(tmp_path / "run")
    assert row["user_epsilon"] > 0 and row["user_sample_rate"] == 1.0
    provenance = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert provenance["provenance"]["strategy"] == strategy
    assert row["update_norm"] > 0
    if strategy != "fedadam":
        n = sum(int(np.prod(np.shape(v))) for v in _initial(flat).values())
        assert row["update_norm"] == pytest.approx(0.01 * math.sqrt(n), rel=1e-3)


class _Float32Grid(_FakeGrid):
    """Like ``_FakeGrid``, but the replies are float32 whatever was sent (a real client trains
    a float32 torch model and sends its weights)."""

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            arrays = reply.content.array_records["arrays"]
            for k in list(arrays.keys()):
                arrays[k] = Array(arrays[k].numpy().astype(np.float32))
        return replies


@pytest.mark.parametrize(
    ("strategy", "unit"),
    [*((s, "sample") for s in ("fedavg", "fedadam", "fedprox", "fedmedian")), ("fedadam", "user")],
)
def test_every_strategy_keeps_training_after_round_one(
    tmp_path: Path, strategy: str, unit: str
) -> None:
    # Prepare: 3 rounds of 2 clients that answer with float32 weights
    overrides = {"strategy": strategy, "privacy-unit": unit, "num-server-rounds": 3}
    overrides.update({"min-clients": 2, "user-noise-multiplier": 1e-6, "user-clip-norm": 4.0})
    flat = _server_config(tmp_path, **overrides)
    # Execute
    server_main(_Float32Grid(2), _context(flat))  # type: ignore[arg-type]
    # Assert: every round aggregated both replies; none was rejected because the global model's
    # dtype drifted (Flower's FedAdam steps in float64)
    rows = read_rounds(tmp_path / "run")
    assert [(r["round"], r["clients_ok"], r["clients_rejected"]) for r in rows] == [
        (1, 2, 0),
        (2, 2, 0),
        (3, 2, 0),
    ]


def _initial(flat: dict[str, Any]) -> dict[str, torch.Tensor]:
    cfg = RunConfig.from_flat(flat)
    model_config = cfg.model.model_config(cfg.features.frame_dim, CharTokenizer().vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        return plain_state_dict(BiGRUCTC(model_config))


def test_user_level_clients_train_without_dp_sgd() -> None:
    # Prepare: privacy-unit "user": the client's DP-SGD is off, whatever dp says
    cfg = RunConfig.from_flat(
        {
            **TINY_NODE,
            **{"batch-size": 2, "privacy-unit": "user"},
        }
    )
    model = BiGRUCTC(cfg.model.model_config(cfg.features.frame_dim, CharTokenizer().vocab_size))
    g = torch.Generator().manual_seed(0)
    examples = [_Utt(torch.randn(8, 6, generator=g), torch.tensor([3, 4])) for _ in range(4)]
    # Execute
    outcome = run_round(
        plain_state_dict(model), examples, cfg, server_round=1, prior=None, budget=None
    )
    # Assert
    assert cfg.train.dp and cfg.user_level_dp and not cfg.sample_level_dp
    assert outcome.privacy_state is None and "epsilon" not in outcome.metrics


class _Utt:
    def __init__(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        self.feats, self.labels = feats, labels


# ---------------------------------------------------------------- config rules


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy-unit": "user", "dp": False}, "non-private baseline"),
        ({"privacy-unit": "both", "strategy": "fedmedian"}, "median"),
        ({"privacy-unit": "people"}, "privacy-unit"),
        ({"user-noise-multiplier": 0.0}, "user-noise-multiplier"),
        ({"user-clip-count-stddev": 0.4, "user-noise-multiplier": 1.0}, "must exceed"),
        ({"user-clip-quantile": 1.0}, "user-clip-quantile"),
    ],
)
def test_contradictory_privacy_settings_are_refused(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flat(overrides)


def test_privacy_units_choose_where_noise_is_added() -> None:
    units = {u: RunConfig.from_flat({"privacy-unit": u}) for u in ("sample", "user", "both")}
    assert [(c.sample_level_dp, c.user_level_dp) for c in units.values()] == [
        (True, False),
        (False, True),
        (True, True),
    ]
    baseline = RunConfig.from_flat({"dp": False})
    assert not baseline.sample_level_dp and not baseline.user_level_dp
