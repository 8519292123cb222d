"""Subsampling of the memory bank, as the published patchcore.sampler: run(features) returns the selected rows.

The random samplers draw from their own generator, seeded by `seed` (0 unless given), never NumPy's global one.
"""
from patchcore._core import (
    ApproximateGreedyCoresetSampler,
    BaseSampler,
    GreedyCoresetSampler,
    IdentitySampler,
    RandomSampler,
)

__all__ = [
    "ApproximateGreedyCoresetSampler",
    "BaseSampler",
    "GreedyCoresetSampler",
    "IdentitySampler",
    "RandomSampler",
]
