"""SimCLR v2 (Chen et al., 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners").

Presets: `cifar10`, `imagenet`, `smoke`. Method "simclr" (ssl_jax/methods/simclr.py) with SimCLR v2's head.

Run (CIFAR-10 from the ImageFolder archive; drop `data.path` to get CIFAR-10 from tensorflow-datasets):

  ssl-jax train --config configs/simclr_v2.py:cifar10 --workdir runs/simclr_v2 \
      --config.data.path=../shared/data/cifar10-jpeg.tar.gz

Results: not yet measured on a GPU (see BENCHMARKS.md).

What v2 changes, following the paper and the official tf2 code (model.py ProjectionHead, run.py flags):
- A 3-layer projection head: two hidden Dense -> BN -> ReLU layers as wide as the backbone output
  (head.hidden_dim = 0 means "the backbone's feature width", so width/depth overrides keep it right), then
  Dense -> BN to 128-d, that output BN with a learnable scale and no bias as in the official code
  (head.last_bn_scale). Its Dense kernels start from N(0, 0.01^2) as there (head.init_std; LinearLayer's
  RandomNormal(stddev=0.01)).
- The official network otherwise too (tf2/resnet.py): convolutions initialised with TF's VarianceScaling()
  (model.conv_init = "tf": fan-in, truncated normal, variance 1 / fan_in), and a projection shortcut (1x1 conv
  + BN) in the first block of every stage, stage 1 included, where torchvision's ResNet-18/34 has the identity
  (model.project_first_block; ResNet-50 and deeper are the same either way). tests/test_lightly_parity.py
  (case simclr_v2_tf2) checks the cifar10 preset's step against that code's step transcribed in PyTorch.
- Fine-tuning starts from the head's first hidden layer: head.finetune_layer = 1 (ft_proj_selector = 1);
  simclr.finetune_features returns that representation. Linear evaluation and kNN still read the backbone.
- Bigger ResNets, with selective kernels (model.sk_ratio, ssl_jax/models/resnet.py: the official tf2
  SK_Conv2D with a ResNet-D stem and shortcuts; the released "sk1" models use 0.0625, bottleneck ResNets
  only). The paper's best is ResNet-152 3x SK (795M parameters; tests/test_models.py checks ours against
  the paper's counts). The imagenet preset keeps ResNet-50 (1x, no SK): the size every other imagenet
  preset of this library uses, trainable on one 8-GPU host, and where the paper finds the 3-layer head
  helps most. For the paper's biggest model:
      --config.model.name=resnet152 --config.model.width_multiplier=3 --config.model.sk_ratio=0.0625
- Not implemented: the MoCo-style memory buffer (64K, EMA 0.999), worth about 1% in the paper.

imagenet: the paper's pretraining recipe: batch 4096, 800 epochs, LARS with peak lr 0.1 x sqrt(B) (6.4 at
4096; the tf2 README's 0.075 x sqrt(B) is its 100-epoch default), linear warm-up over the first 5% of the
epochs (40), cosine decay, weight decay 1e-4, global BatchNorm, temperature 0.1, SimCLR's augmentation.
Both presets train on the official loss, the sum of the two directions (loss.scale = 2.0): with LARS that is
not a retuned learning rate (ssl_jax/methods/simclr.py).
cifar10: the official tf2 README's CIFAR-10 command, which already uses this 3-layer head (the tf2 default):
ResNet-18 (CIFAR stem), batch 512, LARS lr 1.0 x B/256, weight decay 1e-4, temperature 0.5, colour strength
0.5, no blur, 10 warm-up epochs; 200 epochs here instead of its 1000. To compare heads alone against
configs/simclr.py:cifar10, give it that preset's optimizer, initialisation and loss scale (lightly's):
--config.optim.name=sgd --config.optim.lr=0.12 --config.optim.weight_decay=5e-4 --config.optim.warmup_epochs=0
--config.optim.exclude_bias_and_norm=false --config.model.zero_init_residual=false
--config.model.conv_init=pytorch --config.model.project_first_block=false --config.optim.schedule_per_epoch=true
--config.loss.scale=1.0 --config.simclr.bn_per_view=true (tests/test_config.py checks that only the head
differs).
"""
import ml_collections

from ssl_jax import presets


def get_config(arg="cifar10"):
    """Returns the preset named `arg`: cifar10, imagenet or smoke."""
    c = presets.apply(presets.base("simclr"), arg)
    c.head = ml_collections.ConfigDict(dict(
        num_layers=3, hidden_dim=0, out_dim=128, use_bn=True, last_bn=True, last_bn_scale=True, finetune_layer=1,
        init_std=0.01))
    c.model.update(dict(conv_init="tf", project_first_block=True))  # the official tf2 ResNet (docstring)
    # chunk_size > 0: NT-Xent in blocks of that many columns, never the whole similarity matrix at once.
    # scale 2.0: the official tf2 loss, the sum of both directions (ssl_jax/methods/simclr.py).
    c.loss = ml_collections.ConfigDict(dict(temperature=0.5, chunk_size=0, scale=2.0))
    # BatchNorm over both views together, as the official code's one call on the concatenated views.
    c.simclr = ml_collections.ConfigDict(dict(bn_per_view=False))
    c.optim.update(dict(name="lars", lr=1.0, lr_scaling="linear", weight_decay=1e-4, warmup_epochs=10))
    if arg == "imagenet":
        c.num_epochs = 800
        c.loss.temperature = 0.1
        c.optim.update(dict(lr=0.1, lr_scaling="sqrt", warmup_epochs=40))
    elif arg == "smoke":
        c.head.out_dim = 16
        c.optim.update(dict(lr=0.1, lr_scaling="sqrt", warmup_epochs=1))
    return c
