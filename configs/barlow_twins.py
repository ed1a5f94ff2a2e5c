"""Barlow Twins (Zbontar et al., 2021). Presets: `cifar10`, `imagenet`, `smoke`.

Run (CIFAR-10 from the ImageFolder archive; drop `data.path` to get CIFAR-10 from tensorflow-datasets):

  ssl-jax train --config configs/barlow_twins.py:cifar10 --workdir runs/barlow_twins \
      --config.data.path=../shared/data/cifar10-jpeg.tar.gz

Results: not yet measured on a GPU (see BENCHMARKS.md). For reference, lightly's CIFAR-10 benchmark reports
kNN top-1 0.819 for this cifar10 recipe (ResNet-18, batch 512, 200 epochs, one A6000).

Recipe notes.
imagenet is the paper's and the final official main.py's: ResNet-50, projector 8192-8192-8192, lambda 0.0051,
batch 2048, 1000 epochs, LARS (eta 0.001, momentum 0.9, applied before the lr as main.py's LARS does:
`optim.lars_style="byol"`) with lr 0.2 x B/256 for weights and 0.0048 x B/256
for biases and BatchNorm parameters (bias_lr_factor = 0.0048 / 0.2 = 0.024), both excluded from weight decay
and from the trust ratio; 10 warm-up epochs, then cosine decay to 1/1000 of the peak. Weight decay 1.5e-6 is
the paper's (the final main.py defaults to 1e-6). The loss is not scaled: the old `--scale-loss 0.024` is
folded into the bias learning rate, as the final main.py does. Views are BYOL's asymmetric pair (blur
p = 1.0 / 0.1, solarize p = 0.0 / 0.2). Colour jitter: the official brightness/contrast/saturation/hue
0.4/0.4/0.2/0.1 (`augment.jitter`, in every preset).
cifar10 follows lightly's CIFAR-10 benchmark of 27.03.2023 (`presets.lightly_cifar10`), the version behind
its 81.9% kNN at 200 epochs / batch 512: ResNet-18 (CIFAR stem), a 2-layer projector 512 -> 2048 (BatchNorm,
ReLU) -> 2048 ("use a 2-layer projection head for cifar10 as described in the paper"; lightly's later script
took the 3-layer BarlowTwinsProjectionHead), the same SimCLR views for both branches (colour strength 0.5, no
blur, no solarisation), lambda 0.005 (its BarlowTwinsLoss default), SGD momentum 0.9, lr 0.12 x B/256
(lightly's 0.06 x B/128), weight decay 5e-4 on every parameter, cosine decay without warm-up. (An earlier
version of this preset had the 3-layer head, BYOL's asymmetric views, 10 warm-up epochs and no weight decay
on biases and BatchNorm; it was never measured.)
tests/test_lightly_parity.py checks the cifar10 preset's training step against lightly's Barlow Twins step written
in PyTorch, from the same state and views (float32, CPU): the same loss, momentum and updates. One difference is
kept: lightly's loss standardises by the unbiased standard deviation, ours by the biased one with eps 1e-5 (the
official code's BatchNorm), which scales c by (B - 1) / B, 511/512 at batch 512.
(solo-learn's CIFAR recipe, the same projector with LARS eta 0.02, clipped trust ratios and scale-loss 0.1
for 1000 epochs, needs a LARS variant optax does not have.)
"""
import ml_collections

from ssl_jax import presets


def get_config(arg="cifar10"):
    """Returns the preset named `arg`: cifar10, imagenet or smoke."""
    c = presets.apply(presets.base("barlow_twins"), arg)
    # The projector: (num_layers - 1) hidden Dense-BN-ReLU layers of hidden_dim (0: the
    # backbone's width), then a Dense to out_dim.
    c.head = ml_collections.ConfigDict(dict(num_layers=3, hidden_dim=2048, out_dim=2048))
    c.loss = ml_collections.ConfigDict(dict(lambd=0.0051))
    # config.augment is view 1; view 2 differs in blur and solarisation (the same convention as configs/byol.py).
    c.barlow_twins = ml_collections.ConfigDict(dict(view2_blur_p=0.0, view2_solarize_p=0.2))
    c.augment.update(dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.0, solarize_p=0.0))
    if arg == "cifar10":  # lightly's Barlow Twins model (docstring)
        presets.lightly_cifar10(c)
        c.head.num_layers = 2
        c.loss.lambd = 0.005
        c.barlow_twins.view2_solarize_p = 0.0
    elif arg == "imagenet":
        c.num_epochs, c.batch_size = 1000, 2048
        c.head.update(dict(hidden_dim=8192, out_dim=8192))
        c.augment.blur_p = 1.0
        c.barlow_twins.view2_blur_p = 0.1
        c.optim.update(dict(name="lars", lr=0.2, lr_scaling="linear", weight_decay=1.5e-6, warmup_epochs=10,
                            end_lr_factor=0.001, bias_lr_factor=0.024, lars_style="byol"))
    elif arg == "smoke":
        # LARS with the bias learning-rate group, so the smoke run exercises the imagenet optimizer path.
        c.head.update(dict(hidden_dim=32, out_dim=32))
        c.optim.update(dict(name="lars", lr=0.2, weight_decay=1.5e-6, end_lr_factor=0.001, bias_lr_factor=0.024,
                            lars_style="byol"))
    return c
