"""Data sharing instead of model sharing.

* DP-CVAE on embeddings (Di Salvo et al. 2025): :mod:`privfl.sharing.dpcvae`, its DP-CGAN
  baseline :mod:`privfl.sharing.dpcgan`, and :mod:`privfl.sharing.experiment` behind
  ``python -m privfl.bench dpcvae``.
* Distributed Synthetic Learning (Chang et al. 2023): :mod:`privfl.sharing.dsl`, behind
  ``python -m privfl.bench dsl``.
"""
