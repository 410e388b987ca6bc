"""Data sharing instead of model sharing.

* DP-CVAE on embeddings (Di Salvo et al. 2025; docs/dpcvae.md): :mod:`privfl.sharing.dpcvae`, its
  DP-CGAN baseline :mod:`privfl.sharing.dpcgan`, what the two share
  (:mod:`privfl.sharing.federated_generator`), and the comparison behind
  ``python -m privfl.bench dpcvae`` (:mod:`privfl.experiments.dpcvae`).
* Distributed Synthetic Learning (Chang et al. 2023; docs/dsl.md): :mod:`privfl.sharing.dsl`,
  behind ``python -m privfl.bench dsl`` (:mod:`privfl.experiments.dsl`).
"""
