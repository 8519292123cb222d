"""Speed of this build beside the published PatchCore (../shared/reference, run as it is) on whole MVTec-layout data
sets, one after the other on the same machine, with the shared ResNet-18 (layer2 + layer3, 10% approximate greedy
coreset, k = 1, the centre crop) and the same thread count.

For each data set and each of --runs runs, it measures:
  fit                   published: PatchCore.fit on the decoded training images (run_reference.py's "fit");
                        ours: the whole `patchcore fit` command, decoding and saving the model included
  predict in process    per image, over the whole test split, images decoded from their files and scored with the
                        model already in memory. Published: run_reference.py's predict loop; ours: `patchcore bench`
  predict with load     the whole test split in one command that first loads the saved model: ours `patchcore
                        predict --model DIR <test images>`; published: its save_to_path output loaded as
                        load_from_path does it (the backbone's weights from the shared file, not a download), then
                        the same predict loop
Medians over the runs go to a Markdown table on stdout and, with --out, to DIR/<data>.json beside every run's
figures.

usage: /usr/bin/python3 scripts/bench/vs_published.py [DATA ...] [--runs 3] [--threads 2] [--out DIR]
DATA are names under ../shared/data (default: tire magnetic_tile) or paths. Needs Debian's python3-torch,
-torchvision, -faiss, -sklearn, -scipy, -pil, -tqdm for the published code and a built build/patchcore
(PATCHCORE_CLI overrides). A run of both shared sets takes about a quarter of an hour on 2 cores, most of it the
published code.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHARED = os.environ.get("PATCHCORE_SHARED", os.path.join(ROOT, "..", "shared"))
REFERENCE = os.path.join(SHARED, "reference")
WEIGHTS = os.path.join(SHARED, "weights", "resnet18-imagenet-stem-to-layer3.pth")
CLI = os.environ.get("PATCHCORE_CLI", os.path.join(ROOT, "build", "patchcore"))
PYTHON = "/usr/bin/python3"


def test_images(data):
    images = []
    for defect in sorted(os.listdir(os.path.join(data, "test"))):
        folder = os.path.join(data, "test", defect)
        images += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith((".png", ".jpg"))]
    return images


def timed(command, **kwargs):
    start = time.perf_counter()
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    return time.perf_counter() - start, result.stdout


def published_fit_and_predict(data, threads, model_dir):
    _, out = timed([PYTHON, os.path.join(REFERENCE, "run_reference.py"), data, "--weights", WEIGHTS,
                    "--threads", str(threads), "--save", model_dir])
    found = re.search(r"fit ([0-9.]+)s predict\(incl. load\) [0-9.]+s = ([0-9.]+) ms/image", out)
    if not found:
        sys.exit("vs_published.py: run_reference.py printed no timings:\n" + out)
    return float(found.group(1)), float(found.group(2))


# Loads the published model as PatchCore.load_from_path does, with the backbone's weights from the shared file, then
# predicts the test images in batches of 8 as run_reference.py does. Prints the seconds of the whole.
PUBLISHED_PREDICT_WITH_LOAD = r"""
import os, pickle, sys, time
start = time.perf_counter()
reference, model_dir, weights, threads, images = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
sys.path[:0] = [reference, os.path.join(reference, "stubs")]
import torch, torchvision, PIL.Image as Image
from torchvision import transforms as T
import patchcore.patchcore, patchcore.common
torch.set_num_threads(threads)
with open(os.path.join(model_dir, "patchcore_params.pkl"), "rb") as f:
    params = pickle.load(f)
backbone = torchvision.models.resnet18()
backbone.load_state_dict(torch.load(weights), strict=False)
backbone.name = params.pop("backbone.name")
model = patchcore.patchcore.PatchCore(torch.device("cpu"))
model.load(backbone=backbone, **params, device=torch.device("cpu"), nn_method=patchcore.common.FaissNN(False, threads))
model.anomaly_scorer.load(model_dir, "")
tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
for i in range(0, len(images), 8):
    model._predict(torch.stack([tf(Image.open(p).convert("RGB")) for p in images[i:i + 8]]))
print(time.perf_counter() - start)
"""


def published_predict_with_load(model_dir, threads, images):
    _, out = timed([PYTHON, "-c", PUBLISHED_PREDICT_WITH_LOAD, REFERENCE, model_dir, WEIGHTS, str(threads)] + images)
    return float(out.strip().splitlines()[-1])


def ours(data, threads, work, images):
    _, out = timed([CLI, "--threads", str(threads), "bench", "--data", data, "--weights", WEIGHTS, "--repeat", "1",
                    "--json", os.path.join(work, "bench.json")])
    with open(os.path.join(work, "bench.json")) as f:
        bench = json.load(f)
    model = os.path.join(work, "model")
    fit_seconds, _ = timed([CLI, "--threads", str(threads), "fit", "--data", data, "--weights", WEIGHTS, "--out", model])
    with_load, _ = timed([CLI, "--threads", str(threads), "predict", "--model", model] + images)
    return fit_seconds, bench["predict_ms_per_image"], with_load


def measure(data, runs, threads):
    images = test_images(data)
    rows = []
    for run in range(runs):
        with tempfile.TemporaryDirectory() as work:
            published = os.path.join(work, "published")
            p_fit, p_predict = published_fit_and_predict(data, threads, published)
            p_with_load = published_predict_with_load(published, threads, images)
            o_fit, o_predict, o_with_load = ours(data, threads, work, images)
        row = {"published": {"fit_s": p_fit, "predict_ms_per_image": p_predict, "predict_with_load_s": p_with_load},
               "ours": {"fit_s": o_fit, "predict_ms_per_image": o_predict, "predict_with_load_s": o_with_load}}
        print(f"{os.path.basename(data)} run {run + 1}: {json.dumps(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    median = {side: {key: statistics.median(r[side][key] for r in rows) for key in rows[0][side]}
              for side in ("published", "ours")}
    return {"data": data, "test_images": len(images), "threads": threads, "runs": rows, "median": median}


def table(results):
    lines = ["| data | | published | ours | ours faster |", "|---|---|---|---|---|"]
    for r in results:
        p, o = r["median"]["published"], r["median"]["ours"]
        name = os.path.basename(r["data"].rstrip("/"))
        lines.append(f"| {name} | fit | {p['fit_s']:.1f} s | {o['fit_s']:.1f} s | {p['fit_s'] / o['fit_s']:.1f}x |")
        lines.append(f"| | predict in process, per image | {p['predict_ms_per_image']:.0f} ms | "
                     f"{o['predict_ms_per_image']:.1f} ms | {p['predict_ms_per_image'] / o['predict_ms_per_image']:.1f}x |")
        lines.append(f"| | predict with model load, {r['test_images']} images | {p['predict_with_load_s']:.1f} s | "
                     f"{o['predict_with_load_s']:.1f} s | {p['predict_with_load_s'] / o['predict_with_load_s']:.1f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="*", default=["tire", "magnetic_tile"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    results = []
    for name in args.data:
        data = name if os.path.isdir(name) else os.path.join(SHARED, "data", name)
        result = measure(data, args.runs, args.threads)
        results.append(result)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, os.path.basename(data.rstrip("/")) + ".json"), "w") as f:
                json.dump(result, f, indent=1)
    print(f"Medians of {args.runs} run(s), {args.threads} threads\n")
    print(table(results))


if __name__ == "__main__":
    main()
