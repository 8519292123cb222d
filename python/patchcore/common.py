"""The building blocks of PatchCore, as the published patchcore.common documents them.

Arrays go in as anything numpy.asarray accepts (CPU torch tensors included) and come out as numpy arrays.
Nearest-neighbour distances are squared L2, as FAISS returns them. Errors keep the library's messages: bad
arguments raise ValueError, calls before fit or load raise AttributeError (as the published code's unset
attributes do), bad files raise RuntimeError.
"""
import numpy as np

from patchcore import _core, backbones
from patchcore._core import (
    Aggregator,
    ApproximateFaissNN,
    ExactPrunedNN,
    FaissNN,
    MeanMapper,
    NearestNeighbourScorer,
    Preprocessing,
    RescaleSegmentor,
)

__all__ = [
    "Aggregator",
    "ApproximateFaissNN",
    "AverageMerger",
    "ConcatMerger",
    "ExactPrunedNN",
    "FaissNN",
    "MeanMapper",
    "NearestNeighbourScorer",
    "NetworkFeatureAggregator",
    "Preprocessing",
    "RescaleSegmentor",
]

# The published classes are torch modules, called like functions.
for _module in (MeanMapper, Preprocessing, Aggregator):
    _module.__call__ = _module.forward


class NetworkFeatureAggregator(_core.NetworkFeatureAggregator):
    """Intermediate features of a backbone (see patchcore.backbones for the forms it may take), by layer name."""

    def __init__(self, backbone, layers_to_extract_from, device):
        layers = list(layers_to_extract_from)
        super().__init__(backbones.resolve(backbone, layers), layers, device)

    def __call__(self, images):
        return self.forward(images)


class _Merger:
    """Each [N, ...] array reduced to [N, d_i], then all concatenated to [N, sum d_i]."""

    def merge(self, features):
        return np.concatenate([self._reduce(np.asarray(f)) for f in features], axis=1)


class AverageMerger(_Merger):
    """[N, C, ...] → [N, C]: the mean over everything after the channels."""

    @staticmethod
    def _reduce(features):
        return features.reshape(features.shape[0], features.shape[1], -1).mean(axis=-1)


class ConcatMerger(_Merger):
    """[N, ...] → [N, prod(...)]: each row flattened."""

    @staticmethod
    def _reduce(features):
        return features.reshape(features.shape[0], -1)
