"""The attack-vs-dp sweep behind ``python -m privfl.bench attack-vs-dp``: privacy, utility and attack
success of each defense side by side.

* :mod:`~privfl.experiments.attack_vs_dp.settings` — the defenses swept over (a registry of named
  settings) and the ε each will spend, computed before training.
* :mod:`~privfl.experiments.attack_vs_dp.probes` — what is measured on a trained model: gradient
  inversion of one client's round update, membership inference, bytes on the wire.
* :mod:`~privfl.experiments.attack_vs_dp.experiment` —
  :class:`~privfl.experiments.attack_vs_dp.experiment.Preset` (every knob of a sweep),
  :func:`~privfl.experiments.attack_vs_dp.experiment.make_plan` (every check and every ε before any
  training) and :func:`~privfl.experiments.attack_vs_dp.experiment.run_plan` (train → attack →
  record per setting, resumable).
"""

from privfl.experiments.attack_vs_dp.experiment import OutOfBudgetError, Plan, Preset, make_plan, run_plan
from privfl.experiments.attack_vs_dp.settings import DEFAULT_SETTINGS, Setting, SweepSpec, parse_settings

__all__ = [
    "DEFAULT_SETTINGS",
    "OutOfBudgetError",
    "Plan",
    "Preset",
    "Setting",
    "SweepSpec",
    "make_plan",
    "parse_settings",
    "run_plan",
]
