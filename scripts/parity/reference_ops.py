"""Runs PatchCore on a whole MVTec-layout data set with the reference's own torch/torchvision/faiss/scipy
operations (the ones docs/reference-spec.md names; see scripts/fixtures/make_patchcore.py) and writes
per-image scores and metrics, to diff against `patchcore evaluate`'s scores.csv and metrics.json. The memory
bank is either every training patch (compare with a model fitted with `--sampler identity`) or, with --bank,
the rows of a model's index, so a coreset model chosen by `patchcore fit` is scored with the same bank.

This is the parity check behind the README's comparison with the published figures: it tells apart "our
C++ differs from the reference's operations" from "the published figure comes from something else".

usage: /usr/bin/python3 scripts/parity/reference_ops.py DATA WEIGHTS OUT_DIR
         [--compare-index IDENTITY_MODEL/nnscorer_search_index.faiss | --bank MODEL/nnscorer_search_index.faiss]
"""
import argparse
import csv
import json
import os
import sys

import faiss
import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from make_patchcore import embed, evaluation_metrics, load_images, load_resnet18  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def listing(data, split):
    root = os.path.join(data, split)
    names = []
    for defect in sorted(os.listdir(root)):
        for f in sorted(os.listdir(os.path.join(root, defect))):
            if f.lower().endswith(IMAGE_SUFFIXES):
                names.append(f"{split}/{defect}/{f}")
    return names


def embed_all(model, data, names, batch=2):
    return np.concatenate([embed(model, load_images(data, names[i:i + batch])).numpy()
                           for i in range(0, len(names), batch)])


def index_rows(path):
    index = faiss.read_index(path)
    return index.reconstruct_n(0, index.ntotal)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("weights")
    parser.add_argument("out")
    bank_source = parser.add_mutually_exclusive_group()
    bank_source.add_argument("--compare-index", help="report how far this index (from `patchcore fit --sampler "
                             "identity`) is from the training embeddings computed here")
    bank_source.add_argument("--bank", help="use this index's rows as the memory bank instead of embedding train/")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    model = load_resnet18(args.weights)
    bank = index_rows(args.bank) if args.bank else embed_all(model, args.data, listing(args.data, "train"))
    report = {"bank_rows": int(bank.shape[0])}
    if args.compare_index:
        ours = index_rows(args.compare_index)
        report["bank_max_abs_diff"] = float(np.abs(ours - bank).max()) if ours.shape == bank.shape else "shape differs"
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    del bank

    test = listing(args.data, "test")
    scores, maps = [], []
    for i in range(0, len(test), 2):
        distances, _ = index.search(embed(model, load_images(args.data, test[i:i + 2])).numpy(), 1)
        patch = distances.mean(1).reshape(-1, 28, 28)
        scores.extend(patch.reshape(len(patch), -1).max(1))
        up = F.interpolate(torch.from_numpy(patch).unsqueeze(1), size=(224, 224), mode="bilinear",
                           align_corners=False).squeeze(1).numpy()
        maps.extend(scipy.ndimage.gaussian_filter(m, sigma=4) for m in up)
    report.update(evaluation_metrics(args.data, test, np.array(scores), np.stack(maps)))
    with open(os.path.join(args.out, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "score"])
        w.writerows((name, f"{s:.6f}") for name, s in zip(test, scores))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
