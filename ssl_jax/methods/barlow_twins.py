"""Barlow Twins (Zbontar et al., 2021): the cross-correlation of two views' embeddings driven to the identity.

Follows the final official main.py (facebookresearch/barlowtwins); the method contract is the one in simclr.py.
- Projector: (Dense -> BN -> ReLU) x (num_layers - 1), then Dense; 8192-8192-8192 for ImageNet. The official
  last Linear has no bias and ours has one (models.MLPHead); it is cancelled exactly by the standardisation
  in the loss, so its gradient is zero and it keeps its initial values.
- BatchNorm normalises each view with that view's (global-batch) statistics, and the running statistics are
  updated twice per step, view 1 then view 2, as the official forward's two calls do; ours is one pass over
  both views with per-view statistics (models.ResNet.bn_groups), the same function. (SimCLR's official code
  pools the two views' statistics: simclr.bn_per_view = False.)
- Loss: losses.barlow_twins, whose standardisation and cross-correlation are sums over every replica
  (the official affine-free SyncBatchNorm and all_reduce of c). No loss scale: the final main.py dropped
  `--scale-loss 0.024` and folded it into the bias/BN learning rate, 0.0048 = 0.2 x 0.024. That is our
  `optim.bias_lr_factor`. The weights' LARS step is normalised by the trust ratio, so the scale only moves
  weight decay relative to the gradient there (the final main.py keeps the same weight decay without it).
  One official quirk is not copied: its `all_reduce(c)` carries no gradient, so each GPU backpropagates the
  global loss through its own share of c only, and DDP then averages over the W GPUs: every step takes 1/W
  of the exact gradient, which ours is. The official run on W GPUs is ours with weight decay x W and
  bias_lr_factor / W (under LARS a gradient 1/W as large is the same as weight decay x W; biases and BatchNorm
  are outside LARS and take the raw step).
- Views: asymmetric, BYOL's recipe as the official Transform: blur with p = 1.0 / 0.1 and solarisation with
  p = 0.0 / 0.2 for view 1 / view 2. config.augment describes view 1; config.barlow_twins.view2_blur_p and
  view2_solarize_p are where view 2 differs (the convention of methods/byol.py).
- No target network, no extras.
"""
import dataclasses

import jax
import jax.numpy as jnp

from ssl_jax import augment, losses, models
from ssl_jax.methods import common


def networks(config, axis_name=None, bn_groups=1):
    """Returns (backbone, projector) flax modules; BatchNorm is synchronized over `axis_name` when sync_bn,
    with `bn_groups` views per training batch (models.ResNet.bn_groups)."""
    bn_axis = common.bn_axis(config, axis_name)
    backbone = common.backbone(config, axis_name, bn_groups=bn_groups)
    projector = models.MLPHead(
        hidden_dims=(common.head_hidden_dim(config),) * (config.head.num_layers - 1), out_dim=config.head.out_dim,
        use_bn=True, last_bn=False, dtype=common.compute_dtype(config), bn_axis_name=bn_axis, bn_groups=bn_groups)
    return backbone, projector


def init(rng, config, sample_images):
    """Returns (params, batch_stats, extras) for a backbone and projector; Barlow Twins has no extras."""
    backbone, projector = networks(config)
    k_backbone, k_head = jax.random.split(rng)
    x = jnp.zeros((2, config.augment.crop_size, config.augment.crop_size, sample_images.shape[-1]), jnp.float32)
    b_vars = backbone.init(k_backbone, x, train=False)
    h_vars = projector.init(k_head, jnp.zeros((2, feature_dim(config)), jnp.float32), train=False)
    params = {"backbone": b_vars["params"], "head": h_vars["params"]}
    batch_stats = {"backbone": b_vars.get("batch_stats", {}), "head": h_vars.get("batch_stats", {})}
    return params, batch_stats, {}


def view_specs(config):
    """Returns (spec_1, spec_2): config.augment, and the same with barlow_twins.view2_blur_p / view2_solarize_p."""
    spec_1 = augment.spec_from_config(config.augment)
    spec_2 = dataclasses.replace(spec_1, blur_p=config.barlow_twins.view2_blur_p,
                                 solarize_p=config.barlow_twins.view2_solarize_p)
    return spec_1, spec_2


def views(keys_Bx2, images, config):
    """Returns the two asymmetric views of the uint8 batch (view_specs), each from its own per-example keys."""
    spec_1, spec_2 = view_specs(config)
    keys_1 = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, 1)
    keys_2 = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, 2)
    return augment.view_batch(keys_1, images, spec_1), augment.view_batch(keys_2, images, spec_2)


def embed(params, batch_stats, extras, views, rng, progress, *, config, axis_name):
    """Returns ({"z1", "z2": the views' projections, "features"}, (new BatchNorm statistics, {}))."""
    del extras, rng, progress
    # One pass over both views with per-view BatchNorm statistics and running statistics updated view 1
    # then view 2: the function torch's two forward calls compute.
    backbone, projector = networks(config, axis_name, bn_groups=2)
    h, z, stats = common.train_forward(backbone, projector, params, batch_stats,
                                       jnp.concatenate(views).astype(common.compute_dtype(config)))
    (h1, z1), (_, z2) = common.split_views((h, z), 2)
    return {"z1": z1, "z2": z2, "features": jax.lax.stop_gradient(h1).astype(jnp.float32)}, (stats, {})


def embedding_loss(params, emb, side, extras, rng, progress, *, config, axis_name):
    """Returns the Barlow Twins loss of the two views' embeddings over the global batch, metrics and aux."""
    del params, side, extras, rng, progress
    # c is summed over all replicas inside, so the value is the same on every device: the global loss.
    value = losses.barlow_twins(emb["z1"], emb["z2"], config.loss.lambd, axis_name=axis_name)
    return value, ({}, {"features": emb["features"], "embeddings": emb["z1"]})


loss = common.composed_loss(embed, embedding_loss)


feature_dim = common.feature_dim
encode = common.encode
update_extras = common.keep_extras
