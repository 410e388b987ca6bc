"""FedAvg-GAN, DSL's federated baseline: every site trains a whole pix2pix locally, the server averages.

Each round every site loads the global generator and discriminators, trains them on its own data
for ``local_epochs`` (the same losses and exchange as DSL, but inside the site), and sends both
networks' weights; the server averages them weighted by site size (a discriminator per modality
over the sites holding that modality). Downstream models then train on the global generator's
synthetic data, as for DSL.

Threat model: the server (and anyone it shares the model with) sees every site's generator and
discriminator weights each round — model updates of networks trained on the real images, with the
leakage of any FedAvg update (gradient inversion, membership inference); no masks, images or image
gradients leave a site.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from privfl.fl.rounds import fedavg_round, weighted_sum
from privfl.progress import progress_bar
from privfl.sharing.dsl.protocol import DSLServer, DSLSite
from privfl.sharing.dsl.train import DSLConfig, DSLResult, DSLRun, SiteData

__all__ = ["train_fedavg_gan"]

#: FedAvg-GAN's server average: ``Σ_i w_i·θ_i`` accumulated in float64 (not
#: :func:`privfl.updates.weighted_mean`, which rounds differently).
_average = partial(weighted_sum, dtype=torch.float64)


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def train_fedavg_gan(
    sites: Sequence[SiteData],
    config: DSLConfig,
    *,
    rounds: int,
    local_epochs: int = 1,
    perceptual: nn.Module | None = None,
    progress: bool = False,
) -> DSLResult:
    """Train FedAvg-GAN (module docstring): ``rounds`` rounds of ``local_epochs`` local epochs per site.

    Returns a :class:`~privfl.sharing.dsl.train.DSLResult` with variant ``"FedAvg-GAN"``; its
    ``traffic`` counts ``models_to_server`` and ``models_to_sites`` bytes (float32 weights). Seeded
    as :func:`~privfl.sharing.dsl.train.train_dsl`.
    """
    if rounds < 1 or local_epochs < 1:
        raise ValueError(f"rounds and local_epochs must be >= 1, got {rounds} and {local_epochs}")
    body = partial(_train_fedavg_gan, rounds=rounds, local_epochs=local_epochs, progress=progress)
    return DSLRun.seeded("train_fedavg_gan", sites, config, perceptual, None, None, body)


def _train_fedavg_gan(run: DSLRun, t0: float, rounds: int, local_epochs: int, progress: bool) -> DSLResult:
    config = run.config
    device = run.fabric.device
    sizes = [s.size for s in run.sites]
    servers = []
    for j in range(len(run.sites)):
        weights = torch.zeros(len(run.sites), len(config.modalities), device=device)
        weights[j] = torch.tensor(run.available[j], dtype=torch.float32, device=device)
        servers.append(DSLServer(copy.deepcopy(run.generator), weights, lr=config.lr, beta1=config.beta1))
    global_g = copy.deepcopy(run.generator.state_dict())
    global_d = {k: copy.deepcopy(d.state_dict()) for s in run.sites for k, d in s.discriminators.items()}
    traffic = {"models_to_server": 0, "models_to_sites": 0}
    marks = [0] * len(run.sites)

    def site_update(
        global_state: Mapping[str, Tensor], client: tuple[DSLSite, DSLServer]
    ) -> dict[str, Tensor]:
        site, server = client  # --- at the site ---
        server.generator.load_state_dict(global_state)
        for k, d in site.discriminators.items():
            d.load_state_dict(global_d[k])
        traffic["models_to_sites"] += _param_bytes(server.generator) + _param_bytes(site.discriminators)
        for _ in range(local_epochs * math.ceil(site.size / config.batch_size)):
            outputs, replies, _ = run.exchange(server, [site])
            server.step(outputs, replies)
        traffic["models_to_server"] += _param_bytes(server.generator) + _param_bytes(site.discriminators)
        return server.generator.state_dict()

    with progress_bar(progress, "FedAvg-GAN") as bar:
        task = bar.add_task("FedAvg-GAN", total=rounds, status="")
        for r in range(rounds):
            global_g = fedavg_round(
                global_g, list(zip(run.sites, servers)), site_update, sizes, average=_average
            )  # every site in turn, then the server
            # --- at the server: each modality's discriminator over the sites holding it ---
            for k in global_d:
                holders = [
                    (s.discriminators[k].state_dict(), n)
                    for s, n in zip(run.sites, sizes)
                    if k in s.discriminators
                ]
                global_d[k] = _average([h for h, _ in holders], [n for _, n in holders])
            marks = run.log_epoch(r, None, run.sites, marks)
            bar.update(task, advance=1, status=f"round {r + 1}")
    run.generator.load_state_dict(global_g)
    result = run.result("FedAvg-GAN", t0)
    result.traffic = traffic
    return result
