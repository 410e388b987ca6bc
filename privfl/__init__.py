"""Composable privacy defenses for federated learning, and the attacks that test them.

privfl protects the model updates of a federated-learning (FL) round and measures what the
protection buys. A defense takes and returns plain ``dict[str, Tensor]`` updates, so it drops into
any FL loop; every privacy number privfl prints comes from an accountant or a measured attack.

Subpackages and their main names (importing ``privfl`` itself loads none of them):

privfl.updates
    ``Update = dict[str, Tensor]``: ``flatten``/``unflatten``, ``apply``, ``weighted_mean``,
    ``global_l2_norm``, ``validate``.
privfl.defenses
    The ``Defense`` protocol (``protect`` on clients, ``aggregate`` on the server), ``Compose``,
    ``RoundContext``, ``NoDefense``. Differential privacy: ``ClipUpdate``,
    ``GaussianMechanism`` (local / central / distributed), ``LaplaceMechanism``, ``FedDPNoise``,
    ``PrivacyAccountant`` (RDP, PRV, PLD; the tightest is reported), ``dpsgd.DPSGD`` (opacus),
    ``SecureNoise``. What the server sees: ``SecureAggregation`` (Bonawitz et al.),
    ``CKKSAggregation`` (TenSEAL), ``PartialSharing``.
privfl.fl
    FedAvg: ``run_federated``, ``Server``, ``Client``, ``ClientConfig``.
privfl.attacks
    ``InvertingGradients`` (gradient inversion), ``LossThreshold`` and ``LiRA`` (membership
    inference), ``GradientSignAttack`` / ``bisect_site`` (real images from the gradients a
    Distributed Synthetic Learning site returns), their metrics and the empirical ε lower bound.
privfl.sharing
    Data sharing instead of model sharing: the federated DP-CVAE and DP-CGAN on embeddings;
    Distributed Synthetic Learning (``privfl.sharing.dsl``: DSL, MM-DSL, Hetero-MM-DSL, CL-DSL,
    FedAvg-GAN, FID and Dist-FID).
privfl.audit
    ``audit_mechanism`` / ``audit_defense``: an empirical DP audit against the accountant's ε.
privfl.experiments
    The experiments behind the benchmarks, each returning a JSON-ready record: membership inference
    vs DP-SGD (``experiments.membership``: ``run_membership_experiment``, ``FederatedTrainer``), the
    attack-vs-dp sweep (``experiments.attack_vs_dp``), the DP-CVAE and DSL comparisons
    (``experiments.dpcvae``, ``experiments.dsl``).
privfl.data, privfl.models, privfl.metrics
    ``SyntheticHistology`` and ``MultiStainHistology`` (no download), ``partition``;
    ``build_model`` (``unet``, ``unet-tiny``, ``dhunet``, ``dhunet-tiny``); Dice, Jaccard, pixel
    accuracy.
privfl.integrations.flower
    ``PrivflClient`` / ``PrivflStrategy``: the same defenses and accountant inside Flower.
privfl.bench
    ``python -m privfl.bench <job>``: the attack-vs-dp job, benchmarks, the ε calculator (the command
    line, presets, tables and reports around ``privfl.experiments``).
privfl.errors
    ``PrivflError``: the base of every exception privfl raises on bad input or a failed protocol.

Differential privacy in a hand-written FedAvg loop::

    import torch
    from privfl.defenses import ClipUpdate, Compose, GaussianMechanism, RoundContext
    from privfl.updates import apply

    state = {"w": torch.zeros(4)}
    defense = Compose(ClipUpdate(max_norm=1.0), GaussianMechanism(noise_multiplier=1.1, max_epsilon=10.0))
    for r in range(3):
        ctx = RoundContext(round=r, num_clients=2, sampled=(0, 1), weights=(0.5, 0.5))
        defense.before_round(ctx)                            # refuses a round over budget
        updates = [{"w": torch.randn(4)} for _ in ctx.sampled]  # your local training here
        payloads = [defense.protect(u, ctx.for_client(i)) for i, u in zip(ctx.sampled, updates)]
        state = apply(state, defense.aggregate(payloads, ctx))
    print(defense.accountant.epsilon(delta=1e-5))            # ε proven at δ = 1e-5

Documentation: ``make docs`` builds the site (getting started, concepts and threat models,
tutorials, privacy claims, benchmarks, API reference) from ``docs/`` into ``site/``; the pages
are readable as Markdown in ``docs/`` too. Benchmark figures: ``benchmarks/RESULTS.md``.
"""

__version__ = "0.1.0"
