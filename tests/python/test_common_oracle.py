"""patchcore.common against the published common module, run on the same small arrays."""
import numpy as np
import pytest

from patchcore import common

rng = np.random.default_rng(0)


def features(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3])
def test_faiss_nn_finds_the_published_neighbours(reference_common, k):
    bank, queries = features(300, 32), features(40, 32)
    ours, published = common.FaissNN(False, 2), reference_common.FaissNN(False, 2)
    ours.fit(bank)
    published.fit(bank)
    for args in ((k, queries), (k, queries, bank[:100])):
        distances, indices = ours.run(*args)
        expected_distances, expected_indices = published.run(*args)
        assert distances.dtype == np.float32 and indices.dtype == np.int64
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_allclose(distances, expected_distances, rtol=1e-5, atol=1e-5)


def test_approximate_faiss_nn_matches_the_published_index(reference_common):
    bank, queries = features(1024, 64), features(30, 64)
    ours, published = common.ApproximateFaissNN(False, 2), reference_common.ApproximateFaissNN(False, 2)
    ours.fit(bank)
    published.fit(bank)
    distances, indices = ours.run(2, queries)
    expected_distances, expected_indices = published.run(2, queries)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-5, atol=1e-5)


def test_index_files_are_read_both_ways(reference_common, tmp_path):
    bank, queries = features(200, 16), features(10, 16)
    ours = common.FaissNN()
    ours.fit(bank)
    ours.save(str(tmp_path / "ours.faiss"))
    published = reference_common.FaissNN()
    published.load(str(tmp_path / "ours.faiss"))
    np.testing.assert_array_equal(published.run(3, queries)[1], ours.run(3, queries)[1])

    published.save(str(tmp_path / "published.faiss"))
    reloaded = common.FaissNN()
    reloaded.load(str(tmp_path / "published.faiss"))
    np.testing.assert_array_equal(reloaded.run(3, queries)[1], ours.run(3, queries)[1])


def test_errors_are_python_exceptions_with_the_library_messages(tmp_path):
    with pytest.raises(AttributeError, match="before fit"):
        common.FaissNN().run(1, features(2, 4))
    nn = common.FaissNN()
    nn.fit(features(5, 4))
    with pytest.raises(ValueError, match="dimension"):
        nn.run(1, features(2, 3))
    with pytest.raises(RuntimeError, match="no-such-file"):
        nn.load(str(tmp_path / "no-such-file"))


@pytest.mark.parametrize("k", [1, 2])
def test_nearest_neighbour_scorer_scores_as_published(reference_common, k, tmp_path):
    train = [features(120, 4, 2), features(120, 6)]
    test = [features(15, 4, 2), features(15, 6)]
    ours = common.NearestNeighbourScorer(k, common.FaissNN(False, 2))
    published = reference_common.NearestNeighbourScorer(k, reference_common.FaissNN(False, 2))
    ours.fit(train)
    published.fit(train)
    for got, expected in zip(ours.predict(test), published.predict(test)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    ours.save(str(tmp_path), prepend="x_")
    loaded = common.NearestNeighbourScorer(k)
    loaded.load(str(tmp_path), prepend="x_")
    np.testing.assert_array_equal(loaded.predict(test)[2], ours.predict(test)[2])


def test_mean_mapper_preprocessing_and_aggregator_pool_as_published(reference_common, torch):
    layers = [features(50, 128, 3, 3), features(50, 256, 3, 3)]
    ours = common.Preprocessing([128, 256], 1024)
    published = reference_common.Preprocessing([128, 256], 1024)
    preprocessed = ours(layers)
    expected = published([torch.from_numpy(x) for x in layers]).numpy()
    assert preprocessed.shape == (50, 2, 1024)
    np.testing.assert_allclose(preprocessed, expected, rtol=1e-5, atol=1e-6)

    aggregated = common.Aggregator(target_dim=1000)(preprocessed)
    expected = reference_common.Aggregator(target_dim=1000)(torch.from_numpy(preprocessed)).numpy()
    np.testing.assert_allclose(aggregated, expected, rtol=1e-5, atol=1e-6)

    mapped = common.MeanMapper(77)(layers[0])
    expected = reference_common.MeanMapper(77)(torch.from_numpy(layers[0])).numpy()
    np.testing.assert_allclose(mapped, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target_size", [224, 96, (64, 64)])
def test_rescale_segmentor_maps_as_published(reference_common, target_size):
    patch_scores = np.abs(features(3, 28, 28))
    maps = common.RescaleSegmentor("cpu", target_size).convert_to_segmentation(patch_scores)
    expected = reference_common.RescaleSegmentor("cpu", target_size).convert_to_segmentation(patch_scores)
    assert len(maps) == len(expected) == 3
    for got, want in zip(maps, expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merger", ["AverageMerger", "ConcatMerger"])
def test_mergers_merge_as_published(reference_common, merger):
    arrays = [features(4, 3, 5, 5), features(4, 6, 2, 7)]
    np.testing.assert_allclose(
        getattr(common, merger)().merge(arrays), getattr(reference_common, merger)().merge(arrays), rtol=1e-6
    )


def test_network_feature_aggregator_extracts_the_published_features(reference_common, torch):
    import copy

    torchvision = pytest.importorskip("torchvision", reason="python3-torchvision is not installed")
    torch.manual_seed(0)
    network = torchvision.models.resnet18().eval()
    layers = ["layer2", "layer3"]
    images = features(2, 3, 64, 64)
    ours = common.NetworkFeatureAggregator(network, layers, "cpu")
    published = reference_common.NetworkFeatureAggregator(copy.deepcopy(network), layers, "cpu")
    assert ours.feature_dimensions((3, 64, 64)) == published.feature_dimensions((3, 64, 64)) == [128, 256]
    got, expected = ours(images), published(torch.from_numpy(images))
    assert list(got) == layers
    for layer in layers:
        np.testing.assert_allclose(got[layer], expected[layer].numpy(), rtol=1e-4, atol=1e-5)
