"""BYOL (Grill et al., 2020). Presets: `cifar10`, `imagenet`, `smoke`.

Run (CIFAR-10 from the ImageFolder archive; drop `data.path` to get CIFAR-10 from tensorflow-datasets):

  ssl-jax train --config configs/byol.py:cifar10 --workdir runs/byol \
      --config.data.path=../shared/data/cifar10-jpeg.tar.gz

Results: not yet measured on a GPU.

Recipe notes. imagenet is the paper's 1000-epoch recipe (deepmind-research/byol configs/byol.py): ResNet-50,
batch 4096, LARS (eta 1e-3, momentum 0.9, biases and BatchNorm excluded; the momentum on the trust-scaled
gradient, then the lr, as utils/optimizers.py: `optim.lars_style="byol"`) with lr 0.2 x batch/256, weight decay
1.5e-6, 10 warm-up epochs then cosine decay, tau_base 0.996, projector and predictor 4096 -> 256 whose output
Linear has no bias (utils/networks.py MLP: `byol.head_out_bias=False`), haiku's default initialisation of
convolutions and Linears (`model.conv_init="haiku"`, `byol.head_init="haiku"`), colour jitter
(0.4, 0.4, 0.2, 0.1) with p 0.8 (`augment.jitter`), grayscale 0.2, blur p 1.0 / 0.1 and solarize p 0 / 0.2
for views 1 / 2. For 300 epochs the official presets use lr 0.3, weight decay 1e-6 and tau_base 0.99:
`--config.num_epochs=300 --config.optim.lr=0.3 --config.optim.weight_decay=1e-6 --config.byol.tau_base=0.99`.
cifar10 is lightly's CIFAR-10 benchmark (`presets.lightly_cifar10`; ResNet-18, batch 512, 200 epochs, 86.8% kNN
top-1 there): projector 512 -> 1024 -> 256 and predictor 256 -> 1024 -> 256, target decay 0.99 throughout
(`byol.tau_schedule="constant"`), the same SimCLR views for both branches (colour strength 0.5, no blur, no
solarisation), SGD momentum 0.9 with cosine decay and no warm-up. lightly's loss is 0.5 (-cos(p1, z2) - cos(p2,
z1)); ours, the official one, is (2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1)), whose gradient is 4 times as large.
With torch-style SGD (weight decay added to the gradient, then momentum, then the lr) a gradient 4 times as
large with lr / 4 and weight decay x 4 gives exactly the same updates, so lightly's lr 0.24 and weight decay
5e-4 at batch 512 are lr 0.06 (0.03 x batch/256) and weight decay 2e-3 here (tests/test_byol.py checks it).
tests/test_lightly_parity.py checks the cifar10 preset's training step against lightly's BYOL step written in
PyTorch, from the same state and views (float32, CPU): our loss 4 + 4 x lightly's, the same updates, torch's
SGD buffers ours / 4, and lightly's momentum copy (m = 0.99, updated before the forward) equal to our target.
(An earlier version of this preset took solo-learn's details: 4096-wide heads, tau 0.99 -> 1, asymmetric views
with solarize p 0 / 0.2, and lightly's lr and weight decay on our 4x loss. It was never measured.)
"""
import ml_collections

from ssl_jax import presets


def get_config(arg="cifar10"):
    """Returns the preset named `arg`: cifar10, imagenet or smoke."""
    c = presets.apply(presets.base("byol"), arg)
    c.projector = ml_collections.ConfigDict(dict(hidden_dim=4096, out_dim=256))
    c.predictor = ml_collections.ConfigDict(dict(hidden_dim=4096))
    # config.augment describes view 1; view 2 differs only in these two probabilities. head_out_bias: the
    # projector's and predictor's output Linear has a bias (lightly's heads), or not (the official networks.MLP).
    # head_init: their Linears start as torch.nn.Linear's (lightly's) or as haiku's hk.Linear (the official code's).
    c.byol = ml_collections.ConfigDict(dict(tau_base=0.99, tau_schedule="cosine", view2_blur_p=0.0,
                                            view2_solarize_p=0.2, head_out_bias=True, head_init="torch"))
    c.augment.update(dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.0, solarize_p=0.0))
    c.optim.update(dict(name="sgd", lr=0.12, lr_scaling="linear", weight_decay=5e-4, momentum=0.9,
                        warmup_epochs=0, exclude_bias_and_norm=False))
    if arg == "cifar10":  # lightly's BYOL model (docstring)
        presets.lightly_cifar10(c)
        c.projector.hidden_dim = c.predictor.hidden_dim = 1024
        c.byol.update(dict(tau_base=0.99, tau_schedule="constant", view2_solarize_p=0.0))
        c.optim.update(dict(lr=0.03, weight_decay=2e-3))  # lightly's 0.24 and 5e-4 for a loss 4x as large
    elif arg == "imagenet":
        c.num_epochs = 1000
        c.byol.update(dict(tau_base=0.996, view2_blur_p=0.1, view2_solarize_p=0.2, head_out_bias=False,
                           head_init="haiku"))
        c.model.conv_init = "haiku"  # hk.Conv2D's default (networks.ResNetTorso sets no w_init)
        c.augment.update(dict(blur_p=1.0, solarize_p=0.0))
        c.optim.update(dict(name="lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10, trust_coefficient=1e-3,
                            exclude_bias_and_norm=True, lars_style="byol"))
    elif arg == "smoke":
        c.projector.update(dict(hidden_dim=32, out_dim=16))
        c.predictor.hidden_dim = 32
        c.optim.lr = 0.1
    return c
