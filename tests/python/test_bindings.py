"""What the bindings add to the library: torch tensors accepted through numpy, the GIL released while it computes."""
import threading

import numpy as np
import pytest

from patchcore import common

rng = np.random.default_rng(2)


def test_torch_tensors_are_taken_as_arrays(torch):
    bank = rng.standard_normal((50, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8))  # float64: converted, as numpy arrays are
    nn = common.FaissNN()
    nn.fit(torch.from_numpy(bank))
    for got, expected in zip(nn.run(2, torch.from_numpy(queries)), nn.run(2, queries.astype(np.float32))):
        np.testing.assert_array_equal(got, expected)


def test_python_threads_run_while_the_library_searches():
    bank = rng.standard_normal((20000, 128)).astype(np.float32)
    queries = rng.standard_normal((3000, 128)).astype(np.float32)
    nn = common.FaissNN(False, 1)
    nn.fit(bank)
    started, done = threading.Event(), threading.Event()

    def search():
        started.set()
        nn.run(1, queries)
        done.set()

    worker = threading.Thread(target=search)
    worker.start()
    started.wait()
    steps = 0
    while not done.is_set():
        steps += 1
    worker.join()
    # With the GIL held for the whole search this thread could not run a single step until it ended.
    assert steps > 1000, f"only {steps} steps of Python ran during the search"


def test_numpy_arrays_come_out_with_the_published_dtypes():
    nn = common.FaissNN()
    nn.fit(rng.standard_normal((10, 4)).astype(np.float32))
    distances, indices = nn.run(3, rng.standard_normal((2, 4)))
    assert (distances.dtype, indices.dtype) == (np.float32, np.int64)
    with pytest.raises(ValueError, match="n_nearest_neighbours"):
        nn.run(0, rng.standard_normal((2, 4)))


@pytest.mark.parametrize("quantized_products", [True, False])
def test_exact_pruned_search_finds_the_flat_searchs_neighbours(quantized_products):
    # Unstructured rows: the cells prune nothing and the dense search, with either product, answers.
    bank = rng.standard_normal((2000, 300)).astype(np.float32)
    queries = rng.standard_normal((600, 300)).astype(np.float32)
    pruned, flat = common.ExactPrunedNN(2, quantized_products=quantized_products), common.FaissNN(False, 2)
    assert pruned.quantized_products == quantized_products
    pruned.fit(bank)
    flat.fit(bank)
    (distances, indices), (flat_distances, flat_indices) = pruned.run(3, queries), flat.run(3, queries)
    np.testing.assert_array_equal(indices, flat_indices)
    np.testing.assert_allclose(distances, flat_distances, rtol=1e-4)
