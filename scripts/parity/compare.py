"""The published PatchCore (the oracle, ../shared/reference/run_reference.py) and this build side by side on a whole
MVTec-layout data set: image AUROC, pixel AUROC and AUPRO (false-positive rate up to 0.3), with the shared
ResNet-18, layer2 + layer3, a 10% approximate greedy coreset and k = 1.

Rows:
  injected  the oracle with seed 0, and this build fitted with the oracle's coreset randomness
            (fit --reference-randomness on the oracle's --dump), with the number of coreset rows both selected
  seed N    each implementation with its own seed N, for N in --seeds; then the mean and spread of each

The published code computes no AUPRO: for the oracle it is this file's implementation of MVTec AD's definition on
the oracle's 224x224 maps; image and pixel AUROC of the oracle are sklearn's. This build's three metrics are its
own `evaluate` (tests/evaluation checks them against sklearn and a brute-force AUPRO). Masks are resized and
cropped like the images and binarised at 0.5, as run_reference.py does.

usage: [PATCHCORE_CLI=build/patchcore] /usr/bin/python3 scripts/parity/compare.py DATA [--seeds 0 1 2] [--threads 2] [--out DIR]
Needs Debian's python3-torch, -torchvision, -faiss, -sklearn, -scipy, -pil, -tqdm and a built build/patchcore.
Prints a Markdown table; --out keeps the dumps, models and metrics.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import faiss
import numpy as np
import scipy.ndimage
from sklearn.metrics import roc_auc_score

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHARED = os.environ.get("PATCHCORE_SHARED", os.path.join(ROOT, "..", "shared"))
REFERENCE = os.path.join(SHARED, "reference", "run_reference.py")
WEIGHTS = os.path.join(SHARED, "weights", "resnet18-imagenet-stem-to-layer3.pth")
CLI = os.environ.get("PATCHCORE_CLI", os.path.join(ROOT, "build", "patchcore"))


def aupro(maps, masks, limit=0.3):
    """Normalised area under the per-region-overlap curve up to `limit` (MVTec AD's definition): regions are the
    8-connected components of each mask, PRO(t) the mean over regions of the fraction of the region's pixels scoring
    >= t, FPR(t) the fraction of normal pixels scoring >= t; trapezoids up to exactly `limit`, divided by it."""
    scores, region, normal = [], [], []
    regions = 0
    for m, g in zip(maps, masks):
        labels, n = scipy.ndimage.label(g, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        scores.append(m.ravel())
        # Each defect pixel carries 1 / (its region's size), so summing over pixels above t gives the overlap sum.
        weight = np.where(labels.ravel() > 0, 1.0 / sizes[labels.ravel()], 0.0)
        region.append(weight)
        normal.append(labels.ravel() == 0)
        regions += n
    scores, region, normal = np.concatenate(scores), np.concatenate(region), np.concatenate(normal)
    order = np.argsort(-scores, kind="stable")
    s, r, ok = scores[order], region[order], normal[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    fpr = np.r_[0.0, np.cumsum(ok)[last] / ok.sum()]
    pro = np.r_[0.0, np.cumsum(r)[last] / regions]
    i = np.searchsorted(fpr, limit, side="right")
    x, y = fpr[:i], pro[:i]
    if i < len(fpr):
        y_limit = pro[i - 1] + (pro[i] - pro[i - 1]) * (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        x, y = np.r_[x, limit], np.r_[y, y_limit]
    return float(np.trapz(y, x) / limit)


def masks_for(files, data, crop):
    from PIL import Image
    from torchvision import transforms as T
    resize = T.Compose([T.Resize(256), T.CenterCrop(crop), T.ToTensor()])
    masks = []
    for f in files:
        defect = os.path.basename(os.path.dirname(f))
        stem = os.path.splitext(os.path.basename(f))[0]
        path = os.path.join(data, "ground_truth", defect, stem + "_mask.png")
        masks.append((resize(Image.open(path).convert("L"))[0].numpy() > 0.5) if defect != "good"
                     else np.zeros((crop, crop), bool))
    return masks


def oracle(data, seed, threads, out):
    dump = os.path.join(out, f"oracle_seed{seed}.npz")
    if not os.path.exists(dump):
        subprocess.run([sys.executable, REFERENCE, data, "--weights", WEIGHTS, "--threads", str(threads), "--seed",
                        str(seed), "--dump", dump], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    d = np.load(dump)
    masks = masks_for([str(f) for f in d["files"]], data, d["maps"].shape[-1])
    labels, scores, maps = d["labels"], d["scores"], d["maps"]
    return {"image_auroc": roc_auc_score(labels, scores),
            "pixel_auroc": roc_auc_score(np.stack(masks).ravel(), maps.ravel()),
            "aupro": aupro(maps, masks)}, dump


def ours(data, seed, threads, out, randomness=None):
    name = "ours_injected" if randomness else f"ours_seed{seed}"
    model, report = os.path.join(out, name), os.path.join(out, name + "_report")
    args = [CLI, "--threads", str(threads), "fit", "--data", data, "--weights", WEIGHTS, "--out", model,
            "--seed", str(seed)]
    if randomness:
        args += ["--reference-randomness", randomness]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([CLI, "--threads", str(threads), "evaluate", "--model", model, "--data", data, "--out", report],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(report, "metrics.json")) as f:
        m = json.load(f)
    return {k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro")}, model


def same_rows(model, dump):
    """How many memory bank rows, in selection order, hold the same training patch as the oracle's: equal up to
    the float rounding by which the two embeddings differ (1e-3 of the row's norm; different patches differ by far
    more), and the first position where they part."""
    index = faiss.read_index(os.path.join(model, "nnscorer_search_index.faiss"))
    bank = index.reconstruct_n(0, index.ntotal)
    oracle_bank = np.load(dump)["bank"]
    if bank.shape != oracle_bank.shape:
        return 0, len(oracle_bank), 0
    close = np.abs(bank - oracle_bank).max(1) <= 1e-3 * np.linalg.norm(oracle_bank, axis=1)
    first = int(np.argmin(close)) if not close.all() else len(close)
    return int(close.sum()), len(close), first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    data = os.path.abspath(a.data)
    out = a.out or tempfile.mkdtemp(prefix="patchcore-parity-")
    os.makedirs(out, exist_ok=True)
    rows = []
    oracle0, dump0 = oracle(data, 0, a.threads, out)
    injected, model = ours(data, 0, a.threads, out, randomness=dump0)
    rows.append(("injected, oracle", oracle0))
    rows.append(("injected, this build", injected))
    matched = same_rows(model, dump0)
    per_seed = {"oracle": [], "this build": []}
    for seed in a.seeds:
        o = oracle0 if seed == 0 else oracle(data, seed, a.threads, out)[0]
        m = ours(data, seed, a.threads, out)[0]
        per_seed["oracle"].append(o)
        per_seed["this build"].append(m)
        rows.append((f"seed {seed}, oracle", o))
        rows.append((f"seed {seed}, this build", m))
    keys = ("image_auroc", "pixel_auroc", "aupro")
    print(f"{os.path.basename(data)}: | run | image AUROC | pixel AUROC | AUPRO |")
    print("|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
    for who, ms in per_seed.items():
        print(f"| seeds {a.seeds}, {who}: mean (spread) | " +
              " | ".join(f"{np.mean([m[k] for m in ms]):.4f} ({np.ptp([m[k] for m in ms]):.4f})" for k in keys) +
              " |")
    print(f"injected randomness: {matched[0]} of {matched[1]} memory bank rows hold the oracle's patch, the first "
          f"{matched[2]} in a row; largest metric difference {max(abs(oracle0[k] - injected[k]) for k in keys):.4f}")
    print(f"files in {out}")


if __name__ == "__main__":
    main()
