"""FedProx on the client: the proximal pull keeps local weights near the global model, DP or not."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from fedspeech.config import RunConfig
from fedspeech.model import BiGRUCTC, plain_state_dict
from fedspeech_client.local_round import run_round
from fedspeech_client.proximal import add_proximal_step
from fedspeech_client.train import TrainConfig, train_local
from tests.conftest import TINY_NODE, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class _Utt:
    feats: torch.Tensor
    labels: torch.Tensor


def _examples(n: int) -> list[_Utt]:
    g = torch.Generator().manual_seed(0)
    return [_Utt(torch.randn(12, 6, generator=g), torch.randint(1, 29, (3,), generator=g))
            for _ in range(n)]  # fmt: skip


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float(torch.sum((a[k] - b[k]) ** 2)) for k in a) ** 0.5


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_proximal_term_keeps_weights_closer_to_the_global_model(dp: bool) -> None:
    # Prepare: several steps with a large lr, so plain training wanders off
    model = tiny_model()
    start = plain_state_dict(model)
    cfg = TrainConfig(epochs=4, batch_size=4, lr=0.05, dp=dp, noise_multiplier=0.5, dp_seed=7)
    # Execute
    free = train_local(model, _examples(16), cfg)
    prox = train_local(model, _examples(16), cfg, proximal_mu=10.0)
    # Assert: the proximal run moved, but less far from the start
    far, near = _distance(free.state_dict, start), _distance(prox.state_dict, start)
    assert 0 < near < 0.8 * far, (near, far)
    assert prox.epsilon == free.epsilon  # the pull is post-processing: no privacy cost
    assert prox.metrics["num-steps"] == free.metrics["num-steps"]


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_zero_mu_is_bit_identical_to_no_proximal_term(dp: bool) -> None:
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.05, dp=dp, noise_multiplier=0.5, dp_seed=7)
    without = train_local(tiny_model(), _examples(8), cfg)
    zero = train_local(tiny_model(), _examples(8), cfg, proximal_mu=0.0)
    assert all(torch.equal(without.state_dict[k], v) for k, v in zero.state_dict.items())


def test_dp_proximal_pull_runs_once_per_logical_step() -> None:
    # Physical batches of 2 accumulate into one DP step: the pull must not run per chunk.
    cfg = TrainConfig(epochs=2, batch_size=6, lr=0.05, noise_multiplier=1.0, dp_seed=3)
    whole = train_local(tiny_model(), _examples(12), cfg, proximal_mu=5.0)
    split = train_local(
        tiny_model(), _examples(12), replace(cfg, max_physical_batch_size=2), proximal_mu=5.0
    )
    for name, value in whole.state_dict.items():
        torch.testing.assert_close(split.state_dict[name], value, rtol=0, atol=1e-6)


def test_proximal_step_is_a_gradient_step_on_the_proximal_term() -> None:
    # Prepare: SGD without gradients, weights displaced from where the optimizer was built
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    add_proximal_step(optimizer, mu=2.0)
    anchor = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    # Execute
    optimizer.step()
    # Assert: w - lr * mu * (w - w0) = w0 + (1 - 0.2) * 1
    torch.testing.assert_close(net.weight.detach(), anchor + 0.8)
    with pytest.raises(ValueError, match="diverge"):
        add_proximal_step(torch.optim.SGD(net.parameters(), lr=0.5), mu=3.0)
    with pytest.raises(ValueError, match=">= 0"):
        add_proximal_step(optimizer, mu=-1.0)


def test_client_round_passes_the_servers_mu_to_training() -> None:
    cfg = RunConfig.from_flat(
        {**TINY_NODE, "hidden-size": 8, "batch-size": 4, "dp-seed": 0, "lr": 0.05}
    )
    torch.manual_seed(0)
    start = plain_state_dict(BiGRUCTC(cfg.model.model_config(cfg.features.frame_dim, 29)))
    kwargs = {"server_round": 1, "prior": None, "budget": None}
    free = run_round(start, _examples(8), cfg, **kwargs)  # type: ignore[arg-type]
    prox = run_round(start, _examples(8), cfg, proximal_mu=10.0, **kwargs)  # type: ignore[arg-type]
    assert free.state_dict is not None and prox.state_dict is not None
    assert _distance(prox.state_dict, start) < _distance(free.state_dict, start)
    assert prox.metrics["epsilon"] == free.metrics["epsilon"]
