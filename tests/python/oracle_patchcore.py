"""Runs the published PatchCore in its own process (its package is also called patchcore) and saves what it
computes: python3 oracle_patchcore.py REFERENCE_DIR WEIGHTS OUT.npz --train FILE... --test FILE...

Identity sampler and exact search, so nothing random: ResNet-18, layer2 + layer3, 1024 dimensions, 224 crop."""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("reference")
parser.add_argument("weights")
parser.add_argument("out")
parser.add_argument("--train", nargs="+")
parser.add_argument("--test", nargs="+")
args = parser.parse_args()
sys.path[:0] = [args.reference, os.path.join(args.reference, "stubs")]

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision import transforms  # noqa: E402

import patchcore.common  # noqa: E402
import patchcore.patchcore  # noqa: E402
import patchcore.sampler  # noqa: E402

transform = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ]
)


def images(paths):
    return torch.stack([transform(PIL.Image.open(p).convert("RGB")) for p in paths])


network = torchvision.models.resnet18()
network.load_state_dict(torch.load(args.weights), strict=False)
model = patchcore.patchcore.PatchCore(torch.device("cpu"))
model.load(
    backbone=network,
    layers_to_extract_from=["layer2", "layer3"],
    device=torch.device("cpu"),
    input_shape=(3, 224, 224),
    pretrain_embed_dimension=1024,
    target_embed_dimension=1024,
    featuresampler=patchcore.sampler.IdentitySampler(),
    nn_method=patchcore.common.FaissNN(False, 2),
)
model.fit([images(args.train)])
scores, masks = model.predict(images(args.test))
np.savez(args.out, scores=np.array(scores), masks=np.stack(masks))
