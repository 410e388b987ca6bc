"""Issue 5 acceptance: partial sharing, clipping, distributed DP noise and a cryptographic aggregator in
one Compose, inside run_federated — and the same run in the clear gives the same model up to the
aggregator's stated error."""

from __future__ import annotations

import warnings

import pytest
import torch

from privfl.data import SyntheticHistology, partition
from privfl.defenses import (
    CKKSAggregation,
    ClipUpdate,
    Compose,
    GaussianMechanism,
    NoDefense,
    PartialSharing,
    SecureAggregation,
    SeededNoise,
)
from privfl.defenses.base import Defense
from privfl.fl import ClientConfig, run_federated
from privfl.models import build_model
from privfl.updates import weighted_mean

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure")

SHARED = ["down.*", "up.*"]  # unet-tiny: share the encoder/decoder trunk, keep `dec*`/`head*` local
CLIP, Z = 0.5, 0.3


class InTheClear(NoDefense):
    """The plain weighted mean (stands in for the aggregator when checking its error)."""

    def aggregate(self, payloads, ctx):
        return weighted_mean(list(payloads), ctx.weights)


def run(aggregator: Defense, rounds: int = 2):
    data = SyntheticHistology(24, size=32, seed=0, sites=3)
    clients = partition(data, "iid", 3, seed=0)
    torch.manual_seed(0)
    model = build_model("unet-tiny", num_classes=4)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    defense = Compose(PartialSharing(share=SHARED), ClipUpdate(CLIP),
                      GaussianMechanism(noise_multiplier=Z, placement="distributed", noise=SeededNoise(1)),
                      aggregator)
    result = run_federated(model, clients, None, rounds, config=ClientConfig(local_steps=1, batch_size=4),
                           defense=defense, progress=False, val_fraction=0.25)
    return result, defense, initial


@pytest.fixture(scope="module")
def clear():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # distributed noise without a secure aggregator: the reference run
        return run(InTheClear())


@pytest.mark.parametrize("make,tol", [
    (lambda: SecureAggregation(threshold=2, clip_range=4 * CLIP), 1e-5),
    (lambda: CKKSAggregation("precise"), 1e-6),
    (lambda: CKKSAggregation("compact"), 1e-3),
])
def test_partial_clip_noise_and_crypto_aggregation_in_run_federated(clear, make, tol):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(secure aggregator|in the clear)")  # must not fire here
        aggregator = make()
        result, defense, initial = run(aggregator)
    ref, ref_defense, _ = clear
    assert defense.accountant.steps == 2
    report = result.history[-1]["defense_report"]
    assert list(report) == [f"3:{type(aggregator).__name__}"]  # bytes on the wire etc., per round
    assert result.history[-1]["privacy"] == ref.history[-1]["privacy"]
    for k, v in result.global_state.items():
        shared = any(k.startswith(p[:-1]) for p in SHARED)
        if not shared:  # kept local: the global copy never moves
            assert torch.equal(v, initial[k]), k
        else:
            assert not torch.equal(v, initial[k]), k
            torch.testing.assert_close(v, ref.global_state[k], rtol=0, atol=tol, msg=k)


def test_dropouts_under_distributed_noise_are_accounted_with_the_noise_that_survived():
    from privfl.defenses import PrivacyAccountant, RoundContext

    n, z = 5, 1.0
    gauss = GaussianMechanism(noise_multiplier=z, placement="distributed", noise=SeededNoise(0))
    defense = Compose(ClipUpdate(1.0), gauss, SecureAggregation(threshold=3, clip_range=8.0))
    ctx = RoundContext(0, n, tuple(range(n)), (0.2,) * n)
    defense.before_round(ctx)
    updates = [{"w": torch.full((50,), 0.01 * (i + 1))} for i in range(n)]
    payloads = [defense.protect(u, ctx.for_client(i)) if i < 3 else None for i, u in enumerate(updates)]
    mean = defense.aggregate(payloads, ctx)
    # 3 of 5 survived: each added std z*C/sqrt(5), so the survivors' mean has z_eff = z*sqrt(3/5)
    assert gauss.effective_noise_multiplier(ctx) == z  # without survivors: as configured
    reference = PrivacyAccountant()
    reference.record_gaussian(z * (3 / 5) ** 0.5)
    assert defense.accountant.epsilon(1e-5).epsilon == pytest.approx(reference.epsilon(1e-5).epsilon)
    assert mean["w"].shape == (50,)
