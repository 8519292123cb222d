"""patchcore.patchcore.PatchCore: the whole method, with the published class's load, fit, predict, save_to_path
and load_from_path.

Images are [B, 3, H, W] float arrays, normalised as the published code's datasets do, or image files, which the
model reads with its own transform (the shorter side resized, then the centre crop of input_shape).
"""
import os

import numpy as np

from patchcore import _core, backbones

__all__ = ["PatchCore"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _image_paths(data):
    """The files `data` names (a folder's images, sorted, or a list of files), or None for image arrays."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.isdir(path):
            return [path]
        return sorted(
            os.path.join(path, name) for name in os.listdir(path) if name.lower().endswith(_IMAGE_SUFFIXES)
        )
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        return [os.fspath(d) for d in data]
    return None


def _is_image_batch(data):
    return hasattr(data, "shape") and len(data.shape) == 4


class PatchCore(_core.PatchCore):
    def load(
        self,
        backbone,
        layers_to_extract_from,
        device,
        input_shape,
        pretrain_embed_dimension,
        target_embed_dimension,
        patchsize=3,
        patchstride=1,
        anomaly_score_num_nn=1,
        featuresampler=None,
        nn_method=None,
        **kwargs,
    ):
        """As the published load. featuresampler defaults to a new IdentitySampler and nn_method to a new
        FaissNN(False, 4) (the published defaults, one per model rather than shared). Keywords beyond the
        published ones: resize, the shorter side images are resized to before the crop (input_shape's side
        times 8/7 unless given, the published 256 for 224), and batchnorm_statistics, "reference_update" (the
        published load's BatchNorm update, the default) or "checkpoint"."""
        resize = kwargs.pop("resize", input_shape[-1] * 8 // 7)
        batchnorm_statistics = kwargs.pop("batchnorm_statistics", "reference_update")
        if kwargs:
            raise TypeError(f"PatchCore.load: unexpected keyword arguments {sorted(kwargs)}")
        layers = list(layers_to_extract_from)
        self._load(
            backbones.resolve(backbone, layers),
            layers,
            device,
            list(input_shape),
            pretrain_embed_dimension,
            target_embed_dimension,
            patchsize,
            patchstride,
            anomaly_score_num_nn,
            featuresampler,
            nn_method,
            resize,
            batchnorm_statistics,
        )

    def embed(self, images):
        """[B, 3, H, W] → patch embeddings [B·h·w, target_embed_dimension]."""
        return self._embed(images)[0]

    def fit(self, training_data, batch_size=2):
        """Fills the memory bank from a folder of images, a list of image files, one [N, 3, H, W] array, or an
        iterable of such batches (a torch DataLoader, whose items may be dicts with an "image" entry)."""
        paths = _image_paths(training_data)
        if paths is not None:
            self._fit_files(paths, batch_size)
            return
        batches = [training_data] if _is_image_batch(training_data) else training_data
        features = [self._embed(_image_of(batch))[0] for batch in batches]
        self._fit_features(np.concatenate(features, axis=0))

    def predict(self, data):
        """Images (an array, files or a folder) → (scores, masks): one score and one [H, W] map per image.
        An iterable of batches, like the published code's DataLoader, → (scores, masks, labels_gt, masks_gt),
        the last two from the batches' "is_anomaly" and "mask" entries where they are dicts."""
        paths = _image_paths(data)
        if paths is not None:
            return self._predict(self._load_images(paths))
        if _is_image_batch(data):
            return self._predict(data)
        scores, masks, labels_gt, masks_gt = [], [], [], []
        for batch in data:
            if isinstance(batch, dict):
                labels_gt.extend(np.asarray(batch["is_anomaly"]).tolist())
                masks_gt.extend(np.asarray(batch["mask"]).tolist())
            batch_scores, batch_masks = self._predict(_image_of(batch))
            scores.extend(batch_scores)
            masks.extend(batch_masks)
        return scores, masks, labels_gt, masks_gt

    def load_from_path(self, load_path, device, nn_method=None, prepend=""):
        """Replaces this model with the one saved in load_path. The search is the one the model directory
        records; nn_method (default FaissNN(False, 4)) gives its thread count."""
        num_workers = getattr(nn_method, "num_workers", 4) if nn_method is not None else 4
        self._load_from_path(os.fspath(load_path), device, num_workers, prepend)

    def save_to_path(self, save_path, prepend=""):
        super().save_to_path(os.fspath(save_path), prepend)


def _image_of(batch):
    return batch["image"] if isinstance(batch, dict) else batch
