"""Stage 1: run the frozen reference model once and write the reference cache."""

from precompute.run import precompute_reference

__all__ = ["precompute_reference"]
