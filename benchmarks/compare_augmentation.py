"""Summary statistics of ssl_jax's on-device SimCLR/SimSiam augmentation against torchvision's with the same
parameters (configs/simsiam.py:cifar10's), on the first N training images of the CIFAR-10 archive: mean and
std of the normalised views, the mean absolute difference between two views of one image, colourfulness
(mean distance of a pixel from its own grey) and neighbour differences (detail). Two implementations of the
same random transforms should agree on all of them. See BENCHMARKS.md, "SimSiam against a PyTorch reference".

usage: python benchmarks/compare_augmentation.py [N] [ARCHIVE]   (from the repository root)
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torchvision.transforms import v2

from ssl_jax import augment, config as config_lib, data

N = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
ARCHIVE = sys.argv[2] if len(sys.argv) > 2 else "../shared/data/cifar10-jpeg.tar.gz"
cfg = config_lib.load_config("configs/simsiam.py:cifar10", [f"data.path={ARCHIVE}"])
images = np.asarray(data.get_source(cfg.data, "train").images[:N])
spec = augment.spec_from_config(cfg.augment)

keys = jax.random.split(jax.random.key(1), N)
ours = [np.asarray(augment.view_batch(jax.vmap(jax.random.fold_in, (0, None))(keys, i), jnp.asarray(images), spec))
        for i in (1, 2)]

s = cfg.augment.jitter_strength  # SimCLR's colour strength: brightness, contrast, saturation 0.8 s, hue 0.2 s
transform = v2.Compose([
    v2.RandomResizedCrop(spec.size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True),
    v2.RandomHorizontalFlip(spec.flip_p),
    v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=spec.jitter_p),
    v2.RandomGrayscale(spec.grayscale_p), v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)])
torch.manual_seed(0)
chw = torch.from_numpy(images).permute(0, 3, 1, 2)
theirs = [np.stack([transform(x).permute(1, 2, 0).numpy() for x in chw]) for _ in range(2)]

for name, (a, b) in (("ssl_jax", ours), ("torchvision", theirs)):
    colourfulness = np.abs(a - a.mean(-1, keepdims=True)).mean()
    print(f"{name:12s} mean {a.mean():.3f}  std {a.std():.3f}  per-image std {a.reshape(N, -1).std(1).mean():.3f}  "
          f"two-view distance {np.abs(a - b).mean():.3f}  colourfulness {colourfulness:.3f}  "
          f"neighbour difference {np.abs(np.diff(a, axis=1)).mean():.3f}")
