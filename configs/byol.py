"""BYOL (Grill et al., 2020). Presets: `cifar10`, `imagenet`, `smoke`.

Run (CIFAR-10 from the ImageFolder archive; drop `data.path` to get CIFAR-10 from tensorflow-datasets):

  ssl-jax train --config configs/byol.py:cifar10 --workdir runs/byol \
      --config.data.path=../shared/data/cifar10-jpeg.tar.gz

Results: not yet measured on a GPU.

Recipe notes. imagenet is the paper's 1000-epoch recipe (deepmind-research/byol configs/byol.py): ResNet-50,
batch 4096, LARS (eta 1e-3, momentum 0.9, biases and BatchNorm excluded) with lr 0.2 x batch/256, weight decay
1.5e-6, 10 warm-up epochs then cosine decay, tau_base 0.996, projector and predictor 4096 -> 256, colour jitter
(0.4, 0.4, 0.2, 0.1) with p 0.8 (`augment.jitter`, in every preset), grayscale 0.2, blur p 1.0 / 0.1 and solarize p 0 / 0.2 for views
1 / 2. For 300 epochs the official presets use lr 0.3, weight decay 1e-6 and tau_base 0.99:
`--config.num_epochs=300 --config.optim.lr=0.3 --config.optim.weight_decay=1e-6 --config.byol.tau_base=0.99`.
cifar10 combines two known-good CIFAR-10 recipes: lightly's cifar10 benchmark (ResNet-18, batch 512, 200 epochs:
SGD momentum 0.9, lr 0.06 x batch/128 = 0.12 x batch/256, weight decay 5e-4 on every parameter, cosine decay,
no warm-up, projector/predictor 4096 -> 256, no blur) and solo-learn's cifar byol.yaml (tau 0.99 -> 1 on the
cosine schedule, asymmetric views: solarize p 0 / 0.2, no blur on either view).
"""
import ml_collections

from ssl_jax import presets


def get_config(arg="cifar10"):
    """Returns the preset named `arg`: cifar10, imagenet or smoke."""
    c = presets.apply(presets.base("byol"), arg)
    c.projector = ml_collections.ConfigDict(dict(hidden_dim=4096, out_dim=256))
    c.predictor = ml_collections.ConfigDict(dict(hidden_dim=4096))
    # config.augment describes view 1; view 2 differs only in these two probabilities.
    c.byol = ml_collections.ConfigDict(dict(tau_base=0.99, view2_blur_p=0.0, view2_solarize_p=0.2))
    c.augment.update(dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.0, solarize_p=0.0))
    c.optim.update(dict(name="sgd", lr=0.12, lr_scaling="linear", weight_decay=5e-4, momentum=0.9,
                        warmup_epochs=0, exclude_bias_and_norm=False))
    if arg == "imagenet":
        c.num_epochs = 1000
        c.byol.update(dict(tau_base=0.996, view2_blur_p=0.1, view2_solarize_p=0.2))
        c.augment.update(dict(blur_p=1.0, solarize_p=0.0))
        c.optim.update(dict(name="lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10, trust_coefficient=1e-3,
                            exclude_bias_and_norm=True))
    elif arg == "smoke":
        c.projector.update(dict(hidden_dim=32, out_dim=16))
        c.predictor.hidden_dim = 32
        c.optim.lr = 0.1
    return c
