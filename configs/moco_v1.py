"""MoCo v1 (He et al., 2020). Presets: `cifar10`, `imagenet`, `smoke`.

Run (CIFAR-10 from the ImageFolder archive; drop `data.path` to get CIFAR-10 from tensorflow-datasets):

  ssl-jax train --config configs/moco_v1.py:cifar10 --workdir runs/moco_v1 \
      --config.data.path=../shared/data/cifar10-jpeg.tar.gz

Results:
  cifar10 (ResNet-18, batch 512, 200 epochs): not yet measured on a GPU (see BENCHMARKS.md).
  smoke: seconds on a CPU.

Recipe notes. imagenet is facebookresearch/moco's main_moco.py: ResNet-50 (torchvision's, as builder.py builds it:
every BatchNorm scale starting at 1, model.zero_init_residual = False), batch 256, SGD lr 0.03 (momentum
0.9, weight decay 1e-4 on every parameter, as torch's SGD), 200 epochs, a 128-d linear head, K = 65,536,
m = 0.999, temperature 0.07, asymmetric loss, shuffled BatchNorm over 8 groups (8 GPUs) and per-device
BatchNorm for the query encoder (DDP without SyncBN: model.sync_bn = False, which is the official 8 groups
of 32 on 8 devices but one group of 256 on one device; moco.query_bn_groups = 8 would give 8 groups on any
device count), the lr dropped 10x at epochs 120 and 160; v1's augmentation: crop scale 0.2-1, grayscale
p = 0.2 BEFORE the colour jitter (augment.grayscale_first), jitter 0.4/0.4/0.4/0.4 (hue 0.4, not SimCLR's 0.1)
applied to every image, flip, no blur.
cifar10 is MoCo's official CIFAR-10 demo (facebookresearch/moco, colab/moco_cifar10_demo.ipynb on the
colab-notebook branch; kNN 85.3 at 200 epochs there), value for value: torchvision's ResNet-18 with a CIFAR stem
and its init (every BatchNorm scale starting at 1; the colab's replacement 3x3 stem convolution keeps nn.Conv2d's
default init, ours torchvision's like the rest), linear 128-d head, m = 0.99, temperature 0.1, symmetric loss with
ONE queue of K = 4,096 for both directions (2 x 512 keys a step), BatchNorm split in 8 groups for the queries and 8
shuffled groups for the keys (bn_splits = 8), batch 512, cosine without warm-up (set once per epoch), SimCLR-style
colour jitter 0.4/0.4/0.4/0.1 (p = 0.8), grayscale 0.2, no blur, kNN monitor k = 200, temperature 0.1. The colab
SUMS the two directions at SGD lr 0.06, weight decay 5e-4 (every parameter); our loss is their mean, and for SGD
the sum at (lr, wd) is the mean at (2 lr, wd / 2) (ssl_jax/methods/moco.py), so lr 0.06 per 256 (0.12 at 512) and
weight decay 2.5e-4 here. tests/test_lightly_parity.py checks the cifar10 preset's training step against the colab's
ModelMoCo written in PyTorch, from the same state, views and key permutation (float32, CPU, 2026-11-24): our loss
half the colab's sum, the same updates (SGD buffers half of torch's), key encoder, running statistics and queue.
"""
import ml_collections

from ssl_jax import presets


def get_config(arg="cifar10"):
    """Returns the preset named `arg`: cifar10, imagenet or smoke."""
    c = presets.apply(presets.base("moco"), arg)
    # num_layers=1: one linear layer; hidden_dim only matters if num_layers is raised (then it is v2's head).
    c.head = ml_collections.ConfigDict(dict(
        num_layers=1, hidden_dim=512, out_dim=128, use_bn=False, last_bn=False))
    c.loss = ml_collections.ConfigDict(dict(temperature=0.1))
    c.moco = ml_collections.ConfigDict(dict(
        queue_size=4096, momentum=0.99, symmetric=True, shared_queue=True, shuffle_bn=True, shuffle_groups=8,
        query_bn_groups=8))
    c.optim.update(dict(lr=0.06, weight_decay=2.5e-4, warmup_epochs=0, exclude_bias_and_norm=False))
    if arg == "cifar10":  # the colab's torchvision resnet18 (residual BatchNorm scales start at 1), lr set per epoch
        c.model.zero_init_residual = False
        c.optim.schedule_per_epoch = True
    elif arg == "imagenet":
        c.num_epochs, c.batch_size = 200, 256
        # builder.py: base_encoder(num_classes=dim), torchvision's default zero_init_residual=False
        c.model.update(dict(sync_bn=False, zero_init_residual=False))
        c.augment.update(dict(min_scale=0.2, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_first=True,
                              blur_p=0.0))
        c.head.hidden_dim = 2048
        c.loss.temperature = 0.07
        c.moco.update(dict(queue_size=65536, momentum=0.999, symmetric=False, shared_queue=False, query_bn_groups=0))
        c.optim.update(dict(lr=0.03, weight_decay=1e-4, step_milestones=(120, 160), step_factor=0.1))
    elif arg == "smoke":
        c.head.update(dict(hidden_dim=32, out_dim=16))
        # The shared queue (v2's smoke runs one per direction) of 3 steps x 2 x 64 keys: the pointer wraps, and
        # it is not 0 at the end of either epoch (8 steps of 128 keys: 256; 16 steps: 128), so resume must
        # restore it. 4 BatchNorm groups of 16 for queries and keys on one device, 1 of 8 on 8 devices.
        c.moco.update(dict(queue_size=384, shuffle_groups=4, query_bn_groups=4))
        c.optim.lr = 0.1
    return c
