"""Backbones for NetworkFeatureAggregator and PatchCore.load.

A backbone is given as one of:
- load(name, weights_path): a torchvision ResNet architecture ("resnet18", "wide_resnet50_2", ...) and its
  torchvision checkpoint; only the tensors up to the deepest extracted layer are read;
- the path of a TorchScript file whose forward returns a Dict[str, Tensor] of named layers;
- where PyTorch and torchvision are installed, a torch.nn.Module such as torchvision.models.wide_resnet50_2():
  its requested layers are extracted with torchvision's create_feature_extractor, scripted and handed over as
  TorchScript.
"""
import atexit
import os
import shutil
import tempfile

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


# Scripted modules stay on disk while the process runs: the library reads the file, and save_to_path copies it
# into the model directory.
_scripted_dir = None


def _scripted_file():
    global _scripted_dir
    if _scripted_dir is None:
        _scripted_dir = tempfile.mkdtemp(prefix="patchcore-torchscript-")
        atexit.register(shutil.rmtree, _scripted_dir, True)
    handle, path = tempfile.mkstemp(suffix=".pt", dir=_scripted_dir)
    os.close(handle)
    return path


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
    path = _scripted_file()
    torch.jit.save(torch.jit.script(extractor), path)
    return _core.load_backbone("torchscript", path, list(layers))


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
