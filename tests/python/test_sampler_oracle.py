"""patchcore.sampler against the published sampler module. The greedy loops get the published randomness (the
projection and the starting points) injected, so both must select the same rows."""
import numpy as np
import pytest

from patchcore import sampler

rng = np.random.default_rng(1)


def test_identity_sampler_keeps_every_row():
    rows = rng.standard_normal((30, 8)).astype(np.float32)
    np.testing.assert_array_equal(sampler.IdentitySampler().run(rows), rows)


@pytest.mark.parametrize("percentage", [0.0, 1.0, 1.5])
def test_percentages_outside_the_open_interval_are_refused_as_published(reference_sampler, percentage):
    with pytest.raises(ValueError):
        reference_sampler.RandomSampler(percentage)
    with pytest.raises(ValueError):
        sampler.RandomSampler(percentage)
    with pytest.raises(ValueError):
        sampler.ApproximateGreedyCoresetSampler(percentage, "cpu")


def test_random_sampler_keeps_as_many_distinct_rows_as_published(reference_sampler):
    rows = rng.standard_normal((97, 5)).astype(np.float32)
    selected = sampler.RandomSampler(0.3, seed=4).run(rows)
    assert selected.shape == reference_sampler.RandomSampler(0.3).run(rows).shape
    positions = {row.tobytes(): i for i, row in enumerate(rows)}
    assert len({positions[row.tobytes()] for row in selected}) == len(selected)


def test_greedy_coreset_selects_the_published_rows(reference_sampler, torch):
    rows = rng.standard_normal((300, 40)).astype(np.float32)
    projection = rng.standard_normal((16, 40)).astype(np.float32) / np.sqrt(40)
    ours = sampler.GreedyCoresetSampler(0.1, "cpu", dimension_to_project_features_to=16)
    ours.set_projection(projection)
    published = reference_sampler.GreedyCoresetSampler(0.1, torch.device("cpu"), 16)
    expected = published._compute_greedy_coreset_indices(torch.from_numpy(rows @ projection.T))
    assert ours.select(rows) == expected.tolist()
    np.testing.assert_array_equal(ours.run(rows), rows[expected])


def test_approximate_greedy_coreset_selects_the_published_rows(reference_sampler, torch):
    rows = rng.standard_normal((400, 40)).astype(np.float32)
    projection = rng.standard_normal((16, 40)).astype(np.float32) / np.sqrt(40)
    np.random.seed(7)
    starting_points = np.random.choice(len(rows), 10, replace=False)
    np.random.seed(7)  # the published loop draws the same starting points again
    published = reference_sampler.ApproximateGreedyCoresetSampler(0.05, torch.device("cpu"), 10, 16)
    expected = published._compute_greedy_coreset_indices(torch.from_numpy(rows @ projection.T))

    ours = sampler.ApproximateGreedyCoresetSampler(0.05, "cpu", 10, 16)
    ours.set_projection(projection)
    ours.set_starting_points(starting_points.tolist())
    assert ours.select(rows) == expected.tolist()
