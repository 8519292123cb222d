"""PatchCore anomaly detection (Roth et al., CVPR 2022) from the patchcore C++ library, under the published
implementation's module names: patchcore.common, patchcore.sampler and patchcore.patchcore.PatchCore."""
from patchcore._core import __version__
from patchcore import backbones, common, sampler
from patchcore import patchcore

__all__ = ["__version__", "backbones", "common", "sampler", "patchcore"]
