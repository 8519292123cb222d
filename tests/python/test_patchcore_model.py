"""patchcore.patchcore.PatchCore on tire images against the published PatchCore, and its model directory."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from patchcore import backbones, common, sampler
from patchcore.patchcore import PatchCore

from conftest import REFERENCE, WEIGHTS


def split(tire):
    train = sorted(glob.glob(os.path.join(tire, "train", "good", "*.png")))[:4]
    test = [sorted(glob.glob(os.path.join(tire, "test", kind, "*.png")))[0] for kind in ("good", "hole", "cut")]
    return train, test


def fitted(backbone, train):
    model = PatchCore("cpu")
    model.load(
        backbone,
        ["layer2", "layer3"],
        "cpu",
        (3, 224, 224),
        1024,
        1024,
        featuresampler=sampler.IdentitySampler(),
        nn_method=common.FaissNN(False, 2),
    )
    model.fit(train)
    return model


@pytest.fixture(scope="module")
def model(tire):
    return fitted(backbones.load("resnet18", WEIGHTS), split(tire)[0])


def test_scores_and_maps_are_the_published_ones(tire, model, tmp_path, reference_common):
    train, test = split(tire)
    oracle = tmp_path / "oracle.npz"
    subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "oracle_patchcore.py"), REFERENCE, WEIGHTS,
         str(oracle), "--train", *train, "--test", *test],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    expected = np.load(oracle)
    scores, masks = model.predict(test)
    assert model.memory_bank_size == 4 * 28 * 28
    np.testing.assert_allclose(scores, expected["scores"], rtol=1e-4)
    np.testing.assert_allclose(np.stack(masks), expected["masks"], rtol=1e-3, atol=1e-3)


def test_images_as_files_or_arrays_score_alike(tire, model):
    test = split(tire)[1]
    from_files = model.predict(test)
    from_arrays = model.predict(model._load_images(test))
    np.testing.assert_array_equal(from_files[0], from_arrays[0])
    loader = [{"image": model._load_images(test[:2]), "is_anomaly": np.array([0, 1]), "mask": np.zeros((2, 4))}]
    scores, masks, labels, _ = model.predict(loader)
    np.testing.assert_array_equal(scores, from_files[0][:2])
    assert labels == [0, 1]


def test_a_saved_model_loads_and_scores_the_same(tire, model, tmp_path):
    test = split(tire)[1]
    model.save_to_path(str(tmp_path / "model"))
    loaded = PatchCore("cpu")
    loaded.load_from_path(str(tmp_path / "model"), "cpu", common.FaissNN(False, 2))
    assert loaded.memory_bank_size == model.memory_bank_size
    np.testing.assert_array_equal(loaded.predict(test)[0], model.predict(test)[0])


def test_a_torch_module_backbone_gives_the_checkpoints_scores(tire, model, torch, tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="python3-torchvision is not installed")
    train, test = split(tire)
    network = torchvision.models.resnet18()
    network.load_state_dict(torch.load(WEIGHTS), strict=False)
    from_module = fitted(network, train)
    scores = from_module.predict(test)[0]
    np.testing.assert_allclose(scores, model.predict(test)[0], rtol=1e-4)
    # The module went over in memory; the saved model carries it as its TorchScript file and scores the same.
    from_module.save_to_path(str(tmp_path / "model"))
    assert os.path.getsize(tmp_path / "model" / "backbone.pt") > 1 << 20
    loaded = PatchCore("cpu")
    loaded.load_from_path(str(tmp_path / "model"), "cpu", common.FaissNN(False, 2))
    np.testing.assert_array_equal(loaded.predict(test)[0], scores)


def test_calls_out_of_order_raise_attribute_error():
    with pytest.raises(AttributeError, match="load"):
        PatchCore("cpu").predict(np.zeros((1, 3, 224, 224), np.float32))
