"""Client-side transforms and server-side aggregators, composable into a pipeline."""

from privfl.defenses.base import Defense, NoDefense, Payload, RoundContext

__all__ = ["Defense", "NoDefense", "Payload", "RoundContext"]
