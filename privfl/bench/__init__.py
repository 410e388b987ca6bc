"""Benchmarks and the main jobs, run as ``python -m privfl.bench <subcommand>``."""
