"""Backbones for NetworkFeatureAggregator and PatchCore.load.

A backbone is given as one of:
- load(name, weights_path): a torchvision ResNet architecture ("resnet18", "wide_resnet50_2", ...) and its
  torchvision checkpoint; only the tensors up to the deepest extracted layer are read;
- the path of a TorchScript file whose forward returns a Dict[str, Tensor] of named layers;
- where PyTorch and torchvision are installed, a torch.nn.Module such as torchvision.models.wide_resnet50_2():
  its requested layers are extracted with torchvision's create_feature_extractor, scripted and handed over as
  TorchScript serialised in memory; a model saved with it carries that TorchScript as its backbone file.
"""
import io
import os

from patchcore import _core

__all__ = ["Checkpoint", "load", "resolve", "names"]


def names():
    """The torchvision architectures load() knows."""
    return _core.resnet_names()


class Checkpoint:
    """A torchvision architecture and its checkpoint, read once the layers to extract are known."""

    def __init__(self, name, weights_path):
        self.name = name
        self.weights_path = os.fspath(weights_path)

    def __repr__(self):
        return f"Checkpoint({self.name!r}, {self.weights_path!r})"


def load(name, weights_path):
    return Checkpoint(name, weights_path)


def _from_module(module, layers):
    try:
        import torch
        from torchvision.models.feature_extraction import create_feature_extractor
    except ImportError as error:
        raise TypeError(
            "a torch.nn.Module backbone needs torch and torchvision; give a checkpoint "
            "(patchcore.backbones.load) or a TorchScript file instead"
        ) from error
    extractor = create_feature_extractor(module, return_nodes={layer: layer for layer in layers})
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(extractor), buffer)
    return _core.torchscript_from_bytes(buffer.getvalue(), f"<{type(module).__name__}>")


def resolve(backbone, layers):
    """The library's Backbone for any of the forms above."""
    if isinstance(backbone, _core.Backbone):
        return backbone
    if isinstance(backbone, Checkpoint):
        return _core.load_backbone(backbone.name, backbone.weights_path, list(layers))
    if isinstance(backbone, (str, os.PathLike)):
        return _core.load_backbone("torchscript", os.fspath(backbone), list(layers))
    if hasattr(backbone, "named_modules") and callable(backbone):
        return _from_module(backbone, layers)
    raise TypeError(
        f"backbone: expected patchcore.backbones.load(...), a TorchScript path or a torch.nn.Module, "
        f"got {type(backbone).__name__}"
    )
