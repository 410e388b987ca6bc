"""Data sharing instead of model sharing: DP-CVAE on embeddings (issue 10)."""
