"""Writes the fuzzers' seed inputs: fuzz/corpus/<target>/ and the model-directory fuzzer's backbone.

Run with Debian's python3 (torch, torchvision, PIL, faiss, numpy) from the repository root:
    /usr/bin/python3 scripts/fuzz/make_corpus.py fuzz
Seeds are small valid files of every kind the loaders accept, so that mutations start from deep inside
each format rather than at its magic number.
"""
import io
import json
import os
import shutil
import sys
import zlib

import faiss
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from make_common import TinyNet  # noqa: E402  the test suite's TorchScript backbone, also the fuzzer's

# Keep in sync with kSeparator in fuzz/fuzz_model_dir.cpp.
SEPARATOR = b"\n==patchcore-fuzz==\n"


def reset(folder):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)


def checkpoints(out):
    reset(out)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    tensors = {
        "conv.weight": torch.randn(2, 3, 1, 1, generator=g),
        "bn.running_mean": torch.randn(3, generator=g).double(),
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(5, generator=g).half(),
        "bfloat": torch.randn(3, generator=g).bfloat16(),
        "bytes": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "flags": torch.tensor([True, False, True]),
        "int32": torch.arange(-3, 3, dtype=torch.int32),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),                # strides of a view
        "offset": base[1:3, 2:5],              # same storage, nonzero offset
        "complex": torch.randn(2, generator=g, dtype=torch.cfloat),
    }

    def save(name, obj, **kwargs):
        buffer = io.BytesIO()
        torch.save(obj, buffer, **kwargs)
        with open(os.path.join(out, name), "wb") as f:
            f.write(buffer.getvalue())

    save("dtypes.zip.pth", tensors)
    save("dtypes.legacy.pth", tensors, _use_new_zipfile_serialization=False)
    save("proto4.zip.pth", {"w": base}, pickle_protocol=4)
    save("proto4.legacy.pth", {"w": base}, pickle_protocol=4, _use_new_zipfile_serialization=False)
    save("wrapped_state_dict.pth", {"state_dict": {"module.a": base[0], "module.b": base[1]}, "epoch": 3})
    save("wrapped_model.legacy.pth", {"model": {"a": base}}, _use_new_zipfile_serialization=False)
    save("scalar.zip.pth", {"x": torch.tensor(1.5)})


def images(out):
    reset(out)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB")
    grey = rgb.convert("L")
    rgb.save(os.path.join(out, "rgb.png"))
    grey.save(os.path.join(out, "grey.png"))
    rgb.convert("RGBA").save(os.path.join(out, "rgba.png"))
    grey.convert("LA").save(os.path.join(out, "la.png"))
    rgb.convert("P").save(os.path.join(out, "palette.png"))
    grey.convert("1").save(os.path.join(out, "bit1.png"))
    Image.fromarray((rng.integers(0, 65536, (4, 6))).astype(np.uint16)).save(os.path.join(out, "grey16.png"))
    rgb.resize((16, 9)).save(os.path.join(out, "rgb.jpg"), quality=50)
    grey.resize((9, 16)).save(os.path.join(out, "grey.jpg"), quality=50)
    rgb.resize((8, 8)).save(os.path.join(out, "progressive.jpg"), quality=50, progressive=True)
    rgb.save(os.path.join(out, "rgb.bmp"))
    grey.convert("1").save(os.path.join(out, "bit1.bmp"))
    rgb.convert("P").save(os.path.join(out, "palette.bmp"))
    rgb.save(os.path.join(out, "rgb.tif"))
    rgb.save(os.path.join(out, "rgb_deflate.tif"), compression="tiff_adobe_deflate")
    grey.save(os.path.join(out, "grey.tif"))


def model_dirs(out, backbone_path):
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    extractor = create_feature_extractor(TinyNet().eval(), return_nodes={"stem": "low", "block": "high"})
    torch.jit.script(extractor).save(backbone_path)
    with open(backbone_path, "rb") as f:
        backbone = f.read()
    reset(out)
    rng = np.random.default_rng(0)
    dim = 8

    def params(layers, k, nn_method, bank, patchsize=3):
        return {
            "format": "patchcore-model",
            "version": 1,
            "backbone.name": "torchscript",
            "backbone.weights": {"file": "backbone.pt", "bytes": len(backbone), "crc32": zlib.crc32(backbone)},
            "layers_to_extract_from": layers,
            "input_shape": [3, 16, 16],
            "pretrain_embed_dimension": dim,
            "target_embed_dimension": dim,
            "patchsize": patchsize,
            "patchstride": 1,
            "anomaly_scorer_num_nn": k,
            "resize": 16,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "nn_method": nn_method,
            "memory_bank_size": bank,
        }

    def calibrated(p):
        threshold = {"value": 2.5, "method": "quantile", "quantile": 0.995, "f1": 0.0, "good_images": 20,
                     "defective_images": 0, "scores": 20, "min": 1.0, "max": 3.0}
        return dict(p, version=2, batchnorm_statistics="checkpoint",
                    calibration={"data": "/validation", "created": "2026-01-01T00:00:00Z", "image": threshold,
                                 "pixel": dict(threshold, method="f1_max", f1=0.5, defective_images=4, scores=5120)})

    def index_bytes(index):
        return faiss.serialize_index(index).tobytes()

    def npy_bytes(array):
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    def write(name, p, index, features=None):
        parts = [json.dumps(p, indent=2).encode() + b"\n", index_bytes(index)]
        if features is not None:
            parts.append(npy_bytes(features))
        with open(os.path.join(out, name), "wb") as f:
            f.write(SEPARATOR.join(parts))

    bank = rng.standard_normal((12, dim)).astype(np.float32)
    flat = faiss.IndexFlatL2(dim)
    flat.add(bank)
    write("flat.bin", params(["low", "high"], 1, "FaissNN", len(bank)), flat)
    write("flat_features.bin", params(["high"], 3, "FaissNN", len(bank), patchsize=1), flat, bank)
    write("flat_calibrated.bin", calibrated(params(["low", "high"], 1, "FaissNN", len(bank))), flat)
    write("flat_tiles.bin", dict(params(["low", "high"], 1, "FaissNN", len(bank)), version=3,
                                 batchnorm_statistics="checkpoint", view="tiles", tile_overlap=4), flat)

    train = rng.standard_normal((64, dim)).astype(np.float32)
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, 2, 2, 4)
    ivfpq.train(train)
    ivfpq.add(train[:20])
    write("ivfpq.bin", params(["low", "high"], 2, "ApproximateFaissNN", 20), ivfpq)


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "fuzz"
    checkpoints(os.path.join(root, "corpus", "fuzz_checkpoint"))
    images(os.path.join(root, "corpus", "fuzz_image"))
    model_dirs(os.path.join(root, "corpus", "fuzz_model_dir"), os.path.join(root, "model_dir_backbone.pt"))


if __name__ == "__main__":
    main()
