"""Plain PyTorch references for ssl_jax's SimSiam and Barlow Twins on the tiny ResNet of
`--config.model.name=tiny` (CIFAR stem, one basic block of width 8, one of width 16; 16-d features), at batch
256, with torchvision augmentation of the same parameters and kNN (k = 200, T = 0.1) on backbone features by
ssl_jax's own evaluator, every KNN_EVERY epochs and before training. Each answers one question on a CPU: how fast
should kNN rise on this network with this recipe? See BENCHMARKS.md, "CPU sanity runs".

METHOD
  simsiam       written from the official code (facebookresearch/simsiam), the recipe `configs/simsiam.py:cifar10`
                had on 2026-11-23: kaiming fan-out convolutions, residual BatchNorm scales at 0, SGD momentum 0.9,
                lr 0.03 with cosine decay per step and the predictor at the fixed lr, weight decay 5e-4 on every
                parameter, 2048-2048 projector with BN, 2048-512-2048 predictor, torch's Linear initialisation.
  barlow_twins  lightly's BarlowTwinsModel of its CIFAR-10 benchmark (27.03.2023), the model behind its 81.9% kNN
                and the one `configs/barlow_twins.py:cifar10` follows: nn.Conv2d's default initialisation,
                BatchNorm scales at 1, projector 16 -> 2048 (BatchNorm, ReLU) -> 2048, BarlowTwinsLoss as lightly
                wrote it (lambda 5e-3, the unbiased standard deviation), SGD momentum 0.9, lr 0.06 x 256/128,
                weight decay 5e-4 on every parameter, cosine decay per epoch without warm-up.
Both: views of crop scale (0.08, 1), flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2.

usage: python benchmarks/torch_tiny_reference.py METHOD EPOCHS KNN_EVERY OUT.jsonl [ARCHIVE]
       (from the repository root; ARCHIVE defaults to ../shared/data/cifar10-jpeg.tar.gz)
"""
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from ssl_jax import config as config_lib, data
from ssl_jax.evaluators import knn

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
BATCH, WD = 256, 5e-4


class Block(nn.Module):
    def __init__(self, cin, cout, stride, zero_init_residual):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if zero_init_residual:  # as the official SimSiam
            nn.init.zeros_(self.bn2.weight)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class Tiny(nn.Module):  # ssl_jax's "tiny": CIFAR stem, stages (1, 1) of basic blocks, widths 8 and 16
    def __init__(self, official_simsiam):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1, self.layer2 = Block(8, 8, 1, official_simsiam), Block(8, 16, 2, official_simsiam)
        for m in self.modules():
            if official_simsiam and isinstance(m, nn.Conv2d):  # lightly's keeps nn.Conv2d's default
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.layer2(self.layer1(self.stem(x))).mean((2, 3))


def lightly_barlow_twins_loss(z_a, z_b, lambd=5e-3):
    """lightly's BarlowTwinsLoss of that date (single process): standardise by the unbiased std, c = za^T zb / N."""
    z_a = (z_a - z_a.mean(0)) / z_a.std(0)
    z_b = (z_b - z_b.mean(0)) / z_b.std(0)
    n, d = z_a.shape
    c_diff = (z_a.T @ z_b / n - torch.eye(d)).pow(2)
    c_diff[~torch.eye(d, dtype=torch.bool)] *= lambd
    return c_diff.sum()


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    method, epochs, knn_every, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if method not in ("simsiam", "barlow_twins"):
        raise SystemExit(f"unknown METHOD {method!r}: simsiam or barlow_twins")
    official_simsiam = method == "simsiam"
    lr_peak = 0.03 * BATCH / 256 if official_simsiam else 0.06 * BATCH / 128
    archive = sys.argv[5] if len(sys.argv) > 5 else "../shared/data/cifar10-jpeg.tar.gz"
    cfg = config_lib.load_config(f"configs/{method}.py:cifar10", [f"data.path={archive}"])
    # The archive's first decode runs in spawned worker processes, hence main() behind the __main__ guard.
    train_src, test_src = data.get_source(cfg.data, "train"), data.get_source(cfg.data, "test")
    train_u8 = torch.from_numpy(np.ascontiguousarray(train_src.images)).permute(0, 3, 1, 2).contiguous()
    test_u8 = torch.from_numpy(np.ascontiguousarray(test_src.images)).permute(0, 3, 1, 2).contiguous()

    backbone = Tiny(official_simsiam)
    if official_simsiam:
        projector = nn.Sequential(nn.Linear(16, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
                                  nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048, affine=False))
        predictor = nn.Sequential(nn.Linear(2048, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
                                  nn.Linear(512, 2048))
        params = [{"params": list(backbone.parameters()) + list(projector.parameters()), "fix": False},
                  {"params": predictor.parameters(), "fix": True}]

        def loss_fn(x1, x2):
            z1, z2 = projector(backbone(x1)), projector(backbone(x2))
            p1, p2 = predictor(z1), predictor(z2)
            return -0.5 * (F.cosine_similarity(p1, z2.detach()).mean() +
                           F.cosine_similarity(p2, z1.detach()).mean())
    else:
        projector = nn.Sequential(nn.Linear(16, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
                                  nn.Linear(2048, 2048))
        params = [{"params": list(backbone.parameters()) + list(projector.parameters()), "fix": False}]

        def loss_fn(x1, x2):
            return lightly_barlow_twins_loss(projector(backbone(x1)), projector(backbone(x2)))
    opt = torch.optim.SGD(params, lr=lr_peak, momentum=0.9, weight_decay=WD)

    augment = v2.Compose([
        v2.RandomResizedCrop(32, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    class Views(torch.utils.data.Dataset):
        def __len__(self):
            return len(train_u8)

        def __getitem__(self, i):
            return augment(train_u8[i]), augment(train_u8[i])

    # One worker process (fork): it runs only torchvision code, although JAX (the kNN) was started before it.
    loader = torch.utils.data.DataLoader(Views(), batch_size=BATCH, shuffle=True, drop_last=True, num_workers=1,
                                         persistent_workers=True)
    total = len(loader) * epochs

    @torch.no_grad()
    def features(u8):
        backbone.eval()
        out = [backbone(((u8[i:i + 1000].float() / 255) - torch.tensor(MEAN)[:, None, None]) /
                        torch.tensor(STD)[:, None, None]) for i in range(0, len(u8), 1000)]
        backbone.train()
        return torch.cat(out).numpy()

    def knn_top1():
        r = knn.knn_accuracy(features(train_u8), train_src.labels, features(test_u8), test_src.labels, 10)
        return r["knn_top1"], r["knn_top5"]

    log = open(out, "a")
    print(json.dumps({"method": method, "epoch": 0, "knn": knn_top1()}), file=log, flush=True)
    step, t0 = 0, time.time()
    for epoch in range(1, epochs + 1):
        for x1, x2 in loader:
            # SimSiam's official schedule is cosine per step; lightly's CosineAnnealingLR steps once per epoch.
            progress = step / total if official_simsiam else (epoch - 1) / epochs
            lr = lr_peak * 0.5 * (1 + math.cos(math.pi * progress))
            for g in opt.param_groups:
                g["lr"] = lr_peak if g["fix"] else lr
            loss = loss_fn(x1, x2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                print(json.dumps({"step": step, "loss": loss.item(), "s": round(time.time() - t0)}), file=log,
                      flush=True)
        if epoch % knn_every == 0:
            print(json.dumps({"epoch": epoch, "knn": knn_top1(), "s": round(time.time() - t0)}), file=log,
                  flush=True)


if __name__ == "__main__":
    main()
