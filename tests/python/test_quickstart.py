"""The README's Python quick start, run as written from the repository root: it must fit and predict, and score
as the CLI does with the same settings."""
import json
import os
import re
import subprocess

import numpy as np
import pytest

import patchcore

ROOT = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))


def quick_start():
    with open(os.path.join(ROOT, "README.md")) as readme:
        section = readme.read().split("\n## Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_quick_start_fits_predicts_and_agrees_with_the_cli(tire, monkeypatch, tmp_path):
    code = quick_start()
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(ROOT)
    names = {}
    exec(compile(code, "README.md", "exec"), names)
    scores, masks, test_images = names["scores"], names["masks"], names["test_images"]
    assert len(scores) == len(masks) == len(test_images)
    assert all(mask.shape == (224, 224) for mask in masks)

    # The CLI beside the module's build directory (<build>/python/patchcore/_core...).
    cli = os.path.join(os.path.dirname(patchcore.__file__), "..", "..", "patchcore")
    if not os.access(cli, os.X_OK):
        pytest.skip(f"no CLI beside the module ({cli}) to compare with")
    subprocess.run(
        [cli, "fit", "--data", names["data"], "--weights", names["weights"], "--nn", "flat", "--out",
         str(tmp_path / "model")],
        check=True,
        capture_output=True,
    )
    predicted = subprocess.run(
        [cli, "predict", "--model", str(tmp_path / "model"), *test_images, "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    cli_scores = [json.loads(line)["score"] for line in predicted.splitlines() if line.strip()]
    np.testing.assert_allclose(scores, cli_scores, rtol=1e-4)
