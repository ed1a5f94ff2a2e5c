"""SimSiam (Chen & He, 2021): one shared encoder, a predictor, and a stop-gradient on the target branch.

Encoder: backbone -> projector (BatchNorm on every layer, the output BN without affine parameters; 3 layers
for ImageNet, 2 for CIFAR as in the paper). Predictor: a bottleneck MLP (2048 -> 512 -> 2048) with BN on its
hidden layer only. Loss: 0.5 D(p1, sg(z2)) + 0.5 D(p2, sg(z1)) with D the negative cosine similarity; the
stop-gradient is what prevents collapse. The predictor's parameters live under params["predictor"] so the
optimizer can keep its learning rate fixed (`optim.fixed_lr_prefixes=("model/predictor",)`), as the official
`--fix-pred-lr` does.

Checked against the official code (facebookresearch/simsiam, builder.py and main_simsiam.py): each view goes
through the encoder separately, so BatchNorm statistics are per view (ours: one pass over both views with
per-view statistics, models.ResNet.bn_groups, the same function); projector hidden layers are bias-free Linear
-> BN -> ReLU, its output Linear is bias-free and followed by BN(affine=False); the predictor is bias-free
Linear -> BN -> ReLU -> Linear with bias. There is no target network and no state outside the optimizer.
`config.projector.last_bn_affine=True` gives the output BN a scale and a bias (lightly's CIFAR-10 projector).
"""
import jax
import jax.numpy as jnp

from ssl_jax import augment, losses, models
from ssl_jax.methods import common

PARTS = ("backbone", "projector", "predictor")


def networks(config, axis_name=None, bn_groups=1):
    """Returns the flax modules {'backbone', 'projector', 'predictor'}; BN synchronized over `axis_name`, with
    `bn_groups` views per training batch (models.ResNet.bn_groups)."""
    bn_axis = common.bn_axis(config, axis_name)
    dtype = common.compute_dtype(config)
    backbone = common.backbone(config, axis_name, bn_groups=bn_groups)
    proj = config.projector
    affine = bool(proj.get("last_bn_affine", False))  # official: BatchNorm1d(affine=False); lightly's CIFAR: True
    projector = models.MLPHead(hidden_dims=(proj.hidden_dim,) * (proj.num_layers - 1), out_dim=proj.out_dim,
                               use_bn=True, last_bn=True, dtype=dtype, bn_axis_name=bn_axis,
                               last_bn_scale=affine, last_bn_bias=affine, bn_groups=bn_groups)
    predictor = models.MLPHead(hidden_dims=(config.predictor.hidden_dim,), out_dim=proj.out_dim, use_bn=True,
                               last_bn=False, dtype=dtype, bn_axis_name=bn_axis, bn_groups=bn_groups)
    return {"backbone": backbone, "projector": projector, "predictor": predictor}


def init(rng, config, sample_images):
    """Returns (params, batch_stats, extras) for backbone, projector and predictor; SimSiam has no extras."""
    nets = networks(config)
    k_backbone, k_projector, k_predictor = jax.random.split(rng, 3)
    size = config.augment.crop_size
    all_vars = {
        "backbone": nets["backbone"].init(k_backbone, jnp.zeros((2, size, size, sample_images.shape[-1])),
                                          train=False),
        "projector": nets["projector"].init(k_projector, jnp.zeros((2, feature_dim(config))), train=False),
        "predictor": nets["predictor"].init(k_predictor, jnp.zeros((2, config.projector.out_dim)), train=False),
    }
    params = {name: v["params"] for name, v in all_vars.items()}
    stats = {name: v.get("batch_stats", {}) for name, v in all_vars.items()}
    return params, stats, {}


def views(keys_Bx2, images, config):
    """Returns two independently augmented views of the uint8 batch, both with the config's recipe."""
    spec = augment.spec_from_config(config.augment)
    keys_1 = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, 1)
    keys_2 = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, 2)
    return augment.view_batch(keys_1, images, spec), augment.view_batch(keys_2, images, spec)


def forward(params, batch_stats, x, *, config, axis_name=None, bn_groups=1):
    """Returns ({'backbone': h_BxF, 'projector': z_BxD, 'predictor': p_BxD}, new BN statistics), train mode;
    x may be `bn_groups` views concatenated, each normalised with its own statistics."""
    nets = networks(config, axis_name, bn_groups)
    outputs, new_stats = {}, {}
    x = x.astype(common.compute_dtype(config))
    for name in PARTS:
        x, mutated = nets[name].apply({"params": params[name], "batch_stats": batch_stats[name]}, x, train=True,
                                      mutable=["batch_stats"])
        outputs[name], new_stats[name] = x, mutated.get("batch_stats", {})
    return outputs, new_stats


def symmetric_loss(p1, p2, z1, z2, axis_name=None):
    """Returns 0.5 D(p1, sg(z2)) + 0.5 D(p2, sg(z1)), D = negative cosine, averaged over the global batch."""
    # The stop-gradient on the target branch is SimSiam's whole mechanism: make it explicit here rather
    # than rely on the loss function's own.
    z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
    return 0.5 * losses.negative_cosine(p1, z2, axis_name) + 0.5 * losses.negative_cosine(p2, z1, axis_name)


def embed(params, batch_stats, extras, views, rng, progress, *, config, axis_name):
    """Returns ({"p1", "p2": predictions, "z1", "z2": projections, "features"}, (new BN statistics, {}))."""
    del extras, rng, progress
    # One pass over both views, BatchNorm statistics per view: exactly the official two calls.
    out, stats = forward(params, batch_stats, jnp.concatenate(views), config=config, axis_name=axis_name,
                         bn_groups=2)
    out_1, out_2 = common.split_views(out, 2)
    emb = {"p1": out_1["predictor"], "p2": out_2["predictor"], "z1": out_1["projector"], "z2": out_2["projector"],
           "features": jax.lax.stop_gradient(out_1["backbone"]).astype(jnp.float32)}
    return emb, (stats, {})


def embedding_loss(params, emb, side, extras, rng, progress, *, config, axis_name):
    """Returns the symmetrised negative-cosine loss (global batch mean), metrics and aux."""
    del params, side, extras, rng, progress, config
    value = symmetric_loss(emb["p1"], emb["p2"], emb["z1"], emb["z2"], axis_name)
    return value, ({}, {"features": emb["features"], "embeddings": emb["z1"]})


loss = common.composed_loss(embed, embedding_loss)


feature_dim = common.feature_dim
encode = common.encode
update_extras = common.keep_extras
