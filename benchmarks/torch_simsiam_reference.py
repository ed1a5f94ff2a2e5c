"""A plain PyTorch SimSiam, written from the official code (facebookresearch/simsiam), as a reference for
ssl_jax's: the tiny ResNet of `--config.model.name=tiny` (CIFAR stem, one basic block of width 8, one of
width 16; 16-d features), the recipe of `configs/simsiam.py:cifar10` at batch 256 (SGD momentum 0.9,
lr 0.03 with cosine decay and the predictor at the fixed lr, weight decay 5e-4 on every parameter,
2048-2048 projector with BN, 2048-512-2048 predictor), torchvision augmentation with the same parameters,
and torch's default initialisations. kNN (k = 200, T = 0.1) on backbone features with ssl_jax's own
evaluator, every KNN_EVERY epochs and before training. It answers one question on a CPU: how fast should
kNN rise on this network with this recipe? See BENCHMARKS.md, "CPU sanity runs".

usage: python benchmarks/torch_simsiam_reference.py EPOCHS KNN_EVERY OUT.jsonl [ARCHIVE]
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

torch.manual_seed(0)
torch.set_num_threads(2)
EPOCHS, KNN_EVERY, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
BATCH, LR, WD = 256, 0.03 * 256 / 256, 5e-4
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

ARCHIVE = sys.argv[4] if len(sys.argv) > 4 else "../shared/data/cifar10-jpeg.tar.gz"
cfg = config_lib.load_config("configs/simsiam.py:cifar10", [f"data.path={ARCHIVE}"])
train_src, test_src = data.get_source(cfg.data, "train"), data.get_source(cfg.data, "test")
train_u8 = torch.from_numpy(np.ascontiguousarray(train_src.images)).permute(0, 3, 1, 2).contiguous()
test_u8 = torch.from_numpy(np.ascontiguousarray(test_src.images)).permute(0, 3, 1, 2).contiguous()


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.bn2.weight)  # zero_init_residual, as the official SimSiam
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class Tiny(nn.Module):  # ssl_jax's "tiny": CIFAR stem, stages (1, 1) of basic blocks, widths 8 and 16
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1, self.layer2 = Block(8, 8, 1), Block(8, 16, 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.layer2(self.layer1(self.stem(x))).mean((2, 3))


backbone = Tiny()
projector = nn.Sequential(nn.Linear(16, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
                          nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048, affine=False))
predictor = nn.Sequential(nn.Linear(2048, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 2048))
params = [{"params": list(backbone.parameters()) + list(projector.parameters()), "fix": False},
          {"params": predictor.parameters(), "fix": True}]
opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=WD)

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
steps_per_epoch, total = len(loader), len(loader) * EPOCHS


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


log = open(OUT, "a")
print(json.dumps({"epoch": 0, "knn": knn_top1()}), file=log, flush=True)
step, t0 = 0, time.time()
for epoch in range(1, EPOCHS + 1):
    for x1, x2 in loader:
        lr = LR * 0.5 * (1 + math.cos(math.pi * step / total))
        for g in opt.param_groups:
            g["lr"] = LR if g["fix"] else lr
        z1, z2 = projector(backbone(x1)), projector(backbone(x2))
        p1, p2 = predictor(z1), predictor(z2)
        loss = -0.5 * (F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(json.dumps({"step": step, "loss": loss.item(), "s": round(time.time() - t0)}), file=log, flush=True)
    if epoch % KNN_EVERY == 0:
        print(json.dumps({"epoch": epoch, "knn": knn_top1(), "s": round(time.time() - t0)}), file=log, flush=True)
