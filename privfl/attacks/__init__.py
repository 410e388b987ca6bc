"""Attacks that test privfl's defenses: gradient inversion, membership inference, and their metrics."""
