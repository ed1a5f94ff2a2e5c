"""MoCo v2 (Chen et al., 2020): MoCo with an MLP head, temperature 0.2, blur, cosine schedule.

Presets: `cifar10`, `imagenet`, `smoke`. Run (CIFAR-10 from the ImageFolder archive; drop `data.path` to get
CIFAR-10 from tensorflow-datasets):

  ssl-jax train --config configs/moco_v2.py:cifar10 --workdir runs/moco_v2 \
      --config.data.path=../shared/data/cifar10-jpeg.tar.gz

Results:
  cifar10 (ResNet-18, batch 512, 200 epochs): not yet measured on a GPU (see BENCHMARKS.md).
  smoke: seconds on a CPU.

Recipe notes. imagenet is facebookresearch/moco's main_moco.py with --mlp --aug-plus --cos --moco-t 0.2: ResNet-50
(torchvision's, as builder.py builds it: every BatchNorm scale starting at 1, model.zero_init_residual = False),
batch 256, SGD lr 0.03 (momentum 0.9, weight decay 1e-4 on every parameter, as torch's SGD), cosine schedule
without warm-up (set once per epoch), 200 epochs, head Linear(2048, 2048)-ReLU-Linear(2048, 128) without BatchNorm,
K = 65,536, m = 0.999, asymmetric loss, shuffled BatchNorm over 8 groups (8 GPUs) and per-device BatchNorm for the
query encoder (DDP without SyncBN: model.sync_bn = False, which is the official 8 groups of 32 on 8 devices but one
group of 256 on one device; moco.query_bn_groups = 8 would give 8 groups on any device count); augmentation: crop
scale 0.2-1, jitter 0.4/0.4/0.4/0.1 with p = 0.8, grayscale 0.2, Gaussian blur sigma 0.1-2 with p = 0.5, flip.
cifar10 is lightly's CIFAR-10 benchmark MoCo (docs/source/getting_started/benchmarks/cifar10_benchmark.py, the
27.03.2023 table: kNN 0.847 at 200 epochs, batch 512; `presets.lightly_cifar10`): ResNet-18 CIFAR stem with
nn.Conv2d's init and every BatchNorm scale starting at 1, head 512-512-128, m = 0.99, temperature 0.1 (not 0.2),
symmetric loss, the mean of the two directions, with ONE memory bank of K = 8,192 for both (the table's batch-512
rows raised it from 4,096; 2 x 512 keys a step), BatchNorm split in 8 groups for the queries and 8 shuffled groups
for the keys (ResNetGenerator(num_splits=8) for both encoders), SGD lr 0.06 x 512/128 with weight decay 5e-4 on
every parameter, cosine without warm-up, SimCLR's CIFAR augmentation (jitter strength 0.5, crop scale 0.08-1)
without blur, which does not help on 32 x 32 images. One difference: lightly's second direction scores against its
bank after the first direction's keys went in (ssl_jax/methods/moco.py); here both score against the queue before
the step. tests/test_lightly_parity.py checks the cifar10 preset's training step against lightly's MoCo step
written in PyTorch (with that one difference), from the same state, views and key permutation (float32, CPU,
2026-11-24): the same loss, SGD buffers and updates, momentum encoder, running statistics and memory bank.
"""
import ml_collections

from ssl_jax import presets


def get_config(arg="cifar10"):
    """Returns the preset named `arg`: cifar10, imagenet or smoke."""
    c = presets.apply(presets.base("moco"), arg)
    c.head = ml_collections.ConfigDict(dict(
        num_layers=2, hidden_dim=512, out_dim=128, use_bn=False, last_bn=False))
    c.loss = ml_collections.ConfigDict(dict(temperature=0.1))
    c.moco = ml_collections.ConfigDict(dict(
        queue_size=8192, momentum=0.99, symmetric=True, shared_queue=True, shuffle_bn=True, shuffle_groups=8,
        query_bn_groups=8))
    c.optim.update(dict(lr=0.12, warmup_epochs=0, exclude_bias_and_norm=False))
    if arg == "cifar10":  # lightly's MoCo model (docstring)
        presets.lightly_cifar10(c)
    elif arg == "imagenet":
        c.num_epochs, c.batch_size = 200, 256
        # builder.py: base_encoder(num_classes=dim), torchvision's default zero_init_residual=False
        c.model.update(dict(sync_bn=False, zero_init_residual=False))
        c.augment.update(dict(min_scale=0.2, jitter_strength=0.5, jitter_p=0.8, blur_p=0.5))
        c.head.hidden_dim = 2048
        c.loss.temperature = 0.2
        c.moco.update(dict(queue_size=65536, momentum=0.999, symmetric=False, shared_queue=False, query_bn_groups=0))
        c.optim.update(dict(lr=0.03, weight_decay=1e-4, schedule_per_epoch=True))  # main_moco.py: lr set per epoch
    elif arg == "smoke":
        c.head.update(dict(hidden_dim=32, out_dim=16))
        # One queue per direction (v1's smoke runs the shared one) of 3 batches: the pointer wraps, and it is not
        # 0 at the end of the 2-epoch run (resume must restore it). 4 BatchNorm groups of 16 for queries and keys
        # on one device, 1 of 8 on 8 devices.
        c.moco.update(dict(queue_size=192, shared_queue=False, shuffle_groups=4, query_bn_groups=4))
        c.optim.lr = 0.1
    return c
