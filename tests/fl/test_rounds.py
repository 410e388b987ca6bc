"""privfl.fl.rounds: one FedAvg round (clients in order, then the server's average) and the plain
weighted sum that the federated linear classifiers and FedAvg-GAN average with."""

from __future__ import annotations

import pytest
import torch

from privfl.fl.rounds import fedavg_round, weighted_sum
from privfl.updates import weighted_mean


def test_fedavg_round_runs_clients_in_order_from_the_global_state_and_averages() -> None:
    start = {"w": torch.tensor([1.0, 2.0])}
    seen: list[tuple[int, torch.Tensor]] = []

    def local(state, c):
        seen.append((c, state["w"].clone()))
        return {"w": state["w"] + c}

    new = fedavg_round(start, [0, 1, 2], local, [1.0, 1.0, 2.0])
    assert [c for c, _ in seen] == [0, 1, 2] and all(torch.equal(w, start["w"]) for _, w in seen)
    expected = weighted_mean([{"w": start["w"] + c} for c in range(3)], [1.0, 1.0, 2.0])
    assert torch.equal(new["w"], expected["w"])
    summed = fedavg_round(start, [0, 1, 2], local, [1, 1, 2], average=weighted_sum)
    assert torch.allclose(summed["w"], start["w"] + 1.25)


def test_weighted_sum_is_the_left_to_right_sum_in_the_given_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(50, generator=g), "n": torch.tensor(2 * i + 1)} for i in range(3)]
    sizes = [30, 45, 20]
    w = [n / sum(sizes) for n in sizes]
    float32 = weighted_sum(states, sizes)
    assert torch.equal(float32["w"], sum(wi * s["w"] for wi, s in zip(w, states)))
    float64 = weighted_sum(states, sizes, dtype=torch.float64)
    assert torch.equal(float64["w"], sum(wi * s["w"].double() for wi, s in zip(w, states)).float())
    assert float64["n"].dtype == torch.int64 and int(float64["n"]) == 3  # (30·1 + 45·3 + 20·5) / 95 ≈ 2.79
    for bad in ([1, 2], [0, 0, 0], [1, -1, 1], [1, float("nan"), 1]):
        with pytest.raises(ValueError):
            weighted_sum(states, bad)
