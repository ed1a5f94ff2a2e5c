"""SimCLR (Chen et al., 2020): two augmented views, a projection head, NT-Xent over the global batch.

The method contract (shared by every file in methods/; the trainer never branches on a method's name):
  init(rng, config, sample_images) -> (params, batch_stats, extras)
  feature_dim(config) -> int (the width of encode's features)
  views(keys_Bx2, images_uint8, config) -> tuple of view batches
  loss(params, batch_stats, extras, views, rng, progress, *, config, axis_name)
      -> (loss, (batch_stats, metrics, aux)); the loss is identical on every device: the loss of the global
      batch (README.md, "Adding a method").
      aux["features"]: backbone features of the first view (the trainer's online probe reads them);
      aux["embeddings"]: the embeddings the loss compares (the trainer's collapse monitor reads them).
      progress: {"step": int32 scalar, "steps_per_epoch": int, "total_steps": int}.
  update_extras(params, extras, aux, progress, config) -> extras
  encode(params, batch_stats, images, config) -> features_BxD (backbone representation, eval mode)
  project_params(params, progress, config) -> params (optional; applied after each update, as SwAV's
      renormalised prototypes)
Every method writes `loss` as two parts, `loss = common.composed_loss(embed, embedding_loss)`, so that the
trainer can accumulate gradients exactly (ssl_jax/accumulate.py, config.grad_accum_steps):
  embed(params, batch_stats, extras, views, rng, progress, *, config, axis_name) -> (emb, (batch_stats, side))
      emb: dict of per-example arrays, leading axis = this device's B rows in batch order (the networks'
      outputs, with gradient where the loss needs it); side: running statistics outside batch_stats
      (MoCo's key encoder), {} if none. BatchNorm statistics come from the rows embed is given.
  embedding_loss(params, emb, side, extras, rng, progress, *, config, axis_name) -> (loss, (metrics, aux))
      the loss of the whole batch from its embeddings (collectives over axis_name); params are only read
      (they arrive under stop_gradient), all gradient flows through emb.

SimCLR v2 (Chen et al., 2020b) is this file with configs/simclr_v2.py: a deeper head (3 layers, every hidden
layer as wide as the backbone output: head.hidden_dim = 0, BatchNorm on every layer including the output:
head.last_bn), bigger ResNets up to ResNet-152 3x with selective kernels (model.sk_ratio, ssl_jax/models/
resnet.py), and fine-tuning from the head's first hidden layer (head.finetune_layer = 1, the official code's
ft_proj_selector; see finetune_features). Not implemented: the MoCo-style memory buffer (the paper credits it
with about 1%).
"""
import jax
import jax.numpy as jnp

from ssl_jax import augment, losses, models
from ssl_jax.methods import common


def networks(config, axis_name=None, bn_groups=1):
    """Returns (backbone, head) flax modules; BatchNorm is synchronized over `axis_name` when sync_bn, and
    takes `bn_groups` views per training batch (models.ResNet.bn_groups)."""
    bn_axis = common.bn_axis(config, axis_name)
    backbone = common.backbone(config, axis_name, bn_groups=bn_groups)
    head = models.MLPHead(
        hidden_dims=(common.head_hidden_dim(config),) * (config.head.num_layers - 1), out_dim=config.head.out_dim,
        use_bn=config.head.use_bn, last_bn=config.head.last_bn,
        last_bn_scale=config.head.get("last_bn_scale", False), dtype=common.compute_dtype(config),
        bn_axis_name=bn_axis, bn_groups=bn_groups, kernel_init_std=config.head.get("init_std", 0.0))
    return backbone, head


def bn_per_view(config):
    """Returns simclr.bn_per_view: BatchNorm statistics per view (True) or over both views together (False)."""
    return bool(config.get("simclr", {}).get("bn_per_view", False))


def init(rng, config, sample_images):
    """Returns (params, batch_stats, extras) for a backbone and projection head; SimCLR has no extras."""
    finetune_layer(config)  # a bad layer is an error at the start of training, not at fine-tuning
    backbone, head = networks(config)
    k_backbone, k_head = jax.random.split(rng)
    x = jnp.zeros((2, config.augment.crop_size, config.augment.crop_size, sample_images.shape[-1]), jnp.float32)
    b_vars = backbone.init(k_backbone, x, train=False)
    h_vars = head.init(k_head, jnp.zeros((2, feature_dim(config)), jnp.float32), train=False)
    params = {"backbone": b_vars["params"], "head": h_vars["params"]}
    batch_stats = {"backbone": b_vars.get("batch_stats", {}), "head": h_vars.get("batch_stats", {})}
    return params, batch_stats, {}


def views(keys_Bx2, images, config):
    """Returns two independently augmented views of the uint8 batch, both with the config's recipe."""
    spec = augment.spec_from_config(config.augment)
    keys_1 = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, 1)
    keys_2 = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, 2)
    return augment.view_batch(keys_1, images, spec), augment.view_batch(keys_2, images, spec)


def embed(params, batch_stats, extras, views, rng, progress, *, config, axis_name):
    """Returns ({"z1", "z2": projections B x d, "features": first view's backbone features}, (stats, {}))."""
    del extras, rng, progress
    # Both views in one pass. The official SimCLR code takes BatchNorm statistics over all 2B images
    # (simclr.bn_per_view = False); PyTorch code that calls the network once per view (lightly's benchmark,
    # solo-learn) takes them per view: bn_per_view = True gives exactly that, still in one pass.
    backbone, head = networks(config, axis_name, bn_groups=2 if bn_per_view(config) else 1)
    x = jnp.concatenate(views, axis=0).astype(common.compute_dtype(config))
    h, z, new_stats = common.train_forward(backbone, head, params, batch_stats, x)
    (h1, z1), (_, z2) = common.split_views((h, z), 2)
    emb = {"z1": z1, "z2": z2, "features": jax.lax.stop_gradient(h1).astype(jnp.float32)}
    return emb, (new_stats, {})


def embedding_loss(params, emb, side, extras, rng, progress, *, config, axis_name):
    """Returns NT-Xent of the two views' projections over the global batch (times loss.scale), metrics and aux.

    nt_xent is the mean over both directions; the official SimCLR code (v1 and v2, objective.py) trains on
    loss_a + loss_b, their sum: loss.scale = 2.0 (the presets that follow it). With LARS the two are not
    interchangeable by retuning: the trust ratio undoes the scale on adapted kernels, except against weight
    decay (the sum at wd acts as the mean at wd / 2), and biases and BatchNorm parameters, neither adapted
    nor decayed, step twice as far.
    """
    del params, side, extras, rng, progress
    z1, z2 = emb["z1"], emb["z2"]
    value = config.loss.get("scale", 1.0) * losses.nt_xent(z1, z2, config.loss.temperature, axis_name=axis_name,
                                                           chunk_size=config.loss.get("chunk_size", 0))
    metrics = {"contrastive_acc": losses.contrastive_accuracy(z1, z2, axis_name=axis_name)}
    return value, (metrics, {"features": emb["features"], "embeddings": z1})


loss = common.composed_loss(embed, embedding_loss)


def finetune_layer(config):
    """Returns head.finetune_layer (0 when the config has none), checked against the head's hidden layers."""
    layer = config.head.get("finetune_layer", 0)
    if not 0 <= layer <= config.head.num_layers - 1:
        raise ValueError(f"head.finetune_layer={layer}: choose 0 (backbone) or a hidden layer of the head, "
                         f"1..{config.head.num_layers - 1}")
    return layer


def finetune_features(params, batch_stats, images, config):
    """Returns the float32 features_BxD fine-tuning starts from, BatchNorm in inference mode.

    head.finetune_layer = 0 (the default): the backbone features, as `encode`. k >= 1: the k-th hidden
    activation of the head (Dense -> BN -> ReLU), as SimCLR v2's ft_proj_selector = k.
    """
    layer = finetune_layer(config)
    features = encode(params, batch_stats, images, config)
    if layer == 0:
        return features
    _, head = networks(config)
    _, hidden = head.apply({"params": params["head"], "batch_stats": batch_stats["head"]},
                           features, train=False, return_hidden=True)
    return hidden[layer - 1]


feature_dim = common.feature_dim
encode = common.encode
update_extras = common.keep_extras
