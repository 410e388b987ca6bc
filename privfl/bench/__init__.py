"""Benchmarks and the main jobs, run as ``python -m privfl.bench <subcommand>``: each subcommand is
the command line, presets, tables and report around an experiment of :mod:`privfl.experiments`."""
