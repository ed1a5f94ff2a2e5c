"""SwAV (Caron et al., 2020) with multi-crop. Presets: `cifar10`, `imagenet`, `smoke`.

Run (CIFAR-10 from the ImageFolder archive; drop `data.path` to get CIFAR-10 from tensorflow-datasets):

  ssl-jax train --config configs/swav.py:cifar10 --workdir runs/swav \
      --config.data.path=../shared/data/cifar10-jpeg.tar.gz

Results: not yet measured on a GPU.

Recipe notes. imagenet is the official 100-epoch recipe (facebookresearch/swav scripts/swav_100ep_pretrain.sh):
ResNet-50 (src/resnet50.py: torchvision's init with zero_init_residual=False, every BatchNorm scale starting at 1),
batch 4096, multi-crop 2 x 224 (scale 0.14-1) + 6 x 96 (scale 0.05-0.14), colour jitter strength 1, blur p 0.5 on
every crop, projection head 2048 -> 128, 3000 prototypes, temperature 0.1, Sinkhorn epsilon 0.05 with 3 iterations,
prototypes frozen for the first epoch (312 steps at batch 4096; the official 313 iterations), no queue, LARS (eta
1e-3, momentum 0.9, applied to every parameter as apex's LARC is there; LARC's trust ratio and torch SGD's
momentum: `optim.lars_style="larc"`) with lr 4.8 = 0.3 x batch/256, final lr
0.0048, weight decay 1e-6, 10 warm-up epochs (from 0 here; the official warm-up starts at 0.3). BatchNorm is
synchronised over the whole batch here; the official script's apex SyncBN (--sync_bn apex) pools groups of 8 of its
64 GPUs (512 images). The official batch-256 script (swav_200ep_bs256_pretrain.sh) has 200 epochs, base lr 0.6
without warm-up, final lr 0.0006, prototypes frozen for 5005 iterations (one epoch) and a queue of 3840 embeddings
from epoch 15: `--config.batch_size=256 --config.num_epochs=200 --config.optim.lr=0.6 --config.optim.warmup_epochs=0
--config.swav.queue_length=3840 --config.swav.queue_start_epoch=15` (3840 is a multiple of 256).
cifar10 follows lightly's CIFAR-10 benchmark (`presets.lightly_cifar10`; ResNet-18, batch 512, 200 epochs):
512 prototypes, head 512 -> 512 -> 128 with BatchNorm, large crops of 32 with scale 0.14-1, colour strength
0.5, no blur, BatchNorm statistics per crop (lightly calls the network once per crop: `swav.bn_per_crop`; the
official forward pools the crops of one resolution), torch's Adam (`optim.name="adam"`: weight decay added to
the gradient, not AdamW's) with lr 1e-3 x batch/128 = 2e-3 x batch/256, weight decay 1e-6 and cosine decay
without warm-up, no prototype freeze (lightly's default; with Adam, whose step count is shared by every
parameter, a freeze would also skew the prototypes' first updates after it). To lightly's two crops (solo-learn's CIFAR
recipe also has two) it adds the multi-crop of the paper scaled to CIFAR: 6 x 16 crops with scale 0.05-0.14.
Neither library uses small crops on CIFAR-10; their two-crop recipe is `--config.swav.num_small_crops=0`.
tests/test_lightly_parity.py checks that two-crop step against lightly's SwaV step written in PyTorch, from the
same state and views (float32, CPU): the same loss, Adam moments and updates.
"""
import ml_collections

from ssl_jax import presets


def get_config(arg="cifar10"):
    """Returns the preset named `arg`: cifar10, imagenet or smoke."""
    c = presets.apply(presets.base("swav"), arg)
    c.head = ml_collections.ConfigDict(dict(num_layers=2, hidden_dim=512, out_dim=128, use_bn=True, last_bn=False))
    # Large crops are config.augment's (crop_size, min_scale, max_scale); small crops differ only in size and scale.
    c.swav = ml_collections.ConfigDict(dict(
        num_prototypes=512, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3, freeze_prototypes_epochs=1,
        queue_length=0, queue_start_epoch=15, num_large_crops=2, num_small_crops=6, small_crop_size=16,
        small_min_scale=0.05, small_max_scale=0.14, bn_per_crop=False))
    c.augment.update(dict(min_scale=0.14, max_scale=1.0, blur_p=0.0))
    c.optim.update(dict(name="adamw", lr=2e-3, lr_scaling="linear", weight_decay=1e-6, warmup_epochs=0,
                        exclude_bias_and_norm=False))
    if arg == "cifar10":  # lightly's SwAV model (docstring), plus the small crops
        presets.lightly_cifar10(c)
        c.augment.min_scale = 0.14
        c.swav.update(dict(freeze_prototypes_epochs=0, bn_per_crop=True))
        c.optim.update(dict(name="adam", lr=2e-3, weight_decay=1e-6))
    elif arg == "imagenet":
        c.model.zero_init_residual = False  # src/resnet50.py's default, which main_swav.py keeps
        c.head.hidden_dim = 2048
        c.swav.update(dict(num_prototypes=3000, small_crop_size=96))
        c.augment.update(dict(jitter_strength=1.0, blur_p=0.5))
        c.optim.update(dict(name="lars", lr=0.3, weight_decay=1e-6, momentum=0.9, warmup_epochs=10,
                            end_lr_factor=0.001, trust_coefficient=1e-3, exclude_bias_and_norm=False,
                            lars_style="larc"))
    elif arg == "smoke":
        # Two epochs of 8 steps: prototypes frozen in the first; the queue (2 batches) fills from step 8
        # and takes part in Sinkhorn from step 10, so the smoke run goes through every branch.
        c.head.update(dict(hidden_dim=32, out_dim=16))
        c.swav.update(dict(num_prototypes=32, num_small_crops=2, small_crop_size=8, queue_length=128,
                           queue_start_epoch=1))
        c.optim.update(dict(name="sgd", lr=0.1, weight_decay=5e-4, warmup_epochs=1))
    return c
