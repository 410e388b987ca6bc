"""The experiments behind privfl's benchmarks: each trains, attacks and measures, and returns a
JSON-ready record; ``python -m privfl.bench <job>`` adds the command line, the presets, the tables
and the report.

* :mod:`privfl.experiments.membership` —
  :func:`~privfl.experiments.membership.run_membership_experiment`: LiRA and LOSS against an
  overfitted segmentation model, undefended and with DP-SGD;
  :class:`~privfl.experiments.membership.FederatedTrainer`, the training recipe of the target and
  the shadows.
* :mod:`privfl.experiments.inversion` — the fixed case of the Inverting Gradients benchmark.
* :mod:`privfl.experiments.attack_vs_dp` — the attack-vs-dp sweep: the defenses swept over, the plan
  (ε of every setting before training) and, per setting, training, gradient inversion, membership
  inference and bytes on the wire.
* :mod:`privfl.experiments.sweep` — what the training sweeps share: the federation, its model, one
  federated training run and the presets' common fields.
* :mod:`privfl.experiments.dpcvae` — :func:`~privfl.experiments.dpcvae.run_dpcvae_experiment`:
  DP-CVAE on embeddings against its baselines, with what an attacker gets from what each releases.
* :mod:`privfl.experiments.dsl` — :func:`~privfl.experiments.dsl.run_dsl_experiment`: Distributed
  Synthetic Learning against its baselines, with what its channels leak.

The methods themselves are in :mod:`privfl.attacks` and :mod:`privfl.sharing`. Importing
``privfl.experiments`` loads none of the modules above (some of them load timm, which takes
seconds): import the one you need, e.g. ``from privfl.experiments.membership import
FederatedTrainer``.
"""
