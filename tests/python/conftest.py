"""Shared fixtures: the published code as the oracle, and the project's shared data.

The published package is also called patchcore, so its modules are loaded from their files under other names,
and its PatchCore, which imports its own package, runs in a subprocess (oracle_patchcore.py).
"""
import importlib.util
import os
import sys

import pytest

SHARED = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared"))
REFERENCE = os.path.join(SHARED, "reference")
WEIGHTS = os.path.join(SHARED, "weights", "resnet18-imagenet-stem-to-layer3.pth")
TIRE = os.path.join(SHARED, "data", "tire")


def _load_reference_module(name):
    path = os.path.join(REFERENCE, "patchcore", name + ".py")
    if not os.path.exists(path):
        pytest.skip(f"the published code is not at {REFERENCE}")
    for dependency in ("torch", "faiss", "scipy", "tqdm"):
        if importlib.util.find_spec(dependency) is None:
            pytest.skip(f"the published code needs python3-{dependency}, which is not installed")
    spec = importlib.util.spec_from_file_location("reference_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference_common():
    return _load_reference_module("common")


@pytest.fixture(scope="session")
def reference_sampler():
    return _load_reference_module("sampler")


@pytest.fixture(scope="session")
def tire():
    if not (os.path.isdir(TIRE) and os.path.exists(WEIGHTS)):
        pytest.skip(f"the shared tire data and ResNet-18 weights are not under {SHARED}")
    return TIRE


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch", reason="python3-torch is not installed")


def pytest_configure(config):
    # The module under test must be ours, never the published package of the same name.
    import patchcore

    if os.path.realpath(patchcore.__file__).startswith(REFERENCE + os.sep):
        raise pytest.UsageError(f"patchcore resolves to the published code ({patchcore.__file__}), not the build")
    sys.stderr.write(f"patchcore under test: {patchcore.__file__}\n")
